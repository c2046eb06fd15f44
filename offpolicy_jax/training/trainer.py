"""The trainer's parts: setup, one iteration, evaluation, checkpoint, summary.

``loop.run`` puts them together for every RL method; ``experiments/expert_iteration.py`` uses the
same :class:`Session` (model, prompts, sampler, evaluation, metrics, checkpoints, summary) with its
own E- and M-steps.

* :class:`Session` — what every training loop of a run shares: the workdir, the model and
  tokenizer, the training prompts (a selection stage) and the held-out set, the rollout sampler
  with its reward function, the metrics logger, the checkpointer, the progress bar and the
  summary.
* :class:`Learner` — the RL side: the train state and its jitted step, the algorithm's forward
  functions, the stored policies and the rollout pipeline; one :meth:`Learner.iteration` is
  collect → prepare → update → metrics.

Everything that decides a run's numbers is a function of (config, seed, iteration), so a run
killed at any point and restarted with the same ``--workdir`` continues from its last checkpoint
and ends with the same parameters and the same logged metrics as a run that never stopped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging as absl_logging

from offpolicy_jax import distributed, losses, models, rewards
from offpolicy_jax import export as export_lib
from offpolicy_jax.eval import runner
from offpolicy_jax.models import lora as lora_lib
from offpolicy_jax.training import algorithm as algorithm_lib
from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import logger as logger_lib
from offpolicy_jax.training import optim, policies, rollout, stages
from offpolicy_jax.training import selection as selection_lib
from offpolicy_jax.training import state as state_lib, step as step_lib
from offpolicy_jax.training.algorithm import Algorithm, StepInfo
from offpolicy_jax.training.batch import Rollouts
from offpolicy_jax.training.config import RunConfig


def load_policy(config: RunConfig, mesh=None):
    """``(cfg, params, tokenizer, model_dir)`` for ``--model`` (a checkpoint dir or an alias).

    With ``mesh``, every parameter is placed straight into its sharded layout (each process
    copies only its own devices' shards, which is what multi-process runs need)."""
    from offpolicy_jax import tiny_arith
    model_dir = tiny_arith.resolve_model(config.model)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    cfg, params = models.load_hf_checkpoint(model_dir, dtype=dtype, mesh=mesh)
    tokenizer = models.load_tokenizer(model_dir)
    return cfg, params, tokenizer, model_dir


def eos_ids(tokenizer) -> tuple[int, ...]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; responses could never end")
    return (int(tokenizer.eos_token_id),)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(tokenizer)[0]


def remat_policy(name: str) -> bool | str:
    """``--remat`` to ``models.apply_hidden``'s ``remat``: 'none', 'full' or a policy name."""
    return {"none": False, "full": True}.get(name, name)


# ---------------------------------------------------------------------------------------------
# The session: what every loop shares.


class Session:
    """Setup, evaluation, logging, checkpoints and the summary of one run.

    Args:
      config: the shared run settings.
      name: the method's name (progress bar, summary).
      sharded: load the policy onto the ``--mesh`` (RL), or onto one device (``mesh`` None).
      selection: the prompt-selection stage (default: ``--prompt_selection``'s).
      reward_fn: the reward of a response (default: ``stages.verifier_reward``).
      evaluation: an extra held-out evaluation (see ``Algorithm.evaluation``).
    """

    def __init__(self, config: RunConfig, name: str, *, sharded: bool = True, selection=None,
                 reward_fn=None, evaluation=None):
        from offpolicy_jax import compilation_cache
        from offpolicy_jax.data import prompts as prompts_lib
        # First, before anything compiles (the warm start of tiny-arith may).
        compilation_cache.enable(config.compilation_cache)
        # orbax reports every save at INFO; the run's own metrics are the signal worth reading.
        absl_logging.set_verbosity(absl_logging.WARNING)
        self.config = config
        self.name = name
        self.start_time = time.time()
        self.is_main = jax.process_index() == 0
        os.makedirs(config.workdir, exist_ok=True)
        self.mesh = models.make_mesh(config.mesh) if sharded else None
        # The policy as loaded; a Learner's train state takes over (and donates) these buffers.
        self.cfg, self.params, self.tokenizer, self.model_dir = load_policy(config, self.mesh)
        train_records, eval_records = prompts_lib.load_train_and_eval(
            config.dataset, prompt_field=config.prompt_field, answer_field=config.answer_field,
            eval_size=config.eval_size, seed=config.seed, tokenizer=self.tokenizer,
            prompt_format=config.prompt_format, data_dir=config.data_dir,
            train_size=config.train_size)
        self.selection = selection or selection_lib.make_selection(config)
        self.selection.bind(train_records, config)
        self.pool = rewards.VerifierPool()
        self.sampler = stages.RolloutSampler(
            cfg=self.cfg, tokenizer=self.tokenizer, config=config, pool=self.pool,
            mesh=self.mesh, pad_id=pad_id(self.tokenizer), eos_ids=eos_ids(self.tokenizer),
            reward_fn=reward_fn or stages.verifier_reward)
        self.eval_records = eval_records
        self.eval_prompts = [self.sampler.encode(r["prompt"]) for r in eval_records]
        self.eval_golds = [r["gold"] for r in eval_records]
        self.evaluation = evaluation
        if evaluation is not None and hasattr(evaluation, "setup"):
            evaluation.setup(self)          # with the initial policy, before a Learner takes it
        self.logger = logger_lib.MetricsLogger(config.workdir, is_main=self.is_main,
                                               wandb=logger_lib.wandb_settings(config))
        if self.is_main:
            # What `python -m offpolicy_jax.export` needs to rebuild the policy from a checkpoint.
            export_lib.write_run_config(config.workdir, config, self.model_dir)
        self.checkpointer = checkpoint_lib.Checkpointer(os.path.join(config.workdir,
                                                                     "checkpoints"))
        self.bar = None

    def evaluate(self, params) -> dict:
        """Held-out pass@1 (mean over ``eval_samples`` samples per prompt) with its standard
        error over the prompts (``eval/pass@1_se``: the per-prompt accuracies' standard deviation
        / √prompts) and pass@eval_samples, with the same code as
        ``python -m offpolicy_jax.eval``."""
        config = self.config
        result = runner.evaluate_prompts(
            self.cfg, params, self.tokenizer, self.eval_prompts, self.eval_golds,
            num_samples=config.eval_samples, ks=tuple(sorted({1, config.eval_samples})),
            max_new_tokens=config.max_new_tokens, temperature=config.eval_temperature,
            seed=config.seed + 1, eos_token_ids=self.sampler.eos_ids,
            pad_token_id=self.sampler.pad_id, pool=self.pool, mesh=self.mesh)
        per_prompt = np.mean(result.correct, axis=1)
        standard_error = (float(np.std(per_prompt, ddof=1) / np.sqrt(len(per_prompt)))
                          if len(per_prompt) > 1 else 0.0)
        metrics = {"eval/pass@1_se": standard_error,
                   **{f"eval/{k}": v for k, v in result.metrics.items()
                      if k.startswith(("pass@", "maj@", "mean_length", "no_answer"))}}
        if self.evaluation is not None:
            metrics.update({f"eval/{k}": v
                            for k, v in self.evaluation(self, params, result).items()})
        return metrics

    def finished(self, meta: dict) -> bool:
        """After ``--iterations`` iterations, or once the fresh rollouts reach
        ``--rollout_budget`` (when set): the run's last iteration is the first that does."""
        budget = self.config.rollout_budget
        return meta["iteration"] >= self.config.iterations or bool(
            budget and meta["rollouts"] >= budget)

    def evaluation_due(self, meta: dict, rollouts_before: int) -> bool:
        """The last iteration always, every ``--eval_every`` iterations, and at the iteration
        whose fresh rollouts cross a multiple of ``--eval_every_rollouts``."""
        every, every_rollouts = self.config.eval_every, self.config.eval_every_rollouts
        return self.finished(meta) or bool(every and meta["iteration"] % every == 0) or bool(
            every_rollouts and meta["rollouts"] // every_rollouts
            > rollouts_before // every_rollouts)

    def checkpoint_due(self, meta: dict) -> bool:
        return meta["iteration"] % self.config.ckpt_every == 0 or self.finished(meta)

    def start(self, meta: dict, params) -> dict:
        """A new run's meta: evaluates the starting policy and logs it as iteration 0."""
        meta.update(iteration=0, rollouts=0, eval_before=self.evaluate(params))
        self.logger.write(0, meta["eval_before"])
        return meta

    def resumed(self, meta: dict) -> dict:
        """Drops metrics logged after the restored checkpoint; returns ``meta``."""
        self.logger.truncate_after(meta["iteration"])
        return meta

    def log(self, record: dict, meta: dict) -> None:
        """Writes the record of iteration ``meta["iteration"]`` and advances the progress bar."""
        iteration = meta["iteration"]
        if self.finished(meta):
            meta["eval_after"] = {k: v for k, v in record.items() if k.startswith("eval/")}
        self.logger.write(iteration, record)
        if self.bar is None:
            self.bar = tqdm.tqdm(total=self.config.iterations, initial=iteration - 1,
                                 desc=self.name, dynamic_ncols=True,
                                 disable=not (self.is_main and self.config.progress))
        shown = {"reward": "reward_mean", "loss": "train/loss", "len": "response_length"}
        self.bar.set_postfix({label: f"{record[key]:.3f}" for label, key in shown.items()
                              if isinstance(record.get(key), float)})
        self.bar.update(1)

    def finish(self, meta: dict, **extra) -> dict:
        """Closes everything and prints (and writes) the one-line JSON summary."""
        if self.bar is not None:
            self.bar.close()
        self.pool.close()
        self.checkpointer.close()
        self.logger.close()
        k = self.config.eval_samples
        summary = {
            "algorithm": self.name,
            "iterations": meta["iteration"],
            "rollouts": meta["rollouts"],
            "pass@1_before": meta["eval_before"]["eval/pass@1"],
            "pass@1_after": meta["eval_after"]["eval/pass@1"],
            f"pass@{k}_before": meta["eval_before"].get(f"eval/pass@{k}"),
            f"pass@{k}_after": meta["eval_after"].get(f"eval/pass@{k}"),
            **{f"{key}_{when}": meta[f"eval_{when}"].get(f"eval/{key}")
               for key in getattr(self.evaluation, "summary_keys", ())
               for when in ("before", "after")},
            **extra,
            "workdir": self.config.workdir,
            "wall_s": time.time() - self.start_time,
        }
        if self.is_main:
            with open(os.path.join(self.config.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        logger_lib.print_summary(summary, is_main=self.is_main)
        return summary


# ---------------------------------------------------------------------------------------------
# The RL learner: state, jitted functions, stored policies, rollout pipeline.


def make_forward_fn(cfg, algorithm: Algorithm, outputs: tuple[str, ...], temperature: float,
                    num_shards: int = 1):
    """Jitted no-gradient forward outputs (``logp``, ``vocab_mean``, ``values``, ``entropy``) of a
    batch's model inputs (padded or segment-packed, ``rollout.policy_outputs``) under some
    parameters (the old policy, a stored policy); ``num_response`` (R, static) is the batch's
    response width, ``num_shards`` its split over the mesh's batch axes."""

    @functools.partial(jax.jit, static_argnames="num_response")
    def forward(params, batch, num_response):
        out = rollout.policy_outputs(
            cfg, params, batch, num_response=num_response, num_shards=num_shards,
            temperature=temperature,
            with_vocab_mean="vocab_mean" in outputs, with_entropy="entropy" in outputs,
            with_hidden="values" in outputs)
        if "values" in outputs:
            out["values"] = algorithm.value_head.apply(params, out.pop("hidden"))
        return {name: out[name] for name in outputs}

    return forward


def make_loss_fn(cfg, algorithm: Algorithm, config: RunConfig, *, old_from_current=False,
                 num_shards: int = 1):
    """``(params, batch, rng, iteration) -> (loss, metrics)``: the current policy's forward
    outputs, then the algorithm's loss; adds the mean response entropy to the metrics.

    ``old_from_current``: the batch makes a single update, so the old policy's outputs
    (``old_logp``, ...) are the current ones under stop-gradient, taken from this forward.
    ``num_shards``: the batch's split over the mesh's batch axes (a segment-packed batch is
    packed per shard)."""
    old_outputs = algorithm.outputs("old") if old_from_current else ()
    outputs = tuple(o for o in algorithm_lib.OUTPUTS
                    if o in algorithm.outputs("current") or o in old_outputs)
    remat = remat_policy(config.remat)

    def loss_fn(params, batch, rng, iteration):
        current = rollout.policy_outputs(
            cfg, params, batch, num_response=batch["mask"].shape[1], num_shards=num_shards,
            temperature=config.temperature,
            with_vocab_mean="vocab_mean" in outputs, with_entropy=True,
            with_hidden="values" in outputs, remat=remat)
        if "correction_weights" in batch:
            # --rollout_correction: every per-token term's gradient weighted by w_t, the loss
            # value unchanged (losses.corrections).
            current = correct_gradients(current, batch["correction_weights"])
        inputs = dict(batch, logp=current["logp"])
        if "vocab_mean" in outputs:
            inputs["vocab_mean"] = current["vocab_mean"]
        if "entropy" in outputs:
            inputs["entropy"] = current["entropy"]
        if "values" in outputs:
            inputs["values"] = algorithm.value_head.apply(params, current["hidden"])
        for name in old_outputs:
            inputs[algorithm_lib.input_name("old", name)] = jax.lax.stop_gradient(
                inputs["logp"] if name == "logp" else inputs[name])
        info = StepInfo(iteration=iteration, rng=rng, group_size=config.group_size,
                        seed=config.seed, max_new_tokens=config.max_new_tokens)
        loss, metrics = algorithm.loss(inputs, info)
        mask = batch["mask"]
        metrics = dict(metrics)
        metrics["entropy"] = jnp.sum(jax.lax.stop_gradient(current["entropy"]) * mask) / \
            jnp.maximum(jnp.sum(mask), 1.0)
        return loss, metrics

    return loss_fn


def old_outputs_in_update(algorithm: Algorithm, config: RunConfig) -> bool:
    """Whether the old policy's outputs come from the update's own forward pass.

    With one optimizer update per batch (``--num_passes`` x ``--num_minibatches`` = 1) the old
    policy is the current one until that update is applied, so its outputs are the current
    outputs under stop-gradient: the separate forward over the batch is redundant (TRL's GRPO
    skips it the same way). It is still needed when ``prepare`` reads them
    (``Algorithm.prepare_reads``) or the rollout correction compares them with the sampler's.
    """
    return ("old" in algorithm.forward and config.num_passes * config.num_minibatches == 1
            and config.rollout_correction == "none"
            and not any(name.startswith("old_") for name in algorithm.prepare_reads))


def correct_gradients(current: dict, weights) -> dict:
    """The current policy's per-token outputs with their gradients scaled by the rollout
    correction's weights; the critic's hidden states are left alone."""
    return {name: (losses.scale_gradient(value, weights)
                   if name in ("logp", "vocab_mean", "entropy") else value)
            for name, value in current.items()}


def add_value_head(algorithm: Algorithm, cfg, params, param_specs, mesh, *, seed: int):
    """The policy's parameters plus the value head's entries, replicated on the mesh."""
    extra = algorithm.value_head.init(cfg, jax.random.PRNGKey(seed))
    clash = sorted(set(extra) & set(params))
    if clash:
        raise ValueError(f"{algorithm.name}: value head entries {clash} clash with the model's "
                         f"parameter names")
    replicated = jax.sharding.PartitionSpec()
    extra = jax.device_put(extra, jax.sharding.NamedSharding(mesh, replicated))
    return {**params, **extra}, {**param_specs, **jax.tree.map(lambda _: replicated, extra)}


class Learner:
    """An RL method's training side, built on a :class:`Session`.

    Holds the train state (parameters, optimizer state, RNG, skip counters), the jitted train step
    and forward functions, the stored policies and the rollout pipeline. Batches are host numpy,
    identical on every process; each process places only its devices' rows (a multi-process jit
    refuses numpy inputs) and reads forward outputs back whole.

    A loop of several stages (``experiments/veripo.py``: GRPO, then DPO, repeated) keeps one
    learner per stage, each with its own ``config`` (batch size, learning rate), and hands the
    policy from one to the next: ``params = a.suspend()`` drops ``a``'s train state,
    ``b.start_from(params, iteration)`` gives ``b`` a fresh optimizer state and restarts its
    stored policies there (a stage's reference is the policy it starts from).

    Args:
      session: the run's session.
      algorithm: the method.
      config: this learner's settings; default the session's.
    """

    def __init__(self, session: Session, algorithm: Algorithm, config: RunConfig | None = None):
        config, mesh, cfg = config or session.config, session.mesh, session.cfg
        self.session, self.algorithm, self.config = session, algorithm, config
        params = models.shard_params(session.params, mesh)
        # With the mesh: a dimension its axes do not divide (2 key/value heads on tensor=4) is
        # replicated, as shard_params placed it.
        param_specs = models.partition_specs(session.params, mesh)
        if algorithm.value_head is not None:
            params, param_specs = add_value_head(algorithm, cfg, params, param_specs, mesh,
                                                 seed=config.seed)
        # LoRA: the state's params become the adapters (plus any value head); the base weights
        # are a frozen input of the step, merged in wherever the policy runs (policy_params).
        self.adapted = None
        if config.lora:
            self.adapted, params, param_specs = lora_lib.AdaptedModel.for_run(
                cfg, params, param_specs, mesh, rank=config.lora_rank, alpha=config.lora_alpha,
                targets=lora_lib.parse_targets(config.lora_targets), init=config.lora_init,
                seed=config.seed)
        self.policies = policies.PolicyStore(algorithm.policies, params)
        opt_config = optim.OptimizerConfig(name=config.optimizer,
                                           learning_rate=config.learning_rate,
                                           grad_clip=config.grad_clip)
        self.optimizer = optim.make_optimizer(opt_config)
        state = state_lib.create_train_state(params, self.optimizer, rng=config.seed)
        self.state_sharding = step_lib.state_shardings(state, param_specs, mesh)
        self.state = jax.device_put(state, self.state_sharding)
        self.old_in_update = old_outputs_in_update(algorithm, config)
        self.num_shards = math.prod(mesh.shape[axis] for axis in step_lib.BATCH_AXES)
        self.train_step = step_lib.make_train_step(
            make_loss_fn(cfg, algorithm, config, old_from_current=self.old_in_update,
                         num_shards=self.num_shards),
            self.optimizer, num_microbatches=config.num_microbatches, mesh=mesh,
            state_sharding=self.state_sharding,
            learning_rate_fn=optim.make_schedule(opt_config),
            params_fn=self.adapted and self.adapted.params_fn,
            frozen_sharding=self.adapted and self.adapted.base_sharding)
        self.batch_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(step_lib.BATCH_AXES))
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # One jitted forward per set of outputs: the old and the stored policies share it (one
        # compile each instead of one per policy).
        by_outputs, self.forward = {}, {}
        for policy in ("old", *(p.name for p in algorithm.policies)):
            outputs = () if policy == "old" and self.old_in_update else algorithm.outputs(policy)
            if policy == "old" and config.rollout_correction != "none" and "logp" not in outputs:
                # The correction compares the trainer's policy with the sampler's.
                outputs = ("logp", *outputs)
            if outputs and outputs not in by_outputs:
                by_outputs[outputs] = make_forward_fn(cfg, algorithm, outputs, config.temperature,
                                                      self.num_shards)
            if outputs:
                self.forward[policy] = by_outputs[outputs]
        self.pipeline = stages.RolloutPipeline(session.selection, session.sampler,
                                               algorithm.stages, config=config)
        # --rollout_lag=k: the sampler's policy is a stored copy k iterations behind.
        self.sampling_policy = policies.PolicyStore(
            (policies.behind("sampler", config.rollout_lag),) if config.rollout_lag else (),
            params)
        self.correction_metrics = {}
        self.token_fractions = {}   # of the last batch's forward inputs (model_inputs)
        self.response_width = config.max_new_tokens   # of the last batch (Learner.prepare)
        self.guard = step_lib.NonFiniteGuard(config.max_nonfinite_steps)

    # -- stages of a multi-stage loop ------------------------------------------------------------

    def suspend(self):
        """Hands the policy over: returns the trainable parameters and drops the train state
        (and with it the optimizer state) until :meth:`start_from`."""
        params, self.state = self.state.params, None
        return params

    def start_from(self, params, iteration: int) -> None:
        """Continues from ``params`` (another learner's, see :meth:`suspend`) at the start of
        ``iteration``: a fresh optimizer state, and every stored policy restarted at ``params``."""
        state = state_lib.create_train_state(params, self.optimizer, rng=self.config.seed)
        self.state = jax.device_put(state, self.state_sharding)
        self.policies.restart(params, iteration)

    # -- one iteration ---------------------------------------------------------------------------

    def iteration(self, iteration: int) -> dict:
        """Collect → prepare → update; returns the iteration's metrics record."""
        t0, reward_seconds = time.time(), self.session.sampler.reward_seconds
        params, version = self.sampling_params(iteration)
        rollouts = self.pipeline.collect(params, iteration, policy_version=version)
        t_rollout = time.time()
        batch = self.prepare(rollouts, iteration)
        t_prepare = time.time()
        step_metrics = self.update(batch, iteration)
        t_update = time.time()
        self.policies.after_updates(iteration, self.state.params)
        record = self.metrics(rollouts, step_metrics, iteration)
        record.update({
            "rollout_s": t_rollout - t0, "prepare_s": t_prepare - t_rollout,
            # The verifier's part of rollout_s (decoding the responses included).
            "reward_s": self.session.sampler.reward_seconds - reward_seconds,
            "update_s": t_update - t_prepare,
            "step_s": time.time() - t0,
            "tokens_per_s": float(np.sum(rollouts.lengths) * self.config.num_passes)
            / max(t_update - t_prepare, 1e-9),
        })
        return record

    def sampling_params(self, iteration: int):
        """``(params, policy version)`` iteration ``iteration`` samples from: the current policy,
        or with ``--rollout_lag=k`` the policy at the start of iteration ``iteration − k`` (the
        initial policy, version 0, while that is before iteration 1); with LoRA, merged afresh
        from those adapters (no cached merged copy that could go stale: sampling from the base
        weights is a silent failure known from other stacks)."""
        if not self.sampling_policy:
            return self.merged_policy(), iteration - 1
        stale = self.sampling_policy.for_iteration(iteration, self.state.params)["sampler"]
        return self.merged_policy(stale), max(iteration - 1 - self.config.rollout_lag, 0)

    def prepare(self, rollouts: Rollouts, iteration: int) -> dict:
        """The training batch: packed rows, the old and stored policies' forward outputs, and the
        algorithm's targets, all host numpy ``[N, ...]``."""
        # Trained at the width of the longest response (bucketed), not the sampling budget.
        width = rollout.response_bucket(int(np.max(rollouts.lengths)),
                                        self.config.max_new_tokens)
        self.response_width = width
        packed = rollout.pack_sequences(rollouts.prompts(), rollouts.tokens[:, :width],
                                        rollouts.lengths, pad_id=self.session.sampler.pad_id)
        batch = packed.model_inputs()
        batch.update(behaviour_logp=rollouts.behaviour_logp[:, :width], rewards=rollouts.rewards,
                     group_index=rollouts.group_index, policy_version=rollouts.policy_version,
                     task=rollouts.task)
        # Before any update: the old policy is the current one; stored policies as of now.
        scored_with = {"old": self.state.params,
                       **self.policies.for_iteration(iteration, self.state.params)}
        placed = self.forward and distributed.host_to_global(
            self.model_inputs(batch, num_microbatches=1), self.batch_sharding)
        for policy, forward in self.forward.items():
            outputs = distributed.to_host(forward(self.policy_params(scored_with[policy]),
                                                  placed, num_response=width))
            batch.update({algorithm_lib.input_name(policy, k): np.asarray(v)
                          for k, v in outputs.items()})
        if self.config.rollout_correction != "none":
            weights, diagnostics = losses.rollout_correction(
                batch["old_logp"], batch["behaviour_logp"], batch["mask"],
                self.config.rollout_correction, low=self.config.correction_low,
                high=self.config.correction_high)
            batch["correction_weights"] = np.asarray(weights)
            self.correction_metrics = {f"correction/{k}": float(v)
                                       for k, v in diagnostics.items()}
        if self.algorithm.prepare is not None:
            info = StepInfo(iteration=iteration, group_size=self.config.group_size,
                            seed=self.config.seed, max_new_tokens=self.config.max_new_tokens,
                            rng=jax.random.fold_in(jax.random.PRNGKey(self.config.seed),
                                                   iteration))
            withheld = ({algorithm_lib.input_name("old", o) for o in self.algorithm.outputs("old")}
                        if self.old_in_update else set())
            targets = self.algorithm.prepare(PrepareInputs(batch, withheld,
                                                           self.algorithm.name), info)
            batch.update({k: np.asarray(v) for k, v in targets.items()})
        return batch

    def model_inputs(self, batch: dict, num_microbatches: int) -> dict:
        """The forward's inputs of ``batch``'s rows: segment-packed for a step of
        ``num_microbatches`` (``--pack_sequences``, ``rollout.pack_segments``) or the padded
        rows; records the share of the positions computed that are real tokens."""
        real = int(np.sum(batch["attention_mask"]))
        self.token_fractions = {"padded_token_fraction": real / batch["tokens"].size}
        if (not self.config.pack_sequences
                or batch["tokens"].shape[0] % (num_microbatches * self.num_shards)):
            # Packing needs every (microbatch, shard) group to hold whole rows; the padded rows
            # are resharded inside the step instead.
            return {k: batch[k] for k in rollout.PADDED_KEYS}
        packed = rollout.pack_segments(batch["tokens"], batch["attention_mask"],
                                       batch["mask"].shape[1], num_microbatches=num_microbatches,
                                       num_shards=self.num_shards)
        self.token_fractions["packed_token_fraction"] = real / packed["segment_tokens"].size
        return packed

    def update(self, batch: dict, iteration: int) -> list[dict]:
        """``--num_passes`` passes over the batch, each split into ``--num_minibatches``
        optimizer updates (rows of one unit stay together); returns each update's metrics."""
        config = self.config
        num_rows = batch["tokens"].shape[0]
        context = distributed.host_to_global(np.int32(iteration), self.replicated)
        step_metrics = []
        for epoch in range(config.num_passes):
            rng = np.random.default_rng([config.seed, iteration, epoch])
            for rows in algorithm_lib.minibatches(num_rows, config.num_minibatches,
                                                  self.algorithm.minibatch_unit,
                                                  config.group_size, rng):
                if self.algorithm.minibatch_unit != "row" and config.num_microbatches > 1:
                    # The step's microbatch m takes rows m, m + M, ... (train_step); order the
                    # rows so that each microbatch is a contiguous run of whole units.
                    rows = rows.reshape(config.num_microbatches, -1).T.reshape(-1)
                minibatch = {k: np.asarray(v)[rows] for k, v in batch.items()}
                inputs = self.model_inputs(minibatch, config.num_microbatches)
                minibatch = {**{k: v for k, v in minibatch.items()
                                if k not in rollout.PADDED_KEYS}, **inputs}
                frozen = () if self.adapted is None else (self.adapted.base,)
                self.state, metrics = self.train_step(
                    self.state, distributed.host_to_global(minibatch, self.batch_sharding),
                    context, *frozen)
                self.guard.check(self.state, metrics)
                step_metrics.append(metrics)
        return jax.device_get(step_metrics)

    def metrics(self, rollouts: Rollouts, step_metrics: list[dict], iteration: int) -> dict:
        record = {f"train/{k}": float(np.mean([m[k] for m in step_metrics]))
                  for k in step_metrics[-1]}
        staleness = (iteration - 1) - rollouts.policy_version
        record.update({
            "reward_mean": float(np.mean(rollouts.rewards)),
            "response_length": float(np.mean(rollouts.lengths)),
            # What the update's forward passes compute: the batch's response width, and the
            # share of those positions that are real tokens (the rest is padding).
            "response_width": self.response_width,
            "useful_token_fraction": float(np.sum(rollouts.lengths))
            / (len(rollouts.lengths) * self.response_width),
            **self.token_fractions,
            "rollouts": self.session.sampler.generated,
            "staleness_mean": float(np.mean(staleness)),
            "staleness_max": int(np.max(staleness)),
            "stale_fraction": float(np.mean(staleness > 0)),
            "skipped_steps": self.skipped_steps,
            **self.correction_metrics,
            **task_metrics(rollouts),
            **self.pipeline.metrics(),
        })
        if self.algorithm.minibatch_unit != "pair":
            # Rows of a pair batch are not groups (a pair's rewards differ by construction).
            record["zero_gradient_group_fraction"] = zero_gradient_group_fraction(
                rollouts.rewards, self.config.group_size)
        return record

    def policy_params(self, trainable=None):
        """The decoder's parameters of the policy whose trainable part is ``trainable`` (default:
        the train state's): the state's params themselves, or the base with the adapters
        attached."""
        trainable = self.state.params if trainable is None else trainable
        return trainable if self.adapted is None else self.adapted.attached(trainable)

    def merged_policy(self, trainable=None):
        """The policy for the sampler and evaluation whose trainable part is ``trainable``
        (default: the train state's): those parameters, or with LoRA the base with the adapters
        merged in at this call (the sampler refuses attached, unmerged factors)."""
        trainable = self.state.params if trainable is None else trainable
        return trainable if self.adapted is None else self.adapted.merged(trainable)

    def export(self, out_dir: str) -> None:
        """Writes the current policy as a Hugging Face checkpoint (and, for LoRA, the PEFT
        adapter in ``out_dir/adapter``); every process gathers, process 0 writes."""
        session = self.session
        export_lib.export_policy(
            out_dir, session.cfg, self.state.params, session.model_dir,
            adapted=self.adapted, is_main=session.is_main)

    @property
    def skipped_steps(self) -> int:
        return int(np.asarray(self.state.skipped_steps))

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, meta: dict) -> None:
        """Everything to continue exactly here: train state, rollout pipeline, stored policies."""
        meta = dict(meta, rollouts=self.session.sampler.generated)
        meta["pipeline"], pipeline_arrays = self.pipeline.state_dict()
        meta["policies"], policy_arrays = self.policies.state_dict()
        meta["sampling_policy"], sampling_arrays = self.sampling_policy.state_dict()
        arrays = {**{f"rollouts/{k}": v for k, v in pipeline_arrays.items()},
                  **{f"policies/{k}": v for k, v in policy_arrays.items()},
                  **{f"sampling_policy/{k}": v for k, v in sampling_arrays.items()}}
        self.session.checkpointer.save(meta["iteration"], self.state, meta, arrays)

    def restore_or_start(self) -> dict:
        """The meta of the latest checkpoint (state, pipeline and stored policies restored), or a
        new run's (after evaluating the starting policy)."""
        latest = self.session.checkpointer.latest_step()
        if latest is None:
            return self.session.start({}, self.merged_policy())
        self.state, meta, arrays = self.session.checkpointer.restore(
            latest, checkpoint_lib.abstract_like(self.state))
        self.pipeline.load_state_dict(meta["pipeline"],
                                      checkpoint_lib.with_prefix(arrays, "rollouts/"))
        self.policies.load_state_dict(meta["policies"],
                                      checkpoint_lib.with_prefix(arrays, "policies/"))
        # Checkpoints from before --rollout_lag existed have no sampling policy (and no lag).
        saved_lag = len(meta.get("sampling_policy", {}).get("sampler", ()))
        if saved_lag != self.config.rollout_lag:
            raise ValueError(f"{self.session.checkpointer.directory}: the run was started with "
                             f"--rollout_lag={saved_lag}; resume it with the same value, not "
                             f"{self.config.rollout_lag}")
        self.sampling_policy.load_state_dict(meta.get("sampling_policy", {}),
                                             checkpoint_lib.with_prefix(arrays, "sampling_policy/"))
        return self.session.resumed(meta)


class PrepareInputs(dict):
    """The batch as ``prepare`` sees it: reading an old-policy output that this run leaves to
    the update's own forward (``withheld``) is an error naming the fix, not a silent None."""

    def __init__(self, batch: dict, withheld: set, algorithm_name: str):
        super().__init__(batch)
        self.withheld, self.algorithm_name = withheld, algorithm_name

    def _refuse(self, key):
        raise KeyError(f"{self.algorithm_name}: prepare read {key!r}, which a single-update run "
                       f"computes inside the update; declare it in Algorithm.prepare_reads")

    def __getitem__(self, key):
        if key in self.withheld:
            self._refuse(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self.withheld:
            self._refuse(key)
        return super().get(key, default)


def task_metrics(rollouts: Rollouts) -> dict:
    """Per task, when the batch holds another task than solving (RISE's verifications):
    ``<task>/reward_mean``, ``<task>/response_length``, ``<task>/rows`` and ``<task>/share`` (of
    the batch's rows), each over that task's rows only; ``{}`` for a batch of solutions."""
    if not np.any(rollouts.task != batch_lib.SOLVE):
        return {}
    out = {}
    for task, name in enumerate(batch_lib.TASKS):
        rows = rollouts.task == task
        count = int(rows.sum())
        out.update({f"{name}/rows": count, f"{name}/share": count / rollouts.num_rows,
                    f"{name}/reward_mean": float(rollouts.rewards[rows].mean()) if count else None,
                    f"{name}/response_length": float(rollouts.lengths[rows].mean())
                    if count else None})
    return out


def zero_gradient_group_fraction(rewards: np.ndarray, group_size: int) -> float:
    """The share of groups whose rewards are all equal: a group-relative advantage is 0 on all
    of their responses (what prompt selection and dynamic sampling try to avoid)."""
    grouped = np.asarray(rewards).reshape(-1, group_size)
    return float(np.mean(grouped.max(axis=1) == grouped.min(axis=1)))
