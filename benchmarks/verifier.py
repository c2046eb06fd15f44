"""Throughput of the math verifier: responses/s for 1,000 responses built from MATH-500 golds.

The batch mixes three kinds of response (one third each): a correct answer written differently
from the gold (``\\boxed{}`` around a re-typeset gold, or "The answer is ..."), an incorrect one
(the gold plus one, or a wrong choice), and one with no parseable answer. It is scored with a
persistent :class:`VerifierPool` (start-up excluded and reported separately), and also in-process
without deadlines for comparison.

Run: ``python benchmarks/verifier.py [--workers N] [--repeats R]``
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from offpolicy_jax import rewards  # noqa: E402
from offpolicy_jax.rewards import math as rmath  # noqa: E402


def build_responses(golds: list[str], n: int = 1000) -> tuple[list[str], list[str]]:
    """``n`` (response, gold) pairs cycling through ``golds``: correct / incorrect / unparseable."""
    responses, batch_golds = [], []
    for k in range(n):
        gold = golds[k % len(golds)]
        kind = k % 3
        if kind == 0:
            retyped = gold.replace("\\dfrac", "\\frac").replace(" ", "")
            if k % 2:
                responses.append(f"Let me think step by step.\nSo we get $\\boxed{{{retyped}}}$.")
            else:
                responses.append(f"Working... The answer is ${retyped}$.")
        elif kind == 1:
            responses.append(f"After simplifying, the result is \\boxed{{{gold} + 1}}.")
        else:
            responses.append("I could not finish the computation; it might be \\boxed{\\foo{??}}")
        batch_golds.append(gold)
    return responses, batch_golds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="pool size (default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions")
    parser.add_argument("--n", type=int, default=1000, help="responses per batch")
    args = parser.parse_args()

    golds = [item["gold"] for item in rewards.load_benchmark("math500")]
    responses, batch_golds = build_responses(golds, args.n)

    start = time.perf_counter()
    with rewards.VerifierPool(num_workers=args.workers) as pool:
        rewards.score_batch(["\\boxed{1}"], ["1"], pool=pool)  # workers are up
        startup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = rewards.score_batch(responses, batch_golds, pool=pool)
            times.append(time.perf_counter() - t0)
        workers = pool.num_workers
    t0 = time.perf_counter()
    in_process = [rmath.check(g, rmath.extract_answer(r)).equivalent
                  for r, g in zip(responses, batch_golds)]
    serial = time.perf_counter() - t0

    timeouts = sum(r.startswith("timeout") for r in out.reasons)
    print(f"responses: {len(responses)}  mean reward: {out.rewards.mean():.3f}  "
          f"timeouts: {timeouts}  agree with in-process: {in_process == out.equivalent}")
    # The first pass is the honest number for an RL loop (new responses every step); later passes
    # hit SymPy's cache in the workers because the batch repeats.
    print(f"pool ({workers} workers, start-up {startup:.2f} s): "
          f"first pass {len(responses) / times[0]:.0f} responses/s, "
          f"repeat passes {len(responses) / min(times[1:] or times):.0f} responses/s")
    print(f"in-process, one thread, no deadline: {len(responses) / serial:.0f} responses/s")


if __name__ == "__main__":
    main()
