"""End-to-end runs of every experiment file on a tiny model, the kill-and-resume test, and the
start-up validation errors. Each run is a subprocess: experiment files define absl flags at import
time, exactly as a user runs them."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from offpolicy_jax.training.logger import TIMING_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A few seconds per run: 2 layers, short responses, small batches.
SMOKE_FLAGS = ["--iterations=2", "--batch_size=4", "--group_size=4", "--max_new_tokens=24",
               "--eval_size=4", "--eval_samples=2", "--ckpt_every=1", "--progress=false"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small tiny-arith-style checkpoint (fewer SFT steps than the real default)."""
    from offpolicy_jax import tiny_arith
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2, sft_examples=2000,
                                        sft_steps=40, sft_batch_size=32)
    directory = tmp_path_factory.mktemp("tiny_model")
    return tiny_arith.build(str(directory), recipe, log_fn=lambda *_: None)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop run
    return env


def run_experiment(name, *flags, check=True, timeout=600):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"), *flags],
                            capture_output=True, text=True, env=_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed (rc={result.returncode}):\n{result.stderr[-4000:]}")
    return result


def summary_of(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def metrics_without_timing(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


EXPERIMENTS = [
    ("topr", []),
    ("topr", ["--mode=offline", "--offline_prompts=8"]),
    # The baseline of TOPR's claim: naive REINFORCE on the same offline data.
    ("topr", ["--mode=offline", "--offline_prompts=8", "--objective=naive_reinforce"]),
    ("grpo", ["--variant=grpo", "--kl_coef=0.04", "--dynamic_sampling",
              "--max_sampling_rounds=2"]),
    ("grpo", ["--variant=dr_grpo"]),
    ("grpo", ["--variant=dapo", "--prompt_selection=mopps", "--mopps_candidates=2"]),
    ("grpo", ["--variant=gspo", "--rollout_lag=1", "--rollout_correction=tis"]),
    ("grpo", ["--variant=cispo"]),
    ("rover", []),
    ("arpo", []),
    ("rloo", ["--kl_coef=0.03"]),
    ("ppo", []),
    # LoRA next to a trainable value head (the adapters and the head are the trainable params).
    ("ppo", ["--lora_rank=4", "--lora_targets=q,v,down", "--learning_rate=1e-3"]),
    ("expert_iteration", ["--batches_per_iteration=2", "--sft_batch_size=8"]),
    # BFS-Prover-V2's options: the middle 80 % of perplexities, the plateau restart rule.
    ("expert_iteration", ["--batches_per_iteration=2", "--sft_batch_size=8",
                          "--ppl_band_low=0.1", "--ppl_band_high=0.9", "--m_step_init=plateau",
                          "--eval_every=1"]),
    # ReST-MCTS*-style process values: 2 continuations per step prefix select the kept traces.
    ("expert_iteration", ["--batches_per_iteration=2", "--sft_batch_size=8",
                          "--trace_selection=process_value", "--value_rollouts=2"]),
    # B-STaR: a 2-temperature search on 4 dev problems x 4 samples, then 2 batches sampled.
    ("bstar", ["--batches_per_iteration=2", "--sft_batch_size=8", "--dev_size=4",
               "--dev_samples=4", "--bstar_temperatures=0.7,1.0", "--threshold_step=0.05"]),
    # RISE: 4 x 4 solutions, 2 of them verified 4 times each, one batch.
    ("rise", ["--verify_solutions=2"]),
    ("rise", ["--variant=ppo", "--verify_solutions=4", "--kl_coef=0.01"]),
    # TOPR's generative verifier, offline: 4 problems x 2 rated solutions x 4 verifications.
    ("topr", ["--task=verifier", "--offline_prompts=4"]),
]


# Smoke runs left to `-m slow` to keep CI within its time: each path they take is run by another
# default test (the GRPO engine by the grpo variants above, LoRA by test_trainer and
# test_lora_export, PPO with a value head by `ppo`, expert iteration by its options run, the
# offline dataset by `topr --task=verifier` and test_pairs; TOPR's default run by the
# kill-and-resume test below).
SLOW_EXPERIMENTS = {"grpo --variant=dr_grpo", "grpo --variant=cispo", "topr",
                    "topr --mode=offline --offline_prompts=8",
                    "topr --mode=offline --offline_prompts=8 --objective=naive_reinforce",
                    "ppo --lora_rank=4 --lora_targets=q,v,down --learning_rate=1e-3",
                    "expert_iteration --batches_per_iteration=2 --sft_batch_size=8",
                    # run by default (with its resume) in test_process_values
                    "expert_iteration --batches_per_iteration=2 --sft_batch_size=8 "
                    "--trace_selection=process_value --value_rollouts=2",
                    "rise --variant=ppo --verify_solutions=4 --kl_coef=0.01"}


def _params(experiments, slow=frozenset()):
    """pytest params named by their command, the ``slow`` ones marked so."""
    params = []
    for name, extra in experiments:
        label = " ".join([name] + extra)
        params.append(pytest.param(name, extra, id=label,
                                   marks=[pytest.mark.slow] if label in slow else []))
    return params


@pytest.mark.parametrize("name,extra", _params(EXPERIMENTS, SLOW_EXPERIMENTS))
def test_experiment_runs_end_to_end(tiny_model, tmp_path, name, extra):
    workdir = tmp_path / "run"
    result = run_experiment(name, f"--model={tiny_model}", f"--workdir={workdir}", *SMOKE_FLAGS,
                            *extra)
    summary = summary_of(result)
    for key in ("algorithm", "iterations", "rollouts", "pass@1_before", "pass@1_after",
                "skipped_steps", "wall_s"):
        assert key in summary, key
    assert summary["iterations"] == 2
    assert 0.0 <= summary["pass@1_after"] <= 1.0
    records = metrics_without_timing(workdir)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    if name not in ("expert_iteration", "bstar"):      # the verifier's share of the rollouts
        with open(workdir / "metrics.jsonl") as f:
            timed = [json.loads(line) for line in f][1:]
        # Iteration 1 always samples (an offline dataset is drawn then, nothing after).
        assert 0.0 < timed[0]["reward_s"] < timed[0]["rollout_s"]
        assert all(0.0 <= r["reward_s"] <= r["rollout_s"] for r in timed)
    assert np.isfinite(records[-1]["train/loss"])
    assert 0.0 <= records[-1]["zero_gradient_group_fraction"] <= 1.0
    if "--prompt_selection=mopps" in extra:            # the selection stage's metrics are logged
        assert {"mopps/predicted", "mopps/realised"} <= set(records[-1])
    if "--m_step_init=plateau" in extra:               # the band and the restart rule log
        for r in records[1:]:
            assert r["band/candidates"] - r["band/dropped"] == r["train/kept"]
            if r["train/kept"]:
                assert r["band/low_perplexity"] <= r["band/high_perplexity"]
            assert r["plateau/restarts"] == sum(x["plateau/restarted"] for x in records[1:]
                                                if x["iteration"] <= r["iteration"])
    if "--dynamic_sampling" in extra:                  # extra rounds count in the budget
        assert all(r["rollouts"] >= 16 * r["iteration"] for r in records[1:])
        assert 1 <= records[-1]["dynamic_sampling/rounds"] <= 2
    if "--objective=naive_reinforce" in extra:        # no importance weight at all
        for r in records[1:]:
            assert r["train/weight_min"] == r["train/weight_max"] == 1.0
    if "--rollout_lag=1" in extra:                     # iteration 2 samples from version 0
        assert [r["staleness_max"] for r in records[1:]] == [0, 1]
        assert "correction/weight_mean" in records[-1]
    if name == "rise":                                 # both tasks, logged apart
        verified = 2 if "--verify_solutions=2" in extra else 4
        for r in records[1:]:
            assert (r["solve/rows"], r["verify/rows"]) == (16, 4 * verified)
            assert r["verify/share"] == pytest.approx(4 * verified / (16 + 4 * verified))
            assert r["verify/solutions"] == verified
            assert 0.0 <= r["verify/accuracy"] <= 1.0
            assert r["rollouts"] == r["verify/rollouts"] + r["verify/solve_rollouts"]
        assert [r["rollouts"] for r in records[1:]] == [16 + 4 * verified, 32 + 8 * verified]
    if name in ("rise", "topr") and ("--task=verifier" in extra or name == "rise"):
        for r in (records[0], records[-1]):             # held-out verification, every eval
            assert 0.0 <= r["eval/verify_accuracy"] <= 1.0
        assert {"verify_accuracy_before", "verify_accuracy_after"} <= set(summary)
    if "--task=verifier" in extra:                     # verification rows only, one dataset
        assert all(r["verify/share"] == 1.0 for r in records[1:])
        assert [r["rollouts"] for r in records[1:]] == [16 + 32, 16 + 32]
    assert (workdir / "tensorboard").is_dir()
    # The final policy, exported as a Hugging Face checkpoint (and a PEFT adapter for LoRA).
    assert (workdir / "export" / "model.safetensors").exists()
    assert (workdir / "export" / "adapter").is_dir() == any("--lora_rank" in f for f in extra)


def test_kill_and_resume_gives_identical_results(tiny_model, tmp_path):
    flags = [f"--model={tiny_model}", *SMOKE_FLAGS, "--iterations=4", "--ckpt_every=2"]
    straight = tmp_path / "straight"
    run_experiment("topr", f"--workdir={straight}", *flags)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "topr.py"), f"--workdir={resumed}", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    checkpoint = resumed / "checkpoints" / "2"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run ended before its step-2 checkpoint"
    summary = summary_of(run_experiment("topr", f"--workdir={resumed}", *flags))
    assert summary["iterations"] == 4

    assert metrics_without_timing(resumed) == metrics_without_timing(straight)
    from offpolicy_jax.training import checkpoint as checkpoint_lib
    states = [checkpoint_lib.Checkpointer(str(workdir / "checkpoints")).read_state(4)
              for workdir in (straight, resumed)]
    leaves = [jax.tree.leaves(state["params"]) for state in states]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(a, b)


def _arith_pair_file(path) -> str:
    """(prompt, chosen, rejected): an arith problem's worked answer over a slipped one."""
    from offpolicy_jax.data import arith
    problems = arith.generate_problems(8, "train", seed=5)
    rejected = arith.demonstrations(8, seed=5, slip_probability=0.9)
    with open(path, "w") as f:
        for problem, (_, slipped) in zip(problems, rejected):
            f.write(json.dumps({"prompt": problem.prompt, "chosen": problem.response,
                                "rejected": slipped}) + "\n")
    return str(path)


PREFERENCE_RUNS = [
    ("dpo", ["--pairs_file=PAIRS", "--label_smoothing=0.1"]),
    ("spin", ["--num_demonstrations=4", "--spin_iterations=2", "--spin_epochs=1",
              "--spin_lambda=0.1,5.0", "--batch_size=2"]),
    ("veripo", ["--cycles=2", "--grpo_iterations=1", "--dpo_batch_size=2", "--dpo_epochs=1"]),
]


# SPIN's and VerIPO's stage machinery and resumes run by default in test_pairs.
SLOW_PREFERENCE_RUNS = {" ".join([n] + e) for n, e in PREFERENCE_RUNS[1:]}


@pytest.mark.parametrize("name,extra", _params(PREFERENCE_RUNS, SLOW_PREFERENCE_RUNS))
def test_preference_experiment_runs_end_to_end(tiny_model, tmp_path, name, extra):
    """DPO (own rollouts with the process judge; a JSONL file), SPIN and VerIPO from the command
    line: the summary, the pair metrics, evaluations where each method puts them, the export."""
    workdir = tmp_path / "run"
    extra = [f.replace("PAIRS", _arith_pair_file(tmp_path / "pairs.jsonl")) for f in extra]
    smoke = [f for f in SMOKE_FLAGS if not f.startswith("--iterations")]
    if name == "dpo":
        smoke.append("--iterations=2")
    summary = summary_of(run_experiment(name, f"--model={tiny_model}", f"--workdir={workdir}",
                                        *smoke, *extra))
    assert summary["algorithm"] in ("dpo", "spin", "veripo")
    assert 0.0 <= summary["pass@1_after"] <= 1.0
    records = metrics_without_timing(workdir)
    assert [r["iteration"] for r in records] == list(range(summary["iterations"] + 1))
    train = records[1:]
    evaluated = [r["iteration"] for r in records if "eval/pass@1" in r]
    if name == "dpo":
        assert summary["iterations"] == 2
        assert all(r["train/pair_accuracy"] >= 0 and np.isfinite(r["train/reward_margin"])
                   for r in train)
        assert {"train/chosen_logratio", "train/rejected_logratio", "pairs/num_pairs"} <= \
            set(train[-1])
        # The file's 8 pairs; nothing sampled.
        assert train[-1]["pairs/num_pairs"] == 8 and summary["rollouts"] == 0
    if name == "spin":
        # 4 demonstrations, 2 pairs per iteration: SPIN iteration 0 takes 2 iterations, 1 (with
        # the previous pairs) 4; λ 0.1 then 5; evaluated at both ends; 4 samples per iteration.
        assert summary["iterations"] == 6 and summary["rollouts"] == 8
        assert evaluated == [0, 2, 6]
        assert [r["train/lambda"] for r in train] == pytest.approx([0.1] * 2 + [5.0] * 4)
        assert [r["spin/num_pairs"] for r in train] == [4, 4, 8, 8, 8, 8]
    if name == "veripo":
        assert [r["stage"] for r in train][:1] == ["grpo"]
        assert summary["rollouts"] == 32           # 2 GRPO iterations of 4 x 4
        assert all("verifier/judge_agreement" in r for r in train if r["stage"] == "grpo")
        # Every stage's end is evaluated: each GRPO iteration here, and each DPO stage's last.
        stage_ends = [r["iteration"] for r, following in zip(train, train[1:] + [None])
                      if following is None or following["stage"] != r["stage"]
                      or r["stage"] == "grpo"]
        assert evaluated == [0] + stage_ends
    assert (workdir / "export" / "model.safetensors").exists()


def test_dpo_on_own_rollouts_without_a_single_pair_fails_naming_the_cause(tiny_model, tmp_path):
    """The small test model answers no arith problem right: its own rollouts hold no pair (the
    pairing itself is tested in tests/test_pairs.py, with a reward that does pass)."""
    result = run_experiment("dpo", f"--model={tiny_model}", f"--workdir={tmp_path}",
                            *SMOKE_FLAGS, "--offline_prompts=4", check=False)
    assert result.returncode != 0
    assert "none of the 4 prompts got both a chosen and a rejected response among its 4 " \
           "samples: no pairs" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--group_size=1"], "--group_size=1: grpo normalises advantages within a group"),
    (["--model=/nonexistent/dir"], "--model='/nonexistent/dir' is neither"),
    (["--batch_size=3", "--group_size=3", "--num_minibatches=2"], "must divide into 2 minibatches"),
    (["--lora_rank=4", "--lora_targets=q,query"], "--lora_targets must be distinct names from"),
])
def test_invalid_flags_fail_at_start_up(tmp_path, flags, message):
    result = run_experiment("grpo", f"--workdir={tmp_path}", *flags, check=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--batch_size=2", "--group_size=2", "--verify_solutions=5"],
     "--verify_solutions=5: an iteration samples only"),
    (["--batch_size=2", "--group_size=2", "--verify_solutions=1", "--num_minibatches=4"],
     "= 6 rows must divide into --num_minibatches=4"),
    (["--wrong_reward=-1"], "must differ"),
])
def test_invalid_rise_flags_fail_at_start_up(tmp_path, flags, message):
    result = run_experiment("rise", f"--workdir={tmp_path}", "--model=tiny-arith", *flags,
                            check=False, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow      # 42 s; every stage's checkpointed state is resumed by default elsewhere
def test_rise_resumes_exactly(tiny_model, tmp_path):
    """A RISE run restarted from its iteration-2 checkpoint (the iteration-3 checkpoint lost)
    redoes iteration 3 exactly: the verification stage's counters, the down-sampling and both
    tasks' sampling keys are functions of (seed, iteration) or checkpointed."""
    import shutil
    flags = [f"--model={tiny_model}", *SMOKE_FLAGS, "--iterations=3", "--verify_solutions=3",
             "--export_final=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_experiment("rise", f"--workdir={straight}", *flags)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    summary = summary_of(run_experiment("rise", f"--workdir={resumed}", *flags))
    assert summary["iterations"] == 3
    records = metrics_without_timing(straight)
    assert metrics_without_timing(resumed) == records
    assert records[-1]["verify/rollouts"] == 3 * 3 * 4
    from offpolicy_jax.training import checkpoint as checkpoint_lib
    states = [checkpoint_lib.Checkpointer(str(workdir / "checkpoints")).read_state(3)
              for workdir in (straight, resumed)]
    leaves = [jax.tree.leaves(state["params"]) for state in states]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(a, b)


def test_rollout_budget_ends_the_run_and_evaluates_at_equal_rollout_counts(tiny_model, tmp_path):
    """16 fresh rollouts per iteration and a budget of 40: the run ends at iteration 3 (48 >= 40,
    long before --iterations=10), evaluating where the rollouts cross multiples of 20 (iterations
    2 and 3) besides the start."""
    workdir = tmp_path / "run"
    result = run_experiment("topr", f"--model={tiny_model}", f"--workdir={workdir}",
                            *SMOKE_FLAGS, "--iterations=10", "--rollout_budget=40",
                            "--eval_every_rollouts=20")
    assert summary_of(result)["iterations"] == 3
    records = metrics_without_timing(workdir)
    assert [r["rollouts"] for r in records[1:]] == [16, 32, 48]
    assert [r["iteration"] for r in records if "eval/pass@1" in r] == [0, 2, 3]
    assert (workdir / "checkpoints" / "3").is_dir()               # the last iteration is saved


def test_training_reads_benchmarks_from_data_dir(tiny_model, tmp_path):
    """--data_dir reaches the training prompts: a missing folder is an error naming it (the
    packaged copies are never a silent fall-back)."""
    missing = tmp_path / "no_such_folder"
    result = run_experiment("grpo", f"--model={tiny_model}", f"--workdir={tmp_path / 'run'}",
                            "--dataset=math500", f"--data_dir={missing}", check=False,
                            timeout=300)
    assert result.returncode != 0
    assert f"data folder {missing} (from --data_dir) does not exist" in result.stderr


def test_remix_replay_lambda_schedule_and_reincarnation_happen_at_the_configured_steps(
        tiny_model, tmp_path):
    """ReMix-GRPO over 3 steps with T = 2, λ delay 1 and interval 1: step 2 replays groups from
    step 1's policy (staleness 1) and spends fewer fresh rollouts; step 3 is on-policy again (the
    window is discarded after T, the anchor reset to π_2 is checkpointed); λ(t) = 1, 0.9, 0.8."""
    workdir = tmp_path / "remix"
    flags = [f"--model={tiny_model}", *SMOKE_FLAGS, "--iterations=3", "--variant=grpo",
             "--reincarnation_step=2", "--kl_lambda_delay=1", "--kl_lambda_interval=1"]
    run_experiment("remix", f"--workdir={workdir}", *flags)
    records = metrics_without_timing(workdir)[1:]
    assert [r["train/kl_convex_lambda"] for r in records] == pytest.approx([1.0, 0.9, 0.8])
    assert [r["staleness_max"] for r in records] == [0, 1, 0]
    # Step 2's batch holds 2 replayed groups of 4: half the rows, counted by policy version (a
    # fresh row's stored and recomputed log-probs differ by round-off, which must not count).
    assert [r["stale_fraction"] for r in records] == [0.0, 0.5, 0.0]
    assert [r["train/off_policy_fraction"] > 0 for r in records] == [False, True, False]
    assert records[0]["train/off_policy_fraction"] == 0.0
    # Batch 4 prompts x 4 responses: step 2 replays round(0.4 * 4) = 2 groups (8 rows fresh).
    assert [r["rollouts"] for r in records] == [16, 24, 40]
    assert all(np.isfinite(r["train/loss"]) for r in records)


@pytest.mark.parametrize("flags,expected", [
    (["--reincarnation_step=-1"], "(None, 50, 10)"),           # no reincarnation: the paper's λ
    (["--reincarnation_step=20"], "(20, 20, 4)"),              # the paper's ratios to T
    (["--reincarnation_step=-1", "--kl_lambda_delay=5"], "(None, 5, 10)"),
    (["--kl_lambda_interval=0"], "--kl_lambda_interval >= 1"),
    (["--reincarnation_step=-2"], "--reincarnation_step must be >= 0, or -1 for never"),
])
def test_remix_schedule_flags(flags, expected):
    """ReMix's (T, λ delay, λ interval): -1 (never reincarnate) keeps the paper's λ(t) schedule
    instead of deriving it from T, and impossible values are refused naming the flag."""
    code = ("import sys; sys.path.insert(0, 'experiments'); import remix; from absl import flags; "
            "flags.FLAGS(sys.argv); print(remix.schedule())")
    result = subprocess.run([sys.executable, "-c", code, "remix", *flags], capture_output=True,
                            text=True, env=_env(), cwd=ROOT, timeout=120)
    assert expected in (result.stdout + result.stderr)
