"""Metrics: ``metrics.jsonl`` and TensorBoard event files in the workdir (optionally Weights &
Biases too), a tqdm progress bar, and the final one-line JSON summary. Only process 0 writes
(multi-host runs log once)."""

import json
import math
import os
import secrets
import sys

import numpy as np

# Metrics that measure the machine, not the run: excluded when comparing a resumed run with an
# uninterrupted one.
TIMING_KEYS = ("tokens_per_s", "step_s", "rollout_s", "reward_s", "prepare_s", "update_s",
               "eval_s", "wall_s")


def to_python(value):
    """A JSON-friendly float/int from a numpy/JAX scalar (NaN and inf become strings); a string
    (a label, e.g. VerIPO's stage) stays as it is and goes to metrics.jsonl only; None (a metric
    with nothing to measure this time) stays None."""
    if isinstance(value, str) or value is None:
        return value
    value = np.asarray(value)
    if value.dtype.kind in "iub":
        return int(value)
    value = float(value)
    if math.isfinite(value):
        return value
    return str(value)


class MetricsLogger:
    """Appends one JSON object per iteration to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard (x-axis: the iteration).

    On resume, ``truncate_after(iteration)`` drops lines logged after the restored checkpoint, so
    the file of a killed-and-resumed run is identical (up to timing keys) to an uninterrupted
    run's.
    """

    def __init__(self, workdir: str, *, is_main: bool = True, tensorboard: bool = True,
                 wandb: dict | None = None):
        self.is_main = is_main
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._writer = None
        self._wandb = None
        if is_main:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if wandb:
                self._wandb = start_wandb(workdir, **wandb)

    def truncate_after(self, iteration: int) -> None:
        """Keeps only the records with ``record['iteration'] <= iteration``."""
        if not self.is_main or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f
                    if line.strip() and json.loads(line)["iteration"] <= iteration]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, iteration: int, metrics: dict) -> dict:
        record = {"iteration": int(iteration),
                  **{k: to_python(v) for k, v in sorted(metrics.items())}}
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._writer is not None:
                for key, value in record.items():
                    if key != "iteration" and isinstance(value, (int, float)):
                        self._writer.add_scalar(key, value, iteration)
            if self._wandb is not None:
                # The same scalars as TensorBoard, with the iteration as W&B's step.
                self._wandb.log({k: v for k, v in record.items()
                                 if k != "iteration" and isinstance(v, (int, float))},
                                step=int(iteration))
        return record

    def read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def wandb_settings(config) -> dict | None:
    """``--wandb_project/entity/run_name`` as ``start_wandb`` arguments; None when off."""
    if not config.wandb_project:
        return None
    return {"project": config.wandb_project, "entity": config.wandb_entity,
            "name": config.wandb_run_name, "config": {k: v for k, v in vars(config).items()}}


def start_wandb(workdir: str, *, project: str, entity: str | None, name: str | None,
                config: dict):
    """A W&B run for ``workdir`` (files under ``workdir/wandb``).

    The run id is kept in ``workdir/wandb_id`` so that a resumed run continues the same W&B run;
    W&B ignores steps it has already seen, so the iterations a resume repeats are logged once.
    """
    import wandb
    id_path = os.path.join(workdir, "wandb_id")
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)
        with open(id_path, "w") as f:
            f.write(run_id)
    return wandb.init(project=project, entity=entity, name=name or os.path.basename(
        os.path.abspath(workdir)), id=run_id, resume="allow", dir=workdir, config=config)


def print_summary(summary: dict, *, is_main: bool = True) -> None:
    """The run's last line on stdout: one JSON object (the contract scripts and tests parse)."""
    if is_main:
        sys.stdout.flush()
        print(json.dumps({k: to_python(v) if not isinstance(v, str) else v
                          for k, v in summary.items()}), flush=True)
