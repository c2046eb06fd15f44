r"""GRPO and its variants Dr.GRPO and DAPO, as one experiment with a ``--variant`` flag.

Papers:
* GRPO — Shao et al., "DeepSeekMath", https://arxiv.org/abs/2402.03300 (§4.1): group-normalised
  outcome advantage Â_i = (r_i − mean r) / std r, PPO clip ε = 0.2, k3 KL to the reference in the
  loss (β = 0.04), per-sequence token mean (seq-mean-token-mean).
* Dr.GRPO — Liu et al., "Understanding R1-Zero-like Training", https://arxiv.org/abs/2503.20783:
  no /std, and a constant normaliser (seq-mean-token-sum-norm) instead of 1/|o_i|.
* DAPO — Yu et al., https://arxiv.org/abs/2503.14476: clip-higher (ε_low 0.2, ε_high 0.28),
  token-level mean, no KL, dynamic sampling (groups whose rewards are all equal carry no signal).

Command (embedded default, 2 CPU cores, a few minutes):

    python experiments/grpo.py --variant=grpo

Expected: held-out pass@1 of the tiny-arith model rises (see the final JSON line).
Departures: β defaults to 0 here (the tiny default has no separate SFT reference worth anchoring
to; pass --kl_coef=0.04 for the paper's value); DAPO's dynamic sampling re-draws prompts until the
batch is full of informative groups — here uninformative groups are masked out of the loss
instead, which keeps the rollout budget fixed (their advantage is 0 anyway; masking removes them
from the token-mean denominator, which is the part of dynamic sampling that changes the gradient).
"""

import jax
import numpy as np
from absl import app, flags

from offpolicy_jax import losses, tiny_arith
from offpolicy_jax.training import algorithm as algorithm_lib
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop

VARIANT = flags.DEFINE_enum("variant", "grpo", ["grpo", "dr_grpo", "dapo"], "Which objective.")
CLIP_EPS_LOW = flags.DEFINE_float("clip_eps_low", None, "ε_low (default: 0.2 for every variant).")
CLIP_EPS_HIGH = flags.DEFINE_float("clip_eps_high", None, "ε_high (default: 0.2; DAPO 0.28).")
KL_COEF = flags.DEFINE_float("kl_coef", 0.0, "β of the k3 KL to the initial policy "
                             "(GRPO paper 0.04; DAPO and Dr.GRPO use 0).")
UPDATES_PER_BATCH = flags.DEFINE_integer("updates_per_batch", 1, "Passes over each batch "
                                         "(GRPO paper: 1).")
NUM_MINIBATCHES = flags.DEFINE_integer("num_minibatches", 2, "Optimizer updates per pass.")

# Per-variant defaults: (std_normalize, aggregation, eps_low, eps_high, mask_uninformative).
VARIANTS = {
    "grpo": (True, "seq-mean-token-mean", 0.2, 0.2, False),
    "dr_grpo": (False, "seq-mean-token-sum-norm", 0.2, 0.2, False),
    "dapo": (True, "token-mean", 0.2, 0.28, True),
}


def make_algorithm(variant: str) -> algorithm_lib.Algorithm:
    std_normalize, agg, eps_low, eps_high, mask_uninformative = VARIANTS[variant]
    eps_low = CLIP_EPS_LOW.value if CLIP_EPS_LOW.value is not None else eps_low
    eps_high = CLIP_EPS_HIGH.value if CLIP_EPS_HIGH.value is not None else eps_high
    kl_coef = KL_COEF.value

    def advantages(rewards: np.ndarray, group_size: int) -> dict:
        out = {"advantages": np.asarray(losses.grpo_advantages(rewards, group_size,
                                                               std_normalize=std_normalize))}
        if mask_uninformative:
            out["informative"] = np.asarray(losses.informative_groups(rewards, group_size))
        return out

    def loss(inputs):
        mask = inputs["mask"]
        if mask_uninformative:
            mask = mask * inputs["informative"][:, None]
        policy_loss, metrics = losses.ppo_clip(inputs["logp"], inputs["old_logp"],
                                               inputs["advantages"], mask, eps_low=eps_low,
                                               eps_high=eps_high, agg=agg,
                                               max_len=mask.shape[1])
        if kl_coef:
            # GRPO Eq. 3: the k3 estimator of KL(π_θ ‖ π_ref), in the loss, same aggregation.
            kl = losses.aggregate(losses.kl_estimate(inputs["logp"], inputs["ref_logp"], "k3"),
                                  mask, agg, max_len=mask.shape[1])
            policy_loss = policy_loss + kl_coef * kl
            metrics = {**metrics, "kl_ref": jax.lax.stop_gradient(kl)}
        return policy_loss, metrics

    return algorithm_lib.Algorithm(
        name=variant, loss=loss, advantages=advantages, needs_reference=kl_coef > 0,
        updates_per_batch=UPDATES_PER_BATCH.value, num_minibatches=NUM_MINIBATCHES.value)


def main(argv):
    del argv
    config = shared_flags.run_config(VARIANT.value)
    loop.run(config, make_algorithm(VARIANT.value))


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; papers use 1e-6 at 7B.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    app.run(main)
