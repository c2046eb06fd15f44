r"""Auto-CEI: expert iteration with a curriculum on when to say "I don't know" (Zhao et al., ICLR
2025).

Paper: "Automatic Curriculum Expert Iteration for Reliable LLM Reasoning",
https://arxiv.org/abs/2410.07627; official code SalesforceAIResearch/Auto-CEI
(``src/utils/utils.py``: the reward; ``src/rl/ei_generation.py``: sampling, resampling, keep
rule; ``src/rl/curriculum.py``: the hill-climbing). Expert iteration whose reward also pays for
an "I don't know" (IDK) answer, by how long the model reasoned before giving up:

    R = 1 (correct),  -1 (wrong, not IDK),  R_IDK(d) = 2 / (1 + exp(-c2 (d - c1))) - 1

with d the number of reasoning steps before the IDK phrase: giving up early is penalised, giving
up after long reasoning rewarded (R_IDK(c1) = 0, and R_IDK is in (-1, 1)).

* **E-step**: sample n = ``--group_size`` responses per training problem from the current
  policy; reward them; per problem draw n of them with replacement with probability
  ∝ exp(R / temp) and add the n originals; keep those with R > -1 (every correct and every IDK
  response, the better ones several times).
* **M-step**: ``--sft_epochs`` (paper: 1) of supervised fine-tuning of the starting model on the
  kept responses (the code trains the base model afresh every iteration, as ReST-EM does).
* **Curriculum** (hill-climbing on c1): from the starting model's held-out samples, the IDK
  answers' mean length m and every answer's length standard deviation s give
  step = min(0.2 s, 0.5), c1 = m + step and c2 = -ln(0.1) / (4 s). The run is a sequence of
  stages; a stage is ``--stage_iterations`` EI iterations at a fixed c1 (code: 3), or fewer when
  held-out precision and IDK rate both move by less than ``--converge_tolerance`` (code: 0.003).
  Each iteration's held-out f = (1 - λ) · precision + λ · (1 - IDK rate) (λ = ``--idk_lambda``,
  code: 0.2) is computed; a stage scores the f of its best iteration, whose policy the next stage
  samples from (the code; ``--stage_continue=last``: the last iteration's). The stage's score
  decides the next c1: a better f than the best so far keeps moving c1 by ±step in
  the same direction (the first stage: upwards, as in the code); a worse one turns back to the
  other side of the best c1; when both neighbours of the best c1 have scored worse the
  curriculum stops and the remaining iterations run at the best c1.

Held-out metrics (``eval/...`` in metrics.jsonl, every iteration): ``pass@1`` (accuracy, IDK
counted as wrong), ``precision`` (accuracy among the answered, i.e. non-IDK, samples),
``idk_rate``, ``f``, standard errors over the prompts (``*_se``), and the IDK length statistics
the curriculum starts from; per iteration also ``curriculum/c1, c2, stage, stage_end, best_c1,
best_f, stopped`` and the E-step's ``train/kept``, ``train/idk_kept`` and ``reward_mean``.

``--idk_reward=false`` is the plain-EI baseline on the same code path: R = 1 correct, -1
otherwise (an IDK answer is just wrong, never kept), the same resampling and M-step, no
curriculum.

Command (needs the ``tiny-arith-idk`` model, built on first use, about 2 minutes on 2 CPU cores;
the plain ``tiny-arith`` never says IDK):

    python experiments/auto_cei.py --model=tiny-arith-idk

Hardware: 2 CPU cores, 14-17 minutes for 6 iterations on a heavily shared machine.
Measured (small: tiny-arith-idk, 6 iterations, stages of 2, seeds 0 and 1, ``--iterations=6
--stage_iterations=2 --eval_size=128``; held-out 128 problems x 8 samples, standard errors
0.023-0.037): precision 0.368 -> 0.449 and 0.365 -> 0.463, IDK rate 0.174 -> 0.396 and
0.181 -> 0.348 (still rising), accuracy 0.304 -> 0.271 and 0.299 -> 0.302; the plain-EI baseline
(``--noidk_reward``) ends at precision 0.347 and 0.377, IDK rate 0.042 and 0.028, accuracy 0.332
and 0.366. Partly the paper's result: precision rises and beats plain EI, but the IDK rate is
not shown to be bounded (every IDK answer is kept, so IDK fills the kept set on the problems the
policy fails; README section "Auto-CEI"). The paper reports a better balance of precision and
refusals than its baselines on logical reasoning, mathematics and planning tasks with
Llama-3.1-8B-Instruct.

Runs in one process (a multi-process launch is refused at start-up). Checkpointed every
``--ckpt_every`` iterations with the curriculum state (c1, the stage, the scores of the c1 tried)
in the run's meta, and each stage's best parameters so far under ``<workdir>/stage_best``; a
killed run resumes from its last checkpointed iteration with the same results.

Where it follows the code: the reward and its IDK-first precedence (``reward_processor``), the
resampling (n draws ∝ exp(R/temp) plus the n originals, keep R > -1), temp = the starting
model's held-out precision, the initial c1, step and c2 (``test_c1``: the IDK answers' mean
length, all answers' length std), f and λ, at most 3 iterations per stage and the 0.003
convergence tolerance, a stage scored by its best iteration which the next stage continues from,
the first stage always counting as an improvement. Departures (commented where set): n = 8
samples per problem (paper: 16); the length d counts ``a op b=c`` steps (MATH: lines split by
".\n"); IDK is one fixed phrase (the code also matches "sorry", "no answer", ...); the
convergence test compares each iteration with the previous evaluation (the code: with the
starting model's numbers, never updated); the climb follows the spec's rule: the code's loop files
the score under the already-moved c1 and, when f falls, computes c1 - step without moving there,
so it never moves down; c1 is chosen and reported on the same held-out set (the code: a
validation set, then a test set); no initial plain-EI iteration and IDK-rate check (0.25) before
the curriculum (the code runs one on its SFT model); full fine-tuning of the tiny model for LoRA
r 128, α 64 on Llama-3.1-8B-Instruct.
"""

