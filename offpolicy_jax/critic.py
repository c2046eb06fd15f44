"""PPO's critic for LLMs: a linear value head on the policy's final hidden state, and the GAE
targets computed from it (used by ``experiments/ppo.py`` and ReMix's PPO variant).

An algorithm plugs the head in with ``Algorithm(value_head=critic.VALUE_HEAD)``: its ``init`` adds
``{"value_head": {"kernel" [D], "bias" [1]}}`` to the policy's parameters (trained and checkpointed
with them; the model and the sampler ignore the entry), its ``apply`` maps the hidden states that
predict each response token to V(s_t) (the ``values`` forward output), and the algorithm's
``prepare`` turns the rollout's outcome rewards and the pre-update values (``old_values``) into GAE
advantages and value targets with :func:`gae_targets`.

Per-token reward (InstructGPT-style PPO; ALGORITHMS.md §5.4):

    r_t = −β_KL · (logp_old[t] − logp_ref[t]) + [t = L − 1] · score
    δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   R_t = A_t + V(s_t)

Schulman et al. 2017, https://arxiv.org/abs/1707.06347; GAE: https://arxiv.org/abs/1506.02438.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from offpolicy_jax import losses
from offpolicy_jax.training.algorithm import ValueHead

PARAM_NAME = "value_head"   # the top-level parameter entry of the head


def init_value_head(cfg, rng) -> dict:
    """``{"value_head": {"kernel": [D], "bias": [1]}}``, zero-initialised (V ≡ 0 at the start, so
    the first advantages are the whitened returns; the kernel still gets a gradient)."""
    del rng  # zero init is deterministic; the argument keeps ValueHead.init's signature
    return {PARAM_NAME: {"kernel": jnp.zeros((cfg.hidden_size,), jnp.float32),
                         "bias": jnp.zeros((1,), jnp.float32)}}


def values_from_hidden(params: dict, hidden) -> jax.Array:
    """V(s_t) = h_t · w + b in float32.

    Args:
      params: the policy's parameters including ``value_head``.
      hidden: [N, R, D] final-normed hidden states of the states that predict response tokens.

    Returns: [N, R] float32 values.
    """
    head = params[PARAM_NAME]
    return jnp.einsum("nrd,d->nr", hidden.astype(jnp.float32), head["kernel"]) + head["bias"][0]


VALUE_HEAD = ValueHead(init=init_value_head, apply=values_from_hidden)


def token_rewards(scores, mask, *, old_logp=None, ref_logp=None, kl_coef: float = 0.0
                  ) -> np.ndarray:
    """[N, R] per-token rewards: the outcome score on each response's last token, minus the
    per-token KL penalty β·(logp_old − logp_ref) when ``kl_coef`` > 0.

    Args:
      scores: [N] outcome rewards.
      mask: [N, R] response mask (a response's last token is its last unmasked position).
      old_logp, ref_logp: [N, R] (needed when kl_coef > 0).
      kl_coef: β_KL.
    """
    mask = np.asarray(mask, np.float32)
    lengths = mask.sum(axis=1).astype(np.int64)
    if (lengths < 1).any():
        raise ValueError("token_rewards: every response needs at least one token")
    rewards = np.zeros(mask.shape, np.float32)
    rewards[np.arange(mask.shape[0]), lengths - 1] = np.asarray(scores, np.float32)
    if kl_coef:
        if old_logp is None or ref_logp is None:
            raise ValueError("token_rewards: kl_coef > 0 needs old_logp and ref_logp")
        rewards -= kl_coef * (np.asarray(old_logp) - np.asarray(ref_logp)) * mask
    return rewards


def gae_targets(batch: dict, *, gamma: float = 1.0, lam: float = 1.0, kl_coef: float = 0.0,
                whiten: bool = True) -> dict:
    """``{"advantages": [N, R], "returns": [N, R]}`` from a prepared batch.

    Reads ``rewards`` [N] (outcome scores), ``mask``, ``old_values`` (V before this batch's
    updates) and, with ``kl_coef``, ``old_logp``/``ref_logp``. Advantages are whitened over the
    batch's response tokens (verl's PPO default); returns are not.
    """
    rewards = token_rewards(batch["rewards"], batch["mask"], old_logp=batch.get("old_logp"),
                            ref_logp=batch.get("ref_logp"), kl_coef=kl_coef)
    advantages, returns = losses.gae(rewards, np.asarray(batch["old_values"], np.float32),
                                     batch["mask"], gamma=gamma, lam=lam)
    if whiten:
        advantages = losses.masked_whiten(advantages, batch["mask"])
    return {"advantages": np.asarray(advantages, np.float32),
            "returns": np.asarray(returns, np.float32)}


def ppo_with_value_loss(inputs: dict, *, clip_eps: float, vf_clip: float, vf_coef: float
                        ) -> tuple[jax.Array, dict]:
    """PPO's clipped policy loss (token mean) plus ``vf_coef`` × the clipped value loss, for an
    algorithm whose inputs hold ``logp``, ``old_logp``, ``advantages``, ``values``,
    ``old_values``, ``returns`` and ``mask`` (the value head shares the policy's trunk).

    Returns ``(loss, metrics)``: the policy and value losses' metrics and ``policy_loss``.
    """
    mask = inputs["mask"]
    policy_loss, metrics = losses.ppo_clip(inputs["logp"], inputs["old_logp"],
                                           inputs["advantages"], mask, eps_low=clip_eps,
                                           eps_high=clip_eps, agg="token-mean")
    value_loss, value_metrics = losses.value_loss(inputs["values"], inputs["old_values"],
                                                  inputs["returns"], mask, clip_eps=vf_clip)
    return policy_loss + vf_coef * value_loss, {**metrics, **value_metrics,
                                                "policy_loss": policy_loss}
