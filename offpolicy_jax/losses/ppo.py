"""Clipped policy-gradient objectives: PPO-clip (with DAPO's clip-higher and dual clip), the clipped
value loss, and GRPO / Dr. GRPO / DAPO as compositions of clip + KL + aggregation on advantages
computed over whole groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common


def _check_clip(eps_low: float, eps_high: float, dual_clip: float | None) -> None:
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (the bound −c·A must lie above the clipped "
                         f"surrogate), got {dual_clip}")


def clipped_surrogate(ratio, lower, upper, advantages, *, dual_clip: float | None = None
                      ) -> tuple[jax.Array, dict]:
    """Per-token pessimistic clipped surrogate, and the masks of which branch is active.

        ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, lower_t, upper_t))
        ℓ_t = min(ℓ_t, −c·A_t)   for A_t < 0, with dual clip c

    ``lower``/``upper`` may be arrays (ReMix's behaviour-centred trust region) or numbers (PPO).

    Returns: ``(token_losses [B, T], {"clipped": bool [B, T], "dual_clipped": bool [B, T]})``.
    """
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, lower, upper)
    token_losses = jnp.maximum(unclipped, clipped)
    active = {"clipped": clipped > unclipped}
    if dual_clip is None:
        active["dual_clipped"] = jnp.zeros(jnp.shape(token_losses), bool)
        return token_losses, active
    # Dual clip (Ye et al. 2020, arXiv 1912.09729): for A < 0 a huge ratio would make −A·ρ
    # unbounded; cap the loss at −c·A (c > 1).
    dual_bound = -dual_clip * advantages
    active["dual_clipped"] = (advantages < 0) & (token_losses > dual_bound)
    token_losses = jnp.where(advantages < 0, jnp.minimum(token_losses, dual_bound), token_losses)
    return token_losses, active


def ppo_clip(logp, old_logp, advantages, mask, *, eps_low: float = 0.2, eps_high: float = 0.2,
             dual_clip: float | None = None, agg: str = "token-mean", max_len: int | None = None
             ) -> tuple[jax.Array, dict]:
    """PPO's clipped surrogate loss, with asymmetric (clip-higher) bounds and optional dual clip.

        ρ_t = exp(logp_θ[t] − logp_old[t])
        ℓ_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))          (PPO Eq. 7, negated)
        ℓ_t = min(ℓ_t, −c A_t)  if A_t < 0 and dual_clip = c                 (dual-clip PPO)
        loss = agg_t ℓ_t

    PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347. Clip-higher (ε_high > ε_low):
    DAPO, https://arxiv.org/abs/2503.14476. Dual clip: Ye et al. 2020,
    https://arxiv.org/abs/1912.09729 (ARPO uses ε_low = 0.2, ε_high = 0.3, c = 3). ``old_logp``
    and ``advantages`` are constants (stop-gradient). The log-ratio is bounded to ±20 before
    ``exp`` so extreme inputs stay finite; within that range the loss is exact.

    Args:
      logp: [B, T] log π_θ of the sampled tokens (differentiated).
      old_logp: [B, T] log π_old of the same tokens (policy before this update).
      advantages: [B] (outcome, broadcast to every token) or [B, T].
      mask: [B, T] response mask.
      eps_low, eps_high: clip range ``[1 − ε_low, 1 + ε_high]``.
      dual_clip: c > 1, or None for no dual clip.
      agg: aggregation mode, see :func:`offpolicy_jax.losses.aggregate`.
      max_len: ``L_max`` for ``agg="seq-mean-token-sum-norm"`` (default T).

    Returns: ``(loss, metrics)`` with metrics ``pg_loss``, ``clip_fraction`` (tokens where the
    clipped branch is active), ``clip_fraction_low`` / ``clip_fraction_high``,
    ``dual_clip_fraction``, ``ratio_mean/min/max``, ``approx_kl`` (k3 estimate of
    KL(π_old ‖ π_θ)) and ``advantage_mean``.
    """
    _check_clip(eps_low, eps_high, dual_clip)
    shape = common.check_token_arrays(logp=logp, old_logp=old_logp, mask=mask)
    mask = common.as_mask(mask)
    advantages = common.token_advantages(advantages, mask, shape)
    logp = common.masked_zero(logp, mask)
    old_logp = common.fixed(old_logp, mask)

    log_ratio = logp - old_logp
    ratio = common.bounded_exp(log_ratio)
    token_losses, active = clipped_surrogate(ratio, 1.0 - eps_low, 1.0 + eps_high, advantages,
                                             dual_clip=dual_clip)
    loss = common.aggregate(token_losses, mask, agg, max_len=max_len)
    metrics = _clip_metrics(loss, active, ratio, log_ratio, advantages, mask)
    return loss, metrics


def _clip_metrics(loss, active, ratio, log_ratio, advantages, mask) -> dict:
    clipped = active["clipped"]
    bounded_log_ratio = jnp.clip(log_ratio, -common.LOG_RATIO_BOUND, common.LOG_RATIO_BOUND)
    metrics = {
        "pg_loss": loss,
        "clip_fraction": common.masked_mean(clipped, mask),
        # The clipped branch is active above the upper bound for A > 0, below the lower for A < 0.
        "clip_fraction_high": common.masked_mean(clipped & (advantages > 0), mask),
        "clip_fraction_low": common.masked_mean(clipped & (advantages < 0), mask),
        "dual_clip_fraction": common.masked_mean(active["dual_clipped"], mask),
        "approx_kl": common.masked_mean(jnp.expm1(bounded_log_ratio) - bounded_log_ratio, mask),
        "advantage_mean": common.masked_mean(advantages, mask),
    }
    metrics.update(common.ratio_stats("ratio", jax.lax.stop_gradient(log_ratio), mask))
    return jax.tree.map(jax.lax.stop_gradient, metrics)


def value_loss(values, old_values, returns, mask, *, clip_eps: float | None = 0.5,
               agg: str = "token-mean", max_len: int | None = None) -> tuple[jax.Array, dict]:
    """PPO's clipped value (critic) loss.

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v)
        ℓ_t = ½ max((V_t − R_t)², (V_clip,t − R_t)²)

    Schulman et al. 2017, https://arxiv.org/abs/1707.06347 (value clipping as in the OpenAI
    baselines / verl implementations; verl default ε_v = 0.5).

    Args:
      values: [B, T] current critic values (differentiated).
      old_values: [B, T] critic values when the rollout was scored (constant).
      returns: [B, T] value targets R_t (e.g. from :func:`gae`; constant).
      mask: [B, T] response mask.
      clip_eps: ε_v, or None for the plain squared error ½ (V − R)².
      agg, max_len: aggregation, see :func:`offpolicy_jax.losses.aggregate`.

    Returns: ``(loss, metrics)`` with ``vf_loss``, ``vf_clip_fraction``, ``value_mean``,
    ``return_mean``, ``value_error`` (masked mean of (V − R)²).
    """
    common.check_token_arrays(values=values, old_values=old_values, returns=returns, mask=mask)
    mask = common.as_mask(mask)
    values = common.masked_zero(values, mask)
    old_values = common.fixed(old_values, mask)
    returns = common.fixed(returns, mask)
    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        token_losses = 0.5 * unclipped
        clipped_active = jnp.zeros(unclipped.shape, bool)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipped = jnp.square(clipped_values - returns)
        token_losses = 0.5 * jnp.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    loss = common.aggregate(token_losses, mask, agg, max_len=max_len)
    metrics = {
        "vf_loss": loss,
        "vf_clip_fraction": common.masked_mean(clipped_active, mask),
        "value_mean": common.masked_mean(values, mask),
        "return_mean": common.masked_mean(returns, mask),
        "value_error": common.masked_mean(unclipped, mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# ----------------------------------------------------------------------------------------------
# Group-relative compositions: the paper objectives, given advantages computed over whole groups.
# ----------------------------------------------------------------------------------------------
#
# The advantage is a statistic of a whole group of responses (``grpo_advantages``), so it is
# computed once per rollout batch, before the batch is split into minibatches; these losses take
# it as an input. In a notebook with one whole batch:
#
#     adv = losses.grpo_advantages(rewards, group_size)
#     loss, metrics = losses.grpo(logp, old_logp, adv, mask, ref_logp=ref_logp)

def clipped_policy_loss(logp, old_logp, advantages, mask, *, ref_logp=None, eps_low: float = 0.2,
                        eps_high: float = 0.2, dual_clip: float | None = None,
                        kl_coef: float = 0.0, kl_estimator: str = "k3",
                        kl_clamp: float | None = None, agg: str = "token-mean",
                        max_len: int | None = None) -> tuple[jax.Array, dict]:
    """PPO-clip surrogate plus β·KL(π_θ‖π_ref) in the loss, under one aggregation.

        loss = agg_t[ ℓ_clip(ρ_t, A) ] + β · agg_t[ k(logp_t, ref_logp_t) ]

    PPO, Schulman et al. 2017, https://arxiv.org/abs/1707.06347, with the KL penalty in the loss as
    in GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300, Eq. 3-4). Aggregation is linear, so
    this equals ``agg(ℓ_clip + β·k)``. The KL term (estimator k1, k2 or k3; GRPO uses k3) is only
    formed when ``kl_coef`` ≠ 0.

    Args:
      logp, old_logp: [B, T] log π_θ (differentiated) and log π_old.
      advantages: [B] or [B, T], computed over whole groups (constants).
      mask: [B, T] response mask (a [B, T] product with a row mask drops rows from every term).
      ref_logp: [B, T] log π_ref; required when ``kl_coef`` ≠ 0.
      eps_low, eps_high, dual_clip: the clip (:func:`ppo_clip`).
      kl_coef: β. kl_estimator: "k1", "k2" or "k3". kl_clamp: clip the estimate to ±kl_clamp
        (verl's ``low_var_kl`` uses 10); None = unclipped.
      agg, max_len: the aggregation (:func:`offpolicy_jax.losses.aggregate`).

    Returns: ``(loss, metrics)``: the :func:`ppo_clip` metrics, plus ``kl_ref`` when β ≠ 0.
    """
    loss, metrics = ppo_clip(logp, old_logp, advantages, mask, eps_low=eps_low,
                             eps_high=eps_high, dual_clip=dual_clip, agg=agg, max_len=max_len)
    if isinstance(kl_coef, (int, float)) and kl_coef == 0:
        return loss, metrics
    if ref_logp is None:
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logp (the reference policy's [B, T] "
                         f"log-probs); pass ref_logp or set kl_coef=0")
    common.check_token_arrays(logp=logp, ref_logp=ref_logp)
    m = common.as_mask(mask)
    kl_tokens = common.kl_estimate(common.masked_zero(logp, m),
                                   common.fixed(ref_logp, m),
                                   kl_estimator, clamp=kl_clamp)
    kl = common.aggregate(kl_tokens, m, agg, max_len=max_len)
    metrics["kl_ref"] = jax.lax.stop_gradient(kl)
    return loss + kl_coef * kl, metrics


def grpo(logp, old_logp, advantages, mask, *, ref_logp=None, eps_low: float = 0.2,
         eps_high: float = 0.2, kl_coef: float = 0.04, kl_estimator: str = "k3", kl_clamp: float | None = None,
         agg: str = "seq-mean-token-mean") -> tuple[jax.Array, dict]:
    """GRPO: PPO clip on the group-normalised outcome advantage, per-token k3 KL to π_ref.

        Â_i   = (r_i − mean(r)) / (std(r) + 1e-6)           (grpo_advantages, whole groups)
        J     = (1/G) Σ_i (1/|o_i|) Σ_t [ min(ρ_{i,t} Â_i, clip(ρ_{i,t}, 1−ε, 1+ε) Â_i)
                                         − β k3_{i,t} ]
        loss  = −J

    DeepSeekMath, Shao et al. 2024, https://arxiv.org/abs/2402.03300, Eq. 3 (objective) and Eq. 4
    (k3 estimator). Paper defaults: ε = 0.2, β = 0.04, seq-mean-token-mean aggregation.

    Args:
      logp, old_logp: [B, T] log-probs under π_θ (differentiated) and π_old.
      advantages: [B] ``grpo_advantages(rewards, group_size)`` of the whole rollout batch.
      mask: [B, T] response mask.
      ref_logp: [B, T] log-probs under π_ref; required when ``kl_coef != 0``.
      eps_low, eps_high: the clip range ``[1 − ε_low, 1 + ε_high]`` (paper: ε = 0.2 both).
      kl_coef: β. kl_estimator: "k3" (paper), "k2" or "k1". kl_clamp: as
        :func:`clipped_policy_loss`. agg: aggregation (paper: seq-mean-token-mean).

    Returns: ``(loss, metrics)``: the :func:`ppo_clip` metrics plus ``kl_ref`` (when β ≠ 0).
    """
    return clipped_policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                               eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                               kl_estimator=kl_estimator, kl_clamp=kl_clamp, agg=agg)


def dr_grpo(logp, old_logp, advantages, mask, *, max_len: int | None = None, ref_logp=None,
            eps_low: float = 0.2, eps_high: float = 0.2, kl_coef: float = 0.0,
            kl_estimator: str = "k3") -> tuple[jax.Array, dict]:
    """Dr. GRPO ("GRPO done right"): GRPO without the std and without the per-response 1/|o_i|.

        Ã_i  = r_i − mean(r)          (grpo_advantages(..., std_normalize=False), whole groups)
        loss = −(1/(G·L_max)) Σ_i Σ_t min(ρ_{i,t} Ã_i, clip(ρ_{i,t}, 1−ε, 1+ε) Ã_i)  [+ β·KL]

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
    https://arxiv.org/abs/2503.20783. The constant ``L_max`` (aggregation
    ``seq-mean-token-sum-norm``) removes the length bias of ``1/|o_i|``; dropping ``/std`` removes
    the question-difficulty bias. The KL term defaults to off (β = 0), as in the paper's Dr. GRPO
    objective with a rule-based verifier [unconfirmed against the PDF; ALGORITHMS.md only says
    "everything else as GRPO" — pass ``kl_coef=0.04, ref_logp=...`` for that reading].

    Args:
      logp, old_logp, mask, ref_logp, eps_low, eps_high, kl_coef, kl_estimator: as :func:`grpo`.
      advantages: [B] mean-centred group rewards of the whole rollout batch.
      max_len: L_max, the constant normaliser — the generation budget; defaults to T.

    Returns: ``(loss, metrics)`` as :func:`grpo`.
    """
    return clipped_policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                               eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                               kl_estimator=kl_estimator, agg="seq-mean-token-sum-norm",
                               max_len=max_len)


def dapo(logp, old_logp, advantages, mask, *, informative=None, eps_low: float = 0.2,
         eps_high: float = 0.28, ref_logp=None, kl_coef: float = 0.0, kl_estimator: str = "k3"
         ) -> tuple[jax.Array, dict]:
    """DAPO's policy loss: GRPO advantage, clip-higher, token-level mean, no KL, and only the
    informative groups.

        Â_{i,t} = (r_i − mean(r)) / (std(r) + 1e-6)
        loss    = −(1/Σ_{i∈I} |o_i|) Σ_{i∈I} Σ_t min(ρ_{i,t} Â_{i,t},
                                                  clip(ρ_{i,t}, 1−ε_low, 1+ε_high) Â_{i,t})

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    https://arxiv.org/abs/2503.14476 (ε_low = 0.2, ε_high = 0.28, KL removed). I is the set of
    responses whose group's rewards are not all equal: DAPO's dynamic sampling re-draws prompts
    until the batch holds only such groups; here the uninformative groups are dropped from the
    loss instead (``informative``), which keeps the rollout budget fixed. Their advantage is 0
    anyway; dropping them removes their tokens from the token-mean denominator, the part of
    dynamic sampling that changes the gradient. The soft overlong punishment acts on the reward
    (:func:`dapo_overlong_penalty`).

    Args:
      logp, old_logp, mask, ref_logp, kl_coef, kl_estimator: as :func:`grpo`.
      advantages: [B] ``grpo_advantages`` of the whole rollout batch.
      informative: [B] 1 for rows of groups with non-identical rewards
        (:func:`informative_groups` of the whole batch); None keeps every row.
      eps_low, eps_high: the decoupled clip range ``[1 − ε_low, 1 + ε_high]``.

    Returns: ``(loss, metrics)`` as :func:`grpo`.
    """
    if informative is not None:
        common.check_sequence_array("informative", informative, mask.shape[0])
        mask = mask * jnp.asarray(informative, mask.dtype)[:, None]
    return clipped_policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                               eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef,
                               kl_estimator=kl_estimator, agg="token-mean")