import math
import os
import time

import jax
import numpy as np
from absl import app, flags

from offpolicy_jax.data import arith
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import self_training, trainer

# The E-/M-step size flags are also expert_iteration.py's and bstar.py's (the same meaning);
# allow_override lets one process import several of them (the tests do).
BATCHES_PER_ITERATION = flags.DEFINE_integer("batches_per_iteration", 8, "Prompt batches sampled "
                                             "per EM iteration (E-step size, in --batch_size "
                                             "prompts).", allow_override=True)
SFT_EPOCHS = flags.DEFINE_float("sft_epochs", 1.0, "M-step length: epochs over the kept set "
                               "(Auto-CEI: 1).", allow_override=True)
SFT_BATCH_SIZE = flags.DEFINE_integer("sft_batch_size", 32, "M-step batch size.",
                                      allow_override=True)
IDK_REWARD = flags.DEFINE_boolean("idk_reward", True, "Auto-CEI's reward and curriculum; false: "
                                  "the plain-EI baseline (IDK counted as wrong, R = -1).")
IDK_LAMBDA = flags.DEFINE_float("idk_lambda", 0.2, "λ of the curriculum objective "
                                "f = (1-λ)·precision + λ·(1 - IDK rate) (code: 0.2).")
STAGE_ITERATIONS = flags.DEFINE_integer("stage_iterations", 3, "Most EI iterations per "
                                        "curriculum stage (code: 3).")
CONVERGE_TOLERANCE = flags.DEFINE_float("converge_tolerance", 0.003, "A stage ends early when "
                                        "held-out precision and IDK rate both move by less "
                                        "than this (code: 0.003).")
STAGE_CONTINUE = flags.DEFINE_enum("stage_continue", "best", ["best", "last"], "The policy the "
                                   "next stage samples from: 'best', the stage's iteration of "
                                   "largest held-out f, which also scores the stage (the code); "
                                   "'last', its last iteration, scored by its own f.")
RESAMPLING_TEMP = flags.DEFINE_float("resampling_temp", 0.0, "temp of the resampling ∝ "
                                     "exp(R/temp); 0: the starting model's held-out precision "
                                     "(the code's choice).")

