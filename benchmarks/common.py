"""Shared pieces of the benchmark scripts: timing and the machine's measured matmul peak."""

import time

import jax
import jax.numpy as jnp


def time_call(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time (s) of ``fn(*args)`` over ``repeats`` runs after ``warmup`` runs; the result
    is blocked on, so asynchronous dispatch does not hide work."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device, measured now (the achievable peak
    that model FLOP utilisation is reported against, on this machine, in this process)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    b = jax.random.normal(key_b, (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    seconds = time_call(matmul, a, b, repeats=repeats)
    return 2.0 * size ** 3 / seconds
