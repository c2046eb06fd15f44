"""ROVER: Random Policy Valuation for diverse reasoning.

He et al. 2025, "Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards",
https://arxiv.org/abs/2509.24981 (code: github.com/tinnerhrhe/ROVER, ``compute_rover_loss``).
The Q-function of the uniform random policy is parameterised by the policy's own log-probs,
Q(s, a) = ρ·(log π_θ(a|s) − log π_old(a|s)) (Eq. 3), and regressed onto the mean-operator Bellman
target r̃ + Q̄(s') with Q̄(s') the vocabulary mean of Q at the next state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import advantages as advantages_lib
from offpolicy_jax.losses import common


def rover_rewards(rewards, group_size: int, *, std_normalize: bool = False, eps: float = 1e-6
                  ) -> jax.Array:
    """ROVER's centred reward r̃_i = r_i − mean_g(r) (paper Eq. 4), optionally std-normalised.

    The paper mean-centres only (default). The released math training script uses the GRPO
    estimator with std normalisation, r̃ = (r − mean)/(std + 1e-6) — set ``std_normalize=True`` for
    that reading (ALGORITHMS.md §3.3).

    Args:
      rewards: [N] binary rewards, consecutive groups of ``group_size`` responses per prompt.
      group_size: n (static).

    Returns: [N] float32.
    """
    return advantages_lib.grpo_advantages(rewards, group_size, std_normalize=std_normalize,
                                          eps=eps)


def rover(logp, old_logp, vocab_mean, old_vocab_mean, centred_rewards, mask, *, rho: float = 1.0,
          beta_q: float = 1.0, clip_eps: float | None = None, agg: str = "token-mean",
          max_len: int | None = None) -> tuple[jax.Array, dict]:
    """ROVER's mean-operator TD loss on the response tokens.

        Q_t    = ρ (logp_θ[t] − logp_old[t])                                   (Eq. 3)
        Q̄_t+1  = ρ (M_θ(s_{t+1}) − M_old(s_{t+1})),  M(s) = mean(z/T) − logsumexp(z/T)
        Q̂_t    = r̃ + β_Q · Q̄_{t+1} · m[t+1]     (the last response token: Q̂ = r̃)
        loss   = agg_t m[t] (Q_t − sg(Q̂_t))²                                  (Alg. 1; token-mean)

    The whole target is under stop-gradient, including Q̄, which is computed with the current θ in
    the same forward pass (no target network). ``vocab_mean[:, t]`` is M of the state that predicts
    token t, so the successor of token t is column t + 1. Paper defaults ρ = 1, β_Q = 1; no KL, no
    entropy bonus, no clipping. He et al. 2025, https://arxiv.org/abs/2509.24981.

    Optional clip (the official code's ``use_rover_clip``, ``Math/verl/workers/actor/dp_actor.py``
    of github.com/tinnerhrhe/ROVER; off in every released config). With h = log(1 + ε) and
    l = log(1 − ε), Q itself (ρ times the log-ratio) is replaced by a constant bound only where the
    target would push it further out of [l, h]:

        Q̃_t = h   if Q_t > h and Q̂_t > Q_t        (gradient 0)
        Q̃_t = l   if Q_t < l and Q̂_t < Q_t        (gradient 0)
        Q̃_t = Q_t otherwise (inside the band, or outside it with the target pulling back in)

    Args:
      logp: [B, T] log π_θ of the sampled tokens (differentiated).
      old_logp: [B, T] log π_old (behaviour policy of the current step, no grad).
      vocab_mean: [B, T] M_θ(s_t) from :func:`token_log_probs_and_vocab_mean` with the current
        parameters (used only inside the stop-gradient target).
      old_vocab_mean: [B, T] M_old(s_t), from the same no-grad pass that produced ``old_logp``.
      centred_rewards: [B] r̃ (see :func:`rover_rewards`).
      mask: [B, T] response mask.
      rho: ρ, the temperature of the Q parameterisation (code: ``rover_t``).
      beta_q: β_Q, scale of the successor term (code: ``next_q_scale_factor``); 0 drops it.
      clip_eps: ε of the one-sided clip of Q above (the code's ``clip_ratio`` 0.2 with
        ``use_rover_clip``); None (default, as released) disables it.
      agg, max_len: aggregation (code: token-mean).

    Returns: ``(loss, metrics)`` with ``rover_loss``, ``q_mean``, ``q_next_mean``, ``target_mean``,
    ``td_error_abs_mean``, ``ratio_mean/min/max`` (π_θ/π_old) and, with ``clip_eps``,
    ``clip_high_fraction`` / ``clip_low_fraction`` (tokens whose Q was replaced by h / l).
    """
    shape = common.check_token_arrays(logp=logp, old_logp=old_logp, vocab_mean=vocab_mean,
                                      old_vocab_mean=old_vocab_mean, mask=mask)
    batch, _ = shape
    common.check_sequence_array("centred_rewards", centred_rewards, batch)
    if clip_eps is not None and not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    mask = common.as_mask(mask)
    logp = common.masked_zero(logp, mask)
    old_logp = common.fixed(old_logp, mask)
    # Only the target uses the vocabulary means, and the target is a constant.
    vocab_mean = common.fixed(vocab_mean, mask)
    old_vocab_mean = common.fixed(old_vocab_mean, mask)
    centred_rewards = jax.lax.stop_gradient(jnp.asarray(centred_rewards, jnp.float32))

    log_ratio = logp - old_logp
    q = rho * log_ratio                                                       # [B, T]
    mean_q = rho * (vocab_mean - old_vocab_mean)                              # Q̄(s_t), [B, T]
    # Successor of token t is position t + 1; beyond the last response token it is terminal (0).
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_mean_q = jnp.pad(mean_q[:, 1:], ((0, 0), (0, 1))) * next_mask
    target = jax.lax.stop_gradient(centred_rewards[:, None] + beta_q * next_mean_q)
    clip_metrics = {}
    if clip_eps is not None:
        high, low = math.log1p(clip_eps), math.log1p(-clip_eps)
        # One-sided, as the official code: only where the target pushes Q further out.
        clip_high = (target > q) & (q > high)
        clip_low = (target < q) & (q < low)
        q = jnp.where(clip_high, high, jnp.where(clip_low, low, q))
        clip_metrics = {"clip_high_fraction": common.masked_mean(clip_high, mask),
                        "clip_low_fraction": common.masked_mean(clip_low, mask)}
    td_error = q - target
    loss = common.aggregate(jnp.square(td_error), mask, agg, max_len=max_len)
    metrics = {
        "rover_loss": loss,
        "q_mean": common.masked_mean(q, mask),
        "q_next_mean": common.masked_mean(next_mean_q, next_mask * mask),
        "target_mean": common.masked_mean(target, mask),
        "td_error_abs_mean": common.masked_mean(jnp.abs(td_error), mask),
    }
    metrics.update(clip_metrics)
    metrics.update(common.ratio_stats("ratio", logp - old_logp, mask))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
