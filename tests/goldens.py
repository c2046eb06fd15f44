r"""Golden runs for refactoring the engine: record every experiment's metrics, compare two records.

A restructuring of the trainer must leave every number unchanged. This script runs each
experiment file and variant for 4 iterations on the embedded default (``--model=tiny-arith``,
the files' own defaults otherwise) and keeps each run's ``metrics.jsonl`` and final summary; a
second call compares two such records key by key, timing keys aside.

    python tests/goldens.py record /tmp/goldens_before          # before the change
    python tests/goldens.py record /tmp/goldens_after           # after it
    python tests/goldens.py compare /tmp/goldens_before /tmp/goldens_after

``compare`` prints every differing value with its run, iteration and key, and exits 1 if any
value differs by more than ``--rtol`` (default 0: bit-identical JSON floats). Keys renamed on
purpose are mapped with ``--rename OLD=NEW``. Not a pytest file (it takes ~15 minutes on 2 CPU
cores and needs the cached tiny-arith model); numbers hold per machine (XLA:CPU picks kernels by
CPU), so record both sides on the same machine.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = {"tokens_per_s", "step_s", "rollout_s", "reward_s", "update_s", "eval_s", "wall_s",
               "prepare_s", "workdir"}

# (name, experiment file, flags). Every file and variant; the KL and reincarnation variants make
# the stored policies (reference, previous iteration, reset at T) act within 4 iterations.
RUNS = [
    ("topr", "topr", []),
    ("topr_offline", "topr", ["--mode=offline", "--offline_prompts=32"]),
    ("grpo", "grpo", ["--variant=grpo"]),
    ("grpo_kl", "grpo", ["--variant=grpo", "--kl_coef=0.04"]),
    ("dr_grpo", "grpo", ["--variant=dr_grpo"]),
    ("dapo", "grpo", ["--variant=dapo"]),
    ("remix_grpo", "remix", ["--variant=grpo", "--reincarnation_step=2",
                             "--kl_lambda_delay=1", "--kl_lambda_interval=1"]),
    ("remix_ppo", "remix", ["--variant=ppo", "--reincarnation_step=2"]),
    ("rover", "rover", []),
    ("arpo", "arpo", []),
    ("ppo", "ppo", []),
    ("ppo_kl", "ppo", ["--kl_coef=0.01"]),
    ("rloo", "rloo", []),
    ("rloo_kl", "rloo", ["--kl_coef=0.03"]),
    ("expert_iteration", "expert_iteration", ["--batches_per_iteration=2"]),
    # 4 iterations cap SPIN's schedule (its second SPIN iteration starts at 3) and VerIPO's loop
    # (GRPO, GRPO, then DPO).
    ("dpo", "dpo", ["--offline_prompts=32"]),
    ("spin", "spin", ["--num_demonstrations=16", "--batch_size=8", "--spin_epochs=1"]),
    ("veripo", "veripo", ["--grpo_iterations=2"]),
]


def record(out: pathlib.Path, iterations_flag: str, only: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    for name, script, extra in RUNS:
        if only and name not in only:
            continue
        workdir = out / name
        if workdir.exists():
            subprocess.run(["rm", "-rf", str(workdir)], check=True)
        command = [sys.executable, str(ROOT / "experiments" / f"{script}.py"),
                   f"--workdir={workdir}", f"--{iterations_flag}=4", "--eval_every=0",
                   "--ckpt_every=2", "--progress=false", *extra]
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        (workdir / "summary_line.json").write_text(result.stdout.strip().splitlines()[-1])
        print(f"{name}: {time.time() - start:.0f} s", flush=True)


def _load(directory: pathlib.Path, renames: dict) -> list[dict]:
    def rename(record):
        return {renames.get(k, k): v for k, v in record.items() if k not in TIMING_KEYS}
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    records = [rename(json.loads(line)) for line in lines]
    records.append(rename(json.loads((directory / "summary_line.json").read_text())))
    return records


def _differs(a, b, rtol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return False
        return abs(a - b) > rtol * max(abs(a), abs(b))
    return a != b


def compare(before: pathlib.Path, after: pathlib.Path, rtol: float, renames: dict) -> int:
    """Prints each run's verdict; returns 1 if any value differs, a key was lost or a run is
    missing. Keys only in ``after`` (new metrics) are listed, not counted as differences."""
    failures = 0
    for name, _, _ in RUNS:
        if not (before / name / "summary_line.json").exists() \
                or not (after / name / "summary_line.json").exists():
            print(f"{name}: missing in {before if not (before / name).exists() else after}")
            failures += 1
            continue
        old, new = _load(before / name, renames), _load(after / name, renames)
        problems, added = [], set()
        if len(old) != len(new):
            problems.append(f"{len(old)} vs {len(new)} records")
        for index, (a, b) in enumerate(zip(old, new)):
            added |= set(b) - set(a)
            for key in sorted(set(a) - set(b)):
                problems.append(f"record {index}: {key} only in before")
            for key in sorted(set(a) & set(b)):
                if _differs(a[key], b[key], rtol):
                    problems.append(f"record {index}: {key} {a[key]!r} -> {b[key]!r}")
        compared = sum(len(set(a) & set(b)) for a, b in zip(old, new))
        verdict = "identical" if not problems else f"{len(problems)} differences"
        print(f"{name}: {verdict} ({compared} values)"
              + (f"; new keys: {', '.join(sorted(added))}" if added else ""))
        for problem in problems[:20]:
            print("   ", problem)
        failures += bool(problems)
    return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=pathlib.Path)
    rec.add_argument("--iterations_flag", default="iterations",
                     help="the shared flag that counts RL iterations (before the redesign: steps)")
    rec.add_argument("--only", nargs="*", default=[])
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=pathlib.Path)
    cmp.add_argument("after", type=pathlib.Path)
    cmp.add_argument("--rtol", type=float, default=0.0)
    cmp.add_argument("--rename", nargs="*", default=[], help="OLD=NEW key renames")
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.iterations_flag, args.only)
    else:
        renames = dict(item.split("=", 1) for item in args.rename)
        sys.exit(compare(args.before, args.after, args.rtol, renames))


if __name__ == "__main__":
    main()
