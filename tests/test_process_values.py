"""Process values (ReST-MCTS*-style): step prefixes, Monte-Carlo prefix values on toys where the
value is known, the trace scores and keep rules against hand-computed cases, the ReST-MCTS* code's
tree targets, and the value model fitting a known target. The end-to-end runs (smoke, resume) are
in test_experiments.py."""

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from offpolicy_jax import models, process_values as pv
from offpolicy_jax.training.logger import TIMING_KEYS


class CharTokenizer:
    """One token per character (its code point); 0 is EOS, dropped when decoding."""

    eos = 0

    def encode(self, text, add_special_tokens=False):
        del add_special_tokens
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.eos))


def test_step_ends_and_prefixes():
    response = "7*3=21, 12+21=33. \\boxed{33}"
    assert pv.step_ends(response) == [6, 16]
    assert pv.step_prefixes(response) == ["7*3=21", "7*3=21, 12+21=33"]
    assert pv.step_prefixes("4+5=9. \\boxed{9}") == ["4+5=9"]
    # No box: the whole text is the working; no working at all: no step.
    assert pv.step_prefixes("1+2=3, 3*4=12") == ["1+2=3", "1+2=3, 3*4=12"]
    assert pv.step_prefixes("\\boxed{5}") == []
    assert pv.step_prefixes("") == []


def test_prefix_token_counts_follow_the_response_tokens():
    tokenizer = CharTokenizer()
    text = "1+2=3, 3*4=12. \\boxed{12}"
    tokens = tokenizer.encode(text) + [0]
    assert pv.prefix_token_counts(tokens, tokenizer, pv.step_ends(text)) == [5, 13]

    class PairTokenizer(CharTokenizer):          # two characters per token: "ab|cd|e"
        def decode(self, ids, skip_special_tokens=True):
            return "".join({1: "ab", 2: "cd", 3: "e"}[i] for i in ids)
    assert pv.prefix_token_counts([1, 2, 3], PairTokenizer(), [2, 3, 4, 5]) == [1, None, 2, 3]


def _markov_continue(step_success: float, seed: int = 0):
    """A toy policy on problems of K steps: every remaining step comes out right with probability
    ``step_success``, and the answer is right iff every step is right. A query ``(steps done,
    K, prefix right)`` then has the known value ``q^(K - done)`` if its prefix is right, else 0."""
    rng = np.random.default_rng(seed)

    def continue_fn(queries, m):
        out = np.zeros((len(queries), m))
        for row, (done, total, prefix_right) in enumerate(queries):
            if prefix_right:
                out[row] = (rng.random((m, total - done)) < step_success).all(axis=1)
        return out

    return continue_fn


def test_monte_carlo_values_match_known_values():
    q, m = 0.8, 4000
    queries = [(1, 3, True), (2, 3, True), (3, 3, True), (1, 3, False), (0, 4, True)]
    known = np.array([q ** 2, q, 1.0, 0.0, q ** 4])
    values = pv.monte_carlo_values(_markov_continue(q), queries, m)
    standard_error = np.sqrt(known * (1 - known) / m)
    assert np.all(np.abs(values - known) <= 4 * standard_error + 1e-12), (values, known)
    # A deterministic policy: values are exactly 0 or 1.
    exact = pv.monte_carlo_values(_markov_continue(1.0), queries, 3)
    np.testing.assert_array_equal(exact, [1, 1, 1, 0, 1])


def test_monte_carlo_values_checks_its_inputs():
    with pytest.raises(ValueError, match="rollouts must be >= 1"):
        pv.monte_carlo_values(_markov_continue(0.5), [(0, 1, True)], 0)
    with pytest.raises(ValueError, match="expected"):
        pv.monte_carlo_values(lambda queries, m: np.zeros((len(queries), m + 1)),
                              [(0, 1, True)], 2)
    assert pv.monte_carlo_values(_markov_continue(0.5), [], 3).shape == (0,)


def _trace(problem, text, correct, prompt="Q: 2+3*4\nA: ", gold="14"):
    tokenizer = CharTokenizer()
    return pv.Trace(problem=problem, record={"prompt": prompt, "gold": gold},
                    prompt_tokens=tokenizer.encode(prompt),
                    tokens=np.array(tokenizer.encode(text) + [0]), text=text, correct=correct)


def _arith_continue(slip: float, seed: int = 0):
    """Continuations of an arith prefix by a policy that carries on from the prefix's last result
    (adding 2 to it for 2+3*4's second step) and slips the result by 1 with probability
    ``slip``: the answer is right iff the prefix's results are right and no slip happens."""
    rng = random.Random(seed)

    def continue_fn(records, prompts, m):
        out = np.zeros((len(prompts), m))
        for row, (record, prompt) in enumerate(zip(records, prompts)):
            text = "".join(chr(i) for i in prompt)[len(record["prompt"]):]
            last = int(text.split("=")[-1])
            done = text.count("=")
            for j in range(m):
                result = last + 2 if done == 1 else last
                if rng.random() < slip:
                    result += 1
                out[row, j] = float(str(result) == record["gold"])
        return out

    return continue_fn


