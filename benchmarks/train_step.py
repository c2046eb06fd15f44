r"""Train-step throughput and model-FLOP utilisation (MFU) of a Qwen2-shaped 20-50M model.

    python benchmarks/train_step.py [--batch_size=8 --seq_len=256]

Builds a random Qwen2-shaped model (default: hidden 512, 8 layers, 8 query / 2 key-value heads,
SwiGLU 1408, vocab 32768, tied embeddings: ~39M parameters), runs the jitted train step (forward,
backward, AdamW update; token-mean NLL on every position) on sequences of ``--seq_len`` tokens,
and prints tokens/s and MFU = achieved model FLOP/s / the float32 matmul peak measured in the same
run. ``--remat`` is the RL loop's activation-recomputation setting (default: its default); the
recomputed elementwise ops are not counted as model FLOPs. Model FLOPs per token follow the PaLM
appendix-B convention: 6 * (matmul parameters, LM head included) + 12 * layers * heads * head_dim
* seq_len (attention scores and values; the causal half is counted in full, as is customary).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.common import matmul_peak_flops, model_flops_per_token  # noqa: E402
from offpolicy_jax import losses, models
from offpolicy_jax.training import loop, optim, rollout, state as state_lib, step as step_lib

BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
HIDDEN = flags.DEFINE_integer("hidden_size", 512, "Model width.")
LAYERS = flags.DEFINE_integer("num_layers", 8, "Layers.")
VOCAB = flags.DEFINE_integer("vocab_size", 32768, "Vocabulary.")
STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
MICROBATCHES = flags.DEFINE_integer("num_microbatches", 1, "Gradient accumulation.")
REMAT = flags.DEFINE_string("remat", rollout.DEFAULT_REMAT, "Activation recomputation, as the RL "
                            "loop's --remat: 'none', 'full' or a jax.checkpoint_policies name.")


def main(argv):
    del argv
    cfg = models.ModelConfig(
        model_type="qwen2", vocab_size=VOCAB.value, hidden_size=HIDDEN.value,
        intermediate_size=int(HIDDEN.value * 2.75), num_layers=LAYERS.value, num_heads=8,
        num_kv_heads=2, tie_word_embeddings=True, qkv_bias=True)
    params = models.init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.float32)
    batch_size, seq_len = BATCH_SIZE.value, SEQ_LEN.value
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, seq_len))
    batch = {
        "tokens": tokens.astype(np.int32),
        "attention_mask": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
        "mask": np.ones((batch_size, seq_len - 1), np.float32),
    }

    def loss_fn(params, batch, rng):
        del rng
        logp = rollout.response_log_probs(cfg, params, batch["tokens"], batch["attention_mask"],
                                          batch["positions"], num_response=seq_len - 1,
                                          remat=loop.remat_policy(REMAT.value))["logp"]
        return losses.nll(logp, batch["mask"])

    optimizer = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=1e-4))
    state = state_lib.create_train_state(params, optimizer, rng=0)
    train_step = step_lib.make_train_step(loss_fn, optimizer,
                                          num_microbatches=MICROBATCHES.value)
    state, metrics = train_step(state, batch)  # compile + warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(STEPS.value):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    tokens_per_s = batch_size * seq_len / step_s
    achieved = tokens_per_s * model_flops_per_token(cfg, seq_len)
    peak = matmul_peak_flops()
    print(f"model: {cfg.num_params() / 1e6:.1f}M parameters, batch {batch_size} x {seq_len} "
          f"tokens, remat {REMAT.value}, devices: {jax.devices()[0].platform} x "
          f"{jax.device_count()}")
    print(f"train step: {step_s * 1e3:.1f} ms median over {STEPS.value} steps, "
          f"{tokens_per_s:,.0f} tokens/s, loss {float(metrics['loss']):.3f}")
    print(f"model FLOP/s: {achieved / 1e9:.1f} GFLOP/s; float32 matmul peak measured now: "
          f"{peak / 1e9:.1f} GFLOP/s; MFU: {achieved / peak:.1%}")


if __name__ == "__main__":
    app.run(main)
