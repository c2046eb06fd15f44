"""Advantage estimators: group-relative (GRPO / Dr. GRPO / ROVER), leave-one-out (RLOO), GAE (PPO),
and DAPO's soft overlong length penalty.

Groups are consecutive: with ``group_size = G`` rows ``[g·G, (g+1)·G)`` of the rollout batch are
the ``G`` responses to prompt ``g`` (the order the sampler returns ``num_samples`` completions in).
All functions are pure, jittable (``group_size`` and the flags are static) and return arrays only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common


def _grouped(name: str, rewards, group_size: int) -> jax.Array:
    """``rewards`` [N] as float32 [N / G, G], with a clear error when N is not a multiple of G."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"{name} must be a [N] array of per-response rewards, got shape "
                         f"{list(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{name} has {rewards.shape[0]} entries, not a multiple of "
                         f"group_size={group_size} (groups are consecutive rows)")
    return rewards.reshape(-1, group_size)


def grpo_advantages(rewards, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6,
                    unbiased_std: bool = True) -> jax.Array:
    """Group-relative outcome advantage of GRPO (and, without the std, Dr. GRPO and ROVER).

        Â_i = (r_i − mean_g(r)) / (std_g(r) + eps)      if std_normalize   (GRPO)
        Â_i =  r_i − mean_g(r)                          otherwise          (Dr. GRPO; ROVER's r̃)

    DeepSeekMath, Shao et al. 2024, https://arxiv.org/abs/2402.03300 (§4.1.2, outcome supervision);
    Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783 (drops the std). A group whose
    rewards are all equal gets advantage exactly 0 (the numerator is 0), never NaN.

    Args:
      rewards: [N] scalar reward per response, N = num_prompts · group_size, groups consecutive.
      group_size: G, responses per prompt (static).
      std_normalize: divide by the group std (GRPO) or not (Dr. GRPO).
      eps: added to the std (verl/EasyR1 use 1e-6).
      unbiased_std: use the n−1 std like ``torch.std`` in verl/EasyR1 (default) or the population
        std. With G = 1 the std is taken as 0 (the advantage is 0 anyway).

    Returns: [N] float32 advantages.
    """
    grouped = _grouped("rewards", rewards, group_size)
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if std_normalize:
        dof = max(group_size - 1, 1) if unbiased_std else group_size
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / dof)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards, group_size: int) -> jax.Array:
    """REINFORCE leave-one-out advantage: each response's baseline is the mean of the others.

        A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j  =  k/(k−1) · (r_i − mean(r))

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", https://arxiv.org/abs/2402.14740 (§3.2, RLOO estimator).

    Args:
      rewards: [N] rewards, consecutive groups of ``group_size`` (k ≥ 2) responses per prompt.
      group_size: k (static).

    Returns: [N] float32 advantages.
    """
    if isinstance(group_size, int) and group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got group_size={group_size}")
    grouped = _grouped("rewards", rewards, group_size)
    # The centred form k/(k−1)·(r − mean) is exactly 0 for an all-equal group, whereas
    # r − (sum − r)/(k−1) can leave a rounding residue.
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    return (centred * (group_size / (group_size - 1))).reshape(-1)


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 1.0
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens, and the value targets.

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = Σ_l (γλ)^l δ_{t+l},   R_t = A_t + V(s_t)

    Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", https://arxiv.org/abs/1506.02438; as used by PPO (arXiv 1707.06347) for LLMs with
    per-token rewards (KL penalty per token plus the score on the last token). The value after the
    last response token is 0 (terminal). Masked-out tokens (padding, or tool/observation tokens
    inside a multi-turn response) are skipped: they carry no TD error and pass the running value
    and advantage through unchanged, so ``s_{t+1}`` is the next *unmasked* token's state.
    Defaults γ = λ = 1 are verl's.

    Args:
      rewards: [B, T] per-token rewards (0 where there is none).
      values: [B, T] critic values V(s_t) of the states that predict each response token.
      mask: [B, T] response mask.
      gamma: discount γ.
      lam: GAE λ.

    Returns: ``(advantages, returns)``, both [B, T] float32, 0 on masked-out tokens and without
    gradient (they are regression / policy targets).
    """
    common.check_token_arrays(rewards=rewards, values=values, mask=mask)
    mask = common.as_mask(mask)
    rewards = common.masked_zero(rewards, mask)
    values = common.fixed(values, mask)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward_t, value_t, mask_t = inputs
        delta = reward_t + gamma * next_value - value_t
        advantage = delta + gamma * lam * next_advantage
        # A masked token is transparent: keep the carry of the token after it.
        next_value = jnp.where(mask_t > 0, value_t, next_value)
        next_advantage = jnp.where(mask_t > 0, advantage, next_advantage)
        return (next_value, next_advantage), advantage

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    # Scan over time (axis 1) from the last token to the first.
    _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = common.masked_zero(advantages.T, mask)
    returns = common.masked_zero(advantages + values, mask)
    return advantages, returns


def dapo_overlong_penalty(lengths, *, max_length: int, cache_length: int) -> jax.Array:
    """DAPO's soft overlong punishment, added to the outcome reward of each response.

        R_len(y) = 0                                   if |y| ≤ L_max − L_cache
                 = ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| ≤ L_max
                 = −1                                   if |y| > L_max

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    https://arxiv.org/abs/2503.14476 ("overlong reward shaping"; the paper uses L_max = 20480 and
    L_cache = 4096).

    Args:
      lengths: [N] response lengths in tokens.
      max_length: L_max.
      cache_length: L_cache, the width of the linear ramp (0 < L_cache ≤ L_max).

    Returns: [N] float32 penalties in [−1, 0].
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    lengths = jnp.asarray(lengths, jnp.float32)
    soft_start = max_length - cache_length
    ramp = (soft_start - lengths) / cache_length
    return jnp.where(lengths <= soft_start, 0.0, jnp.where(lengths <= max_length, ramp, -1.0))


def informative_groups(rewards, group_size: int) -> jax.Array:
    """[N] bool, True for responses whose group does not have all-equal rewards.

    DAPO's dynamic sampling (arXiv 2503.14476) keeps only such groups: a group with identical
    rewards has zero group-relative advantage and contributes no gradient.
    """
    grouped = _grouped("rewards", rewards, group_size)
    varied = jnp.max(grouped, axis=1) > jnp.min(grouped, axis=1)
    return jnp.repeat(varied, group_size)
