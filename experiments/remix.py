r"""ReMix — Reincarnating Mix-policy Proximal Policy Gradient (Liang et al., ICLR 2026).

Paper: "Squeeze the Soaked Sponge: Efficient Off-policy Reinforcement Finetuning for Large
Language Model", https://arxiv.org/abs/2507.06892. Three pieces (ALGORITHMS.md §2):

1. Mix-PPG (``losses.mix_ppg``): each batch mixes a fraction p of groups replayed from the last N
   policies' rollouts (``training.stages.ReplayWindow``; each row keeps its behaviour log-probs
   log π_{k−i}) with fresh groups from π_k, and takes m passes over each batch (UTD ratio,
   ``--num_passes``). The whole objective is ``losses.remix``.
   The clip is centred on π_k/π_{k−i}: stored ``behaviour_logp`` vs the recomputed ``old_logp``.
2. KL-Convex (``losses.kl_convex``): β·[λ(t)·KL(π_θ‖π_base) + (1−λ(t))·KL(π_θ‖π_{k−1})] with
   λ(t) = max(1 − 0.1·⌈max(t − delay, 0)/interval⌉, 0.5) (``losses.kl_convex_lambda``); π_{k−1} is
   the policy at the start of the previous iteration (a stored policy one iteration behind:
   ``policies.behind("prev", 1)``).
3. Policy reincarnation at step T: the KL anchor π_base becomes the current policy π_T
   (``policies.reset_after("base", T)``) and training switches to on-policy (p = 0, window
   discarded: ``stages.ReplayWindow``). One T sets both, in ``make_algorithm``.

Variants: ``--variant=grpo`` (group-normalised advantage of each stored group, recomputed from its
stored rewards) and ``--variant=ppo`` (GAE from the current critic, ``offpolicy_jax.critic``; the
replayed samples' advantages are recomputed with the current critic — the natural reading of
A^{π_k}, unconfirmed in the paper).

Command (embedded default, no download):

    python experiments/remix.py --variant=grpo

Hardware: 2 CPU cores, a few minutes. Expected: held-out pass@1 of the tiny-arith model rises,
using fewer fresh rollouts per step than GRPO before T (``rollouts`` in metrics.jsonl;
``staleness_max`` = 1..N marks replayed samples).

Departures (commented where set): T, the λ schedule's delay and interval are scaled to a 40-step
run (paper: T = 50 with delay 50 and interval 10 over 350+ steps; the defaults keep the paper's
ratios delay = T, interval = T/5); β = 1e-3 (verl's default, the paper's value is not public); no
entropy bonus (c unconfirmed; verl's default 1e-3 is negligible); the UTD ratio m stays 2 after T
(the paper presumably returns to 1, unconfirmed); the λ schedule runs on the global step (whether
it restarts at T is unconfirmed).
"""

import numpy as np
from absl import app, flags

from offpolicy_jax import critic, losses, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop, policies, stages
from offpolicy_jax.training.algorithm import Algorithm

VARIANT = flags.DEFINE_enum("variant", "grpo", ["grpo", "ppo"], "ReMix-GRPO (group advantages) "
                            "or ReMix-PPO (value head + GAE).")
OFF_POLICY_FRACTION = flags.DEFINE_float("off_policy_fraction", 0.4, "p: fraction of each batch's "
                                         "groups replayed from the window (paper 0.4).")
WINDOW = flags.DEFINE_integer("window", 2, "N: past policies whose samples are replayable "
                              "(paper 2).")
REINCARNATION_STEP = flags.DEFINE_integer("reincarnation_step", 20, "T: after this iteration the "
                                          "KL anchor becomes the current policy and training is "
                                          "on-policy (paper 50 of 350+ steps; -1: never).")
REINCARNATION_FRACTION = flags.DEFINE_float(
    "reincarnation_fraction", None, "T as a fraction of the run, instead of --reincarnation_step: "
    "of --iterations, or with --rollout_budget of the iterations an on-policy method takes to "
    "spend it (budget / (batch_size x group_size)); compare.py uses 0.5.")
KL_COEF = flags.DEFINE_float("kl_coef", 1e-3, "β of the KL-Convex constraint (verl default).")
KL_LAMBDA_DELAY = flags.DEFINE_integer("kl_lambda_delay", None, "λ(t) stays 1 up to this step "
                                       "(paper 50; default: T, or 50 without reincarnation).")
KL_LAMBDA_INTERVAL = flags.DEFINE_integer("kl_lambda_interval", None, "λ(t) drops by 0.1 every "
                                          "this many steps, floor 0.5 (paper 10; default: T/5, "
                                          "or 10 without reincarnation).")
CLIP_EPS = flags.DEFINE_float("clip_eps", 0.2, "ε of the Mix-PPG clip around π_k/π_{k−i}.")
DUAL_CLIP = flags.DEFINE_float("dual_clip", None, "Dual-clip c for A < 0 (a third-party "
                               "implementation uses 3; off by default).")
