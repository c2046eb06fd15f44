r"""Importance-ratio objectives of the second wave: GSPO (one ratio per sequence), CISPO (clipped,
never-dropped token weights) and AReaL's decoupled PPO (a trust region around a proximal policy,
the behaviour policy only in an importance weight).

Each reduces to a familiar on-policy objective when all policies coincide (tested): GSPO to a
per-sequence mean of token-mean REINFORCE on the group advantage, CISPO to token-mean REINFORCE,
decoupled PPO to :func:`ppo_clip`. Formulas and the frameworks' differing conventions:
``shared/ALGORITHMS.md`` §9.1–9.3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common
from offpolicy_jax.losses import ppo as ppo_lib

GSPO_LEVELS = ("sequence", "sequence_token")


def gspo(logp, old_logp, advantages, mask, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
         level: str = "sequence") -> tuple[jax.Array, dict]:
    """Group Sequence Policy Optimization: one length-normalised ratio and one clip per response.

        log s_i = (1/L_i) Σ_t m[i,t] (logp_θ[i,t] − logp_old[i,t])        (geometric-mean ratio)
        ℓ_i     = max(−A_i s_i, −A_i clip(s_i, 1 − ε_low, 1 + ε_high))
        loss    = (1/B') Σ_i ℓ_i                                           (B': non-empty rows)

    Zheng et al. 2025, https://arxiv.org/abs/2507.18071 (Eqs. 5–7); paper clip range ε_low = 3e-4,
    ε_high = 4e-4. Convention (frameworks differ, ALGORITHMS.md §9.1): the loss is a mean over
    sequences of one scalar each — never re-weighted by L_i (TRL's default token-count
    normaliser does that) — and rows with no response token are left out of B'.

    ``level="sequence_token"`` is the paper's GSPO-token (Eq. 13) for per-token advantages:

        s_{i,t} = sg(s_i) · exp(logp_θ[i,t] − sg(logp_θ[i,t]))
        loss    = (1/B') Σ_i (1/L_i) Σ_t max(−A_{i,t} s_{i,t}, −A_{i,t} clip(s_{i,t}, ...))

    Its value equals ``s_i`` on every token, so with ``A_{i,t} = A_i`` loss, clip decisions and
    gradient equal the sequence level (tested).

    Args:
      logp: [B, T] log π_θ of the sampled tokens (differentiated).
      old_logp: [B, T] log π_old (constant).
      advantages: [B] (``grpo_advantages`` of the whole batch); [B] or [B, T] for
        ``sequence_token``.
      mask: [B, T] response mask.
      eps_low, eps_high: the sequence-ratio clip range ``[1 − ε_low, 1 + ε_high]``.
      level: "sequence" or "sequence_token".

    Returns: ``(loss, metrics)`` with ``pg_loss``, ``clip_fraction`` (share of sequences whose
    clipped branch is active), ``clip_fraction_low/high``, ``seq_ratio_mean/min/max`` and
    ``advantage_mean``.
    """
    if level not in GSPO_LEVELS:
        raise ValueError(f"gspo level must be one of {GSPO_LEVELS}, got {level!r}")
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    shape = common.check_token_arrays(logp=logp, old_logp=old_logp, mask=mask)
    mask = common.as_mask(mask)
    logp = common.masked_zero(logp, mask)
    old_logp = common.fixed(old_logp, mask)
    lengths = jnp.sum(mask, axis=-1)                                   # [B]
    non_empty = (lengths > 0).astype(jnp.float32)                      # [B]
    seq_log_ratio = common.safe_divide(jnp.sum(logp - old_logp, axis=-1), lengths)   # [B]
    seq_ratio = common.bounded_exp(seq_log_ratio)                      # [B]
    lower, upper = 1.0 - eps_low, 1.0 + eps_high

    if level == "sequence":
        adv = jax.lax.stop_gradient(common.per_sequence("advantages", advantages, shape[0]))
        seq_losses, active = ppo_lib.clipped_surrogate(seq_ratio, lower, upper, adv)
        loss = common.safe_divide(jnp.sum(seq_losses * non_empty), jnp.sum(non_empty))
        clipped, row_adv = active["clipped"], adv
    else:
        adv_tokens = common.token_advantages(advantages, mask, shape)
        token_ratio = (jax.lax.stop_gradient(seq_ratio)[:, None]
                       * jnp.exp(logp - jax.lax.stop_gradient(logp)))
        token_losses, active = ppo_lib.clipped_surrogate(token_ratio, lower, upper, adv_tokens)
        loss = common.aggregate(token_losses, mask, "seq-mean-token-mean")
        # A sequence counts as clipped by its first token's decision (all of its tokens share the
        # ratio; with per-token advantages the sign may differ, then the token mean is reported).
        clipped = common.masked_mean(active["clipped"], mask, axis=-1) > 0.5
        row_adv = common.masked_mean(adv_tokens, mask, axis=-1)

    def row_mean(x):
        return common.safe_divide(jnp.sum(x * non_empty), jnp.sum(non_empty))

    row_mask = non_empty[:, None]
    metrics = {
        "pg_loss": loss,
        "clip_fraction": row_mean(clipped),
        "clip_fraction_high": row_mean(clipped & (row_adv > 0)),
        "clip_fraction_low": row_mean(clipped & (row_adv < 0)),
        "advantage_mean": row_mean(row_adv),
    }
    metrics.update(common.ratio_stats("seq_ratio", seq_log_ratio[:, None], row_mask))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def cispo(logp, old_logp, advantages, mask, *, eps_low: float = 1.0, eps_high: float = 4.0,
          agg: str = "token-mean", max_len: int | None = None) -> tuple[jax.Array, dict]:
    """CISPO: REINFORCE with the token ratio clipped under stop-gradient as its weight.

        r_t  = exp(logp_θ[t] − logp_old[t])
        w_t  = sg(clip(r_t, 1 − ε_low, 1 + ε_high))
        loss = −(1/Σ m) Σ_{i,t} m[i,t] w_t A_i logp_θ[i,t]                   (token-mean)

    MiniMax-M1, https://arxiv.org/abs/2506.13585 (§3.1). Unlike a PPO clip, a token whose ratio
    leaves the range keeps its gradient with a bounded coefficient. Convention (frameworks differ,
    ALGORITHMS.md §9.2): the clip is additive around 1, as in verl, NeMo-RL and SkyRL; the
    defaults ε_low = 1 (no lower bound, as the paper does) and ε_high = 4 give w ∈ [0, 5],
    SkyRL's default and TRL's recommended absolute cap. The paper's own ε_high was not published.
    The weight multiplies ``logp``, not the ratio: the ratio would apply the IS weight twice.

    Args:
      logp, old_logp, mask: as :func:`offpolicy_jax.losses.ppo_clip`.
      advantages: [B] or [B, T] (GRPO's group-normalised reward in the paper).
      eps_low: in [0, 1]; eps_high >= 0.
      agg, max_len: aggregation (paper: token-mean over the whole batch).

    Returns: ``(loss, metrics)`` with ``pg_loss``, ``clip_fraction`` (tokens whose weight was
    truncated), ``clip_fraction_low/high``, ``weight_mean``, ``ratio_mean/min/max`` and
    ``advantage_mean``.
    """
    if not (0.0 <= eps_low <= 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= eps_low <= 1 and eps_high >= 0, got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    shape = common.check_token_arrays(logp=logp, old_logp=old_logp, mask=mask)
    mask = common.as_mask(mask)
    adv = common.token_advantages(advantages, mask, shape)
    logp = common.masked_zero(logp, mask)
    log_ratio = jax.lax.stop_gradient(logp - common.masked_zero(old_logp, mask))
    ratio = common.bounded_exp(log_ratio)
    weight = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = common.aggregate(-weight * adv * logp, mask, agg, max_len=max_len)
    low, high = ratio < 1.0 - eps_low, ratio > 1.0 + eps_high
    metrics = {
        "pg_loss": loss,
        "clip_fraction": common.masked_mean(low | high, mask),
        "clip_fraction_high": common.masked_mean(high, mask),
        "clip_fraction_low": common.masked_mean(low, mask),
        "weight_mean": common.masked_mean(weight, mask),
        "advantage_mean": common.masked_mean(adv, mask),
    }
    metrics.update(common.ratio_stats("ratio", log_ratio, mask))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def decoupled_ppo(logp, proximal_logp, behaviour_logp, advantages, mask, *,
                  eps_low: float = 0.2, eps_high: float = 0.2,
                  behaviour_weight_cap: float | None = 5.0, agg: str = "token-mean",
                  max_len: int | None = None) -> tuple[jax.Array, dict]:
    """Decoupled PPO: the clip is centred on a proximal policy; the behaviour policy that sampled
    the tokens enters only through an importance weight.

        ρ_t  = exp(logp_θ[t] − logp_prox[t])
        w_t  = sg(exp(logp_prox[t] − logp_beh[t]))         (0 where w_t > cap: token masked)
        ℓ_t  = w_t · max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))
        loss = agg_t ℓ_t    over the original mask

    Fu et al. 2025, "AReaL", https://arxiv.org/abs/2505.24298 (Eq. 5). π_prox is the trainer's
    policy when the update step starts (our ``old_logp``, recomputed), π_beh the possibly stale
    sampler (``behaviour_logp``). The cap is AReaL's example configs' behaviour-weight filter
    (``rejection_sampling: upper 5.0``), not part of the paper's formula; None disables it. As in
    AReaL, masked tokens stay in the denominator (ALGORITHMS.md §9.4 pitfall a). With
    π_prox = π_beh, w ≡ 1 and this is :func:`ppo_clip`.

    Args:
      logp: [B, T] log π_θ (differentiated).
      proximal_logp: [B, T] log π_prox (constant).
      behaviour_logp: [B, T] log π_beh of the sampler (constant).
      advantages: [B] or [B, T].
      mask: [B, T] response mask.
      eps_low, eps_high: the clip range around π_prox.
      behaviour_weight_cap: tokens with w_t above it get no loss; None keeps every token.
      agg, max_len: aggregation.

    Returns: ``(loss, metrics)``: the :func:`ppo_clip` metrics (ratio against π_prox) plus
    ``behaviour_weight_mean/min/max`` and ``behaviour_masked_fraction``.
    """
    if behaviour_weight_cap is not None and behaviour_weight_cap <= 0:
        raise ValueError(f"behaviour_weight_cap must be > 0 or None, got {behaviour_weight_cap}")
    ppo_lib._check_clip(eps_low, eps_high, None)
    shape = common.check_token_arrays(logp=logp, proximal_logp=proximal_logp,
                                      behaviour_logp=behaviour_logp, mask=mask)
    mask = common.as_mask(mask)
    adv = common.token_advantages(advantages, mask, shape)
    logp = common.masked_zero(logp, mask)
    proximal_logp = common.fixed(proximal_logp, mask)
    behaviour_logp = common.fixed(behaviour_logp, mask)

    behaviour_log_weight = proximal_logp - behaviour_logp
    weight = common.bounded_exp(behaviour_log_weight)
    kept = (jnp.ones(shape, bool) if behaviour_weight_cap is None
            else weight <= behaviour_weight_cap)
    log_ratio = logp - proximal_logp
    ratio = common.bounded_exp(log_ratio)
    token_losses, active = ppo_lib.clipped_surrogate(ratio, 1.0 - eps_low, 1.0 + eps_high, adv)
    token_losses = jnp.where(kept, weight * token_losses, 0.0)
    loss = common.aggregate(token_losses, mask, agg, max_len=max_len)
    metrics = ppo_lib._clip_metrics(loss, active, ratio, log_ratio, adv, mask)
    metrics.update(common.ratio_stats("behaviour_weight", behaviour_log_weight, mask))
    metrics["behaviour_masked_fraction"] = common.masked_mean(~kept, mask)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