# Floors for a degenerate start (no spread of lengths, no correct answer), so c2 and exp(R/temp)
# stay finite. Not in the code, which divides by these numbers directly.
_MIN_LENGTH_STD = 0.5
_MIN_TEMP = 0.05


# ---------------------------------------------------------------------------------------------
# The reward, the resampling and the curriculum (pure functions).


def idk_reward(steps, c1: float, c2: float) -> np.ndarray:
    """R_IDK(d) = 2 / (1 + exp(-c2 (d - c1))) - 1 for reasoning lengths ``steps`` (any shape)."""
    d = np.asarray(steps, np.float64)
    return 2.0 / (1.0 + np.exp(-c2 * (d - c1))) - 1.0


def auto_cei_rewards(correct, idk, steps, c1: float, c2: float, *,
                     reward_idk: bool = True) -> np.ndarray:
    """Auto-CEI's reward of each response: R_IDK(d) for an IDK answer (checked first, as in the
    code), else 1 if correct and -1 if not. ``reward_idk=False``: IDK counts as wrong (-1)."""
    correct, idk = np.asarray(correct, bool), np.asarray(idk, bool)
    rewards = np.where(correct, 1.0, -1.0)
    if reward_idk:
        rewards = np.where(idk, idk_reward(steps, c1, c2), rewards)
    else:
        rewards = np.where(idk, -1.0, rewards)
    return rewards


def resampling_probabilities(rewards, temp: float) -> np.ndarray:
    """p_i ∝ exp(R_i / temp) over one problem's responses (computed stably)."""
    logits = np.asarray(rewards, np.float64) / temp
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def resample(rewards, temp: float, rng: np.random.Generator) -> np.ndarray:
    """Indices kept from one problem's n responses: n draws with replacement ∝ exp(R/temp), then
    the n originals, those with R > -1 only (code: ``ei_generation.py``)."""
    rewards = np.asarray(rewards, np.float64)
    n = len(rewards)
    drawn = rng.choice(n, size=n, replace=True, p=resampling_probabilities(rewards, temp))
    indices = np.concatenate([drawn, np.arange(n)])
    return indices[rewards[indices] > -1.0]


def objective(precision: float, idk_rate: float, lam: float) -> float:
    """The curriculum's f = (1 - λ) · precision + λ · (1 - IDK rate)."""
    return (1.0 - lam) * precision + lam * (1.0 - idk_rate)


def initial_curriculum(idk_steps_mean: float, steps_std: float) -> dict:
    """The starting curriculum from the starting model's held-out answers: step =
    min(0.2 s, 0.5), c1 = m + step, c2 = -ln(0.1) / (4 s) (m: mean length of the IDK answers,
    s: length standard deviation of all answers, floored at ``_MIN_LENGTH_STD``)."""
    std = max(float(steps_std), _MIN_LENGTH_STD)
    step = min(0.2 * std, 0.5)
    return {"c1_start": float(idk_steps_mean) + step, "step": step,
            "c2": -math.log(0.1) / (4.0 * std), "position": 0, "direction": 1,
            "best_position": None, "best_f": None, "scores": {}, "stopped": False,
            "stage": 1, "stage_iteration": 0, "stage_best_f": None,
            "stage_best_iteration": None, "continue_from": None}


def c1_of(state: dict, position: int | None = None) -> float:
    """c1 at ``position`` (default the current one): c1_start + position · step."""
    position = state["position"] if position is None else position
    return state["c1_start"] + position * state["step"]


def climb(state: dict, f: float) -> dict:
    """One hill-climbing move after a stage at the current c1 scored ``f``; returns the new state.

    A score above the best so far makes this c1 the best and moves on in the same direction; a
    worse one turns to the best c1's other side. When both neighbours of the best c1 have been
    scored (both worse), the curriculum stops at the best c1."""
    state = {**state, "scores": dict(state["scores"])}
    here = state["position"]
    state["scores"][str(here)] = f
    if state["best_f"] is None or f > state["best_f"]:
        state["best_position"], state["best_f"] = here, f
    best, direction = state["best_position"], state["direction"]
    if str(best + direction) not in state["scores"]:
        state["position"] = best + direction
    elif str(best - direction) not in state["scores"]:
        state["direction"] = -direction
        state["position"] = best - direction
    else:
        state["position"], state["stopped"] = best, True
    return state


