r"""Export any checkpoint of a run as a Hugging Face checkpoint (and a LoRA run as a PEFT adapter).

    python -m offpolicy_jax.export --workdir=W [--step=N] --out=DIR

writes ``DIR/config.json``, ``DIR/model.safetensors`` (sharded above 4 GiB) and the tokenizer files
and chat template of the model the run started from, so that
``transformers.AutoModelForCausalLM.from_pretrained(DIR)``, vLLM and
``python -m offpolicy_jax.eval --model=DIR`` load it. A LoRA run is written twice: merged weights
in ``DIR`` and the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, for
``peft.PeftModel.from_pretrained(base, DIR/adapter)``) in ``DIR/adapter``. Without ``--step`` the
latest checkpoint is exported.

A run directory is recognised by the ``run_config.json`` every run writes at start-up (the
settings and the resolved ``--model`` directory); the policy is rebuilt from that model and the
checkpoint's trainable parameters (the whole model, or the adapters of a LoRA run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp

from offpolicy_jax import models
from offpolicy_jax.models import checkpoint as hf_checkpoint
from offpolicy_jax.models import lora as lora_lib

RUN_CONFIG_FILE = "run_config.json"
ADAPTER_SUBDIR = "adapter"
# Files of a checkpoint directory that describe text, not weights: copied on export.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


class ExportError(ValueError):
    """The run directory, the step or the output directory cannot be used."""


def write_run_config(workdir: str, config, model_dir: str) -> None:
    """``run_config.json``: the run's settings and the resolved directory of its ``--model``."""
    record = {"config": dataclasses.asdict(config), "model_dir": os.path.abspath(model_dir)}
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_CONFIG_FILE))


def read_run_config(workdir: str) -> dict:
    if not os.path.isdir(workdir):
        raise ExportError(f"--workdir={workdir} does not exist")
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if not os.path.isfile(path):
        raise ExportError(f"--workdir={workdir} is not a run directory: it has no "
                          f"{RUN_CONFIG_FILE} (written when a run starts)")
    try:
        with open(path) as f:
            record = json.load(f)
        record["config"]["workdir"], record["model_dir"]   # noqa: B018 (presence check)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ExportError(f"cannot read {path}: {err}") from err
    return record


def base_model_dir(record: dict) -> str:
    """The starting model's directory (rebuilt from ``--model`` if the recorded one is gone)."""
    from offpolicy_jax import tiny_arith
    if os.path.isdir(record["model_dir"]):
        return record["model_dir"]
    return tiny_arith.resolve_model(record["config"]["model"])


def run_lora_config(run_config: dict) -> lora_lib.LoraConfig | None:
    """The run's adapter settings (``--lora_init``'s file when given), None for full runs."""
    if run_config.get("lora_init"):
        return lora_lib.read_peft_config(run_config["lora_init"])
    if run_config.get("lora_rank", 0) > 0:
        return lora_lib.LoraConfig(run_config["lora_rank"], run_config["lora_alpha"],
                                   lora_lib.parse_targets(run_config["lora_targets"]))
    return None


def checkpoint_step(workdir: str, step: int | None) -> int:
    """``step`` if the run has that checkpoint, else its latest; errors list what exists."""
    from offpolicy_jax.training import checkpoint as checkpoint_lib
    directory = os.path.join(workdir, "checkpoints")
    steps = []
    if os.path.isdir(directory):
        checkpointer = checkpoint_lib.Checkpointer(directory)
        steps = checkpointer.all_steps()
        checkpointer.close()
    if not steps:
        raise ExportError(f"--workdir={workdir} has no checkpoint (nothing in {directory}); "
                          f"a run writes one every --ckpt_every iterations and at its end")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"--step={step}: {workdir} has no checkpoint at that step; available "
                          f"steps: {', '.join(map(str, steps))}")
    return step