VF_COEF = flags.DEFINE_float("vf_coef", 0.1, "PPO variant: weight of the value loss.")

# λ(t) stays 1 for 50 steps, then drops by 0.1 every 10 (the paper's schedule).
PAPER_LAMBDA_DELAY, PAPER_LAMBDA_INTERVAL = 50, 10


def schedule(config=None) -> tuple[int | None, int, int]:
    """``(T or None, λ delay, λ interval)`` from the flags (and, for ``--reincarnation_fraction``,
    the run's length in ``config``), checked.

    With T set, λ(t)'s schedule defaults to the paper's ratios to T (delay = T, interval = T/5;
    paper: T = delay = 50, interval = 10); without reincarnation (``--reincarnation_step=-1``) to
    the paper's own delay 50 and interval 10, so turning reincarnation off leaves λ(t) alone.
    """
    step, delay, interval = (REINCARNATION_STEP.value, KL_LAMBDA_DELAY.value,
                             KL_LAMBDA_INTERVAL.value)
    if REINCARNATION_FRACTION.value is not None:
        step = reincarnation_from_fraction(REINCARNATION_FRACTION.value, config)
    if step < -1:
        raise ValueError(f"--reincarnation_step must be >= 0, or -1 for never; got {step}")
    reincarnation = None if step == -1 else step
    if delay is None:
        delay = PAPER_LAMBDA_DELAY if reincarnation is None else reincarnation
    if interval is None:
        interval = PAPER_LAMBDA_INTERVAL if reincarnation is None else max(1, reincarnation // 5)
    if delay < 0 or interval < 1:
        raise ValueError(f"need --kl_lambda_delay >= 0 and --kl_lambda_interval >= 1, got "
                         f"{delay} and {interval}")
    return reincarnation, delay, interval


def reincarnation_from_fraction(fraction: float, config) -> int:
    """T = fraction × the run's length in on-policy iterations (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--reincarnation_fraction must be in (0, 1], got {fraction}")
    length = (config.rollout_budget // (config.batch_size * config.group_size)
              if config.rollout_budget else config.iterations)
    return max(1, round(fraction * length))


def make_algorithm(variant: str, config=None) -> Algorithm:
    """ReMix: the window stage, the two KL anchors and the loss, all from one T."""
    reincarnation, delay, interval = schedule(config)
    kl_coef, clip_eps, dual_clip, vf_coef = (KL_COEF.value, CLIP_EPS.value, DUAL_CLIP.value,
                                             VF_COEF.value)
    ppo = variant == "ppo"

    def advantages(inputs, info) -> dict:
        """A^{π_k}: GAE from the current critic, or the group advantage of each stored group."""
        if ppo:
            return critic.gae_targets(inputs)
        return {"advantages": np.asarray(losses.grpo_advantages(inputs["rewards"],
                                                                info.group_size))}

    def loss(inputs, info):
        mask = inputs["mask"]
        # Rows from the window were sampled by a policy older than π_k (version iteration − 1).
        replayed = inputs["policy_version"] < info.iteration - 1
        # π_base ("base"): the initial policy, then π_T after reincarnation; π_{k−1} ("prev").
        total, metrics = losses.remix(
            inputs["logp"], inputs["old_logp"], inputs["behaviour_logp"], inputs["advantages"],
            mask, base_logp=inputs["base_logp"], prev_logp=inputs["prev_logp"],
            step=info.iteration, kl_coef=kl_coef, lambda_delay=delay, lambda_interval=interval,
            eps_low=clip_eps, eps_high=clip_eps, dual_clip=dual_clip, replayed=replayed)
        if ppo:
            value_loss, value_metrics = losses.value_loss(inputs["values"], inputs["old_values"],
                                                          inputs["returns"], mask)
            total = total + vf_coef * value_loss
            metrics.update(value_metrics)
        return total, metrics

    base = (policies.reference("base") if reincarnation is None
            else policies.reset_after("base", reincarnation))
    old_outputs = ("logp", "values") if ppo else ("logp",)
    return Algorithm(
        name=f"remix_{variant}", loss=loss, prepare=advantages,
        prepare_reads=("old_values",) if ppo else (),
        forward={"current": ("values",) if ppo else (), "old": old_outputs,
                 "base": ("logp",), "prev": ("logp",)},
        policies=(base, policies.behind("prev", 1)),
        value_head=critic.VALUE_HEAD if ppo else None, needs_groups=not ppo,
        stages=(stages.ReplayWindow(off_policy_fraction=OFF_POLICY_FRACTION.value,
                                    window=WINDOW.value, reincarnation_step=reincarnation),))


def main(argv):
    del argv
    config = shared_flags.run_config(f"remix_{VARIANT.value}")
    loop.run(config, make_algorithm(VARIANT.value, config))


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; the paper uses 1e-6.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    flags.FLAGS.set_default("num_passes", 2)        # m: the UTD ratio (paper 2)
    flags.FLAGS.set_default("num_minibatches", 2)
    app.run(main)
