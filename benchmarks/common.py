"""Shared pieces of the benchmark scripts: timing, the machine's measured matmul peak and the
model FLOPs a training token costs."""

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


def model_flops_per_token(cfg, seq_len: float) -> float:
    """Model FLOPs of one token's forward and backward pass (the PaLM appendix's count: 6 per
    matmul parameter, the vocabulary projection included, plus 12 * layers * heads * head_dim *
    seq_len for attention; recomputation is not counted)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * d \
        + 3 * d * f
    matmul_params = cfg.num_layers * per_layer + cfg.vocab_size * d
    attention = 12 * cfg.num_layers * cfg.num_heads * hd * seq_len
    return 6 * matmul_params + attention