def stage_ended(state: dict, change: tuple[float, float], *, stage_iterations: int,
                tolerance: float) -> bool:
    """Whether the stage ends after its ``state["stage_iteration"]``-th iteration: at
    ``stage_iterations``, or when precision and IDK rate both changed by less than
    ``tolerance`` (``change``: their absolute changes since the previous evaluation)."""
    return state["stage_iteration"] >= stage_iterations or (
        change[0] < tolerance and change[1] < tolerance)


# ---------------------------------------------------------------------------------------------
# Held-out metrics with IDK answers.


def idk_metrics(correct: np.ndarray, responses: list[str], lam: float) -> dict:
    """Precision, IDK rate, f and the IDK lengths of ``[P, n]`` held-out samples (``correct``:
    the verifier's 0/1, ``responses``: ``P * n`` texts, prompt-major). Standard errors are over
    prompts (precision's as a ratio of per-prompt sums)."""
    correct = np.asarray(correct, np.float64)
    num_prompts, n = correct.shape
    idk = np.array([arith.is_idk(r) for r in responses], bool).reshape(num_prompts, n)
    steps = np.array([arith.reasoning_steps(r) for r in responses],
                     np.float64).reshape(num_prompts, n)
    answered = (~idk).sum(axis=1).astype(np.float64)
    right = (correct * ~idk).sum(axis=1)
    precision = float(right.sum() / answered.sum()) if answered.sum() else 0.0
    idk_rate = float(idk.mean())

    def se(values):
        return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0

    if answered.sum() and num_prompts > 1:
        residual = right - precision * answered
        precision_se = float(np.sqrt(np.sum(residual ** 2) * num_prompts / (num_prompts - 1))
                             / answered.sum())
    else:
        precision_se = 0.0
    return {"precision": precision, "precision_se": precision_se, "idk_rate": idk_rate,
            "idk_rate_se": se(idk.mean(axis=1)), "f": objective(precision, idk_rate, lam),
            "idk_steps_mean": float(steps[idk].mean()) if idk.any() else None,
            "steps_mean": float(steps.mean()), "steps_std": float(steps.std())}


class IdkEvaluation:
    """The session's extra held-out evaluation: ``idk_metrics`` of the samples it drew."""

    summary_keys = ("precision", "idk_rate")

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, session, params, result) -> dict:
        del session, params
        return idk_metrics(result.correct, result.responses, self.lam)


# ---------------------------------------------------------------------------------------------
# The E-step, the curriculum hook and the run.


def e_step(session: trainer.Session, params, meta: dict, iteration: int) -> tuple[list, dict]:
    """Samples, rewards and resamples ``--batches_per_iteration`` prompt batches; returns the
    kept ``(prompt, response)`` examples and the E-step's metrics."""
    config, state = session.config, meta["curriculum"]
    c1, c2 = (c1_of(state), state["c2"]) if state else (0.0, 1.0)
    kept, rewards, idk_kept, idk_sampled = [], [], 0, 0
    for part in range(BATCHES_PER_ITERATION.value):
        seed_index = iteration * BATCHES_PER_ITERATION.value + part
        records = session.selection.select(config.batch_size, iteration)
        rollouts = session.sampler.sample(params, records, seed_index=seed_index,
                                          policy_version=iteration - 1)
        session.selection.observe(records, rollouts, iteration)
        texts = [session.tokenizer.decode(rollouts.tokens[row, :int(length)].tolist(),
                                          skip_special_tokens=True)
                 for row, length in enumerate(rollouts.lengths)]
        idk = np.array([arith.is_idk(t) for t in texts], bool)
        idk_sampled += int(idk.sum())
        reward = auto_cei_rewards(rollouts.rewards > 0, idk,
                                  [arith.reasoning_steps(t) for t in texts], c1, c2,
                                  reward_idk=IDK_REWARD.value)
        # The draws: a generator per (seed, iteration, batch), so a resumed run redraws them.
        rng = np.random.default_rng([config.seed, iteration, part])
        group_index = np.asarray(rollouts.group_index)
        for prompt in np.unique(group_index):
            rows = np.nonzero(group_index == prompt)[0]
            for row in rows[resample(reward[rows], meta["resampling_temp"], rng)]:
                kept.append((records[int(prompt)]["prompt"], texts[row]))
                idk_kept += int(idk[row])
        rewards.append(reward)
    rewards = np.concatenate(rewards)
    return kept, {"train/kept": len(kept), "train/idk_kept": idk_kept,
                  "train/idk_sampled": idk_sampled / len(rewards),
                  "reward_mean": float(rewards.mean()),
                  **{f"{session.selection.name}/{k}": v
                     for k, v in session.selection.metrics().items()}}


