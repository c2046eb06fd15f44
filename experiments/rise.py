r"""RISE — one policy learns to solve problems and to verify its own solutions, in one RL process.

Paper: Liu et al., "Trust, But Verify: A Self-Verification Approach to Reinforcement Learning with
Verifiable Rewards", https://arxiv.org/abs/2505.13445 (NeurIPS 2025); code: xyliu-cs/RISE on the
xyliu-cs/verl fork (``ray_trainer.py`` with ``trainer.online_critique=True``,
``critique_utils.py``, ``critique_templates.py``, ``protocol.py:downsampling``). ALGORITHMS.md §5.11.

Each iteration:

1. samples ``--group_size`` solutions for each of ``--batch_size`` problems and scores them with
   the outcome reward: 1 (correct), −0.5 (an answer, wrong), −1 (no answer) — the paper's
   ``reward_func`` (``--correct_reward``, ``--wrong_reward``, ``--no_answer_reward``);
2. picks ``--verify_solutions`` of those solutions spread evenly over the groups;
3. builds a verification prompt from each problem + solution: the paper's template (its
   ``CRITIQUE_PROMPT`` after the system prompt "Please reason step by step, ...", through the
   tokenizer's chat template when there is one) or, for the embedded model, a compact one
   (``--verify_template``; ``verification.verification_prompt``);
4. samples ``--group_size`` verifications per prompt; the verification reward applies the same
   outcome rule to the verification's boxed rating against the solution's true score (the gold
   is "1", "-0.5" or "-1");
5. trains on solutions and verifications together, one batch (``training.stages.SelfVerification``
   appends the verification groups; ``Rollouts.task`` tells the rows apart): PPO with GAE over the
   whole batch as in the paper (``--variant=ppo``, a value head as in ``ppo.py``), or a GRPO
   variant (``--variant=grpo``, group-normalised advantages; the solutions' groups and the
   verifications' groups are normalised separately).

Logged per iteration (``metrics.jsonl``): ``solve/reward_mean`` and ``verify/reward_mean`` (each
task's rows only), ``solve/share`` and ``verify/share`` (of the batch's rows),
``verify/accuracy`` (share of verifications whose rating is the solution's), and
``verify/accuracy_correct`` / ``verify/accuracy_wrong`` (on correct / wrong solutions),
``verify/solve_accuracy``, ``verify/rollouts`` and ``verify/solve_rollouts`` (each task's rollouts
so far; ``rollouts`` counts both and is what ``--rollout_budget`` limits). Every evaluation adds
held-out self-verification: the policy rates its own held-out samples (``eval/verify_accuracy``,
``eval/verify_accuracy_correct``, ``eval/verify_accuracy_wrong``, ``eval/verify_said_correct``,
...; ``verification.HeldOutVerification``).

Command (embedded default: ``tiny-arith-verify``, the warm start that has also seen verification
demonstrations, built once and cached like ``tiny-arith``; no download):

    python experiments/rise.py

Hardware: 2 CPU cores; the model build takes a few minutes once, then each iteration a few
seconds. ``--verify_solutions=0`` is the GRPO (or PPO) baseline with the same reward, prompts,
seeds and held-out verification measurement. Measured claim check: README, "Self-verification".

Real checkpoints: ``--model=<HF dir> --dataset=math500`` (or gsm8k / a JSONL) uses the paper's
template through the chat template; the paper's settings are ``--variant=ppo --kl_coef=0.01
--batch_size=1024 --verify_solutions=128 --group_size=8 --learning_rate=5e-7``.

Departures (commented where set): GRPO is the default variant (PPO+GAE, the paper's, is
``--variant=ppo``; its critic is a value head sharing the trunk, as in ``ppo.py``); on the embedded
model ``--verify_solutions`` defaults to 8 of 16 × 8 solutions (the paper: 128 of 1024 × 8, one
solution from each of 1/8 of the groups), so that verification gets a third of the batch's rows
instead of a ninth; the answer (and the rating) is read with ``rewards.math.extract_answer``, which
also accepts "####" / "The answer is" where the paper's code needs ``\boxed{}``; no KL penalty by
default on the embedded model (paper: 0.01 in the reward).
"""

import numpy as np
from absl import app, flags

from offpolicy_jax import critic, losses, tiny_arith, verification
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import loop, policies, stages
from offpolicy_jax.training.algorithm import Algorithm

VARIANT = flags.DEFINE_enum("variant", "grpo", ["grpo", "ppo"], "The RL objective over the mixed "
                            "batch: GRPO's group advantage, or PPO with a value head and GAE "
                            "(the paper's).")
