r"""VerIPO — Verifier-guided Iterative Policy Optimization (Li et al., 2025).

Paper: "VerIPO: Cultivating Long Reasoning in Video-LLMs via Verifier-Guided Iterative Policy
Optimization", https://arxiv.org/abs/2505.19000. The official repository
(https://github.com/HITsz-TMG/VerIPO) holds the README and evaluation scripts only: its training
code, data and checkpoints were announced ("will be released soon") but are not there, so this
file follows the paper's description and the README's Table 1 (GRPO stages at lr 1e-6 then 5e-7, 8
responses per query, temperature 1; DPO stage at lr 5e-7, global batch 32, β = 0.1); the verifier
prompt and the pair-selection rules are this file's (below).

The loop, repeated ``--cycles`` times (one learner per stage, ``training.trainer.Learner``; each
stage starts a fresh optimizer from the policy the previous stage ended with):

1. **GRPO stage** (exploration): ``--grpo_iterations`` iterations of ``experiments/grpo.py``'s
   algorithm (its ``--variant`` and flags, the shared ``--batch_size``, ``--group_size``,
   ``--learning_rate``); every rollout is kept (``pairs.RolloutCollector``).
2. **Rollout-aware verifier**: a judge reads each kept rollout beyond its final answer. On the
   embedded task (``--judge=arith``) it checks the working (``data.arith.check_working``): every
   intermediate step right, every operand a number of the problem or an earlier result, the boxed
   answer the working's own — a verifiable process check standing in for the paper's small-LLM
   judge of "reasoning logic and contextual consistency". On real checkpoints the judge is any
   function ``judge(prompt, response) -> bool`` (``--judge=package.module:function``; a
   model-based judge can be such a function); ``--judge=none`` keeps the outcome reward alone.
   Chosen: correct and judged sound, longest working first (the paper prefers long, reflective
   CoTs); rejected: wrong, or right with an unsound working. Within each prompt's group, chosen
   and rejected responses are paired, each used once, at most ``--pairs_per_prompt``.
3. **DPO stage** (targeted optimisation): ``losses.dpo`` against the policy the stage starts from,
   ``--dpo_epochs`` epochs over the pairs in batches of ``--dpo_batch_size`` pairs at
   ``--dpo_learning_rate``. It samples nothing: its rollouts are the GRPO stage's.

The rollout budget (``--rollout_budget``) is spent by GRPO stages only: the stage that reaches it
ends there, its DPO stage still runs, and the run ends. Held-out evaluation runs at the start and
at the end of every stage. metrics.jsonl: every record has ``stage`` ("grpo"/"dpo") and ``cycle``;
the last GRPO iteration of a cycle logs the verifier (``verifier/``: ``pairs``, ``groups``,
``groups_with_pairs``, ``judge_agreement`` with the outcome reward, ``correct_unsound``,
``wrong_sound``, ``chosen_length``, ``rejected_length``); DPO iterations log the DPO metrics
(``train/pair_accuracy``, ``train/reward_margin``, ``train/chosen_logratio``, ...).

A run killed at any point — a GRPO→DPO or DPO→GRPO boundary included — and restarted with the
same ``--workdir`` continues from its last checkpoint (checkpoints are written at every stage
boundary too) and ends with the same metrics and parameters as one that never stopped.

Command (embedded default, 2 CPU cores, about 10 minutes):

    python experiments/veripo.py

Departures: the paper's curriculum (text, image, then video data; 80 % of the always-solved
examples dropped from later GRPO stages) has no counterpart on one task with a fresh prompt
stream; the judge is a rule, not an LLM; AdamW at the tiny model's learning rates.
"""

import dataclasses
import importlib.util
import math
import os
import pathlib
import time

import numpy as np
from absl import app, flags

from offpolicy_jax import distributed, tiny_arith
from offpolicy_jax.training import flags as shared_flags
from offpolicy_jax.training import pairs, trainer
from offpolicy_jax.training.algorithm import Algorithm
from offpolicy_jax.training.config import RunConfig


