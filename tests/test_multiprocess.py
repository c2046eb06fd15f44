"""Multi-process runs through launch/local.sh: two JAX processes with two CPU devices each.

One well-chosen end-to-end check (about a minute and a half on 2 busy cores): two processes run
one RL step of TOPR and checkpoint, a restart of the two processes resumes from that checkpoint
for a second step, and the final parameters equal those of one process with four devices that
ran both steps without stopping. Plus the launcher's own contract: a failing process makes it
exit non-zero at once and nothing it started survives.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from offpolicy_jax.training.logger import TIMING_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
# Two processes x two devices and one process x four devices run the same global computation on
# the same samples; only the order of float32 reductions over the device layout differs (e.g. the
# gradient all-reduce across processes vs across local devices; per-leaf gradients agree to
# ~1e-7 relative). AdamW's update m / (sqrt(v) + eps) is scale-free, so where a gradient entry is
# near zero that round-off moves the update by a visible fraction of the learning rate (2e-4).
# Measured max |difference| after two steps: 1.7e-6 (in layers/gate_up; most leaves < 5e-7).
# The bound is 6x that, and 40x below the largest change one update makes (checked below, so
# a comparison of parameters that never moved cannot pass).
PARAM_ATOL = 1e-5
# Counts of sequences whose importance ratio exceeds 1: the first minibatch is on-policy, where
# π/μ = 1 up to round-off, so which side of 1 a ratio lands on flips with the reduction order
# (measured: 0.375 vs 0.3125 while every continuous metric agreed to ~1e-7 relative).
ROUND_OFF_COUNTS = ("train/negative_truncated_fraction",)
RUN_FLAGS = ["--batch_size=4", "--group_size=4", "--max_new_tokens=8", "--eval_size=4",
             "--eval_samples=4", "--ckpt_every=1", "--progress=false", "--mesh=1,-1,1",
             "--seed=3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from offpolicy_jax import tiny_arith
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        sft_examples=500, sft_steps=10, sft_batch_size=16)
    return tiny_arith.build(str(tmp_path_factory.mktemp("tiny_mp")), recipe, log_fn=lambda *_: None)


def _env(tmp_path, **extra) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)          # conftest's 8 devices; local.sh sets its own count
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false",
               # The restart reuses the first launch's compiled programs.
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(extra)
    return env


def _local(tmp_path, num_processes, script, *args, log_dir, timeout=400):
    return subprocess.run(
        ["bash", str(LOCAL_SH), str(num_processes), str(script), *args],
        capture_output=True, text=True, timeout=timeout,
        env=_env(tmp_path, LOCAL_DEVICES_PER_PROCESS="2", LOCAL_LOG_DIR=str(log_dir)))


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def _params(workdir, step):
    """Parameters of checkpoint ``step`` as numpy, whatever device layout wrote them (orbax needs
    a target with shardings of this process's topology; one device is enough to read)."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as reader:
        saved = reader.metadata(path).item_metadata
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device), saved)
        return jax.tree.map(np.asarray, reader.restore(path, target)["params"])


