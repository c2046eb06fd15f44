"""Supervised fine-tuning on (prompt, completion) pairs: the warm start of the embedded default and
the M-step of expert iteration. Loss: mean NLL of the completion tokens (prompt tokens excluded)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from offpolicy_jax import losses
from offpolicy_jax.training import optim, rollout, state as state_lib, step as step_lib


def encode_examples(tokenizer, examples, *, eos_id: int):
    """``(prompt ids, completion ids + EOS)`` per example."""
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p, _ in examples]
    completions = [tokenizer.encode(c, add_special_tokens=False) + [eos_id] for _, c in examples]
    return prompts, completions


def pack_examples(prompts, completions, *, pad_id: int, completion_bucket: int,
                  prompt_bucket: int) -> dict:
    """A packed SFT batch (same layout as an RL batch; ``mask`` covers the completion)."""
    too_long = [len(c) for c in completions if len(c) > completion_bucket]
    if too_long:
        raise ValueError(f"a completion has {max(too_long)} tokens, more than the completion "
                         f"budget {completion_bucket}")
    response = np.full((len(completions), completion_bucket), pad_id, np.int32)
    for row, completion in enumerate(completions):
        response[row, :len(completion)] = completion
    lengths = np.array([len(c) for c in completions], np.int32)
    packed = rollout.pack_sequences(prompts, response, lengths, pad_id=pad_id,
                                    prompt_bucket=prompt_bucket)
    return packed.model_inputs()


def make_sft_loss(cfg, num_response: int, *, remat: bool | str = rollout.DEFAULT_REMAT):
    """``(params, batch, rng) -> (loss, metrics)``: token-mean NLL of the completions."""

    def loss_fn(params, batch, rng):
        del rng
        logp = rollout.response_log_probs(
            cfg, params, batch["tokens"], batch["attention_mask"], batch["positions"],
            num_response=num_response, remat=remat)["logp"]
        return losses.nll(logp, batch["mask"])

    return loss_fn


def train_sft(cfg, params, tokenizer, examples, *, steps: int, batch_size: int,
              learning_rate: float, seed: int = 0, eos_id: int, pad_id: int,
              warmup_steps: int = 0, log_every: int = 0, log_fn=print):
    """Fine-tunes ``params`` on ``examples`` (list of ``(prompt, completion)``) with AdamW and a
    cosine schedule; returns ``(params, per-step losses, skipped updates)`` (an update whose loss
    or gradient is not finite leaves the parameters unchanged and is counted)."""
    prompts, completions = encode_examples(tokenizer, examples, eos_id=eos_id)
    # One fixed shape for the whole run (one compile), rounded up to a multiple of 16 rather than
    # a power of two: padding is pure waste in every step.
    completion_bucket = -(-max(len(c) for c in completions) // 16) * 16
    prompt_bucket = -(-max(len(p) for p in prompts) // 16) * 16
    config = optim.OptimizerConfig(name="adamw", learning_rate=learning_rate, schedule="cosine",
                                   warmup_steps=warmup_steps, total_steps=steps,
                                   end_lr_fraction=0.1, weight_decay=0.0)
    optimizer = optim.make_optimizer(config)
    state = state_lib.create_train_state(params, optimizer, rng=seed)
    train_step = step_lib.make_train_step(make_sft_loss(cfg, completion_bucket), optimizer)
    rng = np.random.default_rng(seed)
    history = []
    for step in range(steps):
        rows = rng.choice(len(examples), size=batch_size, replace=False)
        batch = pack_examples([prompts[i] for i in rows], [completions[i] for i in rows],
                              pad_id=pad_id, completion_bucket=completion_bucket,
                              prompt_bucket=prompt_bucket)
        state, metrics = train_step(state, batch)
        history.append(float(metrics["loss"]))
        if log_every and (step + 1) % log_every == 0:
            log_fn(f"sft step {step + 1}/{steps}: loss {np.mean(history[-log_every:]):.4f}")
    return jax.device_get(state.params), history, int(state.skipped_steps)


# ---------------------------------------------------------------------------------------------
# Perplexity-band filtering of expert-iteration data (BFS-Prover-V2, arXiv 2509.06493).


def completion_perplexities(cfg, params, tokenizer, examples, *, eos_id: int, pad_id: int,
                            batch_size: int = 64) -> np.ndarray:
    """[len(examples)] perplexity of each completion (EOS included) under ``params`` at
    temperature 1: ``exp(-mean_t log p(y_t | x, y_<t))`` over the completion's tokens."""
    if not examples:
        return np.zeros((0,), np.float64)
    prompts, completions = encode_examples(tokenizer, examples, eos_id=eos_id)
    completion_bucket = -(-max(len(c) for c in completions) // 16) * 16
    prompt_bucket = -(-max(len(p) for p in prompts) // 16) * 16

    @jax.jit
    def mean_nll(params, batch):
        logp = rollout.response_log_probs(
            cfg, params, batch["tokens"], batch["attention_mask"], batch["positions"],
            num_response=completion_bucket)["logp"]
        mask = batch["mask"].astype(jnp.float32)
        return -(logp * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)

    result = []
    for start in range(0, len(examples), batch_size):
        rows = list(range(start, min(start + batch_size, len(examples))))
        # Pad the last batch to the full size with copies of its first row: one compiled shape.
        padded = rows + [rows[0]] * (batch_size - len(rows))
        batch = pack_examples([prompts[i] for i in padded], [completions[i] for i in padded],
                              pad_id=pad_id, completion_bucket=completion_bucket,
                              prompt_bucket=prompt_bucket)
        result.append(np.asarray(mean_nll(params, batch))[:len(rows)])
    return np.exp(np.concatenate(result).astype(np.float64))


def perplexity_band(perplexities: np.ndarray, low_quantile: float, high_quantile: float
                    ) -> tuple[np.ndarray, float, float]:
    """Which samples lie in the band between two quantiles of their perplexities (both bounds
    inclusive): BFS-Prover-V2 drops the low-perplexity tail (samples the model already finds
    trivial) and the high-perplexity tail (noisy ones) and trains on the middle.

    Args:
      perplexities: [N] one per kept sample.
      low_quantile, high_quantile: 0 <= low <= high <= 1; (0, 1) keeps everything.
    Returns:
      ``(keep [N] bool, low bound, high bound)``, the bounds being the perplexity quantiles
      (``numpy.quantile``, linear interpolation).
    """
    perplexities = np.asarray(perplexities, np.float64)
    if not 0.0 <= low_quantile <= high_quantile <= 1.0:
        raise ValueError(f"need 0 <= low_quantile ({low_quantile}) <= high_quantile "
                         f"({high_quantile}) <= 1")
    if perplexities.size == 0:
        return np.zeros((0,), bool), math.nan, math.nan
    low, high = np.quantile(perplexities, [low_quantile, high_quantile])
    return (perplexities >= low) & (perplexities <= high), float(low), float(high)