VERIFY_SOLUTIONS = flags.DEFINE_integer("verify_solutions", 8, "Solutions verified per "
                                        "iteration, spread evenly over the groups (the paper's "
                                        "critique_batch_size: 128 of 1024 x 8); 0: no "
                                        "verification rows (the baseline).")
VERIFY_SELECTION = flags.DEFINE_enum("verify_selection", "spread", ["spread", "balanced"],
                                     "Which solutions are verified: spread evenly over the groups "
                                     "(the paper's), or half correct and half not as far as the "
                                     "batch has them (not in the paper: against a verifier that "
                                     "learns the base rate of a weak policy's wrong solutions).")
VERIFY_TEMPLATE = flags.DEFINE_enum("verify_template", "auto", ["auto", "paper", "compact"],
                                    "Verification prompt: the paper's template (through the chat "
                                    "template when there is one), the embedded model's compact "
                                    "one, or auto: compact for --dataset=arith, else the paper's.")
EVAL_VERIFY_SAMPLES = flags.DEFINE_integer("eval_verify_samples", 1, "Held-out self-"
                                           "verification: verifications per held-out sample at "
                                           "every evaluation (0: none).")
CORRECT_REWARD = flags.DEFINE_float("correct_reward", 1.0, "Reward of a correct answer (and of a "
                                    "verification whose rating is right); paper 1.")
WRONG_REWARD = flags.DEFINE_float("wrong_reward", -0.5, "Reward of a wrong answer (or rating); "
                                  "paper -0.5.")
NO_ANSWER_REWARD = flags.DEFINE_float("no_answer_reward", -1.0, "Reward of a response with no "
                                      "answer (or no rating); paper -1.")
CLIP_EPS = flags.DEFINE_float("clip_eps", 0.2, "PPO / GRPO clip ε (paper, verl default: 0.2).")
KL_COEF = flags.DEFINE_float("kl_coef", 0.0, "KL to the initial policy: in the reward for PPO "
                             "(paper 0.01), k3 in the loss for GRPO; 0 on the embedded model.")
VF_CLIP = flags.DEFINE_float("vf_clip", 0.5, "PPO: value clip ε_v (verl default 0.5).")
VF_COEF = flags.DEFINE_float("vf_coef", 0.1, "PPO: weight of the value loss (a value head sharing "
                             "the trunk; the paper trains a separate critic at lr 9e-6).")
GAMMA = flags.DEFINE_float("gamma", 1.0, "PPO: discount γ (verl 1.0).")
GAE_LAMBDA = flags.DEFINE_float("gae_lambda", 1.0, "PPO: GAE λ (verl 1.0).")


def template_for(name: str, dataset: str) -> str:
    """``--verify_template`` resolved: ``auto`` is compact on the embedded task, else the paper's."""
    if name == "auto":
        return verification.COMPACT if dataset == "arith" else verification.PAPER
    return name


def prompt_maker(template: str, prompt_format: str = "chat"):
    """``(record, solution, tokenizer) -> verification prompt`` for a template name; the paper's
    template goes through the chat template only with ``--prompt_format=chat``."""

    def make_prompt(record, solution, tokenizer):
        return verification.verification_prompt(record, solution, template=template,
                                                tokenizer=tokenizer,
                                                use_chat_template=prompt_format == "chat")

    return make_prompt


def task_metrics(inputs) -> dict:
    """Per-task diagnostics of a minibatch: each task's mean |advantage| and its rows."""
    import jax.numpy as jnp
    task = inputs["task"]
    advantages = inputs["advantages"]
    if advantages.ndim == 2:                      # PPO: per token; the row mean over its mask
        mask = inputs["mask"]
        advantages = jnp.sum(advantages * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)
    out = {}
    for value, name in ((0, "solve"), (1, "verify")):
        rows = (task == value).astype(jnp.float32)
        out[f"{name}_rows"] = jnp.sum(rows)
        out[f"{name}_abs_advantage"] = jnp.sum(jnp.abs(advantages) * rows) / \
            jnp.maximum(jnp.sum(rows), 1.0)
    return out


