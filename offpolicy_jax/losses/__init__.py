"""Every training objective as a pure, jittable function of arrays.

Inputs are arrays only: ``logp`` / ``old_logp`` / ``behaviour_logp`` / ``ref_logp`` / ``mask`` are
``[B, T]`` (mask = 1 on generated tokens up to and including EOS), rewards and advantages ``[B]``
(or ``[B, T]``), logits ``[B, T, V]``. Every loss checks its input shapes first and returns
``(scalar loss, metrics dict)``; ratios are formed in log space; aggregation is a named option
(:data:`AGGREGATIONS`). Formulas, papers and open questions: ``shared/ALGORITHMS.md``.

>>> import jax, jax.numpy as jnp
>>> from offpolicy_jax import losses
>>> logp = jnp.log(jnp.array([[0.5, 0.25], [0.2, 0.1]]))
>>> loss, metrics = losses.topr(logp, logp, jnp.array([1.0, -1.0]), jnp.ones((2, 2)))
"""

from offpolicy_jax.losses.advantages import (
    dapo_overlong_penalty,
    gae,
    grpo_advantages,
    informative_groups,
    rloo_advantages,
)
from offpolicy_jax.losses.common import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LOG_RATIO_BOUND,
    aggregate,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_whiten,
    sequence_sum,
)
from offpolicy_jax.losses.corrections import (
    CORRECTIONS,
    correction_bounds,
    rollout_correction,
    scale_gradient,
)
from offpolicy_jax.losses.importance import GSPO_LEVELS, cispo, decoupled_ppo, gspo
from offpolicy_jax.losses.logits import (
    entropy,
    token_entropy,
    token_log_probs,
    token_log_probs_and_vocab_mean,
)
from offpolicy_jax.losses.policy_gradient import RATIO_LEVELS, reinforce, topr
from offpolicy_jax.losses.ppo import (
    clipped_policy_loss,
    dapo,
    dr_grpo,
    grpo,
    ppo_clip,
    value_loss,
)
from offpolicy_jax.losses.preference import dpo, spin
from offpolicy_jax.losses.remix import kl_convex, kl_convex_lambda, mix_ppg, remix
from offpolicy_jax.losses.rover import rover, rover_rewards
from offpolicy_jax.losses.sft import nll

# Name -> policy objective, for experiment flags (``--loss=topr``). A plain dict on purpose: the
# signatures differ by family (see each docstring), so a caller picks the loss and passes the
# arrays that family needs.
POLICY_LOSSES = {
    "reinforce": reinforce,
    "clipped_policy_loss": clipped_policy_loss,
    "topr": topr,
    "ppo_clip": ppo_clip,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "gspo": gspo,
    "cispo": cispo,
    "decoupled_ppo": decoupled_ppo,
    "mix_ppg": mix_ppg,
    "remix": remix,
    "rover": rover,
    "nll": nll,
    "dpo": dpo,
    "spin": spin,
}

__all__ = [
    "AGGREGATIONS", "CORRECTIONS", "GSPO_LEVELS", "KL_ESTIMATORS", "LOG_RATIO_BOUND",
    "POLICY_LOSSES", "RATIO_LEVELS", "aggregate", "cispo", "clipped_policy_loss",
    "correction_bounds", "dapo", "dapo_overlong_penalty", "decoupled_ppo", "dpo", "dr_grpo",
    "entropy", "gae", "grpo", "grpo_advantages", "informative_groups", "kl_convex",
    "kl_convex_lambda", "kl_estimate", "kl_k1", "kl_k2", "kl_k3", "masked_mean",
    "masked_whiten", "mix_ppg", "nll", "ppo_clip", "reinforce", "remix", "rloo_advantages",
    "rollout_correction", "rover", "rover_rewards", "scale_gradient", "sequence_sum", "spin",
    "token_entropy", "token_log_probs", "token_log_probs_and_vocab_mean", "topr", "value_loss",
]
