"""Auto-CEI (experiments/auto_cei.py): the IDK reward curve, the resampling, the curriculum's
start and climb against the spec, the IDK answer form of the embedded task, an end-to-end run on
a tiny IDK-speaking model and its exact resume."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from offpolicy_jax.data import arith
from offpolicy_jax.training.logger import TIMING_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("auto_cei", ROOT / "experiments" / "auto_cei.py")
auto_cei = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_cei)


# ---------------------------------------------------------------------------------------------
# The reward.


def test_idk_reward_matches_hand_computed_values():
    # 2/(1+exp(-c2(d-c1))) - 1 = tanh(c2(d-c1)/2); with c1 = 2, c2 = 2 ln 3:
    #   d=2: 0;  d=3: tanh(ln 3) = (9-1)/(9+1) = 0.8;  d=1: -0.8;  d=4: (81-1)/(81+1)
    values = auto_cei.idk_reward([2, 3, 1, 4], c1=2.0, c2=2 * math.log(3))
    np.testing.assert_allclose(values, [0.0, 0.8, -0.8, 80 / 82], atol=1e-12)
    # Long reasoning approaches +1, an immediate IDK approaches -1, never reaching either.
    far = auto_cei.idk_reward([0, 6], c1=2.5, c2=3.0)
    assert -1 < far[0] < -0.99 and 0.99 < far[1] < 1


def test_rewards_of_correct_wrong_and_idk_answers():
    c1, c2 = 2.0, 2 * math.log(3)
    correct = [True, False, False, True]
    idk = [False, False, True, True]          # the last is IDK *and* "correct": IDK wins (code)
    steps = [2, 3, 3, 1]
    np.testing.assert_allclose(auto_cei.auto_cei_rewards(correct, idk, steps, c1, c2),
                               [1.0, -1.0, 0.8, -0.8])
    # The plain-EI baseline: IDK is just wrong.
    np.testing.assert_allclose(
        auto_cei.auto_cei_rewards(correct, idk, steps, c1, c2, reward_idk=False),
        [1.0, -1.0, -1.0, -1.0])


# ---------------------------------------------------------------------------------------------
# Resampling ∝ exp(R / temp), keep R > -1.


def test_resampling_probabilities_are_proportional_to_exp_reward_over_temp():
    p = auto_cei.resampling_probabilities([1.0, 0.0, -1.0], temp=0.5)
    expected = np.array([math.exp(2), 1.0, math.exp(-2)])
    np.testing.assert_allclose(p, expected / expected.sum())
    # A large temperature flattens, a small one concentrates on the best.
    np.testing.assert_allclose(auto_cei.resampling_probabilities([1, 0.5], 1e6), [0.5, 0.5],
                               atol=1e-6)
    assert auto_cei.resampling_probabilities([1, 0.5], 0.01)[0] > 1 - 1e-12


def test_resample_draws_n_adds_the_originals_and_drops_the_wrong():
    rewards = np.array([1.0, 0.2, -1.0, -1.0])
    rng = np.random.default_rng(0)
    kept = auto_cei.resample(rewards, 0.5, rng)
    assert set(kept.tolist()) <= {0, 1} and {0, 1} <= set(kept.tolist())  # originals in
    assert len(kept) <= 2 * len(rewards)
    # Over many draws the drawn part follows p (the originals add one each; the drawn wrong ones,
    # p = 0.015 each here, are dropped with the original wrong ones).
    counts = np.zeros(4)
    for _ in range(4000):
        counts += np.bincount(auto_cei.resample(rewards, 0.5, rng), minlength=4) - [1, 1, 0, 0]
    p = auto_cei.resampling_probabilities(rewards, 0.5)
    np.testing.assert_allclose(counts / (4000 * 4), [p[0], p[1], 0, 0], atol=0.01)


# ---------------------------------------------------------------------------------------------
# The curriculum.


def test_initial_curriculum_follows_the_spec():
    state = auto_cei.initial_curriculum(idk_steps_mean=2.0, steps_std=1.0)
    # step = min(0.2 * 1, 0.5) = 0.2; c1 = 2 + 0.2; c2 = -ln(0.1) / (4 * 1)
    assert state["step"] == pytest.approx(0.2)
    assert auto_cei.c1_of(state) == pytest.approx(2.2)
    assert state["c2"] == pytest.approx(math.log(10) / 4)
    wide = auto_cei.initial_curriculum(idk_steps_mean=1.5, steps_std=5.0)
    assert wide["step"] == pytest.approx(0.5)               # capped at 0.5
    assert auto_cei.c1_of(wide) == pytest.approx(2.0)
    assert wide["c2"] == pytest.approx(math.log(10) / 20)
    # No spread at all (a degenerate start): the std is floored, c2 stays finite.
    flat = auto_cei.initial_curriculum(idk_steps_mean=1.0, steps_std=0.0)
    assert flat["step"] == pytest.approx(0.1) and math.isfinite(flat["c2"])


def test_objective_weights_precision_against_the_idk_rate():
    assert auto_cei.objective(0.5, 0.25, 0.2) == pytest.approx(0.8 * 0.5 + 0.2 * 0.75)
    assert auto_cei.objective(0.9, 1.0, 0.0) == pytest.approx(0.9)


def _climb(fs, state=None):
    state = state or auto_cei.initial_curriculum(idk_steps_mean=2.0, steps_std=1.0)
    positions = [state["position"]]
    for f in fs:
        state = auto_cei.climb(state, f)
        positions.append(state["position"])
    return state, positions


def test_climb_moves_up_while_f_improves_and_stops_when_both_neighbours_are_worse():
    # c1 positions (in steps from the start): 0 -> 1 -> 2 (worse) -> back to 1's other side, 0,
    # already scored and worse: both neighbours of the best (1) are worse, so it stops at 1.
    state, positions = _climb([0.50, 0.60, 0.55])
    assert positions == [0, 1, 2, 1]
    assert state["stopped"] and state["best_position"] == 1 and state["best_f"] == 0.60
    assert auto_cei.c1_of(state) == pytest.approx(2.2 + 0.2)


def test_climb_turns_back_when_the_first_move_is_worse():
    # 0 (0.5) -> 1 (0.4, worse) -> turn to -1 (0.6, better) -> -2 (0.7) -> -3 (0.65, worse) ->
    # -1 already scored and worse: stop at -2.
    state, positions = _climb([0.5, 0.4, 0.6, 0.7, 0.65])
    assert positions == [0, 1, -1, -2, -3, -2]
    assert state["stopped"] and state["best_position"] == -2 and state["direction"] == -1
    # And when the turned-to side is also worse, it stops at the start.
    state, positions = _climb([0.5, 0.4, 0.45])
    assert positions == [0, 1, -1, 0] and state["stopped"]


def test_stage_ends_at_its_length_or_when_both_numbers_converge():
    state = {"stage_iteration": 1}
    assert not auto_cei.stage_ended(state, (0.01, 0.0), stage_iterations=3, tolerance=0.003)
    assert auto_cei.stage_ended(state, (0.002, 0.001), stage_iterations=3, tolerance=0.003)
    assert auto_cei.stage_ended({"stage_iteration": 3}, (0.1, 0.1), stage_iterations=3,
                                tolerance=0.003)


def _parsed_flags():
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def test_a_stage_is_scored_by_its_best_iteration_and_the_next_samples_from_it():
    """--stage_continue=best (the code): a 2-iteration stage whose first iteration has the larger
    f is scored by it, and the next stage continues from that iteration's parameters."""
    from absl.testing import flagsaver
    _parsed_flags()
    state = auto_cei.initial_curriculum(idk_steps_mean=2.0, steps_std=1.0)
    meta = {"curriculum": state, "last_eval": [0.3, 0.2]}
    saved = []
    with flagsaver.flagsaver(stage_iterations=2, stage_continue="best"):
        for iteration, (precision, idk_rate) in enumerate([(0.5, 0.2), (0.4, 0.3)], start=1):
            meta["iteration"] = iteration
            record = {"eval/precision": precision, "eval/idk_rate": idk_rate,
                      "eval/f": auto_cei.objective(precision, idk_rate, 0.2)}
            logged = auto_cei.curriculum_step(meta, record, saved.append)
    state = meta["curriculum"]
    assert saved == [1] and logged["curriculum/stage_end"] == 1
    assert state["continue_from"] == 1 and state["stage"] == 2
    assert state["scores"] == {"0": pytest.approx(0.8 * 0.5 + 0.2 * 0.8)}
    assert state["position"] == 1                           # the first stage moves c1 up
    # --stage_continue=last: scored by the last iteration, which the next stage continues from.
    meta = {"curriculum": auto_cei.initial_curriculum(2.0, 1.0), "last_eval": [0.3, 0.2]}
    with flagsaver.flagsaver(stage_iterations=2, stage_continue="last"):
        for iteration, (precision, idk_rate) in enumerate([(0.5, 0.2), (0.4, 0.3)], start=1):
            meta["iteration"] = iteration
            auto_cei.curriculum_step(meta, {"eval/precision": precision,
                                            "eval/idk_rate": idk_rate,
                                            "eval/f": auto_cei.objective(precision, idk_rate,
                                                                         0.2)})
    assert meta["curriculum"]["continue_from"] is None
    assert meta["curriculum"]["scores"] == {"0": pytest.approx(0.8 * 0.4 + 0.2 * 0.7)}