def curriculum_step(meta: dict, record: dict, save_best=None) -> dict:
    """``run_iterations``' hook after each evaluation: advances the stage and, at its end, climbs
    (``climb``); updates ``meta["curriculum"]`` (checkpointed) and returns the metrics to log.

    With ``--stage_continue=best`` the stage's best iteration so far (by f) is tracked,
    ``save_best(iteration)`` keeps its parameters, and at the stage's end its f scores the stage
    and ``continue_from`` names it for the next E-step."""
    state = meta["curriculum"]
    precision, idk_rate = record["eval/precision"], record["eval/idk_rate"]
    previous = meta["last_eval"]
    meta["last_eval"] = [precision, idk_rate]
    if not state:
        return {}
    logged = {"curriculum/c1": c1_of(state), "curriculum/c2": state["c2"],
              "curriculum/stage": state["stage"]}
    if state["stopped"]:
        return {**logged, "curriculum/stage_end": 0, "curriculum/stopped": 1}
    state = {**state, "stage_iteration": state["stage_iteration"] + 1, "continue_from": None}
    f = record["eval/f"]
    if STAGE_CONTINUE.value == "best":
        if state["stage_best_f"] is None or f > state["stage_best_f"]:
            state.update(stage_best_f=f, stage_best_iteration=meta["iteration"])
            if save_best is not None:
                save_best(meta["iteration"])
    ended = stage_ended(state, (abs(precision - previous[0]), abs(idk_rate - previous[1])),
                        stage_iterations=STAGE_ITERATIONS.value,
                        tolerance=CONVERGE_TOLERANCE.value)
    if ended:
        best = STAGE_CONTINUE.value == "best"
        state = climb(state, state["stage_best_f"] if best else f)
        if best and state["stage_best_iteration"] != meta["iteration"]:
            state["continue_from"] = state["stage_best_iteration"]
        state.update(stage=state["stage"] + 1, stage_iteration=0, stage_best_f=None,
                     stage_best_iteration=None)
    meta["curriculum"] = state
    return {**logged, "curriculum/stage_end": int(ended), "curriculum/stopped":
            int(state["stopped"]), "curriculum/next_c1": c1_of(state),
            "curriculum/continue_from": state["continue_from"],
            "curriculum/best_c1": (c1_of(state, state["best_position"])
                                   if state["best_position"] is not None else None),
            "curriculum/best_f": state["best_f"]}


