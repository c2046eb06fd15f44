r"""GRPO and the objectives built on its group advantage — Dr.GRPO, DAPO, GSPO, CISPO and AReaL's
decoupled PPO — as one experiment with a ``--variant`` flag.

Papers:
* GRPO — Shao et al., "DeepSeekMath", https://arxiv.org/abs/2402.03300 (§4.1): group-normalised
  outcome advantage Â_i = (r_i − mean r) / std r, PPO clip ε = 0.2, k3 KL to the reference in the
  loss (β = 0.04), per-sequence token mean (seq-mean-token-mean).
* Dr.GRPO — Liu et al., "Understanding R1-Zero-like Training", https://arxiv.org/abs/2503.20783:
  no /std, and a constant normaliser (seq-mean-token-sum-norm) instead of 1/|o_i|.
* DAPO — Yu et al., https://arxiv.org/abs/2503.14476: clip-higher (ε_low 0.2, ε_high 0.28),
  token-level mean, no KL, dynamic sampling (groups whose rewards are all equal carry no signal).
* GSPO — Zheng et al., https://arxiv.org/abs/2507.18071: one length-normalised ratio and one clip
  per response, ε_low 3e-4, ε_high 4e-4 (``--gspo_level=sequence_token`` for GSPO-token).
* CISPO — MiniMax-M1, https://arxiv.org/abs/2506.13585: REINFORCE weighted by the token ratio
  clipped under stop-gradient (our convention: additive, w ∈ [1 − ε_low, 1 + ε_high] = [0, 5]).
* Decoupled PPO — AReaL, Fu et al., https://arxiv.org/abs/2505.24298: the clip is centred on the
  trainer's policy at the start of the iteration (π_prox), the possibly stale sampler enters only
  through the weight π_prox/π_beh (tokens above ``--behaviour_weight_cap`` are masked). It only
  differs from GRPO's clip when the sampler lags (``--rollout_lag``).

Command (embedded default, 2 CPU cores, a few minutes):

    python experiments/grpo.py --variant=grpo

Expected: held-out pass@1 of the tiny-arith model rises (see the final JSON line). Under bounded
staleness (README, "Stale rollouts"), sampling 4 iterations behind the trainer:

    python experiments/grpo.py --variant=decoupled_ppo --rollout_lag=4

Departures: β defaults to 0 here (the tiny default has no separate SFT reference worth anchoring
to; pass --kl_coef=0.04 for the paper's value); DAPO's dynamic sampling re-draws prompts until the
batch is full of informative groups — by default here uninformative groups are masked out of the
loss instead, which keeps the rollout budget fixed (their advantage is 0 anyway; masking removes
them from the token-mean denominator, which is the part of dynamic sampling that changes the
gradient). ``--dynamic_sampling`` does it as the paper does (``training.stages.DynamicSampling``,
for any variant), paying for the extra rollouts.
"""

import numpy as np
from absl import app, flags

from offpolicy_jax import losses, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop, policies, stages
from offpolicy_jax.training.algorithm import Algorithm

VARIANT = flags.DEFINE_enum("variant", "grpo",
                            ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "decoupled_ppo"],
                            "Which objective.")
CLIP_EPS_LOW = flags.DEFINE_float("clip_eps_low", None, "ε_low (default: 0.2; GSPO 3e-4; CISPO 1, "
                                  "i.e. no lower bound).")
CLIP_EPS_HIGH = flags.DEFINE_float("clip_eps_high", None, "ε_high (default: 0.2; DAPO 0.28; "
                                   "GSPO 4e-4; CISPO 4).")
GSPO_LEVEL = flags.DEFINE_enum("gspo_level", "sequence", ["sequence", "sequence_token"],
                               "GSPO: the sequence ratio, or GSPO-token (same gradient with "
                               "sequence advantages).")
BEHAVIOUR_WEIGHT_CAP = flags.DEFINE_float("behaviour_weight_cap", 5.0, "Decoupled PPO: tokens "
                                          "whose π_prox/π_beh exceeds this are masked (AReaL's "
                                          "example configs: 5); <= 0 disables the mask.")
KL_COEF = flags.DEFINE_float("kl_coef", 0.0, "β of the k3 KL to the initial policy "
                             "(GRPO paper 0.04; DAPO and Dr.GRPO use 0).")