def test_idk_metrics_on_a_hand_made_sample():
    correct = np.array([[1, 0], [0, 0]])
    responses = ["1+2=3. \\boxed{3}", "1+2=3, 3*4=12. I don't know.",
                 "5-1=3. \\boxed{3}", "I don't know."]
    metrics = auto_cei.idk_metrics(correct, responses, lam=0.2)
    # Answered: one per prompt, one right of two; IDK: 2 of 4, of lengths 2 and 0.
    assert metrics["precision"] == pytest.approx(0.5)
    assert metrics["idk_rate"] == pytest.approx(0.5)
    assert metrics["f"] == pytest.approx(0.8 * 0.5 + 0.2 * 0.5)
    assert metrics["idk_steps_mean"] == pytest.approx(1.0)
    assert metrics["steps_mean"] == pytest.approx(1.0)       # lengths 1, 2, 1, 0
    assert metrics["idk_rate_se"] == pytest.approx(0.0)
    assert metrics["precision_se"] == pytest.approx(math.sqrt(0.25 + 0.25) * math.sqrt(2) / 2)


# ---------------------------------------------------------------------------------------------
# The IDK answer form of the embedded task.


def test_idk_phrase_detection_and_reasoning_length():
    answer = arith.idk_response(["7*3=21", "12+21=33"])
    assert answer == "7*3=21, 12+21=33. I don't know."
    assert arith.is_idk(answer) and arith.is_idk("i DON'T know") and arith.is_idk(
        arith.idk_response([]))
    assert not arith.is_idk("7*3=21, 12+21=33. \\boxed{33}") and not arith.is_idk("I know.")
    assert arith.reasoning_steps(answer) == 2
    assert arith.reasoning_steps("I don't know.") == 0
    assert arith.reasoning_steps("7*3=21, 12+21=33. \\boxed{33}") == 2
    # Steps written after the phrase do not count.
    assert arith.reasoning_steps("1+1=2. I don't know. 2+2=4") == 1


