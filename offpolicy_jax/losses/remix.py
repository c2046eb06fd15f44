"""ReMix (Reincarnating Mix-policy Proximal Policy Gradient): the mix-policy clipped surrogate and
the KL-Convex policy constraint with its λ(t) schedule.

Liang et al., "Squeeze the Soaked Sponge: Efficient Off-policy Reinforcement Finetuning for Large
Language Model", https://arxiv.org/abs/2507.06892 (ICLR 2026). The equations follow the ICLR-version
notes recorded in ALGORITHMS.md §2 (no public training code exists); the uncertain pieces are
options here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common
from offpolicy_jax.losses import ppo


def mix_ppg(logp, old_logp, behaviour_logp, advantages, mask, *, eps_low: float = 0.2,
            eps_high: float = 0.2, dual_clip: float | None = None, agg: str = "token-mean",
            max_len: int | None = None, replayed=None) -> tuple[jax.Array, dict]:
    """Mix-policy proximal policy gradient: PPO clip centred on the behaviour ratio π_k / π_{k−i}.

        r_θ   = π_θ / π_{k−i} = exp(logp_θ − logp_beh)
        c     = π_k / π_{k−i} = exp(logp_old − logp_beh)                      (constant)
        ℓ_t   = max(−A_t r_θ, −A_t clip(r_θ, max(c − ε_low, 0), c + ε_high))
        ℓ_t   = min(ℓ_t, −c_dual A_t)   for A_t < 0 if dual_clip is set
        loss  = agg_t ℓ_t

    ReMix, https://arxiv.org/abs/2507.06892 (Mix-PPG objective, generalising GePPO). For fresh
    samples (π_{k−i} = π_k, so c = 1) this is exactly :func:`ppo_clip`. The clipped term equals
    ``c · clip(π_θ/π_k, 1 − ε/c, 1 + ε/c)``: a trust region around the current policy π_k, scaled by
    the behaviour ratio. The advantage A^{π_k} is the caller's (GAE from the current critic, or the
    group advantage of the stored group).

    Args:
      logp: [B, T] log π_θ (differentiated).
      old_logp: [B, T] log π_k, the policy at the start of this update (recomputed, no grad).
      behaviour_logp: [B, T] log π_{k−i}, the policy that generated the sample (stored).
      advantages: [B] or [B, T].
      mask: [B, T] response mask.
      eps_low, eps_high: clip half-widths around the centre c (the paper: a single ε = 0.2).
      dual_clip: c_dual > 1 or None (a third-party implementation uses 3).
      agg, max_len: aggregation (the paper does not state it; verl's default token-mean).
      replayed: optional [B], 1 for rows sampled by an older policy than π_k (replayed from the
        window: ``policy_version < iteration − 1``). Only for the ``off_policy_fraction`` metric:
        c itself cannot tell, since a fresh row's stored and recomputed log-probs differ by
        round-off (sampler vs training forward).

    Returns: ``(loss, metrics)`` with the :func:`ppo_clip` metrics (``ratio_*`` is π_θ/π_{k−i},
    ``approx_kl`` is KL(π_k ‖ π_θ)) plus ``behaviour_ratio_mean/min/max`` (c = π_k/π_{k−i}) and,
    with ``replayed``, ``off_policy_fraction`` (the share of response tokens in replayed rows).
    """
    ppo._check_clip(eps_low, eps_high, dual_clip)  # noqa: SLF001 (same package)
    shape = common.check_token_arrays(logp=logp, old_logp=old_logp,
                                      behaviour_logp=behaviour_logp, mask=mask)
    mask = common.as_mask(mask)
    advantages = common.token_advantages(advantages, mask, shape)
    logp = common.masked_zero(logp, mask)
    old_logp = common.fixed(old_logp, mask)
    behaviour_logp = common.fixed(behaviour_logp, mask)

    log_ratio = logp - behaviour_logp
    ratio = common.bounded_exp(log_ratio)
    behaviour_log_ratio = old_logp - behaviour_logp
    centre = common.bounded_exp(behaviour_log_ratio)
    token_losses, active = ppo.clipped_surrogate(
        ratio, jnp.maximum(centre - eps_low, 0.0), centre + eps_high, advantages,
        dual_clip=dual_clip)
    loss = common.aggregate(token_losses, mask, agg, max_len=max_len)
    # ``approx_kl`` and the clip fractions refer to the current policy π_k (log π_θ − log π_k).
    metrics = ppo._clip_metrics(  # noqa: SLF001 (same package)
        loss, active, ratio, logp - old_logp, advantages, mask)
    metrics.update(common.ratio_stats("ratio", log_ratio, mask))
    metrics.update(common.ratio_stats("behaviour_ratio", behaviour_log_ratio, mask))
    if replayed is not None:
        common.check_sequence_array("replayed", replayed, shape[0])
        replayed_tokens = jnp.broadcast_to(jnp.asarray(replayed, jnp.float32)[:, None], shape)
        metrics["off_policy_fraction"] = common.masked_mean(replayed_tokens, mask)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def kl_convex_lambda(step, *, initial: float = 1.0, floor: float = 0.5, decrement: float = 0.1,
                     delay: int = 50, interval: int = 10) -> jax.Array:
    """The decaying weight λ(t) of ReMix's KL-Convex constraint.

        λ(t) = max(initial − decrement · ⌈max(t − delay, 0) / interval⌉, floor)
             = max(1 − 0.1 · ⌈max(t − 50, 0) / 10⌉, 0.5)     (defaults)

    λ = 1 for t ≤ 50, then drops by 0.1 at steps 51, 61, ... and stays at 0.5 from step 91 on.
    ReMix, https://arxiv.org/abs/2507.06892 (decaying λ beat a fixed one). Jittable: ``step`` may
    be a traced integer.

    Args:
      step: training step t (Python int or integer array).

    Returns: float32 scalar (or array shaped like ``step``).
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    elapsed = jnp.maximum(jnp.asarray(step, jnp.float32) - delay, 0.0)
    return jnp.maximum(initial - decrement * jnp.ceil(elapsed / interval), floor)


def kl_convex(logp, base_logp, prev_logp, mask, *, lam, estimator: str = "k3",
              clamp: float | None = None, agg: str = "token-mean", max_len: int | None = None
              ) -> tuple[jax.Array, dict]:
    """ReMix's KL-Convex constraint: a convex mix of KL to the base model and to the last policy.

        L_KLC = agg_t [ λ · KL(π_θ ‖ π_base) + (1 − λ) · KL(π_θ ‖ π_{k−1}) ]

    ReMix, https://arxiv.org/abs/2507.06892 (KL-Convex policy constraint). The estimator is not
    stated in the paper notes [unconfirmed]; default is the per-token k3 (verl ``low_var_kl``) on
    the sampled tokens with token-mean, as in verl's GRPO KL loss. With λ = 1, or with
    ``base_logp == prev_logp``, this is the ordinary KL penalty. After policy reincarnation pass the
    reincarnated policy's log-probs as ``base_logp``. Multiply by the coefficient β yourself.

    Args:
      logp: [B, T] log π_θ (differentiated).
      base_logp: [B, T] log π_base (the initial model, or π_T after reincarnation).
      prev_logp: [B, T] log π_{k−1}, the previous step's policy.
      mask: [B, T] response mask.
      lam: λ ∈ [0, 1], a number or scalar array (e.g. :func:`kl_convex_lambda` of the step).
      estimator: "k3" (default), "k2" or "k1".
      clamp: clip the k3 estimate to ±clamp (verl uses 10); None = unclipped.
      agg, max_len: aggregation.

    Returns: ``(loss, metrics)`` with ``kl_convex``, ``kl_base``, ``kl_prev`` (each aggregated the
    same way) and ``kl_convex_lambda``.
    """
    common.check_token_arrays(logp=logp, base_logp=base_logp, prev_logp=prev_logp, mask=mask)
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim != 0:
        raise ValueError(f"lam must be a scalar, got shape {list(lam.shape)}")
    mask = common.as_mask(mask)
    logp = common.masked_zero(logp, mask)
    kl_base_tokens = common.kl_estimate(
        logp, common.fixed(base_logp, mask), estimator, clamp=clamp)
    kl_prev_tokens = common.kl_estimate(
        logp, common.fixed(prev_logp, mask), estimator, clamp=clamp)
    token_losses = lam * kl_base_tokens + (1.0 - lam) * kl_prev_tokens
    loss = common.aggregate(token_losses, mask, agg, max_len=max_len)
    metrics = {
        "kl_convex": loss,
        "kl_base": common.aggregate(kl_base_tokens, mask, agg, max_len=max_len),
        "kl_prev": common.aggregate(kl_prev_tokens, mask, agg, max_len=max_len),
        "kl_convex_lambda": lam,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def remix(logp, old_logp, behaviour_logp, advantages, mask, *, base_logp, prev_logp, step,
          kl_coef: float, lambda_delay: int = 50, lambda_interval: int = 10, entropy=None,
          entropy_coef: float = 0.0, eps_low: float = 0.2, eps_high: float = 0.2,
          dual_clip: float | None = None, kl_estimator: str = "k3", agg: str = "token-mean",
          max_len: int | None = None, replayed=None) -> tuple[jax.Array, dict]:
    """The full ReMix objective: Mix-PPG − c·H[π_θ] + β · KL-Convex(λ(step)).

        L = L^{Mix-PPG} − c·H[π_θ] + β · L_KLC(θ; π_base, λ(t))

    ReMix, https://arxiv.org/abs/2507.06892. The paper notes print ``+c·H`` inside the loss; here
    the entropy is a bonus (subtracted) [unconfirmed sign]. After reincarnation (t > T) pass fresh
    on-policy data (``behaviour_logp = old_logp``, which makes Mix-PPG plain PPO) and the
    reincarnated policy's log-probs as ``base_logp``.

    Args:
      logp, old_logp, behaviour_logp, advantages, mask: as :func:`mix_ppg`.
      base_logp, prev_logp: [B, T] KL anchors, as :func:`kl_convex`.
      step: training step t for λ(t) (:func:`kl_convex_lambda`; may be traced).
      kl_coef: β.
      lambda_delay, lambda_interval: λ(t)'s schedule (paper: 50 and 10).
      entropy: optional [B, T] per-token entropy of π_θ (e.g. :func:`token_entropy`,
        differentiated).
      entropy_coef: c.
      eps_low, eps_high, dual_clip, agg, max_len, replayed: as :func:`mix_ppg` (one aggregation
        for every term); kl_estimator: as :func:`kl_convex`.

    Returns: ``(loss, metrics)``: the :func:`mix_ppg` and :func:`kl_convex` metrics,
    ``policy_loss`` (the Mix-PPG term alone) and ``entropy`` (if given).
    """
    pg_loss, metrics = mix_ppg(logp, old_logp, behaviour_logp, advantages, mask, eps_low=eps_low,
                               eps_high=eps_high, dual_clip=dual_clip, agg=agg, max_len=max_len,
                               replayed=replayed)
    lam = kl_convex_lambda(step, delay=lambda_delay, interval=lambda_interval)
    kl, kl_metrics = kl_convex(logp, base_logp, prev_logp, mask, lam=lam,
                               estimator=kl_estimator, agg=agg, max_len=max_len)
    metrics.update(kl_metrics)
    metrics["policy_loss"] = jax.lax.stop_gradient(pg_loss)
    loss = pg_loss + kl_coef * kl
    if entropy is not None:
        common.check_token_arrays(logp=logp, entropy=entropy)
        mean_entropy = common.aggregate(entropy, common.as_mask(mask), agg, max_len=max_len)
        loss = loss - entropy_coef * mean_entropy
        metrics["entropy"] = jax.lax.stop_gradient(mean_entropy)
    return loss, metrics
