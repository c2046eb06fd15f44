"""B-STaR (experiments/bstar.py): the balance score and the selection it is computed on, against
hand-computed values; the embedded task's process score; resuming a killed run."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from offpolicy_jax.data import arith
from offpolicy_jax.training.logger import TIMING_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bstar", ROOT / "experiments" / "bstar.py")
bstar = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bstar)

NEG = -np.inf


def test_balance_score_matches_hand_computed_values():
    # Per problem, min(n'/n*, 1) * n'/n with n* = 8:
    #   n=4,  n'=2: 2/8 * 2/4  = 0.125
    #   n=2,  n'=2: 2/8 * 1    = 0.25
    #   n=0,  n'=0: nothing selected, 0
    #   n=10, n'=9: 1 * 9/10   = 0.9        (n' >= n*: exploration saturates)
    value = bstar.balance_score(np.array([4, 2, 0, 10]), np.array([2, 2, 0, 9]), n_star=8)
    assert value == pytest.approx((0.125 + 0.25 + 0.0 + 0.9) / 4)
    # n* = 1: only the precision counts once one correct answer is selected.
    assert bstar.balance_score(np.array([4, 3]), np.array([1, 0]), n_star=1) == pytest.approx(
        (0.25 + 0.0) / 2)


def test_balance_score_rejects_inconsistent_counts():
    with pytest.raises(ValueError, match="n_correct <= n_selected"):
        bstar.balance_score(np.array([1]), np.array([2]), n_star=8)
    with pytest.raises(ValueError, match="one shape"):
        bstar.balance_score(np.array([1, 2]), np.array([1]), n_star=8)


def test_candidate_scores_weight_the_process_part():
    scores = bstar.candidate_scores(np.array([1.0, 0.5, 0.0]), np.array([1.0, 0.0, 1.0]), 0.2)
    np.testing.assert_allclose(scores, [1.2, 0.1, 1.0])


def test_select_above_grows_the_per_problem_cap_to_the_target():
    scores = np.array([[1.2, 1.0, 0.1, NEG], [0.2, 0.05, NEG, NEG]])
    correct = np.array([[True, True, False, False], [False, False, False, False]])
    # Above 0.0: 3 and 2 selectable; cap 1 gives 2 < 3, cap 2 gives 4 >= 3.
    n, n_correct, cap = bstar.select_above(scores, correct, 0.0, target_size=3)
    assert (n.tolist(), n_correct.tolist(), cap) == ([2, 2], [2, 0], 2)
    # Above 0.5: 2 and 0 selectable; no cap reaches 3, so none applies (cap = width).
    n, n_correct, cap = bstar.select_above(scores, correct, 0.5, target_size=3)
    assert (n.tolist(), n_correct.tolist(), cap) == ([2, 0], [2, 0], 4)
    # Strictly above: a score equal to the threshold is not selected.
    n, _, _ = bstar.select_above(scores, correct, 0.2, target_size=100)
    assert n.tolist() == [2, 0]


def test_select_above_takes_the_best_responses_first():
    # Unsorted rows; cap 1 must take the highest score of each row.
    scores = np.array([[0.1, 1.2], [1.0, 0.15]])
    correct = np.array([[False, True], [True, False]])
    n, n_correct, cap = bstar.select_above(scores, correct, -1.0, target_size=2)
    assert (n.tolist(), n_correct.tolist(), cap) == ([1, 1], [1, 1], 1)


def test_best_threshold_balances_precision_against_coverage():
    # Problem 0: one correct (1.2), one wrong (0.1). Problem 1: two correct, one wrong (0.15).
    scores = np.array([[1.2, 0.1, NEG], [1.1, 1.05, 0.15]])
    correct = np.array([[True, False, False], [True, True, False]])
    grid = bstar.threshold_grid(-1.0, 1.2, 0.1)
    threshold, value = bstar.best_threshold(scores, correct, grid, target_size=100, n_star=2)
    # Everything (threshold < 0.1): (1/2 * 1/2 + 1 * 2/3) / 2 = 0.4583
    # Above 0.1 (drops the 0.1 only): (1/2 * 1 + 1 * 2/3) / 2 = 0.5833
    # Above 0.2 up to 1.0 (correct only): (1/2 * 1 + 1 * 1) / 2 = 0.75, first at 0.2
    # Above 1.1: (1/2 + 0) / 2 = 0.25
    assert threshold == pytest.approx(0.2)
    assert value == pytest.approx(0.75)


def test_threshold_grid_is_the_codes_grid():
    grid = bstar.threshold_grid(-1.0, 1.0, 0.01)
    assert len(grid) == 201
    assert grid[0] == -1.0 and grid[-1] == 1.0 and grid[100] == 0.0


def test_build_pool_deduplicates_and_metrics_count_distinct_answers():
    pool = bstar.build_pool(
        ["Q: 1+1\nA: ", "Q: 2*3\nA: "],
        [["a", "a", "b", "c"], ["x", "y", "y", "y"]],
        [[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]],
        [[1.0, 1.0, 0.5, 0.5], [0.0, 1.0, 1.0, 1.0]], process_weight=0.2)
    np.testing.assert_allclose(pool.scores, [[1.2, 0.1, 1.1], [0.0, 0.2, NEG]])
    assert pool.correct.tolist() == [[True, False, True], [False, False, False]]
    assert pool.solved.tolist() == [True, False] and pool.samples == 4
    metrics = bstar.pool_metrics(pool, 0.5, target_size=100, prefix="p")
    assert metrics == {"p/pass@4": 0.5, "p/distinct_correct": 1.0, "p/selected": 2,
                       "p/precision": 1.0, "p/recall": 1.0, "p/cap": 3}
    metrics = bstar.pool_metrics(pool, -1.0, target_size=2, prefix="p")
    # Cap 1: the best of each problem, "a" (correct) and "y" (wrong); one of two correct found.
    assert (metrics["p/selected"], metrics["p/precision"], metrics["p/recall"]) == (2, 0.5, 0.5)
    assert bstar.selected_examples(pool, -1.0, target_size=2) == [
        ("Q: 1+1\nA: ", "a"), ("Q: 2*3\nA: ", "y")]
    assert bstar.selected_examples(pool, 0.5, target_size=100) == [
        ("Q: 1+1\nA: ", "a"), ("Q: 1+1\nA: ", "c")]


def test_merge_pools_pads_to_the_widest():
    wide = bstar.build_pool(["p"], [["a", "b"]], [[1.0, 0.0]], [[1.0, 0.0]], 0.2)
    narrow = bstar.build_pool(["q"], [["c", "c"]], [[1.0, 1.0]], [[1.0, 1.0]], 0.2)
    merged = bstar.merge_pools([narrow, wide])
    np.testing.assert_allclose(merged.scores, [[1.2, NEG], [1.2, 0.0]])
    assert merged.prompts == ["q", "p"] and merged.texts == [["c"], ["a", "b"]]


def test_right_step_share_counts_right_steps():
    assert arith.right_step_share("7*3=21, 12+21=33. \\boxed{33}") == 1.0
    assert arith.right_step_share("7*3=21, 12+21=34. \\boxed{34}") == 0.5
    assert arith.right_step_share("7*3=20, 12+20=33. \\boxed{33}") == 0.0
    assert arith.right_step_share("the answer is 33") == 0.0
    assert arith.right_step_share("7*3=21. \\boxed{") == 0.0


# ---------------------------------------------------------------------------------------------
# Runs (subprocesses, as a user runs the file).

RUN_FLAGS = ["--batch_size=4", "--group_size=4", "--max_new_tokens=24", "--eval_size=4",
             "--eval_samples=2", "--ckpt_every=1", "--progress=false", "--dev_size=4",
             "--dev_samples=4", "--bstar_temperatures=0.7,1.0", "--batches_per_iteration=2",
             "--sft_batch_size=8", "--threshold_step=0.05"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from offpolicy_jax import tiny_arith
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2, sft_examples=2000,
                                        sft_steps=40, sft_batch_size=32)
    return tiny_arith.build(str(tmp_path_factory.mktemp("tiny_model")), recipe,
                            log_fn=lambda *_: None)


def _run(*flags, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "bstar.py"), *flags],
                            capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"bstar failed (rc={result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in f]


def test_bad_flags_are_refused_naming_the_flag(tmp_path):
    # The flags are checked before the model is loaded, so the alias is never built here.
    result = _run("--model=tiny-arith", f"--workdir={tmp_path}", "--threshold_step=0",
                  check=False)
    assert result.returncode != 0 and "--threshold_step must be > 0" in result.stderr
    result = _run("--model=tiny-arith", f"--workdir={tmp_path}", "--bstar_temperatures=hot",
                  check=False)
    assert result.returncode != 0 and "--bstar_temperatures must be numbers" in result.stderr


@pytest.mark.slow
def test_resume_at_an_iteration_boundary_gives_identical_results(tiny_model, tmp_path):
    """A run stopped after iteration 1 (its checkpoint) and continued gives the straight run's
    iteration-2 record. Checkpoints are per EM iteration, so a run killed mid-iteration redoes
    that iteration from its start."""
    flags = [f"--model={tiny_model}", *RUN_FLAGS]
    _run(f"--workdir={tmp_path / 'straight'}", *flags, "--iterations=2")
    _run(f"--workdir={tmp_path / 'resumed'}", *flags, "--iterations=1")
    _run(f"--workdir={tmp_path / 'resumed'}", *flags, "--iterations=2")
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "resumed")
    assert [r["iteration"] for r in resumed] == [0, 1, 2]
    assert resumed[2] == straight[2]
    for key in ("bstar/temperature", "bstar/dev_threshold", "bstar/train_threshold",
                "bstar/dev/pass@4", "bstar/train/precision", "bstar/train/recall"):
        assert key in straight[2], key
