"""The loop every expert-iteration method shares (ReST-EM, B-STaR, Auto-CEI, process-value
selection): sample, keep, fine-tune, with the RL trainer's own setup, evaluation, logging,
checkpoints and summary (``training.trainer.Session``).

A method supplies one function, ``iterate(params, meta, iteration) -> (params, record,
skipped)``, that runs its E-step (sampling and the keep rule) and its M-step (usually
``fine_tune``); ``run_iterations`` does the rest, the same for every method:

* rollouts and skipped-update counts in ``meta`` (checkpointed, so a resumed run counts on);
* the held-out evaluation when due, then the method's ``after_evaluation(meta, record)`` hook
  (rules that watch held-out accuracy: BFS-Prover-V2's plateau restart, Auto-CEI's curriculum);
* one metrics.jsonl record per iteration with the stage times;
* a checkpoint (params, prompt-stream position, ``meta``) every ``--ckpt_every`` iterations and at
  the end, so a killed run resumes from its last checkpointed iteration with the same results;
* the export and the run summary.

Expert iteration runs unsharded in one process: the M-step is plain supervised fine-tuning of a
model that fits one device. Under a multi-process launch every process would redo the same work
and write the same workdir, so ``require_single_process`` refuses one.
"""

import math
import os
import time
from typing import Callable

import jax
import numpy as np

from offpolicy_jax import distributed, sft
from offpolicy_jax import export as export_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib


def require_single_process(experiment: str) -> None:
    """Refuses a multi-process launch, naming what was detected."""
    if distributed.maybe_initialize() and jax.process_count() > 1:
        raise SystemExit(f"{experiment}.py runs in a single process, but a multi-process launch "
                         f"was detected ({distributed.detect_launch()}); run it without "
                         f"launch/local.sh, SLURM or a multi-host TPU slice")


def refuse_lora(config, experiment: str) -> None:
    """The M-step is full supervised fine-tuning (``offpolicy_jax.sft``): no LoRA."""
    if config.lora:
        raise SystemExit(f"{experiment}.py: --lora_rank/--lora_init are not supported (its M-step "
                         f"is full supervised fine-tuning, offpolicy_jax.sft); every RL "
                         f"experiment file takes them")


def restore_or_start(session, base_params, new_meta: dict | Callable[[], dict]) -> tuple:
    """``(params, meta)`` of the latest checkpoint, or the base model and a new run's meta.

    ``new_meta``: the method's own keys for a new run (or a function returning them, called only
    when the run starts fresh, e.g. to draw a dev subset); ``skipped_steps`` is added.
    """
    latest = session.checkpointer.latest_step()
    if latest is None:
        extra = new_meta() if callable(new_meta) else dict(new_meta)
        return base_params, session.start({"skipped_steps": 0, **extra}, base_params)
    state, meta, _ = session.checkpointer.restore(
        latest, checkpoint_lib.abstract_like({"params": base_params}))
    session.selection.load_state_dict(meta["selection"], {})
    session.sampler.generated = meta["rollouts"]
    return jax.device_get(state["params"]), session.resumed(meta)


def fine_tune(session, start_params, examples: list[tuple[str, str]], *, iteration: int,
              epochs: float, batch_size: int) -> tuple:
    """The M-step: supervised fine-tuning of ``start_params`` on ``(prompt, response)`` examples
    for ``epochs`` passes (at least one step), AdamW at ``--learning_rate`` with 10 % warm-up and a
    fresh optimizer; returns ``(params, metrics, skipped updates)``. Nothing kept: no step."""
    if not examples:
        return start_params, {"train/loss": 0.0, "train/sft_steps": 0}, 0
    config = session.config
    batch_size = min(batch_size, len(examples))
    steps = max(1, math.ceil(epochs * len(examples) / batch_size))
    params, losses, skipped = sft.train_sft(
        session.cfg, start_params, session.tokenizer, examples, steps=steps,
        batch_size=batch_size, learning_rate=config.learning_rate, seed=config.seed + iteration,
        eos_id=session.sampler.eos_ids[0], pad_id=session.sampler.pad_id,
        warmup_steps=steps // 10)
    return params, {"train/loss": float(np.mean(losses)), "train/sft_steps": steps}, skipped


def run_iterations(session, params, meta: dict, iterate, *, after_evaluation=None) -> dict:
    """Runs ``iterate`` until the session's budget is spent (see the module docstring); returns
    the run summary. ``iterate``'s record should carry ``rollout_s`` and ``update_s``."""
    config = session.config
    while not session.finished(meta):
        iteration, rollouts_before = meta["iteration"] + 1, meta["rollouts"]
        t0 = time.time()
        params, record, skipped = iterate(params, meta, iteration)
        meta["skipped_steps"] += skipped
        record.update(rollouts=session.sampler.generated, skipped_steps=meta["skipped_steps"])
        meta.update(iteration=iteration, rollouts=session.sampler.generated)
        if session.evaluation_due(meta, rollouts_before):
            record.update(session.evaluate(params))
        if after_evaluation is not None:
            record.update(after_evaluation(meta, record))
        record["step_s"] = time.time() - t0
        session.log(record, meta)
        if session.checkpoint_due(meta):
            meta["selection"], _ = session.selection.state_dict()
            session.checkpointer.save(iteration, {"params": params}, meta)

    if config.export_final:
        export_lib.export_policy(os.path.join(config.workdir, "export"), session.cfg, params,
                                 session.model_dir)
    return session.finish(meta, skipped_steps=meta["skipped_steps"])
