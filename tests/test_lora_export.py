"""LoRA adapters, PEFT adapter files, Hugging Face export of runs, and W&B logging."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import hf_tiny
from offpolicy_jax import export as export_lib
from offpolicy_jax import models
from offpolicy_jax.models import lora as lora_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import logger as logger_lib
from offpolicy_jax.training import state as state_lib, step as step_lib
from offpolicy_jax.training.config import RunConfig

PARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Qwen3 checkpoint (head_dim 32 with 4 heads: q/o widths 128 differ from D = 64,
    so a swapped in/out dimension of an adapter cannot go unnoticed)."""
    path = hf_tiny.make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3"))
    cfg, params = models.load_hf_checkpoint(path)
    return path, cfg, params


def _batch(vocab_size):
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, vocab_size, (2, 7)).astype(np.int32)
    return tokens, np.ones_like(tokens)


def _trained_adapters(cfg, lora, seed=1):
    """Adapters as after training: both factors non-zero."""
    adapters = lora_lib.init_adapters(cfg, lora, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                        adapters)


def test_zero_initialised_adapters_reproduce_the_base_model_exactly(base):
    _, cfg, params = base
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapters = lora_lib.init_adapters(cfg, lora, jax.random.PRNGKey(0))
    assert float(jnp.max(jnp.abs(adapters["lora"]["q"]["a"]))) > 0   # A is random, B zero
    merged = jax.jit(lambda b, t: lora_lib.merge(cfg, lora, b, t))(params, adapters)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        np.testing.assert_array_equal(got, want)
    tokens, mask = _batch(cfg.vocab_size)
    want = models.apply(cfg, params, tokens, mask)
    np.testing.assert_array_equal(models.apply(cfg, merged, tokens, mask), want)
    attached = lora_lib.attach(cfg, lora, params, adapters)
    np.testing.assert_array_equal(models.apply(cfg, attached, tokens, mask), want)


def test_attached_and_merged_adapters_give_the_same_model_and_the_sampler_refuses_attached(base):
    from offpolicy_jax import sampling
    _, cfg, params = base
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapters = _trained_adapters(cfg, lora)
    tokens, mask = _batch(cfg.vocab_size)
    merged = models.apply(cfg, lora_lib.merge(cfg, lora, params, adapters), tokens, mask)
    attached = models.apply(cfg, lora_lib.attach(cfg, lora, params, adapters), tokens, mask)
    np.testing.assert_allclose(attached, merged, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(merged - models.apply(cfg, params, tokens, mask))) > 0.1
    with pytest.raises(ValueError, match="LoRA factors.*merged"):
        sampling.generate(cfg, lora_lib.attach(cfg, lora, params, adapters), [[3, 4]],
                          max_new_tokens=2, eos_token_ids=(1,), seed=0)


def test_merge_changes_only_the_targeted_slice_of_the_fused_kernels(base):
    _, cfg, params = base
    lora = lora_lib.LoraConfig(rank=2, alpha=2.0, targets=("k", "up"))
    merged = lora_lib.merge(cfg, lora, params, _trained_adapters(cfg, lora))
    g = cfg.num_groups
    changed = np.any(np.asarray(merged["layers"]["qkv"] != params["layers"]["qkv"]),
                     axis=(0, 1, 2, 4))                       # per member of a KV group
    assert changed.tolist() == [False] * g + [True, False]    # k only: q heads and v untouched
    gate_up = np.any(np.asarray(merged["layers"]["gate_up"] != params["layers"]["gate_up"]),
                     axis=(0, 1, 3))
    assert gate_up.tolist() == [False, True]                  # up only
    for name in ("o", "down", "attn_norm"):
        np.testing.assert_array_equal(merged["layers"][name], params["layers"][name])
    np.testing.assert_array_equal(merged["embed"], params["embed"])


def test_lora_config_names_the_bad_flag():
    with pytest.raises(ValueError, match="--lora_targets.*qq"):
        lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "qq"))
    with pytest.raises(ValueError, match="--lora_rank"):
        lora_lib.LoraConfig(rank=0, alpha=8.0)
    with pytest.raises(ValueError, match="--lora_targets"):
        RunConfig(workdir="", lora_rank=4, lora_targets="q,x").validate()
    assert lora_lib.parse_targets("all") == lora_lib.TARGETS
    assert lora_lib.LoraConfig(4, 8.0, ("v", "q")).targets == ("q", "v")