def test_two_processes_match_one_process_and_resume(tiny_model, tmp_path):
    topr = ROOT / "experiments" / "topr.py"
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    # The reference: one process, four devices, two uninterrupted steps (run alongside).
    single = subprocess.Popen(
        [sys.executable, str(topr), f"--model={tiny_model}", f"--workdir={single_dir}",
         "--iterations=2", *RUN_FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    try:
        first = _local(tmp_path, 2, topr, f"--model={tiny_model}", f"--workdir={multi_dir}",
                       "--iterations=1", *RUN_FLAGS, log_dir=tmp_path / "logs_first")
        assert first.returncode == 0, first.stderr[-4000:]
        assert _summary(first.stdout)["iterations"] == 1
        # Only process 0 prints the summary and writes the logs.
        assert "pass@1_after" not in (tmp_path / "logs_first" / "process_1.log").read_text()

        second = _local(tmp_path, 2, topr, f"--model={tiny_model}", f"--workdir={multi_dir}",
                        "--iterations=2", *RUN_FLAGS, log_dir=tmp_path / "logs_second")
        assert second.returncode == 0, second.stderr[-4000:]
        summary = _summary(second.stdout)
        assert (summary["iterations"], summary["rollouts"]) == (2, 32)
        single_out, single_err = single.communicate(timeout=400)
        assert single.returncode == 0, single_err[-4000:]
    finally:
        if single.poll() is None:
            single.kill()
            single.wait()

    # Resumed, not restarted: a fresh start would have logged step 0 (the initial evaluation)
    # a second time. And the whole metric history equals the single process's.
    multi_metrics, single_metrics = _metrics(multi_dir), _metrics(single_dir)
    assert [r["iteration"] for r in multi_metrics] == [0, 1, 2]
    assert [r["iteration"] for r in single_metrics] == [0, 1, 2]
    for multi_record, single_record in zip(multi_metrics, single_metrics):
        # The first launch ended at step 1, so its step-1 record also has a final evaluation.
        assert single_record.keys() <= multi_record.keys()
        for key, value in single_record.items():
            if key in ROUND_OFF_COUNTS:
                continue
            if key.startswith("train/"):
                assert multi_record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:   # samples, rewards, evaluation: the same tokens, so exactly equal
                assert multi_record[key] == value, key

    multi_params, single_params = _params(multi_dir, 2), _params(single_dir, 2)
    start_params = _params(single_dir, 1)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)),
                                               multi_params, single_params))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.max(np.abs(a - b)),
                                         single_params, start_params))
    print(f"max |params(2 processes x 2) - params(1 process x 4)| = {max(differences):.3g}; "
          f"max change of the last update = {max(moved):.3g}")
    assert max(differences) <= PARAM_ATOL
    assert max(moved) > 10 * PARAM_ATOL

    # The run's final export (process 0 writes what every process gathered) is the policy of
    # checkpoint 2, loadable as a Hugging Face checkpoint.
    from offpolicy_jax import models
    _, exported = models.load_hf_checkpoint(str(multi_dir / "export"))
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(multi_params)):
        np.testing.assert_array_equal(np.asarray(a), b)


def _processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker`` (scanning /proc)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


# Process 1 fails at once; process 0 (and a child it spawned, like a verifier worker) would run
# for minutes if nobody stopped them.
_FAILING_EXPERIMENT = """
import os, subprocess, sys, time
marker = sys.argv[1]
if os.environ["JAX_PROCESS_ID"] == "1":
    time.sleep(1.0)
    sys.exit(7)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker])
time.sleep(300)
"""


def test_local_sh_exits_nonzero_when_a_process_fails_and_leaves_nothing_behind(tmp_path):
    script = tmp_path / "failing_experiment.py"
    script.write_text(_FAILING_EXPERIMENT)
    marker = f"marker-{tmp_path.name}"
    started = time.time()
    result = _local(tmp_path, 2, script, marker, log_dir=tmp_path / "logs", timeout=120)
    assert result.returncode == 7, result.stderr
    assert "process 1" in result.stderr and "exited with status 7" in result.stderr
    assert time.time() - started < 60
    deadline = time.time() + 10
    while _processes_mentioning(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(marker) == []


def test_local_sh_stops_every_process_when_interrupted(tmp_path):
    script = tmp_path / "sleeping_experiment.py"
    script.write_text("import subprocess, sys, time\n"
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', "
                      "sys.argv[1]])\ntime.sleep(300)\n")
    marker = f"marker-{tmp_path.name}"
    launcher = subprocess.Popen(
        ["bash", str(LOCAL_SH), "2", str(script), marker], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
        env=_env(tmp_path, LOCAL_LOG_DIR=str(tmp_path / "logs")))
    deadline = time.time() + 30
    while len(_processes_mentioning(marker)) < 2 + 2 and time.time() < deadline:
        time.sleep(0.2)     # the launcher's 2 processes and their 2 children (+ the launcher)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 130
    deadline = time.time() + 10
    while _processes_mentioning(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(marker) == []


def test_expert_iteration_refuses_a_multi_process_launch(tmp_path):
    """expert_iteration.py is single-process by design: under launch/local.sh every process stops
    at start-up with a message that names the launch, instead of redoing the same work."""
    result = _local(tmp_path, 2, ROOT / "experiments" / "expert_iteration.py",
                    f"--workdir={tmp_path / 'run'}", "--progress=false",
                    log_dir=tmp_path / "logs", timeout=180)
    assert result.returncode != 0
    for process in range(2):
        log = (tmp_path / "logs" / f"process_{process}.log").read_text()
        assert "expert_iteration.py runs in a single process" in log, log[-2000:]
        assert "num_processes=2" in log, log[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