DYNAMIC_SAMPLING = flags.DEFINE_bool("dynamic_sampling", False, "DAPO's dynamic sampling as the "
                                     "paper does it: drop groups whose rewards are all equal and "
                                     "sample more prompts until the batch is full (every sampled "
                                     "response counts in the rollout budget).")
MAX_SAMPLING_ROUNDS = flags.DEFINE_integer("max_sampling_rounds", 4, "Dynamic sampling: "
                                           "generation rounds per iteration at most (verl: 10).")

# Per variant: the loss, whether the advantage divides by the group std, the clip range.
VARIANTS = {
    "grpo": (losses.grpo, True, 0.2, 0.2),
    "dr_grpo": (losses.dr_grpo, False, 0.2, 0.2),
    "dapo": (losses.dapo, True, 0.2, 0.28),
    "gspo": (losses.gspo, True, 3e-4, 4e-4),
    "cispo": (losses.cispo, True, 1.0, 4.0),
    "decoupled_ppo": (losses.decoupled_ppo, True, 0.2, 0.2),
}
# The objectives with GRPO's KL term; the others are used without one, as in their papers.
WITH_KL = ("grpo", "dr_grpo", "dapo")


def make_algorithm(variant: str) -> Algorithm:
    objective, std_normalize, eps_low, eps_high = VARIANTS[variant]
    eps_low = CLIP_EPS_LOW.value if CLIP_EPS_LOW.value is not None else eps_low
    eps_high = CLIP_EPS_HIGH.value if CLIP_EPS_HIGH.value is not None else eps_high
    kl_coef = KL_COEF.value
    if kl_coef and variant not in WITH_KL:
        raise ValueError(f"--kl_coef={kl_coef}: --variant={variant} has no KL term (only "
                         f"{', '.join(WITH_KL)} do)")
    cap = BEHAVIOUR_WEIGHT_CAP.value if BEHAVIOUR_WEIGHT_CAP.value > 0 else None

    def group_advantages(inputs, info) -> dict:
        """Advantages over whole groups of the rollout batch (and DAPO's informative groups)."""
        rewards = inputs["rewards"]
        out = {"advantages": np.asarray(losses.grpo_advantages(
            rewards, info.group_size, std_normalize=std_normalize))}
        if variant == "dapo":
            out["informative"] = np.asarray(
                losses.informative_groups(rewards, info.group_size), np.float32)
        return out

    def loss(inputs, info):
        logp, old_logp, advantages, mask = (inputs["logp"], inputs["old_logp"],
                                            inputs["advantages"], inputs["mask"])
        clip = {"eps_low": eps_low, "eps_high": eps_high}
        if variant == "gspo":
            return objective(logp, old_logp, advantages, mask, level=GSPO_LEVEL.value, **clip)
        if variant == "cispo":
            return objective(logp, old_logp, advantages, mask, **clip)
        if variant == "decoupled_ppo":
            return objective(logp, old_logp, inputs["behaviour_logp"], advantages, mask,
                             behaviour_weight_cap=cap, **clip)
        extra = {"informative": inputs["informative"]} if variant == "dapo" else {}
        if variant == "dr_grpo":
            # L_max is the response budget, not the (trimmed) width of this batch.
            extra["max_len"] = info.max_new_tokens
        return objective(logp, old_logp, advantages, mask, ref_logp=inputs.get("ref_logp"),
                         kl_coef=kl_coef, **clip, **extra)

    forward = {"old": ("logp",)}
    stored = ()
    if kl_coef:
        forward["ref"] = ("logp",)
        stored = (policies.reference("ref"),)   # GRPO's π_ref: the initial policy
    refill = (stages.DynamicSampling(max_rounds=MAX_SAMPLING_ROUNDS.value),) \
        if DYNAMIC_SAMPLING.value else ()
    return Algorithm(name=variant, loss=loss, prepare=group_advantages, forward=forward,
                     policies=stored, stages=refill)


def main(argv):
    del argv
    loop.run(shared_flags.run_config(VARIANT.value), make_algorithm(VARIANT.value))


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; papers use 1e-6 at 7B.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    # Two optimizer updates per rollout batch (the second is off-policy, where the clip acts);
    # the GRPO paper takes one pass over each batch.
    flags.FLAGS.set_default("num_minibatches", 2)
    app.run(main)
