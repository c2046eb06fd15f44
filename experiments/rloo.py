r"""RLOO — REINFORCE Leave-One-Out (Ahmadian et al., 2024).

Paper: "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
in LLMs", https://arxiv.org/abs/2402.14740. The whole response is one action; each response's
baseline is the mean reward of the other k − 1 responses to the same prompt:

    ∇J ≈ (1/k) Σ_i [R_i − (1/(k−1)) Σ_{j≠i} R_j] ∇log π_θ(y_i | x)

Advantages: ``losses.rloo_advantages``; loss: ``losses.reinforce`` with the sequence log-prob (sum
over tokens, ``seq-mean-token-sum``). With ``--kl_coef`` the sequence KL to the initial policy is
subtracted from the reward before the leave-one-out baseline (R = r − β·KL, as in the paper).

Command (embedded default, no download):

    python experiments/rloo.py

Hardware: 2 CPU cores, a few minutes. Expected: held-out pass@1 of the tiny-arith model rises.

Departures (commented where set): β defaults to 0 on the tiny default (the paper uses 0.03/0.10
against an SFT reference); k = the shared --group_size (8) instead of 2 or 4; the second of the two
gradient steps per batch is taken on the same samples without importance correction, as in the
paper's vanilla estimator.
"""

import numpy as np
from absl import app, flags

from offpolicy_jax import losses, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop, policies
from offpolicy_jax.training.algorithm import Algorithm

KL_COEF = flags.DEFINE_float("kl_coef", 0.0, "β of the sequence KL to the initial policy, "
                             "subtracted from the reward (paper 0.03 / 0.10; 0 here).")


def make_algorithm() -> Algorithm:
    kl_coef = KL_COEF.value

    def advantages(inputs, info) -> dict:
        """RLOO advantages of R = r − β Σ_t (log π_old − log π_ref) (KL in the reward)."""
        if not kl_coef:
            return {"advantages": np.asarray(losses.rloo_advantages(inputs["rewards"],
                                                                    info.group_size))}
        sequence_kl = np.sum((inputs["old_logp"] - inputs["ref_logp"]) * inputs["mask"], axis=1)
        shaped = inputs["rewards"] - kl_coef * sequence_kl
        return {"advantages": np.asarray(losses.rloo_advantages(shaped, info.group_size)),
                "sequence_kl": sequence_kl.astype(np.float32)}

    def loss(inputs, info):
        del info
        return losses.reinforce(inputs["logp"], inputs["advantages"], inputs["mask"],
                                agg="seq-mean-token-sum")

    forward, stored = {}, ()
    if kl_coef:
        forward = {"old": ("logp",), "ref": ("logp",)}
        stored = (policies.reference("ref"),)
    return Algorithm(name="rloo", loss=loss, prepare=advantages, forward=forward,
                     prepare_reads=("old_logp",) if kl_coef else (), policies=stored)


def main(argv):
    del argv
    loop.run(shared_flags.run_config("rloo"), make_algorithm())


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; the paper uses 1e-6.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    flags.FLAGS.set_default("num_minibatches", 2)   # the paper's 2 gradient steps per batch
    app.run(main)