def _load_grpo():
    """``experiments/grpo.py`` as a module: the GRPO stage is its algorithm, with its flags."""
    spec = importlib.util.spec_from_file_location(
        "veripo_grpo_stage", pathlib.Path(__file__).with_name("grpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grpo_experiment = _load_grpo()

CYCLES = flags.DEFINE_integer("cycles", 3, "GRPO → verifier → DPO cycles.")
GRPO_ITERATIONS = flags.DEFINE_integer("grpo_iterations", 10, "Iterations per GRPO stage (k).")
DPO_EPOCHS = flags.DEFINE_float("dpo_epochs", 2.0, "Epochs over the pairs per DPO stage.")
DPO_BATCH_SIZE = flags.DEFINE_integer("dpo_batch_size", 32, "Pairs per DPO update (paper: global "
                                      "batch 32).")
DPO_LEARNING_RATE = flags.DEFINE_float("dpo_learning_rate", None, "DPO stages' learning rate "
                                       "(default: half of --learning_rate, the paper's 5e-7 "
                                       "against GRPO's 1e-6).")
BETA = flags.DEFINE_float("beta", 0.1, "DPO's β (paper: 0.1).")
PAIRS_PER_PROMPT = flags.DEFINE_integer("pairs_per_prompt", 2, "Pairs per prompt at most "
                                        "(0: min(#chosen, #rejected)).")
JUDGE = flags.DEFINE_string("judge", "auto", "The verifier's process judge: 'arith', 'none' "
                            "(outcome only) or 'package.module:function' judging (prompt, "
                            "response); 'auto': arith on --dataset=arith, else none.")


@dataclasses.dataclass(frozen=True)
class Options:
    """VerIPO's own settings (the flags above).

    Attributes:
      cycles: GRPO → verifier → DPO cycles.
      grpo_iterations: iterations per GRPO stage.
      dpo_epochs: epochs over the pair set per DPO stage.
      dpo_batch_size: pairs per DPO update.
      dpo_learning_rate: the DPO stages' learning rate.
      beta: DPO's β.
      pairs_per_prompt: pairs per prompt at most (0: as many as the group allows).
      prefer_longer: chosen responses longest first.
    """

    cycles: int = 3
    grpo_iterations: int = 10
    dpo_epochs: float = 2.0
    dpo_batch_size: int = 32
    dpo_learning_rate: float = 2.5e-5
    beta: float = 0.1
    pairs_per_prompt: int = 2
    prefer_longer: bool = True

    def dpo_stage_length(self, num_pairs: int) -> int:
        return max(1, math.ceil(self.dpo_epochs * num_pairs / self.dpo_batch_size))


class VerIPO:
    """The stage-switching loop: a GRPO learner and a DPO learner handing the policy over."""

    def __init__(self, config: RunConfig, options: Options, grpo_algorithm: Algorithm, judge):
        self.config, self.options, self.judge = config, options, judge
        self.session = trainer.Session(config, "veripo", selection=grpo_algorithm.selection,
                                       reward_fn=grpo_algorithm.reward_fn)
        self.collector = pairs.RolloutCollector()
        self.grpo = trainer.Learner(self.session, dataclasses.replace(
            grpo_algorithm, stages=grpo_algorithm.stages + (self.collector,)))
        self.pair_set = pairs.PairDataset()
        dpo_config = dataclasses.replace(
            config, batch_size=options.dpo_batch_size, learning_rate=options.dpo_learning_rate,
            num_minibatches=1, num_passes=1, num_microbatches=1)
        dpo_algorithm = pairs.dpo_algorithm(options.beta, self.pair_set, name="veripo_dpo")
        dpo_config.validate(dpo_algorithm)
        self.dpo = trainer.Learner(self.session, dpo_algorithm, config=dpo_config)
        self.dpo.suspend()                   # the GRPO stage comes first

    def learner(self, meta: dict) -> trainer.Learner:
        return self.grpo if meta["stage"] == "grpo" else self.dpo

    def restore_or_start(self) -> dict:
        checkpointer = self.session.checkpointer
        latest = checkpointer.latest_step()
        if latest is None:
            return self.session.start(
                {"stage": "grpo", "cycle": 0, "stage_iteration": 0,
                 "stage_length": self.options.grpo_iterations, "skipped_steps": 0},
                self.grpo.merged_policy())
        stage = {"stage": checkpointer.read_meta(latest)["stage"]}
        if stage["stage"] == "dpo":
            # A train state of the DPO learner's structure to restore into.
            self.dpo.start_from(self.grpo.suspend(), latest)
        return self.learner(stage).restore_or_start()

    def finished(self, meta: dict) -> bool:
        """All cycles done, the --iterations cap reached, or the budget spent with no DPO stage
        left to run."""
        budget = self.config.rollout_budget
        return (meta["cycle"] >= self.options.cycles
                or meta["iteration"] >= self.config.iterations
                or bool(budget and meta["rollouts"] >= budget and meta["stage"] == "grpo"))

    def stage_done(self, meta: dict) -> bool:
        budget = self.config.rollout_budget
        return (meta["stage_iteration"] >= meta["stage_length"]
                or bool(meta["stage"] == "grpo" and budget and meta["rollouts"] >= budget))

    def to_dpo(self, meta: dict) -> dict:
        """The verifier on the GRPO stage's rollouts, then the DPO stage (or, without pairs, the
        next GRPO stage). Returns the verifier's metrics."""
        config, options = self.config, self.options
        rollouts = self.collector.take()
        correct = rollouts.rewards > 0
        sound = pairs.judge_rows(rollouts, self.session.tokenizer, self.judge)
        pair_rows, stats = pairs.pairs_from_groups(
            rollouts, config.group_size, correct & sound,
            rng=np.random.default_rng([config.seed, meta["cycle"], 29]),
            max_pairs_per_prompt=options.pairs_per_prompt, prefer_longer=options.prefer_longer)
        stats.update(pairs.verifier_stats(correct, sound))
        meta["skipped_steps"] += self.grpo.skipped_steps
        params, start = self.grpo.suspend(), meta["iteration"] + 1
        if pair_rows is None:
            self.grpo.start_from(params, start)
            meta.update(stage="grpo", cycle=meta["cycle"] + 1, stage_iteration=0,
                        stage_length=options.grpo_iterations)
        else:
            self.pair_set.reset(pair_rows, salt=meta["cycle"])
            self.dpo.start_from(params, start)
            meta.update(stage="dpo", stage_iteration=0,
                        stage_length=options.dpo_stage_length(stats["pairs"]))
        return {f"verifier/{k}": v for k, v in stats.items()}

    def to_grpo(self, meta: dict) -> None:
        meta["skipped_steps"] += self.dpo.skipped_steps
        self.pair_set.clear()
        self.grpo.start_from(self.dpo.suspend(), meta["iteration"] + 1)
        meta.update(stage="grpo", cycle=meta["cycle"] + 1, stage_iteration=0,
                    stage_length=self.options.grpo_iterations)

    def run(self) -> dict:
        session = self.session
        meta = self.restore_or_start()
        while not self.finished(meta):
            learner, stage = self.learner(meta), meta["stage"]
            record = learner.iteration(meta["iteration"] + 1)
            record.update(stage=stage, cycle=meta["cycle"])
            meta.update(iteration=meta["iteration"] + 1, rollouts=record["rollouts"],
                        stage_iteration=meta["stage_iteration"] + 1)
            boundary = self.stage_done(meta)
            if boundary or meta["iteration"] >= self.config.iterations:
                t0 = time.time()
                record.update(session.evaluate(learner.merged_policy()), eval_s=time.time() - t0)
            if boundary:
                if stage == "grpo":
                    record.update(self.to_dpo(meta))
                else:
                    self.to_grpo(meta)
            session.log(record, meta)
            if self.finished(meta):
                meta["eval_after"] = {k: v for k, v in record.items() if k.startswith("eval/")}
            if boundary or self.finished(meta) or \
                    meta["iteration"] % self.config.ckpt_every == 0:
                self.learner(meta).save(meta)
        if self.config.export_final:
            self.learner(meta).export(os.path.join(self.config.workdir, "export"))
        # Non-finite updates skipped by earlier stages' learners, and by the active one.
        return session.finish(meta, skipped_steps=meta["skipped_steps"]
                              + self.learner(meta).skipped_steps)


def run(config: RunConfig, options: Options, grpo_algorithm: Algorithm, judge) -> dict:
    """Runs (or resumes) VerIPO and returns the final summary."""
    distributed.maybe_initialize()
    config.validate(grpo_algorithm)
    if config.rollout_lag or config.lora:
        raise ValueError("veripo.py: --rollout_lag and LoRA are not supported (the stages hand "
                         "full parameters over, sampling from the current policy)")
    return VerIPO(config, options, grpo_algorithm, judge).run()


def main(argv):
    del argv
    config = shared_flags.run_config("veripo")
    judge = JUDGE.value
    if judge == "auto":
        judge = "arith" if config.dataset == "arith" else "none"
    options = Options(
        cycles=CYCLES.value, grpo_iterations=GRPO_ITERATIONS.value, dpo_epochs=DPO_EPOCHS.value,
        dpo_batch_size=DPO_BATCH_SIZE.value,
        dpo_learning_rate=DPO_LEARNING_RATE.value or config.learning_rate / 2,
        beta=BETA.value, pairs_per_prompt=PAIRS_PER_PROMPT.value)
    run(config, options, grpo_experiment.make_algorithm(grpo_experiment.VARIANT.value),
        pairs.resolve_judge(judge))


if __name__ == "__main__":
    # grpo.py's embedded defaults, so that the GRPO stages are that file's runs.
    flags.FLAGS.set_default("learning_rate", tiny_arith.RL_LEARNING_RATE)
    flags.FLAGS.set_default("num_minibatches", 2)
    flags.FLAGS.set_default("iterations", 1_000_000)    # a cap only: --cycles decides
    flags.FLAGS.set_default("eval_size", 256)           # pass@1 standard error ~2 points
    app.run(main)
