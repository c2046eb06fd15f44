"""Launch scripts, README and experiment-docstring commands against the real flag definitions;
launch detection; host/global array helpers; the memory table.

The flag check loads each experiment file in a subprocess (absl flags are defined at import, once
per process) and parses every ``experiments/<name>.py ...`` invocation found in the README's
```bash blocks and in the launch scripts with that experiment's own ``FLAGS`` -- so renaming a
flag without updating the docs and scripts fails here.
"""

import ast
import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from offpolicy_jax import distributed, memory, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"}

# Loads one experiment file (without running it) and parses each argv with its FLAGS.
_FLAG_CHECKER = r"""
import importlib.util, json, sys
from absl import flags
path, argvs = sys.argv[1], json.loads(sys.argv[2])
spec = importlib.util.spec_from_file_location("experiment_under_check", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
errors = []
for argv in argvs:
    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS([path] + argv)
    except flags.Error as err:
        errors.append(f"{' '.join(argv)}: {err}")
print(json.dumps(errors))
"""


def _shell_lines(text: str) -> list[str]:
    """Logical lines: backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _readme_bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _script_comment_text(path: pathlib.Path) -> str:
    """The usage examples of a launch script: its comment lines without the leading '#'."""
    lines = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
    return "\n".join(line[1:] if line.startswith(" ") else line for line in lines)


def experiment_invocations(text: str) -> list[tuple[str, list[str]]]:
    """``(experiment file, argv after it)`` for every ``experiments/<name>.py`` in ``text``."""
    found = []
    for line in _shell_lines(text):
        if "experiments/" not in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        for index, token in enumerate(tokens):
            if re.fullmatch(r"experiments/\w+\.py", token):
                argv = []
                for arg in tokens[index + 1:]:
                    if arg in SHELL_OPERATORS:
                        break
                    argv.append(arg)
                found.append((token, argv))
    return found


def check_flags(invocations) -> list[str]:
    """Parse errors of ``invocations`` (one subprocess per experiment file)."""
    by_file: dict[str, list[list[str]]] = {}
    for experiment, argv in invocations:
        by_file.setdefault(experiment, []).append(argv)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")

    def check(experiment: str, argvs: list[list[str]]) -> list[str]:
        path = ROOT / experiment
        if not path.exists():
            return [f"{experiment}: no such experiment file"]
        result = subprocess.run([sys.executable, "-c", _FLAG_CHECKER, str(path), json.dumps(argvs)],
                                capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            return [f"{experiment}: could not be loaded: {result.stderr[-2000:]}"]
        return [f"{experiment} {e}" for e in json.loads(result.stdout.strip().splitlines()[-1])]

    # Each check is mostly a process importing JAX and the experiment: two at a time halves the
    # wall time on the 2-core CI machine (the files cannot share one process: their flags clash).
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(lambda item: check(*item), sorted(by_file.items()))
    return [error for errors in results for error in errors]


def test_every_readme_and_launch_command_parses_with_the_real_flags():
    readme = [inv for block in _readme_bash_blocks() for inv in experiment_invocations(block)]
    scripts = {path.name: experiment_invocations(_script_comment_text(path))
               for path in LAUNCH_SCRIPTS}
    # The documented commands exist: each launch script shows at least one experiment command
    # with flags, and the README's Scaling up section shows one per launcher.
    assert {"local.sh", "tpu_vm.sh", "gpu_slurm.sh"} <= set(scripts)
    for name, invocations in scripts.items():
        assert any(argv for _, argv in invocations), f"launch/{name} documents no flags"
    assert sum(1 for _, argv in readme if argv) >= 3, readme
    invocations = readme + [inv for invs in scripts.values() for inv in invs]
    assert check_flags(invocations) == []


def test_every_experiment_docstring_command_parses_with_its_flags():
    # Each experiment's module docstring gives "the exact command"; it must stay runnable.
    invocations = []
    for path in sorted((ROOT / "experiments").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        found = experiment_invocations(docstring)
        assert any(experiment == f"experiments/{path.name}" for experiment, _ in found), (
            f"{path.name}'s docstring does not show its command (python experiments/{path.name})")
        invocations += found
    assert check_flags(invocations) == []


def test_flag_check_rejects_a_renamed_flag():
    # The same check, fed a misspelt shared flag and a misspelt experiment flag, must fail.
    errors = check_flags([("experiments/topr.py", ["--stepz=3"]),
                          ("experiments/topr.py", ["--iterations=3", "--mode=offlin"]),
                          ("experiments/topr.py", ["--iterations=3", "--mesh=1,-1,1"])])
    assert len(errors) == 2, errors
    assert "stepz" in errors[0] and "offlin" in errors[1]


def test_invocation_extraction_handles_continuations_and_launchers():
    text = ("sbatch --nodes=2 launch/gpu_slurm.sh experiments/topr.py \\\n"
            "    --iterations=3 --mesh=2,4,1 2>&1 | tee log\n"
            "launch/tpu_vm.sh --name=rl run experiments/grpo.py --variant=dapo # note\n")
    assert experiment_invocations(text) == [
        ("experiments/topr.py", ["--iterations=3", "--mesh=2,4,1"]),
        ("experiments/grpo.py", ["--variant=dapo"])]


# ---------------------------------------------------------------------------------------------
# The scripts themselves.


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=lambda p: p.name)
def test_launch_script_is_strict_bash_with_usage(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = dict(os.environ)
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                            timeout=30)
    assert result.returncode == 2 and "Usage" in result.stderr, result.stderr


def test_tpu_vm_dry_run_runs_on_every_worker_with_the_flags_quoted():
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--dry-run", "--name=rl", "--zone=z1",
         "run", "experiments/topr.py", "--model=/ckpt/my model", "--mesh=2,8,1"],
        capture_output=True, text=True, check=True, timeout=30)
    command = shlex.split(result.stdout)
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rl"]
    assert "--worker=all" in command and "--zone=z1" in command
    remote = shlex.split(command[command.index("--command") + 1])
    assert "OFFPOLICY_JAX_DISTRIBUTED=1" in remote
    assert remote[remote.index("experiments/topr.py") + 1:] == ["--model=/ckpt/my model",
                                                                "--mesh=2,8,1"]


# ---------------------------------------------------------------------------------------------
# Launch detection.


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     distributed.LaunchSpec("env", "h:1234", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "8"}, distributed.LaunchSpec("slurm")),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, distributed.LaunchSpec("tpu")),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ({"OFFPOLICY_JAX_DISTRIBUTED": "1"}, distributed.LaunchSpec("auto")),
    ({"OFFPOLICY_JAX_DISTRIBUTED": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "8"}, None),
    # Our explicit variables win over the scheduler's (gpu_slurm.sh sets both).
    ({"JAX_COORDINATOR_ADDRESS": "n0:61440", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
      "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, distributed.LaunchSpec("env", "n0:61440", 2, 1)),
])
def test_detect_launch(env, expected):
    assert distributed.detect_launch(env) == expected


@pytest.mark.parametrize("env,message", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "missing JAX_COORDINATOR_ADDRESS"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' must be an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"),
])
def test_detect_launch_errors_name_the_variable(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.detect_launch(env)


def test_maybe_initialize_leaves_single_process_runs_alone():
    assert distributed.maybe_initialize({}) is False
    assert not jax.distributed.is_initialized()


def test_maybe_initialize_refuses_after_jax_started():
    jax.devices()  # the backend is up in this test process
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "0"}
    with pytest.raises(RuntimeError, match="before any JAX computation"):
        distributed.maybe_initialize(env)


# ---------------------------------------------------------------------------------------------
# Host <-> global arrays (single process here; the two-process run is in test_multiprocess.py).


def test_host_to_global_places_each_shard_and_to_host_reads_it_back():
    mesh = models.make_mesh("2,4,1")
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    host = {"tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
            "keys": jax.random.split(jax.random.key(0), 8)}
    placed = distributed.host_to_global(host, sharding)
    assert placed["tokens"].sharding == sharding
    assert [s.data.shape for s in placed["tokens"].addressable_shards] == [(1, 3)] * 8
    np.testing.assert_array_equal(distributed.to_host(placed["tokens"]), host["tokens"])
    np.testing.assert_array_equal(jax.random.key_data(placed["keys"]),
                                  jax.random.key_data(host["keys"]))


@pytest.mark.parametrize("num_rows", [0, 5, 16])
def test_process_rows_and_gather_rows_single_process(num_rows):
    rows = distributed.process_rows(num_rows)
    assert (rows.start, rows.stop) == (0, num_rows)
    part = np.arange(num_rows, dtype=np.float32)
    np.testing.assert_array_equal(distributed.gather_rows(part, num_rows), part)
    with pytest.raises(ValueError, match="owns rows"):
        distributed.gather_rows(part[:-1] if num_rows else np.zeros(1), num_rows)


# ---------------------------------------------------------------------------------------------
# Memory estimates and the README table.


@pytest.mark.parametrize("name,published_billions", [
    ("Qwen2.5-1.5B", 1.54), ("DeepSeek-R1-Distill-Qwen-1.5B", 1.78), ("Qwen2.5-7B", 7.61),
    ("Llama-3.1-8B", 8.03), ("Qwen3-8B", 8.19)])
def test_published_configs_have_the_published_parameter_counts(name, published_billions):
    # The model cards' counts; a wrong width or layer count in PUBLISHED_CONFIGS shows here.
    assert memory.config_for(name).num_params() / 1e9 == pytest.approx(published_billions,
                                                                       abs=0.01)


def test_estimate_follows_the_formula_by_hand():
    cfg = memory.config_for("Llama-3.1-8B")
    p = cfg.num_params()
    rollout = memory.Rollout(rows=64, slots=1024)
    plan = memory.estimate(cfg, (2, 4, 1), rollout=rollout, with_reference=True)
    assert plan.params == p * 2 / 4 and plan.grads == p * 2 / 4
    assert plan.optimizer == 2 * p * 4 / 4 and plan.reference == p * 2 / 4
    # 2 (k, v) x 32 layers x 8 KV heads x 128 x 1024 slots x 64 rows x 2 bytes over 8 row shards.
    assert plan.kv_cache == 2 * 32 * 8 * 128 * 1024 * 64 * 2 / 8
    # tensor=16 does not divide 8 KV heads: the cache is replicated over tensor, not split.
    assert memory.estimate(cfg, (1, 1, 16), rollout=rollout).kv_cache == \
        2 * 32 * 8 * 128 * 1024 * 64 * 2


def test_lora_estimate_follows_the_formula_by_hand():
    from offpolicy_jax.models import lora
    cfg = memory.config_for("Qwen2.5-7B")
    p = cfg.num_params()
    adapters = lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "v"))
    # q: 3584 -> 28 heads x 128; v: 3584 -> 4 KV heads x 128; 28 layers.
    p_a = 28 * 8 * ((3584 + 3584) + (3584 + 512))
    assert lora.adapter_param_count(cfg, adapters) == p_a
    plan = memory.estimate(cfg, (1, 2, 1), lora=adapters, with_reference=True)
    assert plan.params == (p * 2 + p_a * 4) / 2 and plan.grads == p_a * 4 / 2
    assert plan.optimizer == 2 * p_a * 4 / 2 and plan.reference == p_a * 4 / 2
    assert plan.merged == 28 * (3584 * 3584 + 3584 * 512) * 2 / 2
    full = memory.estimate(cfg, (1, 2, 1), with_reference=True)
    assert plan.state < full.state / 5


def test_recommend_mesh_prefers_data_parallelism_then_fsdp_and_reports_misfits():
    small = memory.config_for("Qwen2.5-1.5B")
    plan = memory.recommend_mesh(small, 8, 80.0)
    assert plan.mesh == (8, 1, 1)       # fits replicated: no parameter all-gathers needed
    big = memory.config_for("Qwen2.5-7B")
    plan = memory.recommend_mesh(big, 8, 80.0)
    assert plan.mesh[2] == 1 and plan.mesh[1] > 1
    assert plan.total <= 0.75 * 80 * memory.GIB
    smaller_fsdp = memory.estimate(big, (plan.mesh[0] * 2, plan.mesh[1] // 2, 1))
    assert smaller_fsdp.total > 0.75 * 80 * memory.GIB
    assert memory.recommend_mesh(big, 1, 16.0) is None


def test_readme_scaling_table_is_the_computed_one():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- section: scaling -->(.*?)<!-- end: scaling -->", text, re.S)
    assert section, "README.md lacks the scaling section"
    assert memory.readme_table() in section.group(1), (
        "the README table differs from `python -m offpolicy_jax.memory`; paste its output")
    assert memory.lora_table() in section.group(1), (
        "the README's LoRA table differs from `python -m offpolicy_jax.memory`; paste it")
