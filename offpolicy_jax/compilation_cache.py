"""JAX's persistent compilation cache, on by default for runs: compile once per machine.

A run's first iteration compiles the sampler, the forward passes and the train step; without a
persistent cache every run (and every resume) pays that again. With it, XLA executables are
written under the package's cache directory (``$OFFPOLICY_JAX_CACHE``, default
``~/.cache/offpolicy_jax``) and reused by any later process on this machine that compiles the same
program with the same shapes, flags and JAX version (the cache key covers all of them, so a
cached executable is the one XLA would build: results are unchanged). Only compilations that
took at least JAX's threshold (1 s by default) are stored. The cache is bounded
(:data:`MAX_BYTES`, least recently used entries evicted first), which also makes JAX take a file
lock around every read and write, so concurrent runs (two comparison runs, test workers) never
read a half-written entry.
"""

from __future__ import annotations

import os

import jax

from offpolicy_jax import tiny_arith


MAX_BYTES = 4 << 30


def default_directory() -> str:
    return os.path.join(tiny_arith.default_cache_dir(), "jax_compilation_cache")


def enable(directory: str | None = None) -> str | None:
    """Points JAX's persistent compilation cache at ``directory`` (None: ``$JAX_COMPILATION_CACHE_DIR``
    if set, else :func:`default_directory`; an empty string leaves the cache off) and returns the
    directory in use.

    Call it before the process compiles anything: JAX decides once per process, at its first
    compilation, whether a cache is in use.
    """
    if directory == "":
        return None
    # A directory the user already gave JAX ($JAX_COMPILATION_CACHE_DIR) is kept.
    directory = directory or jax.config.jax_compilation_cache_dir or default_directory()
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--compilation_cache={directory}: cannot create the directory ({e}); "
                         f"pass another one, or --compilation_cache= to turn the cache off") from e
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
