r"""ARPO — GRPO with a replay buffer of successful responses (Lu et al., 2025).

Paper: "ARPO: End-to-End Policy Optimization for GUI Agents with Experience Replay",
https://arxiv.org/abs/2505.16282 (code: github.com/dvlab-research/ARPO, ``replay_buffer.py`` and
``ray_trainer.py::apply_replay``). The method is GRPO plus a per-prompt FIFO of successful
responses (capacity 8, success = reward > 0.1): when every response of a group failed
(std < 0.05 and mean < 0.2), the group's first response is replaced by a stored success of the
same prompt, so the group carries a learning signal instead of a zero advantage. Buffer and
stage: ``training.stages.SuccessReplay``. Loss: ``losses.ppo_clip`` with the
asymmetric clip ε_low 0.2 / ε_high 0.3 and dual clip c = 3 for negative advantages, no KL.

Command (embedded default, no download):

    python experiments/arpo.py

Hardware: 2 CPU cores, a few minutes. Expected: held-out pass@1 of the tiny-arith model rises;
``staleness_max`` > 0 in metrics.jsonl marks iterations in which a stored success was replayed.

Departures (commented where set): the task is single-turn arithmetic instead of multi-turn OSWorld
GUI episodes (one response = one trajectory); the reward is the verifier's {0, 1} (ARPO adds a
format penalty); 2 optimizer updates per batch instead of 16 (global batch 8 of 128 rollouts). As
in the paper, training revisits a fixed pool of 128 prompts (``--train_size=128``), so prompts
recur and the replay can act; ``success_replay/injected_groups`` in metrics.jsonl counts it.
"""

import numpy as np
from absl import app, flags

from offpolicy_jax import losses, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop, stages
from offpolicy_jax.training.algorithm import Algorithm

CAPACITY = flags.DEFINE_integer("replay_capacity", 8, "Successful responses kept per prompt "
                                "(ARPO: 8).")
SUCCESS_THRESHOLD = flags.DEFINE_float("success_threshold", 0.1, "Reward above which a response "
                                       "is stored (ARPO: eval_result > 0.1).")
CLIP_EPS_LOW = flags.DEFINE_float("clip_eps_low", 0.2, "ε_low (ARPO: 0.2).")
CLIP_EPS_HIGH = flags.DEFINE_float("clip_eps_high", 0.3, "ε_high (ARPO: 0.3).")
DUAL_CLIP = flags.DEFINE_float("dual_clip", 3.0, "Dual-clip c for A < 0 (ARPO: 3).")


def make_algorithm() -> Algorithm:
    eps_low, eps_high, dual_clip = CLIP_EPS_LOW.value, CLIP_EPS_HIGH.value, DUAL_CLIP.value

    def advantages(inputs, info) -> dict:
        # A_i = (R_i − mean) / (std + 1e-6), unbiased std as torch.std (ARPO core_algos).
        return {"advantages": np.asarray(losses.grpo_advantages(inputs["rewards"],
                                                                info.group_size, eps=1e-6))}

    def loss(inputs, info):
        del info
        # Micro-batch 1 in ARPO: token-mean per trajectory, then the mean over trajectories.
        return losses.ppo_clip(inputs["logp"], inputs["old_logp"], inputs["advantages"],
                               inputs["mask"], eps_low=eps_low, eps_high=eps_high,
                               dual_clip=dual_clip, agg="seq-mean-token-mean")

    return Algorithm(name="arpo", loss=loss, prepare=advantages, forward={"old": ("logp",)},
                     stages=(stages.SuccessReplay(capacity=CAPACITY.value,
                                                  success_threshold=SUCCESS_THRESHOLD.value),))


def main(argv):
    del argv
    loop.run(shared_flags.run_config("arpo"), make_algorithm())


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; ARPO uses 1e-6 at 7B.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    # ARPO: 16 updates per batch (global batch 8 of 128 rollouts); 2 here, as the GRPO baseline.
    flags.FLAGS.set_default("num_minibatches", 2)
    # A fixed pool of 128 prompts revisited every epoch, as ARPO's 128 tasks: the replay can only
    # act on prompts that recur (on arith's full pool of 10,333 none does within a run).
    flags.FLAGS.set_default("train_size", 128)
    app.run(main)
