"""The persistent compilation cache: a second process reuses the first one's executable (and
computes the same numbers); an empty directory flag leaves it off; a bad directory is named."""

import os
import pathlib
import subprocess
import sys

import pytest

from offpolicy_jax import compilation_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A program that takes well over JAX's 1 s threshold to compile on one CPU core would make the
# test slow; the threshold is lowered to 0 in the child instead, and the program kept small.
CHILD = """
import sys, jax, jax.numpy as jnp
from offpolicy_jax import compilation_cache
print(compilation_cache.enable(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(repr(float(f(jnp.arange(64.0).reshape(8, 8) / 64))))
"""


def _child(directory: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, directory], capture_output=True,
                         text=True, env=env, timeout=120, check=True)
    return out.stdout.split()


def _entries(directory) -> set[str]:
    return {p.name for p in pathlib.Path(directory).iterdir() if p.name.endswith("-cache")}


def test_a_second_process_reuses_the_cached_executable(tmp_path):
    first = _child(str(tmp_path))
    assert first[0] == str(tmp_path)
    written = _entries(tmp_path)
    assert written, "the first process wrote no cache entry"
    mtimes = {name: (tmp_path / name).stat().st_mtime_ns for name in written}
    second = _child(str(tmp_path))
    assert second == first                                    # same result from the cache
    assert _entries(tmp_path) == written                      # nothing compiled anew
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in written} == mtimes


def test_empty_directory_leaves_the_cache_off_and_a_bad_one_is_named(tmp_path):
    assert compilation_cache.enable("") is None
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="--compilation_cache=.*file/cache"):
        compilation_cache.enable(str(blocker / "cache"))
    assert compilation_cache.default_directory().endswith("jax_compilation_cache")