def make_algorithm(variant: str, dataset: str, prompt_format: str = "chat") -> Algorithm:
    reward = verification.OutcomeReward(correct=CORRECT_REWARD.value, wrong=WRONG_REWARD.value,
                                        no_answer=NO_ANSWER_REWARD.value)
    make_prompt = prompt_maker(template_for(VERIFY_TEMPLATE.value, dataset), prompt_format)
    clip_eps, kl_coef = CLIP_EPS.value, KL_COEF.value
    self_verification = stages.SelfVerification(VERIFY_SOLUTIONS.value, make_prompt,
                                                reward=reward,
                                                selection=VERIFY_SELECTION.value)
    evaluation = (verification.HeldOutVerification(make_prompt,
                                                   samples=EVAL_VERIFY_SAMPLES.value)
                  if EVAL_VERIFY_SAMPLES.value else None)
    forward = {"old": ("logp",)}
    stored = ()
    if kl_coef:
        forward["ref"] = ("logp",)
        stored = (policies.reference("ref"),)   # the initial policy
    common = dict(policies=stored, stages=(self_verification,),
                  reward_fn=verification.make_outcome_reward(reward), evaluation=evaluation)

    if variant == "grpo":
        def group_advantages(inputs, info) -> dict:
            """GRPO's group-normalised advantage over every group of the batch: the solutions'
            groups (one problem each) and the verifications' (one solution each)."""
            return {"advantages": np.asarray(losses.grpo_advantages(inputs["rewards"],
                                                                    info.group_size))}

        def loss(inputs, info):
            del info
            value, metrics = losses.grpo(inputs["logp"], inputs["old_logp"],
                                         inputs["advantages"], inputs["mask"],
                                         ref_logp=inputs.get("ref_logp"), kl_coef=kl_coef,
                                         eps_low=clip_eps, eps_high=clip_eps)
            return value, {**metrics, **task_metrics(inputs)}

        return Algorithm(name="rise_grpo", loss=loss, prepare=group_advantages,
                         forward=forward, **common)

    vf_clip, vf_coef = VF_CLIP.value, VF_COEF.value
    gamma, gae_lambda = GAMMA.value, GAE_LAMBDA.value

    def targets(inputs, info) -> dict:
        """GAE over the whole mixed batch, advantages whitened over all of its response tokens
        (verl's compute_advantage on the concatenated batch)."""
        del info
        return critic.gae_targets(inputs, gamma=gamma, lam=gae_lambda, kl_coef=kl_coef)

    def ppo_loss(inputs, info):
        del info
        value, metrics = critic.ppo_with_value_loss(inputs, clip_eps=clip_eps, vf_clip=vf_clip,
                                                    vf_coef=vf_coef)
        return value, {**metrics, **task_metrics(inputs)}

    forward = {"current": ("values",), "old": ("logp", "values"), **{
        k: v for k, v in forward.items() if k != "old"}}
    # GAE reads V before the update (and, with the KL penalty, the old log-probs).
    prepare_reads = ("old_logp", "old_values") if kl_coef else ("old_values",)
    return Algorithm(name="rise_ppo", loss=ppo_loss, prepare=targets, prepare_reads=prepare_reads,
                     forward=forward, value_head=critic.VALUE_HEAD, needs_groups=False, **common)


def check_batch(config, verify_solutions: int) -> None:
    """Fails fast, naming the flags, when the mixed batch cannot be split as asked."""
    solutions = config.batch_size * config.group_size
    if verify_solutions > solutions:
        raise ValueError(f"--verify_solutions={verify_solutions}: an iteration samples only "
                         f"--batch_size x --group_size = {solutions} solutions")
    rows = (config.batch_size + verify_solutions) * config.group_size
    if rows % (config.num_minibatches * config.num_microbatches):
        raise ValueError(f"the mixed batch of (--batch_size + --verify_solutions) x --group_size "
                         f"= {rows} rows must divide into --num_minibatches="
                         f"{config.num_minibatches} x --num_microbatches="
                         f"{config.num_microbatches}")


def main(argv):
    del argv
    variant = VARIANT.value
    config = shared_flags.run_config(f"rise_{variant}")
    check_batch(config, VERIFY_SOLUTIONS.value)
    loop.run(config, make_algorithm(variant, config.dataset, config.prompt_format))


# Defaults for the embedded task on 2 CPU cores, each a departure from the paper's 1.5B-7B setting.
EMBEDDED_DEFAULTS = {
    "model": tiny_arith.VERIFY_ALIAS,                # tiny-arith, fine-tuned to verify as well
    "learning_rate": tiny_arith.RL_LEARNING_RATE,    # 5e-5 (paper: 5e-7, critic 9e-6)
    "num_minibatches": 2,                            # as grpo.py / ppo.py on the embedded model
    "max_new_tokens": 64,                            # a check of 3 steps needs ~57 characters
}


if __name__ == "__main__":
    for name, value in EMBEDDED_DEFAULTS.items():
        flags.FLAGS.set_default(name, value)
    app.run(main)