def validate_flags(config) -> None:
    """Clear errors naming the flag, checked before the model is loaded."""
    if not 0.0 <= IDK_LAMBDA.value <= 1.0:
        raise SystemExit(f"--idk_lambda must be in [0, 1], got {IDK_LAMBDA.value}")
    if STAGE_ITERATIONS.value < 1:
        raise SystemExit(f"--stage_iterations must be >= 1, got {STAGE_ITERATIONS.value}")
    if CONVERGE_TOLERANCE.value < 0:
        raise SystemExit(f"--converge_tolerance must be >= 0, got {CONVERGE_TOLERANCE.value}")
    if RESAMPLING_TEMP.value < 0:
        raise SystemExit(f"--resampling_temp must be >= 0 (0: the starting model's held-out "
                         f"precision), got {RESAMPLING_TEMP.value}")
    if BATCHES_PER_ITERATION.value < 1:
        raise SystemExit(f"--batches_per_iteration must be >= 1, got "
                         f"{BATCHES_PER_ITERATION.value}")
    if SFT_EPOCHS.value <= 0 or SFT_BATCH_SIZE.value < 1:
        raise SystemExit(f"--sft_epochs must be > 0 and --sft_batch_size >= 1, got "
                         f"{SFT_EPOCHS.value} and {SFT_BATCH_SIZE.value}")
    if config.eval_every != 1 or config.eval_every_rollouts:
        raise SystemExit(f"auto_cei.py's curriculum reads held-out precision and IDK rate after "
                         f"every iteration: --eval_every must be 1 and --eval_every_rollouts 0, "
                         f"got {config.eval_every} and {config.eval_every_rollouts}")
    if config.dataset != "arith":
        raise SystemExit(f"auto_cei.py: --dataset={config.dataset!r}: the IDK answer form and "
                         f"the reasoning length are the embedded task's (--dataset=arith)")


def run(config) -> dict:
    self_training.require_single_process("auto_cei")
    config.validate()
    validate_flags(config)
    self_training.refuse_lora(config, "auto_cei")
    session = trainer.Session(config, "auto_cei", sharded=False,
                              evaluation=IdkEvaluation(IDK_LAMBDA.value))
    base_params = jax.device_get(session.params)
    params, meta = self_training.restore_or_start(session, base_params, {})
    if "curriculum" not in meta:           # a new run: set up from the starting model's samples
        before = meta["eval_before"]
        lengths = before["eval/idk_steps_mean"]
        meta["curriculum"] = initial_curriculum(
            lengths if lengths is not None else before["eval/steps_mean"],
            before["eval/steps_std"]) if IDK_REWARD.value else {}
        meta["resampling_temp"] = RESAMPLING_TEMP.value or max(before["eval/precision"],
                                                               _MIN_TEMP)
        meta["last_eval"] = [before["eval/precision"], before["eval/idk_rate"]]

    # The parameters of each stage's best iteration so far (--stage_continue=best), kept beside
    # the run's checkpoints so that a resumed run samples from the same policy.
    stage_best = checkpoint_lib.Checkpointer(os.path.join(config.workdir, "stage_best"))
    latest = {}

    def save_best(iteration):
        if iteration not in stage_best.all_steps():       # a redone iteration: same params
            stage_best.save(iteration, {"params": latest["params"]}, {})

    def iterate(params, meta, iteration):
        t0 = time.time()
        continue_from = (meta["curriculum"] or {}).get("continue_from")
        if continue_from is not None:       # the last stage's best iteration, not its last
            state, _, _ = stage_best.restore(
                continue_from, checkpoint_lib.abstract_like({"params": base_params}))
            params = jax.device_get(state["params"])
        kept, record = e_step(session, params, meta, iteration)
        t_sample = time.time()
        # M-step from the starting model every iteration (the code trains its base afresh).
        params, metrics, skipped = self_training.fine_tune(
            session, base_params, kept, iteration=iteration, epochs=SFT_EPOCHS.value,
            batch_size=SFT_BATCH_SIZE.value)
        latest["params"] = params
        record.update(metrics, rollout_s=t_sample - t0, update_s=time.time() - t_sample,
                      **{"train/resampling_temp": meta["resampling_temp"]})
        return params, record, skipped

    try:
        return self_training.run_iterations(
            session, params, meta, iterate,
            after_evaluation=lambda meta, record: curriculum_step(meta, record, save_best))
    finally:
        stage_best.close()


def main(argv):
    del argv
    run(shared_flags.run_config("auto_cei"))


if __name__ == "__main__":
    flags.FLAGS.set_default("iterations", 6)          # two stages of 3 (code: until the climb
    #                                                   stops; kept small here)
    flags.FLAGS.set_default("group_size", 8)          # n per problem (paper: 16)
    flags.FLAGS.set_default("eval_every", 1)          # the curriculum reads every evaluation
    flags.FLAGS.set_default("learning_rate", 1e-4)    # M-step SFT lr for the tiny model (as
    #                                                   expert_iteration.py: 1e-3 degrades it)
    app.run(main)