def test_value_pool_values_each_distinct_prefix_once():
    traces = [_trace(0, "3*4=12, 2+12=14. \\boxed{14}", True),
              _trace(0, "3*4=12, 2+12=14. \\boxed{14}", True),     # the same trace again
              _trace(0, "3*4=11, 2+11=14. \\boxed{14}", True),     # two slips that cancel
              _trace(0, "3*4=12, 2+12=15. \\boxed{15}", False),    # wrong: not valued
              _trace(1, "3*4=12, 2+12=14. \\boxed{14}", True)]     # another problem
    pool = pv.value_pool(_arith_continue(0.0), traces, CharTokenizer(), rollouts=3)
    assert pool.continuations == (2 + 2 + 2) * 3
    assert [list(v) for v in pool.per_trace] == [[1, 1], [1, 1], [0, 1], [], [1, 1]]
    assert pool.texts[:2] == ["Q: 2+3*4\nA: 3*4=12", "Q: 2+3*4\nA: 3*4=12, 2+12=14"]
    assert pool.prefixes[2:4] == ["3*4=11", "3*4=11, 2+11=14"]
    assert [pv.prefix_arithmetic_right(p) for p in pool.prefixes] == [True, True, False, False,
                                                                      True, True]
    assert not pv.prefix_arithmetic_right("3*4=12, 2+")
    # The cancelling slips: the first prefix is worth 0, the full working (which ends at the
    # right number) 1; the minimum catches it.
    np.testing.assert_array_equal(pool.values, [1, 1, 0, 1, 1, 1])
    # With slips the right prefixes' values are 1 - slip (one step left) and 1 - slip (the last
    # result is boxed with the same slip chance), up to sampling noise.
    noisy = pv.value_pool(_arith_continue(0.25), traces[:1], CharTokenizer(), rollouts=2000)
    np.testing.assert_allclose(noisy.per_trace[0], [0.75, 0.75], atol=0.04)


def test_trace_scores():
    values = [np.array([1.0, 0.25, 0.75]), np.array([0.5]), np.array([])]
    np.testing.assert_allclose(pv.trace_scores(values, "min"), [0.25, 0.5, 0.0])
    np.testing.assert_allclose(pv.trace_scores(values, "mean"), [2 / 3, 0.5, 0.0])
    np.testing.assert_allclose(pv.trace_scores(values, "last"), [0.75, 0.5, 0.0])


def test_keep_rules_against_hand_computed_cases():
    problem = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    correct = np.array([1, 1, 0, 1, 1, 1, 1, 0])
    scores = np.array([0.1, 0.9, 1.0, 0.5, 0.5, 0.5, 0.75, 1.0])
    assert pv.select_by_outcome(problem, correct, cap=2) == [0, 1, 4, 5]
    # Problem 0: row 0 is under the threshold, rows 1 (0.9) and 3 (0.5) pass; the wrong row 2 is
    # never kept whatever its score. Problem 1: 0.75 first, then the tie 4/5 in sampling order.
    assert pv.select_by_value(problem, correct, scores, cap=2, threshold=0.2) == [1, 3, 4, 6]
    assert pv.select_by_value(problem, correct, scores, cap=1, threshold=0.2) == [1, 6]
    assert pv.select_by_value(problem, correct, scores, cap=5, threshold=0.6) == [1, 6]
    assert pv.select_by_value(problem, correct, scores, cap=5, threshold=0.0) == [0, 1, 3, 4, 5,
                                                                                    6]


def test_selection_quality_counts_fully_correct_workings():
    traces = [_trace(0, "3*4=12, 2+12=14. \\boxed{14}", True),
              _trace(0, "3*4=11, 2+11=14. \\boxed{14}", True)]
    assert pv.selection_quality(traces, [0, 1]) == {"kept": 2, "valid": 1, "valid_fraction": 0.5}
    assert pv.selection_quality(traces, []) == {"kept": 0, "valid": 0, "valid_fraction": 0.0}
    other = [_trace(0, "x", True, prompt="What is 2?")]
    assert pv.selection_quality(other, [0]) == {"kept": 1}


