r"""Side-by-side comparison of RL methods on the embedded task, at equal rollout budgets.

Runs each chosen method's experiment file as a subprocess (its own workdir under ``--workdir``),
with the same seeds, the same shared settings and the same budget of *fresh* rollouts (responses
sampled during training), which every experiment file enforces itself (``--rollout_budget``: a run
ends at the first iteration whose rollouts reach it, so ReMix, which replays a fraction of every
batch before its reincarnation step, runs more iterations than the on-policy methods, and expert
iteration, which samples 8 batches per EM iteration, fewer). Every run is evaluated at the same
rollout counts (``--eval_every_rollouts``). Nothing here depends on the method: what differs is
the command-line configuration in ``METHODS``. Then it reads every run's ``metrics.jsonl`` and
writes

* ``results.json`` — every run's evaluation curve and summary, each final number per seed with
  the seeds' mean and its standard error (a later run diffs against it: ``--diff_against``);
* ``results.md`` — the table grouped by family (``FAMILIES``): pass@1 before, pass@1 and pass@4
  after (mean ± standard error over seeds), best, rollouts needed to reach the GRPO run's final
  pass@1 with its spread over seeds, wall time; then the runs' training diagnostics;
* ``comparison.png`` — held-out pass@1 against rollouts consumed, a band of ± one standard error
  over seeds (matplotlib, Agg backend).

A run whose workdir already holds a summary that spent the budget is not run again, so an
interrupted comparison resumes where it stopped (a run killed midway resumes from its own last
checkpoint).

Command (embedded default: six methods, three seeds, two runs at a time on 2 CPU cores; about
1.5 hours: eight methods over three seeds took 111 minutes, ReMix's runs 19 minutes each):

    python experiments/compare.py --out=docs/comparison

Methods: grpo, topr, remix, rover, arpo, rloo (default), remix_ppo, ppo, dapo, dr_grpo, gspo,
cispo, decoupled_ppo, expert_iteration, bstar, auto_cei (on its own IDK-capable model), grpo_dynamic
(DAPO's dynamic sampling), grpo_mopps and topr_mopps (MoPPS prompt selection), rise
(self-verification), dpo, spin and veripo (preference and self-play training), and TOPR on the
paper's off-policy data against naive REINFORCE on the same data (topr_offline,
reinforce_offline).

With ``--final_eval_samples=n`` every finished run's last checkpoint is also evaluated by the
harness (``python -m offpolicy_jax.eval``, the held-out arith set, n samples per problem) and the
report adds pass@1/4/8/n and the different correct responses per problem, mean ± standard error
over seeds: the measurements of ROVER's claim that pass@k stays high.

A sweep: ``--vary=flag=v1,v2`` (repeatable) adds one row ``<method>+<flag>=<v>`` per value, the
method's configuration with that one flag changed, e.g. the ReMix sweep in the README:

    python experiments/compare.py --methods=remix --seeds=0 --vary=num_passes=1,4 \
        --vary=off_policy_fraction=0.2,0.6 --out=docs/comparison/remix_sweep

Bounded staleness: ``--rollout_lags=0,2,4,8`` runs every method at each ``--rollout_lag`` (rows
``<method>_lag<k>``) and adds a method × lag table of final pass@1 and ``staleness.png``:

    python experiments/compare.py --methods=grpo,ppo,decoupled_ppo,gspo,cispo,topr,remix,rover \
        --rollout_lags=0,2,4,8 --seeds=0,1 --out=docs/staleness
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

from offpolicy_jax.eval import test_time
from offpolicy_jax.training import flags as shared_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The offline methods' flags; {iterations}, {prompts} and {eval_every} are filled in by ``plan``
# from the budget (the on-policy iterations it buys, budget / group size, and iterations between
# evaluation points).
OFFLINE = ["--offline_prompts={prompts}", "--iterations={iterations}", "--rollout_budget=0",
           "--eval_every_rollouts=0", "--eval_every={eval_every}"]

# name -> (experiment file, its flags). Every method runs with its file's own defaults otherwise.
METHODS = {
    "grpo": ("grpo", ["--variant=grpo"]),
    "dr_grpo": ("grpo", ["--variant=dr_grpo"]),
    "dapo": ("grpo", ["--variant=dapo"]),
    "topr": ("topr", []),
    # Prompt selection and dynamic sampling (issue 15's claim check; use a recurring pool, e.g.
    # --extra_flags=--train_size=1024, or MoPPS's posteriors never see a prompt twice).
    "grpo_dynamic": ("grpo", ["--variant=grpo", "--dynamic_sampling"]),
    "grpo_mopps": ("grpo", ["--variant=grpo", "--prompt_selection=mopps"]),
    "topr_mopps": ("topr", ["--prompt_selection=mopps"]),
    # T at half the run (the paper: T = 50 of 75-350 steps), counted in the iterations an
    # on-policy method takes to spend the budget.
    "remix": ("remix", ["--variant=grpo", "--reincarnation_fraction=0.5"]),
    # ReMix-PPO, the paper's headline variant (value head and GAE), at the same T.
    "remix_ppo": ("remix", ["--variant=ppo", "--reincarnation_fraction=0.5"]),
    "rover": ("rover", []),
    "arpo": ("arpo", []),
    "rloo": ("rloo", []),
    "ppo": ("ppo", []),
    "gspo": ("grpo", ["--variant=gspo"]),
    "cispo": ("grpo", ["--variant=cispo"]),
    "decoupled_ppo": ("grpo", ["--variant=decoupled_ppo"]),
    "expert_iteration": ("expert_iteration", ["--batches_per_iteration=8"]),
    # Preference and self-play training (README, "Preference and self-play training"). DPO draws
    # one dataset of --offline_prompts x --group_size responses (2,048 rollouts at its defaults),
    # then trains on its pairs until the plan's --iterations cap; SPIN samples one response per
    # demonstration per SPIN iteration (768 in all) and ends with its schedule; neither reaches
    # the budget. VerIPO's GRPO stages spend it (its DPO stages sample nothing).
    "dpo": ("dpo", []),
    "spin": ("spin", []),
    "veripo": ("veripo", []),
    # TOPR's claim that truncating the negatives' weights keeps off-policy training stable, on
    # the paper's own off-policy data: one dataset of the whole budget drawn from the initial
    # policy (--mode=offline), then one pass over it in the on-policy methods' iteration count,
    # TOPR against naive REINFORCE on the same data (every weight 1). The dataset is drawn at
    # iteration 1, so the budget cannot end these runs and evaluations go by iterations.
    "topr_offline": ("topr", ["--mode=offline", *OFFLINE]),
    "reinforce_offline": ("topr", ["--mode=offline", "--objective=naive_reinforce", *OFFLINE]),
    "rise": ("rise", []),
    "bstar": ("bstar", []),
    # Auto-CEI needs a model that can answer "I don't know": its own embedded checkpoint, which
    # replaces --model (a method's flags come after the shared ones); its curriculum reads an
    # evaluation after every iteration.
    "auto_cei": ("auto_cei", ["--model=tiny-arith-idk", "--eval_every_rollouts=0"]),
}
DEFAULT_METHODS = ["grpo", "topr", "remix", "rover", "arpo", "rloo"]

# The published table's groups, in order (a method in none of them is listed under "other").
FAMILIES = {
    "on-policy baselines": ["grpo", "dr_grpo", "dapo", "rloo", "ppo", "gspo", "cispo",
                            "decoupled_ppo"],
    "off-policy seed methods": ["topr", "topr_offline", "reinforce_offline", "remix",
                                "remix_ppo", "rover", "arpo"],
    "prompt selection and curricula": ["grpo_dynamic", "grpo_mopps", "topr_mopps"],
    "self-verification": ["rise"],
    "preference and self-play": ["dpo", "spin", "veripo"],
    "expert iteration": ["expert_iteration", "bstar", "auto_cei"],
}


def family(name: str) -> str:
    """The family of a table row: its method's, ``<method>_lag<k>`` and ``<method>+<flag>=<v>``
    rows included."""
    base = name.partition("+")[0]
    method, _, lag = base.rpartition("_lag")
    method = method if method and lag.isdigit() else base
    return next((f for f, members in FAMILIES.items() if method in members), "other")

METHOD_NAMES = flags.DEFINE_list("methods", DEFAULT_METHODS, f"Methods to run, from "
                                 f"{sorted(METHODS)}.")
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every method runs once per seed "
                          "(three for the published table: a mean with a standard error).")
EVAL_POINTS = flags.DEFINE_integer("eval_points", 8, "Held-out evaluations along each run "
                                   "(besides the start), at equal rollout counts.")
OUT = flags.DEFINE_string("out", None, "Where results.md/json and comparison.png go "
                          "(default: the --workdir root).")
PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs at the same time.")
REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Do not run anything: rebuild the report "
                                "from the finished runs already in the workdirs.")
ROLLOUT_LAGS = flags.DEFINE_list("rollout_lags", None, "Run every method at each of these "
                                  "--rollout_lag values (rows <method>_lag<k>); default: the "
                                  "methods' own (on-policy) sampling.")
DIFF_AGAINST = flags.DEFINE_string("diff_against", None, "An earlier results.json: add a table "
                                   "of each method's final pass@1 then and now, with the "
                                   "difference's standard error, to results.md.")
VARY = flags.DEFINE_multi_string("vary", [], "A one-at-a-time sweep around each method's "
                                  "settings: 'flag=v1,v2' adds a row <method>+<flag>=<v> per "
                                  "value, run with --<flag>=<v> after the method's own flags; "
                                  "repeat for more flags (the unvaried row is kept).")
FINAL_EVAL_SAMPLES = flags.DEFINE_integer(
    "final_eval_samples", 0, "n > 0: also evaluate every finished run's last checkpoint on the "
    "held-out arith set (--final_eval_problems problems, n samples each, python -m "
    "offpolicy_jax.eval) and add pass@1/4/8/n and distinct correct responses per problem to the "
    "report (ROVER's diversity claim); 0: off.")
FINAL_EVAL_PROBLEMS = flags.DEFINE_integer("final_eval_problems", 500, "Held-out problems of the "
                                           "final-checkpoint evaluation (the arith set has 500).")
EXTRA_FLAGS = flags.DEFINE_list("extra_flags", [], "Flags passed to every run, e.g. "
                                "--extra_flags=--max_new_tokens=32.")


def plan(method: str, seed: str, lag: str | None = None,
         setting: tuple[str, str] | None = None) -> dict:
    """The command line of one run: the budget, the evaluation points and an iteration cap that
    the budget always reaches first (4x the on-policy iterations); with ``lag``, sampling
    ``lag`` iterations behind the trainer; with ``setting`` = (flag, value), that flag set
    after the method's own (a ``--vary`` row)."""
    experiment, extra = METHODS[method]
    if lag is not None:
        extra = [*extra, f"--rollout_lag={lag}"]
        method = f"{method}_lag{lag}"
    if setting is not None:
        extra = [*extra, f"--{setting[0]}={setting[1]}"]
        method = f"{method}+{setting[0]}={setting[1]}"
    budget = shared_flags.ROLLOUT_BUDGET.value
    if budget < 1:
        raise ValueError(f"--rollout_budget must be >= 1 for a comparison, got {budget}")
    batch, group = shared_flags.BATCH_SIZE.value, shared_flags.GROUP_SIZE.value
    on_policy_iterations = math.ceil(budget / (batch * group))
    extra = [flag.format(iterations=on_policy_iterations, prompts=budget // group,
                         eval_every=max(1, on_policy_iterations // max(EVAL_POINTS.value, 1)))
             for flag in extra]
    workdir = os.path.join(root_workdir(), f"{method}_seed{seed}")
    # The method's own flags follow the shared ones (so they win where both set one, e.g.
    # auto_cei's --model) and --extra_flags come last (they win over both).
    command = [sys.executable, str(ROOT / "experiments" / f"{experiment}.py"),
               f"--model={shared_flags.MODEL.value}", f"--workdir={workdir}", f"--seed={seed}",
               f"--rollout_budget={budget}", f"--iterations={4 * on_policy_iterations}",
               f"--eval_every_rollouts={max(1, budget // max(EVAL_POINTS.value, 1))}",
               f"--batch_size={batch}", f"--group_size={group}",
               f"--eval_size={shared_flags.EVAL_SIZE.value}",
               f"--eval_samples={shared_flags.EVAL_SAMPLES.value}", "--progress=false",
               *extra, *EXTRA_FLAGS.value]
    return {"method": method, "seed": seed, "workdir": workdir, "command": command,
            "rollout_budget": budget}


def settings(vary: list[str]) -> list[tuple[str, str] | None]:
    """The rows of a ``--vary`` sweep: None (the method as configured), then one
    ``(flag, value)`` per value of each ``flag=v1,v2``."""
    rows = [None]
    for spec in vary:
        flag, _, values = spec.partition("=")
        flag = flag.strip().removeprefix("--")
        if not flag or not values or any(not v.strip() for v in values.split(",")):
            raise ValueError(f"--vary={spec!r}: expected 'flag=value1,value2,...'")
        rows += [(flag, value.strip()) for value in values.split(",")]
    return rows


def root_workdir() -> str:
    return shared_flags.WORKDIR.value or "workdirs/compare"


def child_env() -> dict:
    """The environment of a run or an evaluation: this checkout's package first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def execute(run: dict) -> dict:
    """Runs one experiment; its stdout/stderr go to ``<workdir>/log.txt``. A run whose workdir
    holds a summary that spent the budget is not started again (its own wall time is kept)."""
    done = finished(run)
    if done["returncode"] == 0 and done["rollouts"] >= run["rollout_budget"]:
        print(f"{run['method']} seed {run['seed']}: finished before ({done['wall_s']:.0f} s)",
              flush=True)
        return done
    os.makedirs(run["workdir"], exist_ok=True)
    start = time.time()
    with open(os.path.join(run["workdir"], "log.txt"), "w") as log:
        result = subprocess.run(run["command"], stdout=log, stderr=subprocess.STDOUT,
                                env=child_env())
    run = dict(run, returncode=result.returncode, wall_s=time.time() - start)
    print(f"{run['method']} seed {run['seed']}: rc={result.returncode} "
          f"({run['wall_s']:.0f} s)", flush=True)
    return run


def finished(run: dict) -> dict:
    """A run already in its workdir, as ``execute`` would report it (from its summary.json)."""
    path = os.path.join(run["workdir"], "summary.json")
    if not os.path.exists(path):
        return dict(run, returncode=1, wall_s=0.0)
    with open(path) as f:
        summary = json.load(f)
    return dict(run, returncode=0, wall_s=summary["wall_s"], rollouts=summary["rollouts"])



def final_eval_dir(workdir: str, samples: int) -> str:
    return os.path.join(workdir, f"final_eval_n{samples}")


def final_eval(run: dict, samples: int, problems: int) -> dict:
    """Evaluates a finished run's last checkpoint with the harness (``--final_eval_samples``),
    once: an evaluation already in its folder is kept. Returns the run with
    ``final_eval_returncode``."""
    out = final_eval_dir(run["workdir"], samples)
    if run["returncode"] != 0 or os.path.exists(os.path.join(out, "results.json")):
        return run
    # The run's own response budget and sampling temperature (its saved configuration).
    with open(os.path.join(run["workdir"], "run_config.json")) as f:
        config = json.load(f)["config"]
    command = [sys.executable, "-m", "offpolicy_jax.eval", f"--model={run['workdir']}",
               "--benchmarks=arith", f"--limit={problems}", f"--num_samples={samples}",
               f"--k={','.join(str(k) for k in sorted({1, 4, 8, samples}) if k <= samples)}",
               f"--temperature={config['eval_temperature']}", "--top_p=1",
               f"--max_new_tokens={config['max_new_tokens']}",
               f"--seed={run['seed']}", "--progress=false", f"--out={out}"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.txt"), "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env())
    print(f"{run['method']} seed {run['seed']}: final evaluation rc={result.returncode}",
          flush=True)
    return dict(run, final_eval_returncode=result.returncode)


def read_final_eval(workdir: str, samples: int) -> dict | None:
    """``{"pass@k": ..., "distinct_correct": ...}`` of a run's final-checkpoint evaluation."""
    path = os.path.join(final_eval_dir(workdir, samples), "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)["benchmarks"]["arith"]
    return {k: v for k, v in metrics.items() if k.startswith("pass@") or k == "distinct_correct"}


def read_curve(workdir: str) -> list[dict]:
    """``[{"iteration", "rollouts", "pass@1"[, "pass@4"]}]`` of every evaluation in
    ``metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    curve = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "eval/pass@1" in record:
                point = {"iteration": record["iteration"], "rollouts": record.get("rollouts", 0),
                         "pass@1": record["eval/pass@1"]}
                if "eval/pass@4" in record:
                    point["pass@4"] = record["eval/pass@4"]
                curve.append(point)
    return curve


# Training diagnostics averaged over each run's iterations (where the method logs them).
TRAINING_METRICS = ("zero_gradient_group_fraction", "mopps/correlation",
                    "success_replay/injected_groups", "dynamic_sampling/extra_rollouts",
                    "staleness_mean", "train/clip_fraction", "train/ratio_max",
                    "correction/mismatch_kl", "train/behaviour_masked_fraction")


def training_means(workdir: str) -> dict:
    """The mean over iterations of each of ``TRAINING_METRICS`` the run logged."""
    path = os.path.join(workdir, "metrics.jsonl")
    values = {key: [] for key in TRAINING_METRICS}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                for key in TRAINING_METRICS:
                    if isinstance(record.get(key), (int, float)):
                        values[key].append(record[key])
    return {key: sum(v) / len(v) for key, v in values.items() if v}


def rollouts_to_reach(curve: list[dict], target: float) -> int | None:
    """Fresh rollouts at the first evaluation *after training started* with pass@1 ≥ ``target``
    (None if never)."""
    for point in curve[1:]:
        if point["pass@1"] >= target:
            return point["rollouts"]
    return None


def mean_and_error(values: list[float]) -> tuple[float, float | None]:
    """The mean of the seeds' values and its standard error (None for a single seed)."""
    return (sum(values) / len(values),
            test_time.standard_error(values) if len(values) > 1 else None)


def summarise(runs: list[dict]) -> dict:
    """Per-method results: the seeds' mean curve (with its standard error at each evaluation)
    and, for each final number, every seed's value, their mean and its standard error."""
    methods = {}
    for run in runs:
        run["curve"] = read_curve(run["workdir"])
        methods.setdefault(run["method"], []).append(run)
    grpo_final = None
    if "grpo" in methods and all(r["curve"] for r in methods["grpo"]):
        grpo_final = sum(r["curve"][-1]["pass@1"] for r in methods["grpo"]) / len(methods["grpo"])
    table = {}
    for method, group in methods.items():
        ok = [r for r in group if r["returncode"] == 0 and r["curve"]]
        if not ok:
            table[method] = {"failed": True}
            continue
        length = min(len(r["curve"]) for r in ok)
        curves = [r["curve"][:length] for r in ok]
        mean_curve = []
        for i in range(length):
            mean, error = mean_and_error([c[i]["pass@1"] for c in curves])
            mean_curve.append({"rollouts": curves[0][i]["rollouts"], "pass@1": mean,
                               "pass@1_se": error})
        finals = [c[-1]["pass@1"] for c in curves]
        entry = {
            # The last evaluation is the run's last iteration (always evaluated).
            "seeds": len(ok), "iterations": ok[0]["curve"][-1]["iteration"],
            "rollouts": mean_curve[-1]["rollouts"],
            "pass@1_before": mean_curve[0]["pass@1"],
            "pass@1_after": mean_curve[-1]["pass@1"],
            # Each seed's final pass@1, and the standard error of their mean (None: one seed).
            "pass@1_after_by_seed": finals,
            "pass@1_after_se": mean_curve[-1]["pass@1_se"],
            "pass@1_best": max(p["pass@1"] for p in mean_curve),
            "rollouts_to_grpo_final": (None if grpo_final is None
                                       else rollouts_to_reach(mean_curve, grpo_final)),
            # Each seed's own rollouts to the target (None: that seed never reached it).
            "rollouts_to_grpo_final_by_seed": (
                None if grpo_final is None
                else [rollouts_to_reach(c, grpo_final) for c in curves]),
            "wall_s": sum(r["wall_s"] for r in ok) / len(ok),
            "training": training_means(ok[0]["workdir"]),
            "curve": mean_curve,
        }
        finals_n = [read_final_eval(r["workdir"], FINAL_EVAL_SAMPLES.value)
                    for r in ok] if FINAL_EVAL_SAMPLES.value else []
        if finals_n and all(finals_n):
            entry["final_eval"] = {"samples": FINAL_EVAL_SAMPLES.value}
            for key in finals_n[0]:
                by_seed = [f[key] for f in finals_n]
                mean, error = mean_and_error(by_seed)
                entry["final_eval"][key] = {"by_seed": by_seed, "mean": mean, "se": error}
        if all("pass@4" in c[-1] for c in curves):
            entry["pass@4_after_by_seed"] = [c[-1]["pass@4"] for c in curves]
            entry["pass@4_after"], entry["pass@4_after_se"] = mean_and_error(
                entry["pass@4_after_by_seed"])
        table[method] = entry
    return {"grpo_final_pass@1": grpo_final, "methods": table}


def with_error(mean: float, error: float | None, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" + ("" if error is None else f" ± {error:.{digits}f}")


def reach_cell(r: dict) -> str:
    """Rollouts to GRPO's final pass@1: one seed's value, or over several seeds the mean ± its
    standard error of those that reached it and how many did."""
    by_seed = r.get("rollouts_to_grpo_final_by_seed")
    if not by_seed:
        return "—"
    reached = [v for v in by_seed if v is not None]
    if len(by_seed) == 1:
        return "—" if not reached else str(reached[0])
    if not reached:
        return f"— (0/{len(by_seed)})"
    mean, error = mean_and_error(reached)
    return f"{with_error(mean, error, 0)} ({len(reached)}/{len(by_seed)})"


def by_family(names) -> dict:
    """``{family: [row names]}`` in ``FAMILIES``' order, "other" last."""
    groups = {name: [] for name in [*FAMILIES, "other"]}
    for name in names:
        groups[family(name)].append(name)
    return {name: rows for name, rows in groups.items() if rows}


def write_markdown(results: dict, path: str, command: str) -> None:
    columns = ["method", "seeds", "iterations", "rollouts", "pass@1 start", "pass@1 end",
               "pass@4 end", "best", "rollouts to GRPO's final pass@1", "wall per run (s)"]
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for group, names in by_family(results["methods"]).items():
        rows.append(f"| **{group}** |" + " |" * (len(columns) - 1))
        for method in names:
            r = results["methods"][method]
            if r.get("failed"):
                rows.append(f"| {method} | failed |" + " |" * (len(columns) - 2))
                continue
            pass4 = ("—" if "pass@4_after" not in r
                     else with_error(r["pass@4_after"], r["pass@4_after_se"]))
            rows.append(f"| {method} | {r['seeds']} | {r['iterations']} | {r['rollouts']} | "
                        f"{r['pass@1_before']:.3f} | "
                        f"{with_error(r['pass@1_after'], r['pass@1_after_se'])} | {pass4} | "
                        f"{r['pass@1_best']:.3f} | {reach_cell(r)} | {r['wall_s']:.0f} |")
    evaluated = {m: r["final_eval"] for m, r in results["methods"].items() if "final_eval" in r}
    if evaluated:
        keys = sorted({k for e in evaluated.values() for k in e if k.startswith("pass@")},
                      key=lambda k: int(k.split("@")[1])) + ["distinct_correct"]
        samples = next(iter(evaluated.values()))["samples"]
        rows += ["", f"Last checkpoint, held-out arith, {samples} samples per problem "
                 "(mean over seeds ± its standard error):", "",
                 "| method | " + " | ".join(keys).replace("_", " ") + " |",
                 "|---|" + "---|" * len(keys)]
        for method, e in evaluated.items():
            rows.append(f"| {method} | " + " | ".join(
                with_error(e[k]["mean"], e[k]["se"], 2 if k == "distinct_correct" else 3)
                if k in e else "—" for k in keys) + " |")
    logged = [k for k in TRAINING_METRICS
              if any(k in r.get("training", {}) for r in results["methods"].values())]
    if logged:
        rows += ["", "| method | " + " | ".join(logged) + " |",
                 "|---|" + "---|" * len(logged)]
        for method, r in results["methods"].items():
            means = r.get("training", {})
            rows.append(f"| {method} | " + " | ".join(
                f"{means[k]:.3f}" if k in means else "—" for k in logged) + " |")
    text = (f"Command: `{command}`\n\n" + "\n".join(rows) + "\n\n"
            "pass@1, pass@4: over the held-out samples per prompt, the mean over seeds ± its "
            "standard error (no error: one seed); rollouts: fresh training responses sampled "
            "(replayed ones not counted); rollouts to GRPO's final pass@1: the first evaluation "
            "at or above it (several seeds: mean ± standard error over the seeds that reached "
            "it, and how many did); the second table averages training diagnostics over each "
            "run's iterations (first seed). The plot leaves out offline rows: they draw their "
            "whole dataset at iteration 1.\n")
    if results.get("runs_wall_s") is not None:
        text += (f"\nWall time: the runs' own times sum to {results['runs_wall_s'] / 3600:.2f} h"
                 f" ({len(results.get('runs', []))} runs, {results.get('parallel')} at a time)")
        elapsed = results.get("elapsed_s")
        text += ("; this invocation took " + f"{elapsed / 60:.1f} min.\n" if elapsed is not None
                 else ".\n")
    with open(path, "w") as f:
        f.write(text)


def changes(results: dict, earlier: dict) -> str:
    """A table of each method's final pass@1 now against ``earlier`` (another results.json):
    the difference and its standard error, sqrt(se_now^2 + se_earlier^2), where both have one."""
    rows = ["| method | earlier | now | change |", "|---|---|---|---|"]
    for method, r in results["methods"].items():
        before = earlier.get("methods", {}).get(method)
        if r.get("failed") or not before or before.get("failed"):
            continue
        errors = (r.get("pass@1_after_se"), before.get("pass@1_after_se"))
        error = (None if None in errors else math.sqrt(errors[0] ** 2 + errors[1] ** 2))
        rows.append(f"| {method} | {with_error(before['pass@1_after'], errors[1])} | "
                    f"{with_error(r['pass@1_after'], errors[0])} | "
                    f"{with_error(r['pass@1_after'] - before['pass@1_after'], error)} |")
    return "\n".join(rows)


def lag_table(results: dict, key: str = "pass@1_after") -> dict:
    """``{method: {lag: value}}`` of the ``<method>_lag<k>`` rows: the seeds' mean final pass@1,
    or another summary ``key`` (``pass@1_after_se``: its standard error; rows without one are
    left out)."""
    table = {}
    for name, r in results["methods"].items():
        method, _, lag = name.rpartition("_lag")
        if method and lag.isdigit() and not r.get("failed") and r.get(key) is not None:
            table.setdefault(method, {})[int(lag)] = r[key]
    return table


def write_lag_markdown(table: dict, lags: list[int], errors: dict | None = None) -> str:
    """The method x lag table; ``errors`` (``lag_table(results, "pass@1_after_se")``) adds
    ``± standard error`` where there are several seeds."""
    errors = errors or {}
    rows = ["| method | " + " | ".join(f"lag {k}" for k in lags) + " |",
            "|---|" + "---|" * len(lags)]

    def cell(method, k):
        if k not in table[method]:
            return "—"
        return with_error(table[method][k], errors.get(method, {}).get(k))

    for method in table:
        rows.append(f"| {method} | " + " | ".join(cell(method, k) for k in lags) + " |")
    return "\n".join(rows)


def plot_lags(table: dict, lags: list[int], path: str, errors: dict | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    errors = errors or {}
    figure, axis = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for method, by_lag in table.items():
        shown = [k for k in lags if k in by_lag]
        spread = [errors.get(method, {}).get(k) or 0.0 for k in shown]
        axis.errorbar(shown, [by_lag[k] for k in shown], yerr=spread, marker="o", capsize=3,
                      label=method)
    axis.set_xlabel("rollout lag k (iterations the sampler is behind)")
    axis.set_ylabel("final held-out pass@1")
    axis.set_title("tiny-arith: final pass@1 vs staleness")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def on_rollout_axis(curve: list[dict]) -> bool:
    """Whether a curve's evaluations fall at different rollout counts (not so for an offline
    run, whose every evaluation after the start is at the whole dataset's count)."""
    rollouts = [p["rollouts"] for p in curve[1:]]
    return len(set(rollouts)) == len(rollouts)


def plot(results: dict, path: str) -> None:
    """Held-out pass@1 against fresh rollouts, one line per method (the seeds' mean) with a band
    of ± one standard error where there are several seeds. Offline rows (``topr_offline``...),
    whose whole dataset is drawn at iteration 1, have no curve against rollouts and are left
    out (the table has them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7.2, 4.5), dpi=100)
    for method, r in results["methods"].items():
        if r.get("failed"):
            continue
        if not on_rollout_axis(r["curve"]):
            continue
        rollouts = [p["rollouts"] for p in r["curve"]]
        mean = [p["pass@1"] for p in r["curve"]]
        (line,) = axis.plot(rollouts, mean, marker="o", markersize=3, label=method)
        if all(p.get("pass@1_se") is not None for p in r["curve"]):
            errors = [p["pass@1_se"] for p in r["curve"]]
            axis.fill_between(rollouts, [m - e for m, e in zip(mean, errors)],
                              [m + e for m, e in zip(mean, errors)], color=line.get_color(),
                              alpha=0.15, linewidth=0)
    axis.set_xlabel("fresh training rollouts")
    axis.set_ylabel("held-out pass@1 (band: ± standard error over seeds)")
    axis.set_title("tiny-arith: pass@1 vs rollouts consumed")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv):
    del argv
    unknown = sorted(set(METHOD_NAMES.value) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    lags = ROLLOUT_LAGS.value or [None]
    bad_lags = [lag for lag in lags if lag is not None and not lag.isdigit()]
    if bad_lags:
        raise ValueError(f"--rollout_lags: {bad_lags} are not integers >= 0")
    runs = [plan(method, seed, lag, setting) for seed in SEEDS.value
            for method in METHOD_NAMES.value for lag in lags for setting in settings(VARY.value)]
    start = time.time()
    if REPORT_ONLY.value:
        runs = [finished(run) for run in runs]
    else:
        with futures.ThreadPoolExecutor(max_workers=max(PARALLEL.value, 1)) as pool:
            runs = list(pool.map(execute, runs))
            if FINAL_EVAL_SAMPLES.value:
                runs = list(pool.map(lambda run: final_eval(run, FINAL_EVAL_SAMPLES.value,
                                                            FINAL_EVAL_PROBLEMS.value), runs))
    results = summarise(runs)
    # Machine time: every run's own wall time, summed (runs finished before included); and how
    # long this invocation took (None for a --report_only rebuild).
    results["runs_wall_s"] = sum(r["wall_s"] for r in runs)
    results["elapsed_s"] = None if REPORT_ONLY.value else time.time() - start
    results["parallel"] = PARALLEL.value
    results["runs"] = [{k: v for k, v in r.items() if k != "command"} | {
        "command": " ".join(r["command"][1:])} for r in runs]
    out = OUT.value or root_workdir()
    os.makedirs(out, exist_ok=True)
    # The command that produced the runs (a --report_only rebuild reports the original one).
    command = "python experiments/compare.py " + " ".join(
        a for a in sys.argv[1:] if not a.startswith("--report_only"))
    results["command"] = command
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(results, os.path.join(out, "results.md"), command)
    plot(results, os.path.join(out, "comparison.png"))
    if ROLLOUT_LAGS.value:
        by_lag, lag_values = lag_table(results), [int(k) for k in ROLLOUT_LAGS.value]
        errors = lag_table(results, "pass@1_after_se")
        with open(os.path.join(out, "results.md"), "a") as f:
            f.write("\nFinal held-out pass@1 by rollout lag (mean over seeds ± its standard "
                    "error):\n\n" + write_lag_markdown(by_lag, lag_values, errors) + "\n")
        plot_lags(by_lag, lag_values, os.path.join(out, "staleness.png"), errors)
    if DIFF_AGAINST.value:
        with open(DIFF_AGAINST.value) as f:
            earlier = json.load(f)
        with open(os.path.join(out, "results.md"), "a") as f:
            f.write(f"\nFinal pass@1 against {DIFF_AGAINST.value}:\n\n"
                    + changes(results, earlier) + "\n")
    print(open(os.path.join(out, "results.md")).read())
    failed = [r["method"] for r in runs if r["returncode"] != 0]
    failed_evals = [f"{r['method']} seed {r['seed']}" for r in runs
                    if r.get("final_eval_returncode", 0) != 0]
    if failed or failed_evals:
        raise SystemExit(f"runs failed: {failed} (see their log.txt); final evaluations failed: "
                         f"{failed_evals} (see final_eval_n*/log.txt)")


if __name__ == "__main__":
    # The shared flags that matter here (--rollout_budget, --batch_size, --group_size,
    # --eval_size, --eval_samples, --model, --workdir = root of the runs) are passed to every run;
    # the rest are not used.
    # Fresh training rollouts per run: 200 iterations of 16 prompts x 8 responses, the budget of
    # the main TOPR run.
    flags.FLAGS.set_default("rollout_budget", 25_600)
    flags.FLAGS.set_default("eval_samples", 4)   # 4 samples per held-out prompt keep evals cheap
    flags.FLAGS.set_default("eval_size", 128)    # 512 held-out samples: pass@1 s.e. ~2 points
    app.run(main)