def test_idk_demonstrations_give_up_only_on_hard_problems():
    pairs = arith.idk_demonstrations(600, seed=0, slip_probability=0.0, idk_fraction=1.0,
                                     hard_min_steps=3, hard_min_value=20)
    problems = arith.generate_problems(600, "train", 0)
    assert [p.prompt for p in problems] == [prompt for prompt, _ in pairs]
    for problem, (_, response) in zip(problems, pairs):
        hard = arith.is_hard(problem, 3, 20)
        assert arith.is_idk(response) == hard
        if hard:     # one to all of the problem's own steps, then the phrase
            d = arith.reasoning_steps(response)
            assert 1 <= d <= len(problem.steps)
            assert response == arith.idk_response(problem.steps[:d])
        else:
            assert response == problem.response
    assert any(arith.is_idk(r) for _, r in pairs)
    with pytest.raises(ValueError, match="idk_fraction"):
        arith.idk_demonstrations(1, seed=0, slip_probability=0.0, idk_fraction=2.0,
                                 hard_min_steps=3, hard_min_value=20)


def test_idk_recipe_fine_tunes_its_base_and_is_cached_under_its_own_alias(tiny_model, tmp_path,
                                                                          monkeypatch):
    from offpolicy_jax import models, tiny_arith
    recipe = tiny_arith.TinyArithIdkRecipe(examples=64, sft_steps=2, sft_batch_size=8)
    directory = tiny_arith.build_idk(str(tmp_path / "idk"), recipe, base_dir=tiny_model,
                                     log_fn=lambda *_: None)
    with open(os.path.join(directory, tiny_arith.STAMP_FILE)) as f:
        assert json.load(f)["examples"] == 64
    assert models.load_hf_checkpoint(directory)[0].hidden_size == 64       # the base's shape
    tokenizer = models.load_tokenizer(directory)
    text = "Q: 9*9-5-8\nA: 9*9=81. I don't know."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # The mix: solving demonstrations and some IDK answers.
    examples = tiny_arith.idk_examples(recipe)
    assert len(examples) == 64 and 0 < sum(arith.is_idk(r) for _, r in examples) < 32
    # Cached under its own alias (built once, then loaded); --model=tiny-arith-idk resolves to it.
    built = []

    def fake_build(directory, recipe, **_):          # writes only the stamp
        built.append(directory)
        with open(os.path.join(directory, tiny_arith.STAMP_FILE), "w") as f:
            json.dump(dataclasses.asdict(recipe), f)

    monkeypatch.setattr(tiny_arith, "build_idk", fake_build)
    cached = tiny_arith.ensure_idk(str(tmp_path / "cache"), recipe)
    assert cached == str(tmp_path / "cache" / f"{tiny_arith.IDK_ALIAS}-v{recipe.version}")
    assert tiny_arith.ensure_idk(str(tmp_path / "cache"), recipe) == cached and len(built) == 1
    monkeypatch.setattr(tiny_arith, "ensure_idk", lambda: "resolved")
    assert tiny_arith.resolve_model("tiny-arith-idk") == "resolved"


