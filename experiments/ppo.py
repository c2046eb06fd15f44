r"""PPO with a value head and GAE — the classic actor-critic baseline of ReMix, ROVER and RISE.

Papers: Schulman et al., "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347;
GAE, https://arxiv.org/abs/1506.02438; the LLM recipe (per-token KL penalty in the reward, outcome
score on the last token, whitened advantages, clipped value loss) as in verl, which ReMix-PPO and
RISE build on (ALGORITHMS.md §5.4). Critic: ``offpolicy_jax.critic`` (a linear head on the policy's
final hidden state); losses: ``losses.ppo_clip`` + ``losses.value_loss``, summed in
``critic.ppo_with_value_loss``.

Command (embedded default, no download):

    python experiments/ppo.py

Hardware: 2 CPU cores, a few minutes. Expected: held-out pass@1 of the tiny-arith model rises
(final JSON line: ``pass@1_before`` / ``pass@1_after``), typically a little slower than the group
baselines at the start because the critic starts at V ≡ 0.

Departures (commented where set): the critic shares the policy's trunk (a value head, loss weight
``--vf_coef``) instead of verl's separate critic model with its own learning rate (1e-5 vs the
actor's 1e-6); β_KL defaults to 0 on the tiny default (no separate SFT reference worth anchoring to;
verl's default is 1e-3).
"""

from absl import app, flags

from offpolicy_jax import critic, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop, policies
from offpolicy_jax.training.algorithm import Algorithm

CLIP_EPS = flags.DEFINE_float("clip_eps", 0.2, "PPO clip ε (verl default 0.2).")
VF_CLIP = flags.DEFINE_float("vf_clip", 0.5, "Value clip ε_v (verl default 0.5).")
VF_COEF = flags.DEFINE_float("vf_coef", 0.1, "Weight of the value loss in the shared loss "
                             "(a separate critic has none; 0.1 is the usual value-head weight).")
GAMMA = flags.DEFINE_float("gamma", 1.0, "Discount γ (verl 1.0).")
GAE_LAMBDA = flags.DEFINE_float("gae_lambda", 1.0, "GAE λ (verl 1.0).")
KL_COEF = flags.DEFINE_float("kl_coef", 0.0, "β_KL of the per-token KL penalty in the reward "
                             "(verl 1e-3; 0 on the tiny default).")


def make_algorithm() -> Algorithm:
    clip_eps, vf_clip, vf_coef = CLIP_EPS.value, VF_CLIP.value, VF_COEF.value
    gamma, gae_lambda, kl_coef = GAMMA.value, GAE_LAMBDA.value, KL_COEF.value

    def targets(inputs, info) -> dict:
        del info
        return critic.gae_targets(inputs, gamma=gamma, lam=gae_lambda, kl_coef=kl_coef)

    def loss(inputs, info):
        del info
        return critic.ppo_with_value_loss(inputs, clip_eps=clip_eps, vf_clip=vf_clip,
                                          vf_coef=vf_coef)

    forward = {"current": ("values",), "old": ("logp", "values")}
    stored = ()
    if kl_coef:
        forward["ref"] = ("logp",)
        stored = (policies.reference("ref"),)   # the KL penalty's anchor: the initial policy
    # GAE reads V before the update (and, with the KL penalty, the old log-probs).
    prepare_reads = ("old_logp", "old_values") if kl_coef else ("old_values",)
    return Algorithm(name="ppo", loss=loss, prepare=targets, prepare_reads=prepare_reads,
                     forward=forward, policies=stored, value_head=critic.VALUE_HEAD,
                     needs_groups=False)


def main(argv):
    del argv
    loop.run(shared_flags.run_config("ppo"), make_algorithm())


if __name__ == "__main__":
    # The embedded tiny-arith model's learning rate; verl's actor uses 1e-6.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    flags.FLAGS.set_default("num_minibatches", 2)   # optimizer updates per PPO epoch
    app.run(main)
