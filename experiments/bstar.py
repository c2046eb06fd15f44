r"""B-STaR: self-taught reasoning that re-balances exploration and exploitation every iteration
(Zeng et al., ICLR 2025).

Paper: "B-STaR: Monitoring and Balancing Exploration and Exploitation in Self-Taught
Reasoners", https://arxiv.org/abs/2412.17256; official code hkust-nlp/B-STaR
(``train_code/train_bstar.sh``, ``determine_hyper.py``, ``metric_modiacc_auto.py``). Online
expert iteration whose two exploration/exploitation knobs, the sampling temperature τ and the
reward threshold, are re-chosen every iteration:

1. **Configuration search** on a small dev subset: for every τ of a grid, sample K responses per
   dev problem; score each distinct response, ``score = w · process + outcome`` (the code:
   min-step PRM score / 5 + 0/1 answer check); for every threshold of a grid, select per problem
   the distinct responses scoring above it (best first, at most ``cap`` per problem, the smallest
   ``cap`` whose selection reaches a target size) and compute the **balance score**

       bs = mean_i  min(n'_i / n*, 1) · n'_i / n_i              (code ``cal_modi_acc_soft``)

   with n_i the problem's selected responses and n'_i the correct ones among them (n* = 8 in the
   code). The first term rewards exploration (many distinct correct answers, up to n*), the second
   exploitation (the selection's precision). The τ whose best threshold gives the largest bs wins.
2. **E-step**: sample the iteration's training problems at the chosen τ; choose the threshold on
   that pool by the same score (the code re-sweeps it on the training pool, with its own target
   size) and keep the selection.
3. **M-step**: supervised fine-tuning on the selection, continuing from the current policy (the
   code resumes its SFT run each iteration; ReST-EM restarts from the base instead).

Logged per iteration (``bstar/...`` in metrics.jsonl), as the paper monitors them: the chosen τ and
threshold, the balance score of every τ of the grid, and on the dev pool at the chosen τ and on
the training pool: pass@K, distinct correct responses per problem, and the selection's precision
(correct share of the selected) and recall (share of the distinct correct responses selected).

Reward on the embedded task (the nearest honest analogue of the paper's reward model): the
outcome is the verifier's 0/1 reward; the process part is ``data.arith.right_step_share``, the
share of the response's steps whose arithmetic is right, in [0, 1] (the paper takes the minimum
of a learned PRM's step scores, in [0, 1]; with exact per-step checks the minimum is only ever 0
or 1, so the share is used to keep the score graded). ``--process_weight=0`` turns it off (then
any ``--dataset`` works: the score is the outcome alone).

Command (embedded default, no download):

    python experiments/bstar.py

Hardware: 2 CPU cores (shared), 2–4 minutes for 3 iterations with the reduced search below.
Measured (small: tiny-arith, 3 iterations, seeds 0 and 1, ``--iterations=3 --eval_every=1
--dev_size=16 --dev_samples=8 --bstar_temperatures=0.5,0.7,0.9,1.1``): held-out pass@1
0.289 → 0.324 and 0.283 → 0.348, pass@8 0.797 → 0.766 and 0.703 → 0.719; ReST-EM
(expert_iteration.py) at the same settings ends at pass@1 0.344 / 0.330, pass@8 0.734 / 0.703.
Equal pass@1, pass@8 a little higher in both seeds (within one standard error), and ReST-EM's
exploration does not collapse at this learning rate either (README section "Expert iteration,
plus"; the paper: B-STaR keeps exploration up where ReST-EM's falls, and improves on it).

Runs in one process (a multi-process launch is refused at start-up). Checkpointed every
``--ckpt_every`` EM iterations (params, prompt-stream position, dev subset); a killed run resumes
from the last checkpointed iteration with the same results (not mid-iteration).

Departures (commented where set): the dev subset is ``--dev_size`` training problems × K =
``--dev_samples`` (code: 1k held-apart problems × 64); the ground-truth solution the code adds to
every problem's candidates (score 1) is not added (records carry the gold answer only, and ReST-EM,
which B-STaR is compared with, sees no reference solutions either); a problem with nothing selected
counts 0 in the mean (the code averages over the problems present in the selection, which with the
reference solution always added is every problem); responses are deduplicated before the
per-problem cap (the code caps, then deduplicates); the M-step's length is a number of epochs over
the selection (the code: 500 steps per iteration) with a fresh optimizer each iteration.
"""