def test_lora_gradients_flow_only_to_the_adapters(base):
    """The step differentiates w.r.t. the adapters alone: the optimizer state mirrors only
    them, the base stays bit-for-bit, and dL/dB is the chain rule through W + s·A·B."""
    _, cfg, params = base
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "o", "down"))
    tokens, mask = _batch(cfg.vocab_size)
    weights = jax.random.normal(jax.random.PRNGKey(3), (2, 7, cfg.vocab_size))

    def loss_fn(model_params, batch, rng):
        del rng
        logits = models.apply(cfg, model_params, batch["tokens"], batch["mask"])
        return jnp.mean(logits * weights), {}

    def params_fn(frozen, trainable):       # the trainer's: factors attached, not merged
        return lora_lib.attach(cfg, lora, frozen, trainable)

    adapters = _trained_adapters(cfg, lora)
    optimizer = optax.sgd(1.0)
    state = state_lib.create_train_state(adapters, optimizer, rng=0)
    shapes = {x.shape for x in jax.tree.leaves(adapters)}
    base_copy = jax.tree.map(np.array, params)
    step = step_lib.make_train_step(loss_fn, optimizer, params_fn=params_fn, donate=False)
    batch = {"tokens": tokens, "mask": mask}
    new_state, metrics = step(state, batch, None, params)

    assert set(new_state.params) == {"lora"}
    assert {x.shape for x in jax.tree.leaves(new_state.opt_state) if x.ndim} <= shapes
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(got, want)
    # SGD with lr 1: the update is minus the gradient. The full-weight gradient at the merged
    # point gives the adapter gradient by the chain rule: dL/dB = s · Aᵀ · dL/dW.
    full_grad = jax.grad(lambda p: loss_fn(p, batch, None)[0])(
        lora_lib.merge(cfg, lora, params, adapters))
    a = adapters["lora"]["o"]["a"]
    want_b = lora.scale * jnp.einsum("lir,lio->lro", a, full_grad["layers"]["o"])
    got_b = adapters["lora"]["o"]["b"] - new_state.params["lora"]["o"]["b"]
    np.testing.assert_allclose(got_b, want_b, rtol=1e-4, atol=1e-6)
    assert float(metrics["grad_norm"]) > 0


def test_adapter_partition_specs_follow_the_base_kernels_and_fit_the_mesh(base):
    _, cfg, params = base
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)
    adapters = _trained_adapters(cfg, lora)
    specs = lora_lib.partition_specs(adapters)
    assert specs["lora"]["q"]["a"] == P(None, "fsdp", None)
    assert specs["lora"]["q"]["b"] == P(None, None, "tensor")
    assert specs["lora"]["down"]["a"] == P(None, "tensor", None)
    assert specs["lora"]["o"]["b"] == P(None, None, "fsdp")
    # On a (1, 2, 4) mesh: rank 4 is never split; the merge under sharded inputs is the same
    # function as on one device.
    mesh = models.make_mesh("1,2,4")
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                             lora_lib.partition_specs(adapters, mesh),
                             is_leaf=lambda x: isinstance(x, P))
    placed = jax.device_put(adapters, shardings)
    merged = jax.jit(lambda b, t: lora_lib.merge(cfg, lora, b, t))(
        models.shard_params(params, mesh), placed)
    want = lora_lib.merge(cfg, lora, params, adapters)
    for got, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def _torch_logits(model, tokens, mask):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def test_peft_adapter_round_trip_with_peft_and_transformers(base, tmp_path):
    """Our adapters written as a PEFT directory: peft applies them to the transformers base
    model with our logits; the merged export loads in plain transformers with the same logits;
    reading the directory back gives the same adapters."""
    import peft
    import torch
    import transformers
    path, cfg, params = base
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0)          # every target
    adapters = _trained_adapters(cfg, lora)
    merged = lora_lib.merge(cfg, lora, params, adapters)
    tokens, mask = _batch(cfg.vocab_size)
    ours = np.asarray(models.apply(cfg, merged, tokens, mask))
    assert np.max(np.abs(ours - np.asarray(models.apply(cfg, params, tokens, mask)))) > 0.1

    out = tmp_path / "export"
    export_lib.export_policy(str(out), cfg, adapters, str(path), params=merged, lora=lora)
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base_model, str(out / "adapter")).eval()
    peft_error = np.max(np.abs(_torch_logits(peft_model, tokens, mask) - ours))
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32).eval()
    merged_error = np.max(np.abs(_torch_logits(merged_model, tokens, mask) - ours))
    assert peft_error < PARITY_TOLERANCE and merged_error < PARITY_TOLERANCE, (peft_error,
                                                                               merged_error)
    assert os.path.exists(out / "tokenizer.json")

    lora_back, adapters_back = lora_lib.load_peft_adapter(out / "adapter", cfg)
    assert lora_back == lora
    for got, want in zip(jax.tree.leaves(adapters_back), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(got, want)


def test_peft_import_errors_name_the_file_and_the_problem(base, tmp_path):
    _, cfg, _ = base
    with pytest.raises(lora_lib.AdapterError, match="no adapter_config.json"):
        lora_lib.load_peft_adapter(tmp_path, cfg)
    lora = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q", "v"))
    lora_lib.save_peft_adapter(tmp_path, cfg, lora, _trained_adapters(cfg, lora), base_model="b")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, r=3)))
    with pytest.raises(lora_lib.AdapterError, match=r"adapter_model.safetensors.*mis-shaped"):
        lora_lib.load_peft_adapter(tmp_path, cfg)
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(lora_lib.AdapterError, match="use_dora"):
        lora_lib.load_peft_adapter(tmp_path, cfg)


