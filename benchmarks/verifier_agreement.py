"""Agreement of the math verifier and of Math-Verify with hand-labelled (gold, prediction) pairs.

The table is ``tests/data/verifier_labelled.jsonl`` (built by
``tests/data/build_verifier_labelled.py``: real golds of the six benchmarks, predictions written
as a model would, labels with reasons). Each row belongs to the ``tuning`` part (what the
verifier's rules may be fitted to) or to the ``heldout`` part (measured, never tuned on); the
split is by question id and was fixed before any measurement.

Both verifiers run in the same invocation and under the same deadline: ours through a
:class:`offpolicy_jax.rewards.VerifierPool` (killable workers), Math-Verify in a child process with
its own ``parsing_timeout`` / ``timeout_seconds`` (signal based, so it runs in that child's main
thread). Math-Verify receives ``$gold$`` and ``$prediction$``.

Run: ``python benchmarks/verifier_agreement.py --split heldout`` (``tuning``, ``all``;
``--by-form`` adds a per-form table, ``--show-misses`` lists the rows each verifier gets wrong).
"""

import argparse
import collections
import inspect
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offpolicy_jax import rewards  # noqa: E402

TABLE = ROOT / "tests" / "data" / "verifier_labelled.jsonl"
DEADLINE_S = 2

_MATH_VERIFY_CHILD = """
import json, sys, time
from math_verify import parse, verify
deadline = int(sys.argv[1])
out = []
for gold, pred in json.load(sys.stdin):
    t0 = time.monotonic()
    try:
        ok = bool(verify(parse('$' + gold + '$', parsing_timeout=deadline),
                         parse('$' + pred + '$', parsing_timeout=deadline),
                         timeout_seconds=deadline))
    except Exception:
        ok = False
    out.append([ok, time.monotonic() - t0])
print(json.dumps(out))
"""


def load_rows(split: str, path: pathlib.Path = TABLE) -> list[dict]:
    """Rows of the labelled table in ``split`` ('tuning', 'heldout' or 'all')."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r for r in rows if split == "all" or r["split"] == split]


def ours(rows: list[dict], deadline: float = DEADLINE_S) -> list[tuple[bool, str]]:
    """Our verdicts (equivalent, reason) for each row, every check under ``deadline`` seconds."""
    golds, preds = [r["gold"] for r in rows], [r["prediction"] for r in rows]
    with rewards.VerifierPool(timeout=deadline) as pool:
        if "options" in inspect.signature(pool.check_many).parameters:
            verdicts = pool.check_many(golds, preds, options=[r.get("options") for r in rows])
        else:  # a verifier from before the keyword options (the baseline measurement)
            verdicts = pool.check_many(golds, preds)
    return [(v.equivalent, v.reason) for v in verdicts]


def math_verify(rows: list[dict], deadline: int = DEADLINE_S) -> list[tuple[bool, float]] | None:
    """Math-Verify's verdicts and seconds per row (None when it is not installed)."""
    pairs = [[r["gold"], r["prediction"]] for r in rows]
    proc = subprocess.run([sys.executable, "-c", _MATH_VERIFY_CHILD, str(deadline)],
                          input=json.dumps(pairs), capture_output=True, text=True,
                          timeout=60 + 3 * deadline * len(rows))
    if proc.returncode != 0:
        if "No module named 'math_verify'" in proc.stderr:
            return None
        raise RuntimeError(proc.stderr[-2000:])
    return [tuple(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]


def agreement(labels: list[bool], verdicts: list[bool]) -> int:
    """How many verdicts equal their label."""
    return sum(bool(v) == bool(lab) for v, lab in zip(verdicts, labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("tuning", "heldout", "all"), default="heldout")
    parser.add_argument("--by-form", action="store_true", help="per-form agreement")
    parser.add_argument("--show-misses", action="store_true", help="list misjudged rows")
    parser.add_argument("--no-math-verify", action="store_true", help="skip Math-Verify")
    args = parser.parse_args()

    rows = load_rows(args.split)
    labels = [r["label"] for r in rows]
    t0 = time.perf_counter()
    our = ours(rows)
    our_s = time.perf_counter() - t0
    theirs = None if args.no_math_verify else math_verify(rows)

    n = len(rows)
    ours_right = agreement(labels, [v for v, _ in our])
    timeouts = sum(reason.startswith("timeout") for _, reason in our)
    print(f"table: {TABLE.relative_to(ROOT)}  split: {args.split}  rows: {n} "
          f"({sum(labels)} labelled equivalent)")
    print(f"ours:        {ours_right}/{n} = {ours_right / n:.1%}  "
          f"({timeouts} over the {DEADLINE_S} s deadline; {our_s:.1f} s in all)")
    if theirs is not None:
        theirs_right = agreement(labels, [v for v, _ in theirs])
        slow = sum(s > DEADLINE_S for _, s in theirs)
        print(f"Math-Verify: {theirs_right}/{n} = {theirs_right / n:.1%}  "
              f"({slow} calls over {DEADLINE_S} s)")
    if args.by_form:
        forms = collections.defaultdict(lambda: [0, 0, 0])
        for k, r in enumerate(rows):
            cell = forms[r["form"]]
            cell[0] += 1
            cell[1] += bool(our[k][0]) == r["label"]
            cell[2] += theirs is not None and bool(theirs[k][0]) == r["label"]
        print(f"{'form':<16} {'rows':>5} {'ours':>5} {'MV':>5}")
        for form, (count, a, b) in sorted(forms.items()):
            print(f"{form:<16} {count:>5} {a:>5} {b if theirs is not None else '-':>5}")
    if args.show_misses:
        for k, r in enumerate(rows):
            mine = bool(our[k][0]) != r["label"]
            other = theirs is not None and bool(theirs[k][0]) != r["label"]
            if mine or other:
                who = "+".join(name for name, miss in (("ours", mine), ("MV", other)) if miss)
                print(f"[{who}] {r['id']} label={r['label']} gold={r['gold']!r} "
                      f"pred={r['prediction']!r} ({r['form']}; ours: {our[k][1]})")


if __name__ == "__main__":
    main()
