"""Pairwise preference losses: DPO and SPIN (DPO against the previous iterate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common


def _sequence_logp(name: str, logp, mask) -> jax.Array:
    """Σ_t m logp, with shape checks naming ``name``. [B, T] -> [B]."""
    common.check_token_arrays(**{name: logp, f"{name}_mask": mask})
    return common.sequence_sum(logp, mask)


def _valid_pairs(first_mask, second_mask) -> jax.Array:
    """[B] float 0/1: 1 for pairs with at least one unmasked token in either response.

    A pair whose two responses are both fully masked is batch padding: it would otherwise add
    log 2 (h = 0) to the mean, so it is left out of every average.
    """
    return ((jnp.sum(common.as_mask(first_mask), axis=-1)
             + jnp.sum(common.as_mask(second_mask), axis=-1)) > 0).astype(jnp.float32)


def _pairwise_logistic(policy_margin, reference_margin, scale, label_smoothing, prefix, valid
                       ) -> tuple[jax.Array, dict]:
    """−mean[(1−s) log σ(z) + s log σ(−z)], z = scale · (policy_margin − reference_margin).

    The mean runs over the ``valid`` pairs only (see :func:`_valid_pairs`).
    """
    logits = scale * (policy_margin - reference_margin)
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * jax.nn.log_sigmoid(-logits)
    loss = common.masked_mean(losses, valid)
    metrics = {
        f"{prefix}_loss": loss,
        "reward_accuracy": common.masked_mean(logits > 0, valid),
        "reward_margin": common.masked_mean(logits, valid),
    }
    return loss, metrics


def dpo(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, chosen_mask,
        rejected_mask, *, beta: float = 0.1, label_smoothing: float = 0.0
        ) -> tuple[jax.Array, dict]:
    """Direct Preference Optimisation.

        h    = β [log π_θ(y_w|x) − log π_ref(y_w|x)] − β [log π_θ(y_l|x) − log π_ref(y_l|x)]
        loss = −mean log σ(h)                                                  (DPO Eq. 7)

    Rafailov et al. 2023, https://arxiv.org/abs/2305.18290. Sequence log-probs are sums over the
    response tokens (no length normalisation); π_ref is frozen (stop-gradient). ``label_smoothing``
    s > 0 gives the conservative-DPO loss −(1−s) log σ(h) − s log σ(−h) (label noise s); 0 = DPO.
    Chosen and rejected responses may be padded to different lengths. The mean is over pairs;
    a pair whose two masks are all zero (batch padding) is ignored.

    Args:
      chosen_logp, ref_chosen_logp, chosen_mask: [B, Tw] token log-probs of the preferred
        response y_w under π_θ (differentiated) and π_ref, and its mask.
      rejected_logp, ref_rejected_logp, rejected_mask: [B, Tl], the same for y_l.
      beta: β (≈ 0.1).
      label_smoothing: s ∈ [0, 0.5).

    Returns: ``(loss, metrics)`` with ``dpo_loss``, ``reward_accuracy`` (fraction with h > 0),
    ``reward_margin`` (mean h), ``chosen_reward`` / ``rejected_reward`` (mean implicit rewards
    β·log π_θ/π_ref).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    common.check_token_arrays(chosen_logp=chosen_logp, ref_chosen_logp=ref_chosen_logp,
                              chosen_mask=chosen_mask)
    common.check_token_arrays(rejected_logp=rejected_logp, ref_rejected_logp=ref_rejected_logp,
                              rejected_mask=rejected_mask)
    if jnp.shape(chosen_logp)[0] != jnp.shape(rejected_logp)[0]:
        raise ValueError(f"chosen_logp {list(jnp.shape(chosen_logp))} and rejected_logp "
                         f"{list(jnp.shape(rejected_logp))} must have the same batch size B")
    chosen = _sequence_logp("chosen_logp", chosen_logp, chosen_mask)
    rejected = _sequence_logp("rejected_logp", rejected_logp, rejected_mask)
    ref_chosen = jax.lax.stop_gradient(_sequence_logp("ref_chosen_logp", ref_chosen_logp,
                                                      chosen_mask))
    ref_rejected = jax.lax.stop_gradient(_sequence_logp("ref_rejected_logp", ref_rejected_logp,
                                                        rejected_mask))
    valid = _valid_pairs(chosen_mask, rejected_mask)
    loss, metrics = _pairwise_logistic(chosen - rejected, ref_chosen - ref_rejected, beta,
                                       label_smoothing, "dpo", valid)
    metrics["chosen_reward"] = common.masked_mean(beta * (chosen - ref_chosen), valid)
    metrics["rejected_reward"] = common.masked_mean(beta * (rejected - ref_rejected), valid)
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def spin(real_logp, generated_logp, opponent_real_logp, opponent_generated_logp, real_mask,
         generated_mask, *, lam: float = 0.1) -> tuple[jax.Array, dict]:
    """Self-Play fIne-tuNing: DPO where the "rejected" answer is the previous iterate's own sample.

        z    = λ log(p_θ(y|x) / p_θt(y|x)) − λ log(p_θ(y'|x) / p_θt(y'|x)),   y ~ p_data, y' ~ p_θt
        loss = mean ℓ(z),  ℓ(z) = log(1 + e^{−z})

    Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language
    Models", https://arxiv.org/abs/2401.01335 (ICML 2024). The opponent p_θt is both the generator
    of y' and the reference (stop-gradient). Identical to :func:`dpo` with β = λ (fully-masked
    padding pairs are ignored in the same way).

    Args:
      real_logp, opponent_real_logp, real_mask: [B, Ty] token log-probs of the human (SFT)
        response y under p_θ (differentiated) and p_θt, and its mask.
      generated_logp, opponent_generated_logp, generated_mask: [B, Ty'] the same for y'.
      lam: λ (0.1; 5.0 in the paper's last iteration).

    Returns: ``(loss, metrics)`` with ``spin_loss``, ``reward_accuracy``, ``reward_margin``.
    """
    common.check_token_arrays(real_logp=real_logp, opponent_real_logp=opponent_real_logp,
                              real_mask=real_mask)
    common.check_token_arrays(generated_logp=generated_logp,
                              opponent_generated_logp=opponent_generated_logp,
                              generated_mask=generated_mask)
    if jnp.shape(real_logp)[0] != jnp.shape(generated_logp)[0]:
        raise ValueError(f"real_logp {list(jnp.shape(real_logp))} and generated_logp "
                         f"{list(jnp.shape(generated_logp))} must have the same batch size B")
    real = _sequence_logp("real_logp", real_logp, real_mask)
    generated = _sequence_logp("generated_logp", generated_logp, generated_mask)
    opponent_real = jax.lax.stop_gradient(
        _sequence_logp("opponent_real_logp", opponent_real_logp, real_mask))
    opponent_generated = jax.lax.stop_gradient(
        _sequence_logp("opponent_generated_logp", opponent_generated_logp, generated_mask))
    loss, metrics = _pairwise_logistic(real - generated, opponent_real - opponent_generated, lam,
                                       0.0, "spin", _valid_pairs(real_mask, generated_mask))
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