# ---------------------------------------------------------------------------------------------
# The export command on a run directory.


def _fake_run(workdir, model_dir, params, steps=(2,)):
    """A run directory as a full fine-tuning run leaves it: run_config.json and checkpoints."""
    os.makedirs(workdir, exist_ok=True)
    export_lib.write_run_config(str(workdir), RunConfig(workdir=str(workdir),
                                                        model=str(model_dir)), str(model_dir))
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    for step in steps:
        state = state_lib.create_train_state(params, optax.sgd(0.1), rng=0)
        checkpointer.save(step, state, {"iteration": step})
    checkpointer.close()


def test_export_command_writes_a_checkpoint_transformers_loads_with_parity(base, tmp_path):
    path, cfg, params = base
    trained = jax.tree.map(lambda x: x * 1.01, params)
    _fake_run(tmp_path / "run", path, trained)
    out = tmp_path / "hf"
    assert export_lib.main(["export", f"--workdir={tmp_path / 'run'}", f"--out={out}"]) == 0
    tokens, mask = _batch(cfg.vocab_size)
    reference = hf_tiny.torch_logits(out, tokens, mask)
    error = np.max(np.abs(reference - np.asarray(models.apply(cfg, trained, tokens, mask))))
    assert error < PARITY_TOLERANCE, error
    assert models.load_tokenizer(out).encode("12+3") == models.load_tokenizer(path).encode("12+3")


def test_export_command_errors_name_the_problem(base, tmp_path, capsys):
    path, _, params = base
    run = tmp_path / "run"

    def error_of(*flags):
        assert export_lib.main(["export", *flags]) == 2
        return capsys.readouterr().err

    assert "--workdir" in error_of(f"--out={tmp_path / 'o'}")
    assert "does not exist" in error_of(f"--workdir={run}", f"--out={tmp_path / 'o'}")
    os.makedirs(run)
    assert "no run_config.json" in error_of(f"--workdir={run}", f"--out={tmp_path / 'o'}")
    _fake_run(run, path, params, steps=())
    assert "has no checkpoint" in error_of(f"--workdir={run}", f"--out={tmp_path / 'o'}")
    _fake_run(run, path, params, steps=(2, 4))
    message = error_of(f"--workdir={run}", "--step=3", f"--out={tmp_path / 'o'}")
    assert "--step=3" in message and "available steps: 2, 4" in message
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = error_of(f"--workdir={run}", f"--out={blocker / 'sub'}")
    assert f"--out={blocker / 'sub'}" in message and "cannot be created" in message


# ---------------------------------------------------------------------------------------------
# Weights & Biases.


def _wandb_history(run_dir, timeout_s: float = 30.0) -> list[dict]:
    """The history rows of the offline W&B run in ``run_dir``, once its file is complete.

    wandb's background service may still be writing after ``finish()`` returns on a busy
    machine; the run's ``exit`` record marks the end of the file.
    """
    import time
    deadline = time.time() + timeout_s
    while True:
        kinds, rows = _wandb_records(run_dir)
        if "exit" in kinds or time.time() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(run_dir) -> tuple[set, list[dict]]:
    """The history rows of an offline W&B run file.

    ``run-<id>.wandb`` is a 7-byte header (":W&B", magic, version) followed by LevelDB-log
    blocks of 32 KiB; each chunk has a 7-byte header (crc32c, little-endian length, type: 1 full,
    2 first, 3 middle, 4 last) and the chunks of a record hold one protobuf ``Record``.
    """
    from wandb.proto import wandb_internal_pb2
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, chunks, rows, kinds = 7, [], [], set()
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        if left_in_block < 7 or (length == 0 and kind == 0):    # block trailer / padding
            position += left_in_block
            continue
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            kinds.add(record.WhichOneof("record_type"))
            if record.WhichOneof("record_type") == "history":
                # Keys with a "/" arrive split into nested_key.
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_")}
                            | {"_step": record.history.step.num})
    return kinds, rows


def test_wandb_offline_run_gets_the_tensorboard_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = RunConfig(workdir=str(tmp_path), wandb_project="offpolicy-test",
                       wandb_run_name="tiny")
    logger = logger_lib.MetricsLogger(str(tmp_path), wandb=logger_lib.wandb_settings(config))
    logger.write(0, {"eval/pass@1": 0.25})
    logger.write(1, {"train/loss": np.float32(-0.5), "reward_mean": 0.5, "skipped_steps": 0})
    logger.close()
    rows = _wandb_history(tmp_path)
    assert rows == [{"eval/pass@1": 0.25, "_step": 0},
                    {"train/loss": -0.5, "reward_mean": 0.5, "skipped_steps": 0, "_step": 1}]
    assert [json.loads(line)["iteration"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1]
    assert logger_lib.wandb_settings(RunConfig(workdir="")) is None
    with pytest.raises(ValueError, match="--wandb_project"):
        RunConfig(workdir="", wandb_entity="me").validate()