# ---------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small tiny-arith-style checkpoint, as test_experiments builds it. Too little trained to
    say IDK (the IDK path of the E-step is covered by the reward and resampling tests above; the
    curriculum then starts from the lengths of all answers)."""
    from offpolicy_jax import tiny_arith
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2, sft_examples=2000,
                                        sft_steps=40, sft_batch_size=32)
    return tiny_arith.build(str(tmp_path_factory.mktemp("tiny_model")), recipe,
                            log_fn=lambda *_: None)


RUN_FLAGS = ["--batch_size=4", "--group_size=4", "--max_new_tokens=24", "--eval_size=4",
             "--eval_samples=4", "--ckpt_every=1", "--progress=false",
             "--batches_per_iteration=2", "--sft_batch_size=8", "--stage_iterations=1"]


def _run(*flags, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "auto_cei.py"), *flags],
                            capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"auto_cei failed (rc={result.returncode}):\n"
                             f"{result.stderr[-4000:]}")
    return result


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in f]


def test_bad_flags_are_refused_naming_the_flag(tmp_path):
    # Checked before the model is loaded: the alias is never built here.
    result = _run("--model=tiny-arith-idk", f"--workdir={tmp_path}", "--idk_lambda=1.5",
                  check=False)
    assert result.returncode != 0 and "--idk_lambda must be in [0, 1]" in result.stderr
    from absl.testing import flagsaver
    _parsed_flags()
    config = types.SimpleNamespace(eval_every=1, eval_every_rollouts=0, dataset="arith")
    for overrides, message in (({"stage_iterations": 0}, "--stage_iterations must be >= 1"),
                               ({"resampling_temp": -1.0}, "--resampling_temp must be >= 0"),
                               ({"converge_tolerance": -0.1}, "--converge_tolerance must be")):
        with flagsaver.flagsaver(**overrides), pytest.raises(SystemExit, match=message):
            auto_cei.validate_flags(config)
    for bad, message in (({"eval_every": 2}, "--eval_every must be 1"),
                         ({"dataset": "gsm8k"}, "--dataset='gsm8k'")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            auto_cei.validate_flags(types.SimpleNamespace(**{**vars(config), **bad}))
    auto_cei.validate_flags(config)         # the defaults pass


def test_runs_end_to_end_and_resumes_with_the_same_metrics(tiny_model, tmp_path):
    """Two iterations (stages of one, so c1 moves after each) straight; then the same run resumed
    from its iteration-1 checkpoint redoes iteration 2: identical metrics.jsonl without
    timings (the curriculum state comes back from the checkpoint's meta)."""
    flags = [f"--model={tiny_model}", *RUN_FLAGS, "--iterations=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = json.loads(_run(f"--workdir={straight}", *flags).stdout.strip().splitlines()[-1])
    assert summary["algorithm"] == "auto_cei" and summary["iterations"] == 2
    assert "precision_after" in summary and "idk_rate_after" in summary
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "2")
    _run(f"--workdir={resumed}", *flags)
    records = _records(straight)
    assert _records(resumed) == records
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        for key in ("eval/precision", "eval/idk_rate", "eval/pass@1", "eval/f",
                    "curriculum/c1", "curriculum/c2", "curriculum/stage_end", "train/kept"):
            assert key in record, key
        assert record["curriculum/stage_end"] == 1     # stages of one iteration
    # The first stage scores best so far, so c1 moves up by one step.
    step = records[1]["curriculum/next_c1"] - records[1]["curriculum/c1"]
    assert step > 0 and records[2]["curriculum/c1"] == pytest.approx(
        records[1]["curriculum/c1"] + step)
