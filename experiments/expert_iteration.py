r"""Expert iteration / ReST-EM (Singh et al., TMLR 2024).

Paper: "Beyond Human Data: Scaling Self-Training for Problem-Solving with Language Models",
https://arxiv.org/abs/2312.06585. An EM loop with a binary verifier reward:

* E-step: sample K responses per training problem from the current policy; keep the verified-correct
  ones (at most ``--max_per_prompt`` per problem);
* M-step: maximise Σ_{(x,y) kept} log p_θ(y|x) — plain NLL on the kept responses
  (``losses.nll`` through ``offpolicy_jax.sft``) — **always fine-tuning from the base model**, not
  from the previous iterate (the paper's choice, against overfitting to its own samples).

``--iterations`` counts EM iterations (paper: 3 on MATH). Each iteration samples
``--batch_size × --batches_per_iteration`` problems × ``--group_size`` (K) responses; these count
towards the ``rollouts`` budget in metrics.jsonl, like the RL experiments. The run is checkpointed
every ``--ckpt_every`` iterations and at the end (params + prompt-stream position), so a killed
run resumes. Setup, evaluation, logging, checkpoints and the summary are the RL trainer's own
(``training.trainer.Session``); only the E- and M-steps are this file's.

Command (embedded default, no download):

    python experiments/expert_iteration.py

Hardware: 2 CPU cores, a few minutes. Expected: held-out pass@1 of the tiny-arith model rises
after the first iteration and improves a little with the next (the paper: 40.3 → 41.9 % pass@1 over
three iterations on MATH with PaLM 2-L).

Runs in one process (a multi-process launch is refused at start-up).

Departures (commented where set): K = 8 (``--group_size``) instead of 32; the M-step's length is a
number of epochs over the kept set (the paper scales it with the data); AdamW with a cosine
schedule at a learning rate suited to the tiny model.
"""

import math
import os
import time

import jax
import numpy as np
from absl import app, flags

from offpolicy_jax import distributed, sft
from offpolicy_jax import export as export_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import trainer

BATCHES_PER_ITERATION = flags.DEFINE_integer("batches_per_iteration", 8, "Prompt batches sampled "
                                             "per EM iteration (E-step size, in --batch_size "
                                             "prompts).")
MAX_PER_PROMPT = flags.DEFINE_integer("max_per_prompt", 10, "Correct responses kept per problem "
                                      "(paper: 10).")
SFT_EPOCHS = flags.DEFINE_float("sft_epochs", 4.0, "M-step length: epochs over the kept set.")
SFT_BATCH_SIZE = flags.DEFINE_integer("sft_batch_size", 32, "M-step batch size.")


def keep_correct(rollouts, records: list[dict], tokenizer, max_per_prompt: int
                 ) -> list[tuple[str, str]]:
    """E-step filter: ``(prompt text, response text)`` of the verified-correct responses, at most
    ``max_per_prompt`` per problem (EOS is re-added by the SFT packer)."""
    kept, per_prompt = [], {}
    for row in np.nonzero(rollouts.rewards > 0)[0]:
        prompt = int(rollouts.group_index[row])
        if per_prompt.get(prompt, 0) >= max_per_prompt:
            continue
        per_prompt[prompt] = per_prompt.get(prompt, 0) + 1
        length = int(rollouts.lengths[row])
        text = tokenizer.decode(rollouts.tokens[row, :length].tolist(),
                                skip_special_tokens=True)
        kept.append((records[prompt]["prompt"], text))
    return kept


def e_step(session: trainer.Session, params, iteration: int) -> tuple[list, dict]:
    """K samples per problem from the current policy; the verified-correct ones, and metrics."""
    kept, rewards = [], []
    for part in range(BATCHES_PER_ITERATION.value):
        records = session.selection.select(session.config.batch_size, iteration)
        rollouts = session.sampler.sample(
            params, records, seed_index=iteration * BATCHES_PER_ITERATION.value + part,
            policy_version=iteration - 1)
        session.selection.observe(records, rollouts, iteration)
        kept += keep_correct(rollouts, records, session.tokenizer, MAX_PER_PROMPT.value)
        rewards.append(rollouts.rewards)
    reward_mean = sum(float(r.sum()) for r in rewards) / max(sum(r.size for r in rewards), 1)
    return kept, {"train/kept": len(kept), "reward_mean": reward_mean,
                  "zero_gradient_group_fraction": trainer.zero_gradient_group_fraction(
                      np.concatenate(rewards), session.config.group_size),
                  **{f"{session.selection.name}/{k}": v
                     for k, v in session.selection.metrics().items()}}