def test_tree_value_targets_follow_the_rest_mcts_code():
    # Shortest correct path of 3 steps: k/K. A wrong first step below the root (d(root) = 4):
    # max(0, 0 - 1/4) = 0. A failed branch below the first step A (v = 1/3, d(A) = 3):
    # 1/3 - (2/3)/3 = 1/9, and one deeper keeps subtracting d(A)'s share: 1/9 - (8/9)/3 < 0 -> 0.
    traces = [["a", "b", "c"], ["x", "y"], ["a", "z", "w"]]
    targets = pv.tree_value_targets(traces, [True, False, False])
    np.testing.assert_allclose(targets[0], [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(targets[1], [0.0, 0.0])
    np.testing.assert_allclose(targets[2], [1 / 3, 1 / 9, 0.0])
    # Two correct leaves: a node's distance is to the nearer one; a longer correct path climbs
    # from its branching node at its own distance.
    targets = pv.tree_value_targets([["a", "b"], ["a", "c", "d"], ["e"]], [True, True, False])
    np.testing.assert_allclose(targets[0], [0.5, 1.0])
    np.testing.assert_allclose(targets[1], [0.5, 0.75, 1.0])
    np.testing.assert_allclose(targets[2], [0.0])
    # Without a correct leaf nothing is emitted.
    assert pv.tree_value_targets([["a", "b"]], [False]) == [[None, None]]


def test_value_model_fits_a_known_target(tmp_path):
    cfg = models.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    tokenizer = CharTokenizer()
    params = pv.init_value_model(cfg, models.init_params(cfg, 0))
    rng = random.Random(0)
    # The value is known from the last character: prefixes ending in an even digit are worth 1.
    texts = [f"Q: {rng.randint(1, 99)}\nA: {rng.randint(0, 99)}" for _ in range(128)]
    targets = np.array([float(int(t[-1]) % 2 == 0) for t in texts])
    before = np.mean((pv.predict_values(cfg, params, tokenizer, texts, pad_id=0) - targets) ** 2)
    trained, losses = pv.train_value_model(cfg, params, tokenizer, texts, targets, epochs=4,
                                           batch_size=32, learning_rate=3e-3, seed=0, pad_id=0)
    after = pv.predict_values(cfg, trained, tokenizer, texts, pad_id=0)
    assert after.min() >= 0.0 and after.max() <= 1.0
    assert np.mean((after - targets) ** 2) < 0.1 < before
    assert losses[-1] < losses[0]
    # The store gives back the same parameters.
    store = pv.ValueModelStore(str(tmp_path / "values"))
    store.save(3, trained)
    restored = store.load(3, params)
    np.testing.assert_array_equal(pv.predict_values(cfg, restored, tokenizer, texts, pad_id=0),
                                  after)
    assert store.load(4, params) is None


# ---------------------------------------------------------------------------------------------
# End to end: expert_iteration.py --trace_selection=process_value (smoke run and resume).

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 40 new tokens: room for a whole response (about 30 characters) and its boxed answer.
RUN_FLAGS = ["--batch_size=4", "--group_size=4", "--max_new_tokens=40", "--eval_size=4",
             "--eval_samples=2", "--ckpt_every=1", "--progress=false", "--export_final=false",
             "--batches_per_iteration=2", "--sft_batch_size=8", "--trace_selection=process_value",
             "--value_rollouts=2", "--value_epochs=1", "--iterations=2"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """test_experiments.py's small model with 150 warm-start steps instead of 40: it writes
    boxed answers and gets a few right (with 40 it answers nothing, and there is nothing to
    value)."""
    from offpolicy_jax import tiny_arith
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2, sft_examples=2000,
                                        sft_steps=150, sft_batch_size=32)
    return tiny_arith.build(str(tmp_path_factory.mktemp("tiny_model")), recipe,
                            log_fn=lambda *_: None)


def _run(*flags):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "expert_iteration.py"),
                             *flags], capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"expert_iteration failed (rc={result.returncode}):\n"
                             f"{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_process_value_run_and_its_resume_give_identical_results(tiny_model, tmp_path):
    """A smoke run of two iterations; then the same run resumed from its iteration-1 checkpoint
    (the iteration-2 checkpoint lost, iteration 2's saved value model left behind, as a kill
    between the two saves would leave them) redoes iteration 2 exactly: the continuations' keys
    are functions of (seed, iteration) and the value model is restored as of iteration 1."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = _run(f"--model={tiny_model}", f"--workdir={straight}", *RUN_FLAGS)
    assert summary["iterations"] == 2 and summary["rollouts"] == 2 * 2 * 4 * 4
    records = _records(straight)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in ("process/pool", "process/prefixes", "process/continuations",
                    "process/outcome_kept", "process/outcome_valid_fraction",
                    "process/process_value_kept", "process/process_value_valid_fraction",
                    "process/value_heldout_mse", "process/right_prefixes",
                    "process/wrong_last_prefix_value_mean"):
            assert key in record, key
        assert record["train/kept"] == record["process/process_value_kept"]
        assert record["process/pool"] == 2 * 4 * 4
        assert record["process/process_value_kept"] <= record["process/outcome_kept"]
        assert record["process/continuations"] == 2 * record["process/prefixes"]
    assert records[1]["process/prefixes"] > 0      # something was valued and the head fitted
    assert "process/value_head_kept" in records[2]  # ... and used on iteration 2's pool
    assert (straight / "value_model" / "2.npz").exists()

    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")
    _run(f"--model={tiny_model}", f"--workdir={resumed}", *RUN_FLAGS)
    assert _records(resumed) == records
    with np.load(straight / "value_model" / "2.npz") as a, \
            np.load(resumed / "value_model" / "2.npz") as b:
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])