def load_run_policy(workdir: str, step: int | None = None, dtype=None):
    """``(cfg, params, trainable, lora, model_dir, step)`` of a run's checkpoint.

    ``params`` is the full model (adapters merged for a LoRA run), ``trainable`` what the
    checkpoint holds (the adapters of a LoRA run, else ``params``), ``lora`` the adapter settings
    or None. ``dtype`` defaults to the run's ``--dtype``.
    """
    from offpolicy_jax.training import checkpoint as checkpoint_lib
    record = read_run_config(workdir)
    run_config = record["config"]
    step = checkpoint_step(workdir, step)
    model_dir = base_model_dir(record)
    dtype = dtype or (jnp.bfloat16 if run_config.get("dtype") == "bfloat16" else jnp.float32)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    trainable = checkpointer.read_state(step)["params"]
    checkpointer.close()
    lora = run_lora_config(run_config)
    if lora is None:
        cfg = models.ModelConfig.from_hf_config(models.read_hf_config(model_dir),
                                                dtype=jnp.dtype(dtype).name)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), trainable)
        return cfg, params, params, None, model_dir, step
    cfg, base = models.load_hf_checkpoint(model_dir, dtype=dtype)
    if "lora" not in trainable:
        raise ExportError(f"{workdir} is a LoRA run (run_config.json) but checkpoint {step} "
                          f"holds no adapters")
    params = lora_lib.merge(cfg, lora, base, trainable)
    return cfg, params, trainable, lora, model_dir, step


def check_writable(out_dir: str) -> None:
    """Creates ``out_dir``; fails naming it if it cannot be created or written to."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise ExportError(f"--out={out_dir} cannot be created: {err.strerror or err}") from err
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ExportError(f"--out={out_dir} is not writable")


def copy_tokenizer(model_dir: str, out_dir: str) -> list[str]:
    """Copies the tokenizer, chat template and generation config of ``model_dir``."""
    copied = []
    for name in TOKENIZER_FILES:
        source = os.path.join(model_dir, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def export_policy(out_dir: str, cfg, trainable, model_dir: str, *, params=None,
                  adapted: lora_lib.AdaptedModel | None = None,
                  lora: lora_lib.LoraConfig | None = None, is_main: bool = True) -> None:
    """Writes a policy as a Hugging Face checkpoint in ``out_dir`` (+ PEFT adapter for LoRA).

    Args:
      trainable: what the train state holds: the model's parameters, or ``{"lora": ...}``.
      params: the full parameters when already merged (else merged here for LoRA).
      adapted: a training run's ``AdaptedModel`` (gives the LoRA settings and the base).
      lora: the LoRA settings when ``params`` are given merged (export of a checkpoint).
      is_main: every process must call this (the tensors are gathered); only process 0 writes.
    """
    lora = adapted.lora if adapted is not None else lora
    if params is None:
        params = adapted.merged(trainable) if adapted is not None else trainable
    if is_main:
        check_writable(out_dir)
    tensors = models.hf_tensors(cfg, params)
    adapter = None
    if lora is not None:
        adapter = jax.tree.map(hf_checkpoint._to_host, {"lora": trainable["lora"]})
    if not is_main:
        return
    models.write_hf_tensors(out_dir, cfg, tensors)
    copy_tokenizer(model_dir, out_dir)
    if adapter is not None:
        lora_lib.save_peft_adapter(os.path.join(out_dir, ADAPTER_SUBDIR), cfg, lora, adapter,
                                   base_model=os.path.abspath(model_dir))


def export_run(workdir: str, out_dir: str, step: int | None = None) -> dict:
    """Exports checkpoint ``step`` (default: latest) of the run in ``workdir``; returns a summary."""
    check_writable(out_dir)
    cfg, params, trainable, lora, model_dir, step = load_run_policy(workdir, step)
    export_policy(out_dir, cfg, trainable, model_dir, params=params, lora=lora)
    summary = {"workdir": workdir, "step": step, "out": out_dir, "base_model": model_dir}
    if lora is not None:
        summary["adapter"] = os.path.join(out_dir, ADAPTER_SUBDIR)
    return summary


def main(argv=None) -> int:
    """The command line; flags live in their own ``FlagValues`` so that importing this module
    next to an experiment's flags (which also define --workdir) cannot clash."""
    from absl import flags
    values = flags.FlagValues()
    workdir = flags.DEFINE_string("workdir", None, "The run directory (its --workdir).",
                                  flag_values=values)
    step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).",
                                flag_values=values)
    out = flags.DEFINE_string("out", None, "Output directory (created).", flag_values=values)
    try:
        rest = values(list(argv if argv is not None else sys.argv))
        if len(rest) > 1:
            raise ExportError(f"unexpected arguments: {' '.join(rest[1:])}")
        if not workdir.value or not out.value:
            raise ExportError("usage: python -m offpolicy_jax.export --workdir=W [--step=N] "
                              "--out=DIR (--workdir and --out are required)")
        summary = export_run(workdir.value, out.value, step.value)
    except (flags.Error, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
