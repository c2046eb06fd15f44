r"""Rollout corrections: per-token weights from the gap between the trainer's policy and the policy
that sampled the tokens, usable with any objective.

The full importance ratio factorises as ``π_θ/π_beh = (π_old/π_beh)·(π_θ/π_old)``: the sampler
mismatch or staleness ``δ_t = logp_old[t] − logp_beh[t]`` times what the update itself moves. An
objective such as PPO handles the second factor; these estimators handle the first, as verl,
NeMo-RL, SkyRL and AReaL do (``shared/ALGORITHMS.md`` §9.4):

    tis       w_t = min(exp δ_t, C)                                 truncated IS, token (C = 2)
    seq_tis   w_i = min(exp Σ_t m δ_t, C), every token of row i     truncated IS, sequence (C = 2)
    mis       w_t = exp δ_t · 1[lo ≤ exp δ_t ≤ C]                   masked IS, token ([0, 2])
    seq_mis   w_i = ρ_i · 1[lo ≤ ρ_i ≤ C],  ρ_i = exp Σ_t m δ_t      masked IS, sequence ([0.5, 2],
                                                                     verl's seq-is-rs)
    geo_mask  w_i = 1[lo ≤ exp(Σ_t m δ_t / L_i) ≤ hi]               geometric sequence mask
                                                                     ([0.999, 1.001], verl)
    icepop    w_t = exp δ_t · 1[α ≤ exp δ_t ≤ β]                    two-sided token mask keeping
                                                                     the weight ([0.5, 5], Ring-1T)

How the weights enter (one place for every objective, :func:`scale_gradient`): the trainer scales
the gradient that reaches the current policy's per-token outputs (``logp``, and ``vocab_mean`` /
``entropy`` when a loss uses them) by ``w_t``. For any loss whose token-t term depends on the
policy only through token t's outputs — every per-token objective, and GSPO's length-normalised
sequence ratio — that gradient equals the gradient of the loss with each token's term multiplied
by ``w_t`` after the clip, which is how verl applies them; the loss value and the aggregation's
denominators are unchanged (a rejected token stays in the token count, AReaL's convention; §9.4
pitfall a), and the KL and entropy terms are weighted too. The critic's values are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common

# Mode -> default (low, high) bounds on the weight (low unused by the truncations).
CORRECTIONS = {
    "none": (None, None),
    "tis": (None, 2.0),
    "seq_tis": (None, 2.0),
    "mis": (0.0, 2.0),
    "seq_mis": (0.5, 2.0),
    "geo_mask": (0.999, 1.001),
    "icepop": (0.5, 5.0),
}


def correction_bounds(mode: str, low: float | None = None, high: float | None = None
                      ) -> tuple[float | None, float | None]:
    """The ``(low, high)`` a mode uses: the given ones, else its defaults; checked."""
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; expected one of "
                         f"{sorted(CORRECTIONS)}")
    default_low, default_high = CORRECTIONS[mode]
    low = default_low if low is None else low
    high = default_high if high is None else high
    if mode in ("tis", "seq_tis"):
        if high <= 0:
            raise ValueError(f"rollout correction {mode}: the truncation C must be > 0, got "
                             f"{high}")
    elif mode != "none" and not 0.0 <= low <= high:
        raise ValueError(f"rollout correction {mode}: need 0 <= low <= high, got low={low}, "
                         f"high={high}")
    return low, high


def rollout_correction(old_logp, behaviour_logp, mask, mode: str, *, low: float | None = None,
                       high: float | None = None) -> tuple[jax.Array, dict]:
    """Per-token correction weights ``[B, T]`` (0 on masked tokens) and their diagnostics.

    Args:
      old_logp: [B, T] log π_old, the trainer's policy before the update (constant).
      behaviour_logp: [B, T] log π_beh returned by the sampler with the tokens.
      mask: [B, T] response mask.
      mode: a key of :data:`CORRECTIONS` ("none" gives weight 1 on every response token).
      low, high: bounds on the weight (see the module docstring); None: the mode's default.

    Returns: ``(weights, metrics)`` with ``weight_mean/min/max`` over response tokens,
    ``masked_fraction`` (response tokens with weight 0), ``mismatch_kl`` (k3 estimate of
    KL(π_beh ‖ π_old) per token) and ``seq_log_ratio_std`` (the spread over rows of the mean
    per-token log-ratio, the geometric mask's statistic).
    """
    low, high = correction_bounds(mode, low, high)
    common.check_token_arrays(old_logp=old_logp, behaviour_logp=behaviour_logp, mask=mask)
    mask = common.as_mask(mask)
    # Bounded before exp (§9.4 pitfall c): an extreme gap must not make the weights non-finite.
    delta = jnp.clip(common.masked_zero(old_logp, mask) - common.masked_zero(behaviour_logp, mask),
                     -common.LOG_RATIO_BOUND, common.LOG_RATIO_BOUND)
    lengths = jnp.sum(mask, axis=-1, keepdims=True)                     # [B, 1]
    seq_log_ratio = jnp.sum(delta, axis=-1, keepdims=True)              # [B, 1]
    seq_mean_log_ratio = common.safe_divide(seq_log_ratio, lengths)     # [B, 1]
    token_ratio = jnp.exp(delta)
    seq_ratio = jnp.broadcast_to(jnp.exp(seq_log_ratio), delta.shape)

    if mode == "none":
        weights = jnp.ones_like(delta)
    elif mode == "tis":
        weights = jnp.minimum(token_ratio, high)
    elif mode == "seq_tis":
        weights = jnp.minimum(seq_ratio, high)
    elif mode in ("mis", "icepop"):
        weights = jnp.where((token_ratio >= low) & (token_ratio <= high), token_ratio, 0.0)
    elif mode == "seq_mis":
        weights = jnp.where((seq_ratio >= low) & (seq_ratio <= high), seq_ratio, 0.0)
    else:  # geo_mask
        geo = jnp.broadcast_to(jnp.exp(seq_mean_log_ratio), delta.shape)
        weights = ((geo >= low) & (geo <= high)).astype(jnp.float32)
    weights = jax.lax.stop_gradient(common.masked_zero(weights, mask))

    rows = (lengths[:, 0] > 0).astype(jnp.float32)
    row_mean = common.safe_divide(jnp.sum(seq_mean_log_ratio[:, 0] * rows), jnp.sum(rows))
    row_var = common.safe_divide(jnp.sum(jnp.square(seq_mean_log_ratio[:, 0] - row_mean) * rows),
                                 jnp.sum(rows))
    metrics = {
        "weight_mean": common.masked_mean(weights, mask),
        "weight_min": common.masked_min(weights, mask),
        "weight_max": common.masked_max(weights, mask),
        "masked_fraction": common.masked_mean(weights == 0, mask),
        "mismatch_kl": common.masked_mean(jnp.expm1(delta) - delta, mask),
        "seq_log_ratio_std": jnp.sqrt(row_var),
    }
    return weights, jax.tree.map(jax.lax.stop_gradient, metrics)


@jax.custom_vjp
def scale_gradient(x, weights):
    """``x`` unchanged; the gradient flowing back into ``x`` is multiplied by ``weights`` (a
    constant: no gradient reaches it). Exact in the forward pass, unlike ``w·x + sg((1−w)·x)``."""
    del weights
    return x


def _scale_gradient_fwd(x, weights):
    return x, weights


def _scale_gradient_bwd(weights, cotangent):
    return cotangent * weights, jnp.zeros_like(weights)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)