import dataclasses
import math
import time

import jax
import numpy as np
from absl import app, flags

from offpolicy_jax.data import arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import self_training, trainer

# The code's grid: 0.50 to 1.20 in steps of 0.05.
_PAPER_TEMPERATURES = [f"{0.5 + 0.05 * i:.2f}" for i in range(15)]

# The E-/M-step size flags are also expert_iteration.py's (the same meaning); allow_override lets
# one process import both files (the tests do), the later definition winning. Each file alone is
# unaffected.
BATCHES_PER_ITERATION = flags.DEFINE_integer("batches_per_iteration", 8, "Prompt batches sampled "
                                             "per EM iteration (E-step size, in --batch_size "
                                             "prompts).", allow_override=True)
TEMPERATURES = flags.DEFINE_list("bstar_temperatures", _PAPER_TEMPERATURES,
                                 "Sampling temperatures searched every iteration (code: 0.50 to "
                                 "1.20 step 0.05).")
THRESHOLD_MIN = flags.DEFINE_float("threshold_min", -1.0, "Lowest reward threshold searched "
                                   "(code: -1.0).")
THRESHOLD_MAX = flags.DEFINE_float("threshold_max", 1.0, "Highest reward threshold searched "
                                   "(code: 1.0).")
THRESHOLD_STEP = flags.DEFINE_float("threshold_step", 0.01, "Threshold grid step (code: 0.01).")
N_STAR = flags.DEFINE_integer("n_star", 8, "n*: correct selected responses per problem at which "
                              "exploration earns full credit in the balance score (code: 8).")
PROCESS_WEIGHT = flags.DEFINE_float("process_weight", 0.2, "w in score = w·process + outcome "
                                    "(code: PRM score / 5). 0: outcome only.")
DEV_SIZE = flags.DEFINE_integer("dev_size", 32, "Dev problems of the configuration search "
                                "(code: 1k).")
DEV_SAMPLES = flags.DEFINE_integer("dev_samples", 16, "Responses per dev problem and temperature "
                                   "(code: 64).")
DEV_TARGET_PER_PROBLEM = flags.DEFINE_float("dev_target_per_problem", 3.55,
                                            "Selection target size on the dev pool, per problem "
                                            "(code: 3,550 for 1k problems).")
TRAIN_TARGET_PER_PROBLEM = flags.DEFINE_float("train_target_per_problem", 4.0,
                                              "Selection target size on the training pool, per "
                                              "problem (code: 67,500 in all; per problem "
                                              "unconfirmed).")
SFT_EPOCHS = flags.DEFINE_float("sft_epochs", 4.0, "M-step length: epochs over the selection.",
                               allow_override=True)
SFT_BATCH_SIZE = flags.DEFINE_integer("sft_batch_size", 32, "M-step batch size.",
                                      allow_override=True)

# The dev pool's sampling keys: one per iteration, the same for every temperature (common random
# numbers, so temperatures are compared on the same draws), far from the E-step's seed indices.
_DEV_SEED_OFFSET = 1_000_000


# ---------------------------------------------------------------------------------------------
# The balance score and the selection it is computed on (pure functions of arrays).


def candidate_scores(process: np.ndarray, outcome: np.ndarray, process_weight: float
                     ) -> np.ndarray:
    """B-STaR's selection score of each response: ``process_weight · process + outcome`` (code:
    min-step PRM score / 5 + 0/1 answer match). Any shape; returns the same shape."""
    return process_weight * np.asarray(process, np.float64) + np.asarray(outcome, np.float64)