def m_step(session: trainer.Session, base_params, kept, *, iteration: int):
    """Fine-tunes the *base* parameters on the kept responses; returns ``(params, metrics,
    skipped updates)``."""
    if not kept:
        return base_params, {"train/loss": 0.0, "train/sft_steps": 0}, 0
    config = session.config
    batch_size = min(SFT_BATCH_SIZE.value, len(kept))
    steps = max(1, math.ceil(SFT_EPOCHS.value * len(kept) / batch_size))
    params, sft_losses, skipped = sft.train_sft(
        session.cfg, base_params, session.tokenizer, kept, steps=steps, batch_size=batch_size,
        learning_rate=config.learning_rate, seed=config.seed + iteration,
        eos_id=session.sampler.eos_ids[0], pad_id=session.sampler.pad_id,
        warmup_steps=steps // 10)
    return params, {"train/loss": float(np.mean(sft_losses)), "train/sft_steps": steps}, skipped


def run(config) -> dict:
    # The E- and M-steps run unsharded in one process (the M-step is plain SFT of a model that
    # fits one device). Under a multi-process launch every process would redo the same work and
    # write the same workdir, so such a launch is refused, naming what was detected.
    if distributed.maybe_initialize() and jax.process_count() > 1:
        raise SystemExit(f"expert_iteration.py runs in a single process, but a multi-process "
                         f"launch was detected ({distributed.detect_launch()}); run it without "
                         f"launch/local.sh, SLURM or a multi-host TPU slice")
    config.validate()
    if config.lora:
        raise SystemExit("expert_iteration.py: --lora_rank/--lora_init are not supported (its "
                         "M-step is full supervised fine-tuning from the base model, "
                         "offpolicy_jax.sft); every RL experiment file takes them")
    session = trainer.Session(config, "expert_iteration", sharded=False)
    base_params = jax.device_get(session.params)
    params, meta = restore_or_start(session, base_params)

    while not session.finished(meta):
        iteration, rollouts_before = meta["iteration"] + 1, meta["rollouts"]
        t0 = time.time()
        kept, record = e_step(session, params, iteration)
        t_sample = time.time()
        # M-step: from the base model, every iteration.
        params, sft_metrics, skipped = m_step(session, base_params, kept, iteration=iteration)
        meta["skipped_steps"] += skipped
        record.update(sft_metrics, rollouts=session.sampler.generated,
                      skipped_steps=meta["skipped_steps"], rollout_s=t_sample - t0,
                      update_s=time.time() - t_sample)
        meta.update(iteration=iteration, rollouts=session.sampler.generated)
        if session.evaluation_due(meta, rollouts_before):
            record.update(session.evaluate(params))
        record["step_s"] = time.time() - t0
        session.log(record, meta)
        if session.checkpoint_due(meta):
            meta["selection"], _ = session.selection.state_dict()
            session.checkpointer.save(iteration, {"params": params}, meta)

    if config.export_final:
        export_lib.export_policy(os.path.join(config.workdir, "export"), session.cfg, params,
                                 session.model_dir)
    return session.finish(meta, skipped_steps=meta["skipped_steps"])


def restore_or_start(session: trainer.Session, base_params) -> tuple:
    """``(params, meta)`` of the latest checkpoint, or the base model and a new run's meta."""
    latest = session.checkpointer.latest_step()
    if latest is None:
        return base_params, session.start({"skipped_steps": 0}, base_params)
    state, meta, _ = session.checkpointer.restore(
        latest, checkpoint_lib.abstract_like({"params": base_params}))
    session.selection.load_state_dict(meta["selection"], {})
    session.sampler.generated = meta["rollouts"]
    return jax.device_get(state["params"]), session.resumed(meta)


def main(argv):
    del argv
    run(shared_flags.run_config("expert_iteration"))


if __name__ == "__main__":
    flags.FLAGS.set_default("iterations", 3)          # EM iterations (paper: 3 on MATH)
    flags.FLAGS.set_default("temperature", 0.7)       # the paper's sampling temperature
    flags.FLAGS.set_default("top_k", 40)              # the paper's top-K
    flags.FLAGS.set_default("learning_rate", 1e-3)    # M-step SFT lr for the tiny model
    app.run(main)
