"""REINFORCE and Tapered Off-Policy REINFORCE (TOPR)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common

RATIO_LEVELS = ("sequence", "sequence_geo_mean", "token")


def reinforce(logp, rewards, mask, *, baseline=0.0, agg: str = "seq-mean-token-mean",
              max_len: int | None = None) -> tuple[jax.Array, dict]:
    """REINFORCE with a baseline: ``ℓ_{i,t} = −(R_i − b_i) · logp_θ[i,t]``, aggregated.

        ∇loss = −agg_{i,t} (R_i − b_i) ∇log π_θ(y_{i,t} | s_{i,t})

    Williams 1992 ("Simple statistical gradient-following algorithms", Machine Learning 8); as the
    on-policy baseline of TOPR (Le Roux et al. 2025, https://arxiv.org/abs/2503.14286, Eq. 3, with
    the loss divided by the sequence length as in its §4.1 — hence the default aggregation
    ``seq-mean-token-mean``; use ``seq-mean-token-sum`` for the textbook ∇log π(y) = Σ_t ∇log π).
    ``R − b`` is a constant (stop-gradient). Off-policy samples are *not* corrected: this is the
    "naive REINFORCE" whose negative term is unbounded (TOPR Eq. 4).

    Args:
      logp: [B, T] log π_θ of the sampled tokens.
      rewards: [B] sequence rewards or [B, T] per-token returns.
      mask: [B, T] response mask.
      baseline: scalar, [B] or [B, T] baseline b (0 = none).
      agg, max_len: aggregation, see :func:`offpolicy_jax.losses.aggregate`.

    Returns: ``(loss, metrics)`` with ``pg_loss``, ``reward_mean``, ``advantage_mean`` (masked over
    tokens) and ``logp_mean``.
    """
    shape = common.check_token_arrays(logp=logp, mask=mask)
    mask = common.as_mask(mask)
    rewards = common.per_token("rewards", rewards, shape)
    advantage = jax.lax.stop_gradient(rewards - common.per_token("baseline", baseline, shape))
    advantage = common.masked_zero(advantage, mask)
    logp = common.masked_zero(logp, mask)
    loss = common.aggregate(-advantage * logp, mask, agg, max_len=max_len)
    metrics = {
        "pg_loss": loss,
        "reward_mean": common.masked_mean(rewards, mask),
        "advantage_mean": common.masked_mean(advantage, mask),
        "logp_mean": common.masked_mean(logp, mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _log_bounds(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    """``(a, b)`` with ``0 ≤ a ≤ b ≤ inf`` as ``(log a, log b)``; log 0 = −inf."""
    low, high = bounds
    if not 0.0 <= low <= high:
        raise ValueError(f"{name} must satisfy 0 <= a <= b, got {bounds}")
    return (-math.inf if low == 0 else math.log(low)), math.log(high)


def topr(logp, behaviour_logp, rewards, mask, *, baseline=0.0, ratio_level: str = "sequence",
         positive_bounds: tuple[float, float] = (1.0, 1.0),
         negative_bounds: tuple[float, float] = (0.0, 1.0),
         agg: str = "seq-mean-token-mean", max_len: int | None = None) -> tuple[jax.Array, dict]:
    """Tapered Off-Policy REINFORCE: SFT-like update on positives, truncated IS on negatives.

    Gradient (TOPR Eqs. 7–8), with ``[z]_a^b = min(max(z, a), b)`` and τ ~ μ (behaviour policy):

        ∇J = Σ_{R(τ)≥0} [π(τ)/μ(τ)]_{a⁺}^{b⁺} R(τ) ∇log π(τ)
           + Σ_{R(τ)<0} [π(τ)/μ(τ)]_{a⁻}^{b⁻} R(τ) ∇log π(τ)

    Canonical TOPR: a⁺ = b⁺ = 1 (positives: plain SFT), a⁻ = 0, b⁻ = 1 (negatives: truncated IS,
    so a negative's weight decays to 0 as π moves away from it and the objective stays bounded,
    Prop. 3.2). Surrogate loss per sequence i (ALGORITHMS.md §1.3):

        log w_i = Σ_t m_i[t] (logp_θ[i,t] − logp_μ[i,t])                 (trajectory log-ratio)
        α_i     = exp(clip(log w_i, log a, log b))  with (a, b) chosen by sign(R_i)
        ℓ_i     = −sg(α_i) · (R_i − c) · (1/L_i) Σ_t m_i[t] logp_θ[i,t]
        loss    = mean_i ℓ_i                                                (seq-mean-token-mean)

    Le Roux, Bellemare et al. 2025, "Tapered Off-Policy REINFORCE",
    https://arxiv.org/abs/2503.14286. Set membership uses the sign of R (not of R − c). The
    ratio is formed in log space, so the canonical weights are finite for any log-ratio.

    Args:
      logp: [B, T] log π_θ of the sampled tokens (differentiated).
      behaviour_logp: [B, T] log μ of the same tokens, stored at generation time.
      rewards: [B] trajectory rewards R (the paper: ±1).
      mask: [B, T] response mask.
      baseline: c, scalar or [B] (paper default 0; §4.3: c shifts the effective share of
        positives to p(1 − c) / (1 + c(1 − 2p))).
      ratio_level: "sequence" (the paper's π(τ)/μ(τ)), "sequence_geo_mean" (verl's length-normalised
        exp(mean_t log-ratio)) or "token" (per-token ratios, Trinity-RFT / ROLL).
      positive_bounds: (a⁺, b⁺). (1, 1) = TOPR; (0, 1) = TIS; (0, inf) = full IS (weights are
        capped at e^20 ≈ 4.85e8 so extreme log-ratios stay finite).
      negative_bounds: (a⁻, b⁻). (0, 1) = TOPR and TIS; (1, 1) = naive REINFORCE.
      agg, max_len: aggregation (paper: seq-mean-token-mean, i.e. the 1/L_i of §4.1).

    Returns: ``(loss, metrics)`` with ``pg_loss``, ``positive_fraction``, ``weight_mean/min/max``
    and ``negative_weight_mean/min/max`` (importance weights actually applied; per sequence, or per
    token for ``ratio_level="token"``), ``negative_truncated_fraction`` (negative weights cut by a⁻
    or b⁻), ``ratio_mean/min/max`` (the raw ratio π/μ at ``ratio_level`` before truncation, over
    all sequences or tokens; exponent bounded to ±20 so a max of ~4.85e8 means "at least"),
    ``log_ratio_mean`` (sequence log π/μ) and ``kl_behaviour`` (k1 estimate of KL(μ‖π) per
    token).
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level={ratio_level!r}; expected one of {RATIO_LEVELS}")
    pos_low, pos_high = _log_bounds("positive_bounds", positive_bounds)
    neg_low, neg_high = _log_bounds("negative_bounds", negative_bounds)
    shape = common.check_token_arrays(logp=logp, behaviour_logp=behaviour_logp, mask=mask)
    batch, _ = shape
    common.check_sequence_array("rewards", rewards, batch)
    mask = common.as_mask(mask)
    rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    baseline = jax.lax.stop_gradient(common.per_sequence("baseline", baseline, batch))
    logp = common.masked_zero(logp, mask)
    behaviour_logp = common.masked_zero(behaviour_logp, mask)

    # The weight is a constant of the surrogate: stop the gradient before forming it.
    token_log_ratio = jax.lax.stop_gradient(logp) - behaviour_logp          # [B, T]
    sequence_log_ratio = jnp.sum(token_log_ratio, axis=-1)                  # [B]
    lengths = jnp.sum(mask, axis=-1)                                        # [B]
    non_empty = (lengths > 0).astype(jnp.float32)                           # [B]
    positive = rewards >= 0                                                 # [B]

    if ratio_level == "token":
        log_w = token_log_ratio                                             # [B, T]
        is_positive = jnp.broadcast_to(positive[:, None], shape)
        selection = mask                                                    # stats over tokens
    else:
        log_w = (sequence_log_ratio if ratio_level == "sequence"
                 else common.safe_divide(sequence_log_ratio, lengths))      # [B]
        is_positive = positive
        selection = non_empty                                               # stats over sequences
    log_weight = jnp.where(is_positive, jnp.clip(log_w, pos_low, pos_high),
                           jnp.clip(log_w, neg_low, neg_high))
    # Upper bounds above e^20 (b = inf: full IS) act as e^20, so weights stay finite; exact below.
    log_weight = jnp.minimum(log_weight, common.LOG_RATIO_BOUND)
    weight = jax.lax.stop_gradient(jnp.exp(log_weight))
    token_weight = weight if ratio_level == "token" else jnp.broadcast_to(weight[:, None], shape)

    advantage = jnp.broadcast_to((rewards - baseline)[:, None], shape)
    token_losses = -token_weight * advantage * logp
    loss = common.aggregate(token_losses, mask, agg, max_len=max_len)

    negative_selection = selection * (~is_positive)
    truncated = (log_w < neg_low) | (log_w > neg_high)
    metrics = {
        "pg_loss": loss,
        "positive_fraction": common.masked_mean(positive, non_empty),
        "weight_mean": common.masked_mean(weight, selection),
        "weight_min": common.masked_min(weight, selection),
        "weight_max": common.masked_max(weight, selection),
        "negative_weight_mean": common.masked_mean(weight, negative_selection),
        "negative_weight_min": common.masked_min(weight, negative_selection),
        "negative_weight_max": common.masked_max(weight, negative_selection),
        "negative_truncated_fraction": common.masked_mean(truncated, negative_selection),
        "log_ratio_mean": common.masked_mean(sequence_log_ratio, non_empty),
        "kl_behaviour": common.masked_mean(-token_log_ratio, mask),
    }
    # The raw (untruncated) ratio π/μ at the chosen level, all rows; exponent bounded to ±20.
    metrics.update(common.ratio_stats("ratio", log_w, selection))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