def balance_score(n_selected: np.ndarray, n_correct: np.ndarray, n_star: int) -> float:
    """bs = mean_i min(n'_i / n*, 1) · n'_i / n_i (the balance score; code
    ``cal_modi_acc_soft``).

    Args:
      n_selected: [Q] selected responses per problem (n_i).
      n_correct: [Q] correct responses among them (n'_i).
      n_star: n*, the correct count at which exploration earns full credit.
    A problem with nothing selected counts 0 (nothing to learn from it); see the module's
    departures.
    """
    n_selected = np.asarray(n_selected, np.float64)
    n_correct = np.asarray(n_correct, np.float64)
    if n_selected.shape != n_correct.shape or n_selected.ndim != 1:
        raise ValueError(f"n_selected {n_selected.shape} and n_correct {n_correct.shape} must be "
                         f"[Q] arrays of one shape")
    if np.any(n_correct > n_selected) or np.any(n_correct < 0):
        raise ValueError("need 0 <= n_correct <= n_selected")
    precision = np.divide(n_correct, n_selected, out=np.zeros_like(n_correct),
                          where=n_selected > 0)
    return float(np.mean(np.minimum(n_correct / n_star, 1.0) * precision))


def select_above(scores: np.ndarray, correct: np.ndarray, threshold: float, target_size: float
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """The code's selection at one threshold: per problem, its distinct responses scoring above
    ``threshold``, best first, at most ``cap`` of them, with ``cap`` the smallest (from 1) whose
    selection reaches ``target_size`` in all (or no cap, when none does).

    Args:
      scores: [Q, M] score of each distinct response; -inf pads problems with fewer than M.
      correct: [Q, M] bool, the response's answer is right.
      threshold: a response is selectable when its score is strictly above it.
      target_size: the total selection size the cap grows to reach.
    Returns:
      ``(n_selected [Q], n_correct [Q], cap)``.
    """
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    if scores.shape != correct.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must be [Q, M]")
    # Best first; a tie goes to the correct response (lexsort: the last key is the primary one).
    order = np.lexsort((~correct, -scores), axis=1)
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    sorted_correct = np.take_along_axis(correct, order, axis=1)
    above = sorted_scores > threshold          # a prefix of each row, the rows being sorted
    available = above.sum(axis=1)
    correct_prefix = np.cumsum(sorted_correct & above, axis=1)
    width = scores.shape[1]
    cap = width
    for candidate in range(1, width + 1):
        if np.minimum(available, candidate).sum() >= target_size:
            cap = candidate
            break
    n_selected = np.minimum(available, cap)
    n_correct = np.where(n_selected > 0,
                         correct_prefix[np.arange(len(scores)), np.maximum(n_selected - 1, 0)],
                         0)
    return n_selected, n_correct, cap


def threshold_grid(low: float, high: float, step: float) -> np.ndarray:
    """``low, low + step, ..., high`` (inclusive, rounded against float drift)."""
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return np.round(low + step * np.arange(count), 10)


def best_threshold(scores: np.ndarray, correct: np.ndarray, thresholds: np.ndarray,
                   target_size: float, n_star: int) -> tuple[float, float]:
    """``(threshold, balance score)`` maximising the balance score; the first (lowest) threshold
    among equals, as the code's ascending sweep keeps the first maximum."""
    best = (float(thresholds[0]), -math.inf)
    for threshold in thresholds:
        n_selected, n_correct, _ = select_above(scores, correct, threshold, target_size)
        value = balance_score(n_selected, n_correct, n_star)
        if value > best[1]:
            best = (float(threshold), value)
    return best


@dataclasses.dataclass
class Pool:
    """The distinct responses of a set of problems, as padded arrays.

    Attributes:
      scores: [Q, M] selection score (-inf pads).
      correct: [Q, M] bool.
      texts: per problem, its distinct response texts (row order of ``scores``).
      prompts: [Q] the problems' prompt texts.
      samples: responses drawn per problem (K).
      solved: [Q] bool, at least one of the K samples is correct.
    """

    scores: np.ndarray
    correct: np.ndarray
    texts: list
    prompts: list
    samples: int
    solved: np.ndarray


def build_pool(prompts: list[str], responses: list[list[str]], outcomes: list[list[float]],
               process_scores: list[list[float]], process_weight: float) -> Pool:
    """Deduplicates each problem's responses by text (an identical text has an identical score)
    and pads them into a ``Pool``. ``responses``, ``outcomes``, ``process_scores``: per problem,
    one entry per sample."""
    distinct = []
    for texts, rewards, process in zip(responses, outcomes, process_scores, strict=True):
        seen = {}
        for text, reward, step_share in zip(texts, rewards, process, strict=True):
            seen.setdefault(text, (float(candidate_scores(step_share, reward, process_weight)),
                                   reward > 0))
        distinct.append(seen)
    width = max(1, max(len(d) for d in distinct))
    scores = np.full((len(distinct), width), -np.inf)
    correct = np.zeros((len(distinct), width), bool)
    for row, seen in enumerate(distinct):
        for column, (score, is_correct) in enumerate(seen.values()):
            scores[row, column], correct[row, column] = score, is_correct
    return Pool(scores=scores, correct=correct, texts=[list(d) for d in distinct],
                prompts=list(prompts), samples=len(responses[0]) if responses else 0,
                solved=correct.any(axis=1))


def pool_metrics(pool: Pool, threshold: float, target_size: float, prefix: str) -> dict:
    """What B-STaR monitors on a pool at a threshold: pass@K, distinct correct responses per
    problem, and the selection's precision and recall."""
    n_selected, n_correct, cap = select_above(pool.scores, pool.correct, threshold, target_size)
    distinct_correct = pool.correct.sum(axis=1)
    return {f"{prefix}/pass@{pool.samples}": float(pool.solved.mean()),
            f"{prefix}/distinct_correct": float(distinct_correct.mean()),
            f"{prefix}/selected": int(n_selected.sum()),
            f"{prefix}/precision": float(n_correct.sum() / max(n_selected.sum(), 1)),
            f"{prefix}/recall": float(n_correct.sum() / max(distinct_correct.sum(), 1)),
            f"{prefix}/cap": int(cap)}


def selected_examples(pool: Pool, threshold: float, target_size: float
                      ) -> list[tuple[str, str]]:
    """``(prompt, response)`` of the selection (``select_above``'s), best first per problem."""
    n_selected, _, _ = select_above(pool.scores, pool.correct, threshold, target_size)
    order = np.lexsort((~pool.correct, -pool.scores), axis=1)
    return [(pool.prompts[row], pool.texts[row][column])
            for row in range(len(pool.prompts)) for column in order[row, :n_selected[row]]]


# ---------------------------------------------------------------------------------------------
# The loop.


def process_score_fn(config, process_weight: float):
    """``(record, response) -> process score``: the arith step share, or 0 when unused."""
    if process_weight == 0:
        return lambda record, response: 0.0
    if config.dataset != "arith":
        raise SystemExit(f"bstar.py: --process_weight={process_weight} needs the embedded task's "
                         f"step checks (--dataset=arith), got --dataset={config.dataset}; set "
                         f"--process_weight=0 to score by the outcome alone")
    return lambda record, response: arith.right_step_share(response)


def sample_pool(session: trainer.Session, params, records: list[dict], *, temperature: float,
                num_samples: int, seed_index: int, policy_version: int, process_score
                ) -> tuple[Pool, np.ndarray]:
    """``num_samples`` responses per record at ``temperature``, scored and deduplicated; and the
    [N] outcome rewards of the samples (groups of ``num_samples`` rows)."""
    sampler = session.sampler
    run_config = sampler.config
    sampler.config = dataclasses.replace(run_config, temperature=temperature)
    try:
        rollouts = sampler.sample(params, records, seed_index=seed_index,
                                  policy_version=policy_version, num_samples=num_samples)
    finally:
        sampler.config = run_config
    texts = sampler.decode(rollouts, range(len(rollouts.rewards)))
    responses = [[] for _ in records]
    outcomes = [[] for _ in records]
    process = [[] for _ in records]
    for row, text in enumerate(texts):
        problem = int(rollouts.group_index[row])
        responses[problem].append(text)
        outcomes[problem].append(float(rollouts.rewards[row]))
        process[problem].append(process_score(records[problem], text))
    pool = build_pool([r["prompt"] for r in records], responses, outcomes, process,
                      PROCESS_WEIGHT.value)
    return pool, rollouts.rewards


def choose_configuration(session: trainer.Session, params, dev_records: list[dict],
                         iteration: int, process_score) -> tuple[float, dict]:
    """The configuration search on the dev subset: ``(temperature, metrics)`` (the threshold is
    in the metrics; the E-step re-chooses it on its own pool, as the code does), the
    first temperature of the grid among equals (the code keeps the first maximum)."""
    thresholds = threshold_grid(THRESHOLD_MIN.value, THRESHOLD_MAX.value, THRESHOLD_STEP.value)
    target = DEV_TARGET_PER_PROBLEM.value * len(dev_records)
    best, metrics = None, {}
    for text in TEMPERATURES.value:
        temperature = float(text)
        pool, _ = sample_pool(session, params, dev_records, temperature=temperature,
                           num_samples=DEV_SAMPLES.value,
                           seed_index=_DEV_SEED_OFFSET + iteration,
                           policy_version=iteration - 1, process_score=process_score)
        threshold, value = best_threshold(pool.scores, pool.correct, thresholds, target,
                                          N_STAR.value)
        metrics[f"bstar/balance@{temperature:.2f}"] = value
        if best is None or value > best[2]:
            best = (temperature, threshold, value, pool)
    temperature, threshold, value, pool = best
    metrics.update({"bstar/temperature": temperature, "bstar/dev_threshold": threshold,
                    "bstar/balance_score": value,
                    **pool_metrics(pool, threshold, target, "bstar/dev")})
    return temperature, metrics


def e_step(session: trainer.Session, params, iteration: int, temperature: float,
           process_score) -> tuple[list, dict]:
    """Samples the iteration's problems at ``temperature``; the selection at the threshold that
    maximises the balance score on this pool, and metrics."""
    config = session.config
    records, pools, rewards = [], [], []
    for part in range(BATCHES_PER_ITERATION.value):
        batch = session.selection.select(config.batch_size, iteration)
        records += batch
        pool, batch_rewards = sample_pool(
            session, params, batch, temperature=temperature, num_samples=config.group_size,
            seed_index=iteration * BATCHES_PER_ITERATION.value + part,
            policy_version=iteration - 1, process_score=process_score)
        pools.append(pool)
        rewards.append(batch_rewards)
    pool = merge_pools(pools)
    target = TRAIN_TARGET_PER_PROBLEM.value * len(records)
    thresholds = threshold_grid(THRESHOLD_MIN.value, THRESHOLD_MAX.value, THRESHOLD_STEP.value)
    threshold, value = best_threshold(pool.scores, pool.correct, thresholds, target, N_STAR.value)
    kept = selected_examples(pool, threshold, target)
    return kept, {"train/kept": len(kept), "bstar/train_threshold": threshold,
                  "bstar/train_balance_score": value,
                  "reward_mean": float(np.mean(np.concatenate(rewards))),
                  "zero_gradient_group_fraction": trainer.zero_gradient_group_fraction(
                      np.concatenate(rewards), config.group_size),
                  **pool_metrics(pool, threshold, target, "bstar/train")}


def merge_pools(pools: list[Pool]) -> Pool:
    """One pool of the problems of several (widths padded to the widest)."""
    width = max(p.scores.shape[1] for p in pools)

    def pad(array, value):
        return np.pad(array, ((0, 0), (0, width - array.shape[1])), constant_values=value)

    return Pool(scores=np.concatenate([pad(p.scores, -np.inf) for p in pools]),
                correct=np.concatenate([pad(p.correct, False) for p in pools]),
                texts=[t for p in pools for t in p.texts],
                prompts=[q for p in pools for q in p.prompts], samples=pools[0].samples,
                solved=np.concatenate([p.solved for p in pools]))


def m_step(session: trainer.Session, params, kept, *, iteration: int):
    """Fine-tunes the *current* parameters on the selection (the code continues its SFT run each
    iteration); returns ``(params, metrics, skipped updates)``."""
    return self_training.fine_tune(session, params, kept, iteration=iteration,
                                   epochs=SFT_EPOCHS.value, batch_size=SFT_BATCH_SIZE.value)


def validate_flags() -> None:
    """Clear errors naming the flag for settings the search cannot run with."""
    try:
        temperatures = [float(t) for t in TEMPERATURES.value]
    except ValueError as error:
        raise SystemExit(f"--bstar_temperatures must be numbers: {error}") from None
    checks = [
        (temperatures and all(t > 0 for t in temperatures),
         f"--bstar_temperatures must be a non-empty list of positive numbers, got "
         f"{TEMPERATURES.value}"),
        (THRESHOLD_STEP.value > 0, f"--threshold_step must be > 0, got {THRESHOLD_STEP.value}"),
        (THRESHOLD_MAX.value >= THRESHOLD_MIN.value,
         f"--threshold_max ({THRESHOLD_MAX.value}) must be >= --threshold_min "
         f"({THRESHOLD_MIN.value})"),
        (N_STAR.value >= 1, f"--n_star must be >= 1, got {N_STAR.value}"),
        (PROCESS_WEIGHT.value >= 0, f"--process_weight must be >= 0, got {PROCESS_WEIGHT.value}"),
        (DEV_SIZE.value >= 1, f"--dev_size must be >= 1, got {DEV_SIZE.value}"),
        (DEV_SAMPLES.value >= 1, f"--dev_samples must be >= 1, got {DEV_SAMPLES.value}"),
        (DEV_TARGET_PER_PROBLEM.value > 0,
         f"--dev_target_per_problem must be > 0, got {DEV_TARGET_PER_PROBLEM.value}"),
        (TRAIN_TARGET_PER_PROBLEM.value > 0,
         f"--train_target_per_problem must be > 0, got {TRAIN_TARGET_PER_PROBLEM.value}"),
        (BATCHES_PER_ITERATION.value >= 1,
         f"--batches_per_iteration must be >= 1, got {BATCHES_PER_ITERATION.value}"),
        (SFT_BATCH_SIZE.value >= 1, f"--sft_batch_size must be >= 1, got {SFT_BATCH_SIZE.value}"),
        (SFT_EPOCHS.value > 0, f"--sft_epochs must be > 0, got {SFT_EPOCHS.value}"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(message)


def draw_dev_records(session: trainer.Session) -> list[dict]:
    """The dev subset: the first ``--dev_size`` problems of the training stream (drawn once, at
    the start, and checkpointed with the run)."""
    records = []
    while len(records) < DEV_SIZE.value:
        records += session.selection.select(session.config.batch_size, 0)
    return records[:DEV_SIZE.value]


def run(config) -> dict:
    self_training.require_single_process("bstar")
    config.validate()
    validate_flags()
    self_training.refuse_lora(config, "bstar")
    process_score = process_score_fn(config, PROCESS_WEIGHT.value)
    session = trainer.Session(config, "bstar", sharded=False)
    base_params = jax.device_get(session.params)
    # The dev subset is drawn once, at the start, and checkpointed with the run.
    params, meta = self_training.restore_or_start(
        session, base_params, lambda: {"dev_records": draw_dev_records(session)})

    def iterate(params, meta, iteration):
        t0 = time.time()
        temperature, record = choose_configuration(session, params, meta["dev_records"],
                                                   iteration, process_score)
        kept, e_metrics = e_step(session, params, iteration, temperature, process_score)
        record.update(e_metrics)
        t_sample = time.time()
        params, sft_metrics, skipped = m_step(session, params, kept, iteration=iteration)
        record.update(sft_metrics, rollout_s=t_sample - t0, update_s=time.time() - t_sample)
        return params, record, skipped

    return self_training.run_iterations(session, params, meta, iterate)


def main(argv):
    del argv
    run(shared_flags.run_config("bstar"))


if __name__ == "__main__":
    flags.FLAGS.set_default("iterations", 3)          # EM iterations (code: 9; kept small here)
    flags.FLAGS.set_default("learning_rate", 1e-4)    # M-step SFT lr, expert_iteration.py's
    app.run(main)
