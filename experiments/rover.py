r"""ROVER — Random Policy Valuation for diverse reasoning (He et al., 2025).

Paper: "Random Policy Valuation is Enough for LLM Reasoning with Verifiable Rewards",
https://arxiv.org/abs/2509.24981 (code: github.com/tinnerhrhe/ROVER). Loss: ``losses.rover`` — the
Q-function of the uniform random policy is the policy's own relative log-prob,
Q(s_t, a_t) = ρ (log π_θ − log π_old) (Eq. 3), regressed onto the mean-operator Bellman target
r̃ + β_Q · mean_a Q(s_{t+1}, a) with the vocabulary mean taken over the full logits (Alg. 1).
Rewards: ``losses.rover_rewards`` — mean-centred within each prompt's group (Eq. 4; the released
math script also divides by the std: ``--std_normalize``). No KL, no entropy bonus, no clipping.

Command (embedded default, no download):

    python experiments/rover.py

Hardware: 2 CPU cores, a few minutes. Expected: held-out pass@1 of the tiny-arith model rises and
the response entropy stays higher than GRPO's (the paper's diversity claim; see ``train/entropy``
in metrics.jsonl).

Departures (commented where set): rollout temperature 1.0 (the paper samples at 0.6; the shared
default keeps methods comparable); learning rate for a 1M-parameter model.
"""

import numpy as np
from absl import app, flags

from offpolicy_jax import losses, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop
from offpolicy_jax.training.algorithm import Algorithm

RHO = flags.DEFINE_float("rho", 1.0, "ρ, temperature of the Q parameterisation (paper: 1).")
BETA_Q = flags.DEFINE_float("beta_q", 1.0, "β_Q, scale of the successor mean-Q term (paper: 1; "
                            "0 collapses entropy and length, 5 degrades).")
CLIP_EPS = flags.DEFINE_float("clip_eps", None, "ε of the official code's optional one-sided clip "
                              "of Q to [log(1-ε), log(1+ε)] where the target pushes it further "
                              "out (use_rover_clip, clip_ratio 0.2; off in the released runs).")
STD_NORMALIZE = flags.DEFINE_bool("std_normalize", False, "Divide the centred reward by the group "
                                  "std (the released math script) instead of mean-centring only "
                                  "(the paper, Eq. 4).")


def make_algorithm() -> Algorithm:
    rho, beta_q, std_normalize, clip_eps = (RHO.value, BETA_Q.value, STD_NORMALIZE.value,
                                            CLIP_EPS.value)

    def centred_rewards(inputs, info) -> dict:
        return {"advantages": np.asarray(losses.rover_rewards(
            inputs["rewards"], info.group_size, std_normalize=std_normalize))}

    def loss(inputs, info):
        del info
        return losses.rover(inputs["logp"], inputs["old_logp"], inputs["vocab_mean"],
                            inputs["old_vocab_mean"], inputs["advantages"], inputs["mask"],
                            rho=rho, beta_q=beta_q, clip_eps=clip_eps)

    return Algorithm(name="rover", loss=loss, prepare=centred_rewards,
                     forward={"current": ("vocab_mean",), "old": ("logp", "vocab_mean")})


def main(argv):
    del argv
    loop.run(shared_flags.run_config("rover"), make_algorithm())


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; the paper uses 1e-6 at 8B.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    # Paper: 128 prompts per batch in mini-batches of 32, so 4 updates per batch; with one update
    # the target alone carries the gradient (Q ≡ 0 on-policy).
    flags.FLAGS.set_default("num_minibatches", 4)
    app.run(main)
