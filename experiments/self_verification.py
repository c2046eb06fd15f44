r"""The self-verification claim check: RISE against GRPO at equal rollout budgets, and TOPR's
generative verifier before -> after, on the embedded task.

Runs (each a subprocess of its experiment file, its own workdir under ``--workdir``, the same
seed and held-out set; model ``tiny-arith-verify``):

* ``rise`` — ``rise.py`` (GRPO variant, ``--verify_solutions`` per iteration), until its
  *solving* rollouts reach ``--rollout_budget`` (the verification rollouts come on top);
* ``rise_balanced`` — the same with ``--verify_selection=balanced`` (half of the verified
  solutions correct, as far as the batch has them; not the paper's);
* ``grpo`` — ``rise.py --verify_solutions=0``: the same objective, reward, prompts and seeds
  without verification rows (GRPO with the paper's 1 / −0.5 / −1 reward), for
  ``--rollout_budget`` rollouts, with the same held-out self-verification measurement;
* ``topr_verifier`` — ``topr.py --task=verifier`` (offline, ``--verifier_iterations``).

Both RL runs are evaluated at every ``--eval_every_rollouts`` rollouts (verifications counted).
The report compares RISE and GRPO both ways: at equal *total* rollouts (RISE's evaluation where
its rollouts, verifications included, first reach the budget) and at equal *solving* rollouts
(RISE's last evaluation). It writes ``results.json`` (every evaluation of every run) and
``results.md`` (the tables) to ``--out``; pass@1's standard error is the one each run logs (over
the held-out prompts), the verification accuracies' are binomial over the rated samples (overall
or of each outcome).

Command (measured in the README, "Self-verification"):

    python experiments/self_verification.py --out=docs/self_verification
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import time
from concurrent import futures

from absl import app, flags

from offpolicy_jax import tiny_arith

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKDIR = flags.DEFINE_string("workdir", "workdirs/self_verification", "Root of the runs.")
OUT = flags.DEFINE_string("out", None, "Where results.md/json go (default: --workdir).")
MODEL = flags.DEFINE_string("model", tiny_arith.VERIFY_ALIAS, "The policy to start from.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.")
BUDGET = flags.DEFINE_integer("rollout_budget", 25_600, "Solving rollouts of each RL run "
                              "(200 iterations of 16 x 8).")
EVAL_EVERY_ROLLOUTS = flags.DEFINE_integer("eval_every_rollouts", 3_200, "Held-out evaluation "
                                           "every this many rollouts (verifications counted).")
EVAL_SIZE = flags.DEFINE_integer("eval_size", 128, "Held-out problems.")
EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", 4, "Samples per held-out problem (each is "
                                    "also rated once by the policy).")
VERIFY_SOLUTIONS = flags.DEFINE_integer("verify_solutions", 8, "RISE: solutions verified per "
                                        "iteration.")
VERIFIER_ITERATIONS = flags.DEFINE_integer("verifier_iterations", 100, "TOPR verifier: "
                                           "iterations over its offline dataset.")
VERIFIER_PROMPTS = flags.DEFINE_integer("verifier_prompts", 256, "TOPR verifier: problems in "
                                        "its offline dataset.")
RUNS = flags.DEFINE_list("runs", ["rise", "rise_balanced", "grpo", "topr_verifier"],
                         "Which runs.")
PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs at the same time.")
REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild the report from finished runs.")
EXTRA_FLAGS = flags.DEFINE_list("extra_flags", [], "Flags passed to every run.")

BATCH_SIZE, GROUP_SIZE = 16, 8


def commands() -> dict:
    """``{run name: command line}``."""
    per_iteration = BATCH_SIZE * GROUP_SIZE
    iterations = math.ceil(BUDGET.value / per_iteration)
    common = [f"--model={MODEL.value}", f"--seed={SEED.value}", f"--eval_size={EVAL_SIZE.value}",
              f"--eval_samples={EVAL_SAMPLES.value}", f"--batch_size={BATCH_SIZE}",
              f"--group_size={GROUP_SIZE}", "--progress=false", *EXTRA_FLAGS.value]
    rl = [f"--iterations={iterations}", f"--eval_every_rollouts={EVAL_EVERY_ROLLOUTS.value}"]
    return {
        "rise": ["rise", f"--verify_solutions={VERIFY_SOLUTIONS.value}", *rl, *common],
        # The same, verifying half correct and half wrong solutions (not the paper's): against a
        # verifier that learns the base rate of a weak policy's wrong solutions.
        "rise_balanced": ["rise", f"--verify_solutions={VERIFY_SOLUTIONS.value}",
                          "--verify_selection=balanced", *rl, *common],
        "grpo": ["rise", "--verify_solutions=0", *rl, *common],
        "topr_verifier": ["topr", "--task=verifier", f"--iterations={VERIFIER_ITERATIONS.value}",
                          f"--offline_prompts={VERIFIER_PROMPTS.value}", *common],
    }


def execute(name: str, command: list[str]) -> dict:
    workdir = os.path.join(WORKDIR.value, name)
    os.makedirs(workdir, exist_ok=True)
    argv = [sys.executable, str(ROOT / "experiments" / f"{command[0]}.py"), *command[1:],
            f"--workdir={workdir}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "w") as log:
        result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"{name}: rc={result.returncode} ({time.time() - start:.0f} s)", flush=True)
    return {"name": name, "workdir": workdir, "returncode": result.returncode,
            "command": " ".join(["python", f"experiments/{command[0]}.py", *command[1:]])}


EVAL_KEYS = ("eval/pass@1", "eval/pass@1_se", "eval/verify_accuracy", "eval/verify_accuracy_correct",
             "eval/verify_accuracy_wrong", "eval/verify_balanced_accuracy",
             "eval/verify_said_correct", "eval/verify_solutions_correct")


def evaluations(workdir: str) -> list[dict]:
    """Every evaluation of a run: iteration, rollouts (both tasks), solving rollouts, metrics."""
    points, solve_rollouts = [], 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            solve_rollouts = record.get("verify/solve_rollouts", record.get("rollouts", 0))
            if "eval/pass@1" in record:
                points.append({"iteration": record["iteration"],
                               "rollouts": record.get("rollouts", 0),
                               "solve_rollouts": solve_rollouts if record["iteration"] else 0,
                               **{k[len("eval/"):]: record.get(k) for k in EVAL_KEYS}})
    return points


def standard_error(p, n) -> float | None:
    return None if p is None or not n else math.sqrt(max(p * (1 - p), 0.0) / n)


def with_errors(point: dict, samples: int) -> dict:
    """Standard errors: pass@1's as the run logged it (over the held-out prompts, whose samples
    are correlated); binomial for the verification accuracies, over the held-out samples or the
    samples of that outcome (each rated once, so they treat the ratings as independent)."""
    correct = point["verify_solutions_correct"] or 0.0
    sizes = {"verify_accuracy": samples,
             "verify_accuracy_correct": round(correct * samples),
             "verify_accuracy_wrong": round((1 - correct) * samples)}
    errors = {f"{k}_se": standard_error(point.get(k), n) for k, n in sizes.items()}
    if point.get("pass@1_se") is None:
        errors["pass@1_se"] = standard_error(point.get("pass@1"), samples)
    return {**point, **errors}


def first_at(points: list[dict], key: str, budget: int) -> dict:
    """The first evaluation whose ``key`` rollouts reach ``budget`` (else the last)."""
    for point in points:
        if point[key] >= budget:
            return point
    return points[-1]


def fmt(point: dict, key: str) -> str:
    value, se = point.get(key), point.get(f"{key}_se")
    if value is None:
        return "—"
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"


def report(runs: dict) -> tuple[dict, str]:
    samples = EVAL_SIZE.value * EVAL_SAMPLES.value
    curves = {name: [with_errors(p, samples) for p in evaluations(run["workdir"])]
              for name, run in runs.items() if run["returncode"] == 0}
    rows = []
    columns = ("pass@1", "verify_accuracy", "verify_accuracy_correct", "verify_accuracy_wrong",
               "verify_balanced_accuracy", "verify_said_correct")
    header = ("| run | at | iteration | rollouts (all) | solving rollouts | pass@1 | "
              "verify acc. | on correct | on wrong | balanced | said correct |")
    rows += [header, "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, label, point):
        key = "solve_rollouts" if "solving" in label else "rollouts"
        if label[0].isdigit() and point[key] < int(label.split()[0]):
            label += f" (not reached: the run stopped at {point[key]})"
        rows.append(f"| {name} | {label} | {point['iteration']} | {point['rollouts']} | "
                    f"{point['solve_rollouts']} | "
                    + " | ".join(fmt(point, k) for k in columns) + " |")

    budget = BUDGET.value
    if "grpo" in curves:
        row("grpo", "start", curves["grpo"][0])
        row("grpo", f"{budget} rollouts", first_at(curves["grpo"], "rollouts", budget))
    if "rise" in curves:
        row("rise", "start", curves["rise"][0])
        row("rise", f"{budget} rollouts (all)", first_at(curves["rise"], "rollouts", budget))
        row("rise", f"{budget} solving rollouts",
            first_at(curves["rise"], "solve_rollouts", budget))
    if "rise_balanced" in curves:
        row("rise_balanced", f"{budget} rollouts (all)",
            first_at(curves["rise_balanced"], "rollouts", budget))
        row("rise_balanced", f"{budget} solving rollouts",
            first_at(curves["rise_balanced"], "solve_rollouts", budget))
    if "topr_verifier" in curves:
        row("topr_verifier", "start", curves["topr_verifier"][0])
        row("topr_verifier", "end", curves["topr_verifier"][-1])
    text = ("\n".join(rows) + "\n\nHeld-out: " f"{EVAL_SIZE.value} problems x "
            f"{EVAL_SAMPLES.value} samples, each sample rated once by the policy (TOPR verifier: "
            "the initial policy's samples). ± one standard error (pass@1: over the prompts; "
            "accuracies: binomial over the rated samples).\n\nCommands:\n\n"
            + "\n".join(f"    {run['command']}" for run in runs.values()) + "\n")
    return {"curves": curves, "runs": runs}, text


def main(argv):
    del argv
    plans = {name: command for name, command in commands().items() if name in RUNS.value}
    if REPORT_ONLY.value:
        runs = {name: {"name": name, "workdir": os.path.join(WORKDIR.value, name),
                       "returncode": 0, "command": " ".join(
                           ["python", f"experiments/{c[0]}.py", *c[1:]])}
                for name, c in plans.items()}
    else:
        with futures.ThreadPoolExecutor(max_workers=max(PARALLEL.value, 1)) as pool:
            done = pool.map(lambda item: execute(*item), plans.items())
            runs = {run["name"]: run for run in done}
    results, text = report(runs)
    out = OUT.value or WORKDIR.value
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
