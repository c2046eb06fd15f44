"""The RL loop: prompts -> rollouts -> rewards -> advantages -> updates -> eval -> checkpoint.

``run(config, algorithm)`` is the whole engine and reads top to bottom. Everything that decides a
run's numbers is a function of (config, seed, step), so a run killed at any point and restarted with
the same ``--workdir`` continues from its last checkpoint and ends with the same parameters and the
same logged metrics as a run that was never interrupted.
"""

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging as absl_logging

from offpolicy_jax import distributed, models, rewards, sampling
from offpolicy_jax.eval import runner
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import logger as logger_lib
from offpolicy_jax.training import optim, rollout, state as state_lib, step as step_lib
from offpolicy_jax.training.algorithm import Algorithm


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The shared run settings (one field per shared flag; see ``training.flags``)."""

    workdir: str
    model: str = "tiny-arith"
    dataset: str = "arith"
    prompt_field: str = "question"
    answer_field: str = "answer"
    steps: int = 40
    seed: int = 0
    mesh: str = "1,-1,1"
    batch_size: int = 16
    group_size: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    learning_rate: float = 1e-6
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    num_microbatches: int = 1
    eval_every: int = 0
    eval_size: int = 64
    eval_samples: int = 8
    eval_temperature: float = 1.0
    ckpt_every: int = 10
    max_nonfinite_steps: int = 5
    dtype: str = "float32"
    remat: str = rollout.DEFAULT_REMAT
    progress: bool = True

    def validate(self, algorithm: Algorithm) -> None:
        """Fails fast, naming the flag, on settings that cannot work together."""
        checks = [
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.group_size >= 1, f"--group_size must be >= 1, got {self.group_size}"),
            (not (algorithm.needs_groups and self.group_size < 2),
             f"--group_size={self.group_size}: {algorithm.name} normalises advantages within a "
             f"group of responses to the same prompt, which needs --group_size >= 2"),
            (self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--temperature must be > 0 for RL rollouts (the behaviour "
             f"log-probs are log softmax(z/T)), got {self.temperature}"),
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (self.eval_every >= 0, f"--eval_every must be >= 0, got {self.eval_every}"),
            (self.ckpt_every >= 1, f"--ckpt_every must be >= 1, got {self.ckpt_every}"),
            (self.eval_samples >= 1, f"--eval_samples must be >= 1, got {self.eval_samples}"),
            ((self.batch_size * self.group_size) % (algorithm.num_minibatches
                                                     * self.num_microbatches) == 0,
             f"--batch_size x --group_size = {self.batch_size * self.group_size} responses must "
             f"divide into {algorithm.num_minibatches} minibatches x --num_microbatches="
             f"{self.num_microbatches}"),
            (self.dtype in ("float32", "bfloat16"),
             f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
            (self.remat in ("none", "full") or hasattr(jax.checkpoint_policies, self.remat),
             f"--remat must be 'none', 'full' or a jax.checkpoint_policies name, got "
             f"{self.remat!r}"),
            (algorithm.reset_reference_after is None or algorithm.needs_reference,
             f"{algorithm.name}: reset_reference_after needs needs_reference=True"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# Setup helpers: model, data, jitted functions.


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


def make_log_prob_fn(cfg, algorithm: Algorithm, temperature: float, num_response: int):
    """Jitted no-grad log-probs of a packed batch under some params (old and reference policy)."""

    @jax.jit
    def log_probs(params, batch):
        out = rollout.response_log_probs(
            cfg, params, batch["tokens"], batch["attention_mask"], batch["positions"],
            num_response=num_response, temperature=temperature,
            with_vocab_mean=algorithm.needs_vocab_mean,
            with_hidden=algorithm.value_fn is not None)
        if algorithm.value_fn is not None:
            out["values"] = algorithm.value_fn(params, out.pop("hidden"))
        return out

    return log_probs


def on_host_batches(log_probs_fn, batch_sharding):
    """``log_probs_fn(params, batch)`` for a host (numpy) batch that is the same on every process:
    the batch is placed with ``batch_sharding`` and the outputs come back as numpy."""

    def log_probs(params, batch):
        placed = distributed.host_to_global(batch, batch_sharding)
        return distributed.to_host(log_probs_fn(params, placed))

    return log_probs


def remat_policy(name: str) -> bool | str:
    """``--remat`` to ``models.apply_hidden``'s ``remat``: 'none', 'full' or a policy name."""
    return {"none": False, "full": True}.get(name, name)


def make_loss_fn(cfg, algorithm: Algorithm, temperature: float, num_response: int, *,
                 remat: bool | str = False):
    """``(params, batch, rng) -> (loss, metrics)``: the policy's log-probs, then the algorithm."""

    def loss_fn(params, batch, rng):
        del rng
        current = rollout.response_log_probs(
            cfg, params, batch["tokens"], batch["attention_mask"], batch["positions"],
            num_response=num_response, temperature=temperature,
            with_vocab_mean=algorithm.needs_vocab_mean, with_entropy=True,
            with_hidden=algorithm.value_fn is not None, remat=remat)
        inputs = dict(batch)
        inputs["logp"] = current["logp"]
        if algorithm.needs_vocab_mean:
            inputs["vocab_mean"] = current["vocab_mean"]
        if algorithm.value_fn is not None:
            inputs["values"] = algorithm.value_fn(params, current["hidden"])
        loss, metrics = algorithm.loss(inputs)
        mask = batch["mask"]
        metrics = dict(metrics)
        metrics["entropy"] = jnp.sum(jax.lax.stop_gradient(current["entropy"]) * mask) / \
            jnp.maximum(jnp.sum(mask), 1.0)
        return loss, metrics

    return loss_fn


def evaluate(cfg, params, tokenizer, eval_prompts, eval_golds, config: RunConfig, pool, *,
             seed: int, mesh=None) -> dict:
    """Held-out pass@1 (mean over ``eval_samples`` samples per prompt) and pass@eval_samples."""
    ks = tuple(sorted({1, config.eval_samples}))
    result = runner.evaluate_prompts(
        cfg, params, tokenizer, eval_prompts, eval_golds, num_samples=config.eval_samples, ks=ks,
        max_new_tokens=config.max_new_tokens, temperature=config.eval_temperature,
        seed=seed, eos_token_ids=eos_ids(tokenizer), pad_token_id=pad_id(tokenizer), pool=pool,
        mesh=mesh)
    return {f"eval/{k}": v for k, v in result.metrics.items()
            if k.startswith(("pass@", "maj@", "mean_length", "no_answer"))}


def add_extra_params(algorithm: Algorithm, cfg, params, param_specs, mesh, *, seed: int):
    """The policy's parameters plus ``algorithm.extra_params`` (e.g. a value head), replicated."""
    extra = algorithm.extra_params(cfg, jax.random.PRNGKey(seed))
    clash = sorted(set(extra) & set(params))
    if clash:
        raise ValueError(f"{algorithm.name}: extra_params {clash} clash with the model's "
                         f"parameter names")
    replicated = jax.sharding.PartitionSpec()
    extra = jax.device_put(extra, jax.sharding.NamedSharding(mesh, replicated))
    return {**params, **extra}, {**param_specs, **jax.tree.map(lambda _: replicated, extra)}


# Extra copies of the policy a run may keep (ReMix: the previous iteration's policy, and the KL
# anchor after reincarnation) travel in the checkpoint's arrays under this prefix.
POLICY_COPY_PREFIX = "policy_copy/"


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def policy_copies_to_arrays(copies: dict) -> dict:
    """``{name: params or None}`` -> flat ``{"policy_copy/<name>/<param path>": numpy array}``."""
    arrays = {}
    for name, params in copies.items():
        if params is None:
            continue
        # to_host: with several processes the shards live on other hosts' devices too.
        for path, leaf in jax.tree_util.tree_flatten_with_path(distributed.to_host(params))[0]:
            arrays[f"{POLICY_COPY_PREFIX}{name}/{_path_name(path)}"] = np.asarray(leaf)
    return arrays


def split_policy_copies(arrays: dict, like) -> tuple[dict, dict]:
    """``(copies, other arrays)``: the saved policy copies rebuilt with ``like``'s structure and
    shardings, and the remaining (rollout-source) arrays."""
    others = {k: v for k, v in arrays.items() if not k.startswith(POLICY_COPY_PREFIX)}
    names = {k[len(POLICY_COPY_PREFIX):].split("/", 1)[0] for k in arrays
             if k.startswith(POLICY_COPY_PREFIX)}
    copies = {}
    for name in sorted(names):
        def restore(path, leaf, name=name):
            key = f"{POLICY_COPY_PREFIX}{name}/{_path_name(path)}"
            if key not in arrays:
                raise ValueError(f"checkpoint policy copy {name!r} lacks {key}")
            # Every process holds the whole array; each places only its own devices' shards.
            return distributed.host_to_global(np.asarray(arrays[key], leaf.dtype), leaf.sharding)
        copies[name] = jax.tree_util.tree_map_with_path(restore, like)
    return copies, others


# ---------------------------------------------------------------------------------------------
# Rollout sources: where each iteration's training samples come from.
#
# A rollout batch is a dict of numpy arrays, rows grouped contiguously by prompt (group_size rows
# per prompt): prompt_tokens [N, P] (left-aligned, padded) and prompt_lengths [N]; tokens [N, R],
# lengths [N]; behaviour_logp [N, R] (the sampler's log-probs); rewards [N]; group_index [N];
# policy_version [N] (the iteration whose policy generated the row, 0 = initial policy).


def prompts_to_array(prompt_tokens: list[list[int]], pad_id: int):
    lengths = np.array([len(p) for p in prompt_tokens], np.int32)
    array = np.full((len(prompt_tokens), int(lengths.max())), pad_id, np.int32)
    for row, prompt in enumerate(prompt_tokens):
        array[row, :len(prompt)] = prompt
    return array, lengths


def array_to_prompts(array: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [array[row, :lengths[row]].tolist() for row in range(array.shape[0])]


@dataclasses.dataclass
class RolloutContext:
    """What a rollout source needs from the loop: the policy's sampler and the verifier."""

    cfg: object
    tokenizer: object
    config: RunConfig
    pool: object
    iterator: object
    mesh: object
    pad_id: int
    generated: int = 0    # responses sampled so far in this run (the "rollouts" budget)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sample_and_score(self, params, records: list[dict], seed_index: int,
                         policy_version: int) -> dict:
        """``group_size`` responses per record from ``params``, verified against its gold."""
        config = self.config
        prompt_tokens = [self.encode(r["prompt"]) for r in records]
        out = sampling.generate(
            self.cfg, params, prompt_tokens, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            eos_token_ids=eos_ids(self.tokenizer),
            seed=jax.random.fold_in(jax.random.PRNGKey(config.seed), seed_index),
            num_samples=config.group_size, mesh=self.mesh, pad_token_id=self.pad_id)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        prompt_index = np.asarray(out.prompt_index)
        self.generated += tokens.shape[0]
        # Every process holds all rows (generate gathers them); each verifies its own share and
        # the rewards are all-gathered, so all processes continue with identical host data.
        mine = distributed.process_rows(tokens.shape[0])
        responses = [self.tokenizer.decode(tokens[i, :lengths[i]].tolist(),
                                           skip_special_tokens=True)
                     for i in range(mine.start, mine.stop)]
        scored = rewards.score_batch(responses, [records[i]["gold"] for i in prompt_index[mine]],
                                     pool=self.pool)
        row_rewards = distributed.gather_rows(np.asarray(scored.rewards, np.float32),
                                              tokens.shape[0])
        prompt_array, prompt_lengths = prompts_to_array(
            [prompt_tokens[i] for i in prompt_index], self.pad_id)
        return {
            "prompt_tokens": prompt_array, "prompt_lengths": prompt_lengths,
            "tokens": tokens.astype(np.int32), "lengths": lengths.astype(np.int32),
            "behaviour_logp": np.asarray(out.logprobs, np.float32),
            "rewards": row_rewards,
            "group_index": prompt_index.astype(np.int32),
            "policy_version": np.full(tokens.shape[0], policy_version, np.int32),
        }


class OnlineRollouts:
    """Fresh samples from the current policy every iteration (on-policy at the first update)."""

    def collect(self, context: RolloutContext, params, iteration: int) -> dict:
        return context.sample_and_score(params, next(context.iterator), iteration,
                                        policy_version=iteration - 1)

    def state_dict(self) -> tuple[dict, dict]:
        return {}, {}

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        del meta, arrays


class OfflineRollouts:
    """One dataset sampled from the initial policy, then replayed in order (TOPR's offline setting).

    The dataset (``num_prompts`` prompts x group size responses with their behaviour log-probs) is
    drawn at the first iteration and saved in every checkpoint; each iteration takes the next
    ``batch_size`` groups, reshuffling the group order every epoch with the run's seed.
    """

    def __init__(self, num_prompts: int):
        if num_prompts < 1:
            raise ValueError(f"offline dataset needs num_prompts >= 1, got {num_prompts}")
        self.num_prompts = num_prompts
        self.dataset = None
        self.cursor = 0

    def _build(self, context: RolloutContext, params) -> None:
        parts, drawn = [], 0
        while drawn < self.num_prompts:
            records = next(context.iterator)[:self.num_prompts - drawn]
            # Seed indices far above any iteration number keep these draws independent of the
            # online ones (fold_in needs a non-negative index).
            parts.append(context.sample_and_score(params, records, seed_index=(1 << 30) + len(parts),
                                                  policy_version=0))
            drawn += len(records)
        width = max(p["prompt_tokens"].shape[1] for p in parts)
        for part in parts:
            pad = width - part["prompt_tokens"].shape[1]
            part["prompt_tokens"] = np.pad(part["prompt_tokens"], ((0, 0), (0, pad)),
                                           constant_values=context.pad_id)
        self.dataset = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def collect(self, context: RolloutContext, params, iteration: int) -> dict:
        if self.dataset is None:
            self._build(context, params)
        group_size = context.config.group_size
        num_groups = self.dataset["rewards"].shape[0] // group_size
        groups = []
        for _ in range(context.config.batch_size):
            epoch, position = divmod(self.cursor, num_groups)
            order = np.random.default_rng([context.config.seed, epoch]).permutation(num_groups)
            groups.append(order[position])
            self.cursor += 1
        rows = (np.asarray(groups)[:, None] * group_size + np.arange(group_size)[None, :]).ravel()
        return {k: v[rows] for k, v in self.dataset.items()}

    def state_dict(self) -> tuple[dict, dict]:
        arrays = {} if self.dataset is None else {f"offline/{k}": v
                                                  for k, v in self.dataset.items()}
        return {"cursor": self.cursor}, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        self.cursor = meta.get("cursor", 0)
        dataset = {k[len("offline/"):]: np.asarray(v) for k, v in arrays.items()
                   if k.startswith("offline/")}
        self.dataset = dataset or None


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config: RunConfig, algorithm: Algorithm, *, rollout_source=None) -> dict:
    """Runs (or resumes) an RL experiment and returns the final summary.

    Args:
      config: the shared run settings.
      algorithm: advantages and loss (see ``training.algorithm``).
      rollout_source: where samples come from: ``OnlineRollouts()`` (default), ``OfflineRollouts``,
        or a replay-aware source (ReMix, ARPO). Its state is saved in every checkpoint.
    """
    from offpolicy_jax.data import pipeline, prompts as prompts_lib

    # Join the other processes of a multi-process launch before anything touches a device.
    distributed.maybe_initialize()
    config.validate(algorithm)
    # orbax reports every save at INFO; the run's own metrics are the signal worth reading.
    absl_logging.set_verbosity(absl_logging.WARNING)
    start_time = time.time()
    is_main = jax.process_index() == 0
    os.makedirs(config.workdir, exist_ok=True)
    mesh = models.make_mesh(config.mesh)
    source = rollout_source or OnlineRollouts()

    # Policy, reference, tokenizer.
    cfg, params, tokenizer, model_dir = load_policy(config, mesh)
    param_specs = models.partition_specs(params)
    params = models.shard_params(params, mesh)
    if algorithm.extra_params is not None:
        params, param_specs = add_extra_params(algorithm, cfg, params, param_specs, mesh,
                                               seed=config.seed)
    # Copies, not aliases: the train step donates the state's parameter buffers.
    reference_params = jax.tree.map(jnp.copy, params) if algorithm.needs_reference else None
    previous_params = jax.tree.map(jnp.copy, params) if algorithm.needs_previous_policy else None

    # Prompts: a checkpointable iterator over training prompts, a fixed held-out set.
    train_records, eval_records = prompts_lib.load_train_and_eval(
        config.dataset, prompt_field=config.prompt_field, answer_field=config.answer_field,
        eval_size=config.eval_size, seed=config.seed, tokenizer=tokenizer)
    # One global prompt stream, the same on every process (not a per-process shard): generation
    # splits the batch over all devices anyway, and identical host data on every process keeps a
    # run's numbers, its checkpoints and its resume independent of the number of processes.
    iterator = pipeline.PromptIterator(train_records, config.batch_size, seed=config.seed,
                                       shard_index=0, shard_count=1)
    pool = rewards.VerifierPool()
    context = RolloutContext(cfg=cfg, tokenizer=tokenizer, config=config, pool=pool,
                             iterator=iterator, mesh=mesh, pad_id=pad_id(tokenizer))
    eval_prompts = [context.encode(r["prompt"]) for r in eval_records]
    eval_golds = [r["gold"] for r in eval_records]

    def held_out(params):
        return evaluate(cfg, params, tokenizer, eval_prompts, eval_golds, config, pool,
                        seed=config.seed + 1, mesh=mesh)

    # Optimizer, state, jitted functions.
    opt_config = optim.OptimizerConfig(name=config.optimizer, learning_rate=config.learning_rate,
                                       grad_clip=config.grad_clip)
    optimizer = optim.make_optimizer(opt_config)
    state = state_lib.create_train_state(params, optimizer, rng=config.seed)
    state_sharding = step_lib.state_shardings(state, param_specs, mesh)
    state = jax.device_put(state, state_sharding)
    num_response = config.max_new_tokens
    train_step = step_lib.make_train_step(
        make_loss_fn(cfg, algorithm, config.temperature, num_response,
                     remat=remat_policy(config.remat)), optimizer,
        num_microbatches=config.num_microbatches, mesh=mesh, state_sharding=state_sharding,
        learning_rate_fn=optim.make_schedule(opt_config))
    # Batches are host numpy, identical on every process; each process places only its devices'
    # rows (a multi-process jit refuses numpy inputs) and reads the log-probs back whole.
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(step_lib.BATCH_AXES))
    log_probs = on_host_batches(make_log_prob_fn(cfg, algorithm, config.temperature, num_response),
                                batch_sharding)
    guard = step_lib.NonFiniteGuard(config.max_nonfinite_steps)
    logger = logger_lib.MetricsLogger(config.workdir, is_main=is_main)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(config.workdir, "checkpoints"))

    # Resume, or start fresh (and measure the starting policy).
    meta = {"rollouts": 0, "iteration": 0}
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta, arrays = checkpointer.restore(latest, checkpoint_lib.abstract_like(state))
        iterator.set_state(meta["data_iterator"])
        copies, arrays = split_policy_copies(arrays, state.params)
        reference_params = copies.get("reference", reference_params)
        previous_params = copies.get("previous", previous_params)
        source.load_state_dict(meta["rollout_source"], arrays)
        context.generated = meta["rollouts"]
        logger.truncate_after(meta["iteration"])
    else:
        meta["eval_before"] = held_out(state.params)
        logger.write(0, meta["eval_before"])
    bar = tqdm.tqdm(total=config.steps, initial=meta["iteration"], desc=algorithm.name,
                    disable=not (is_main and config.progress), dynamic_ncols=True)

    while meta["iteration"] < config.steps:
        iteration = meta["iteration"] + 1
        t0 = time.time()

        # 1. Samples (with behaviour log-probs) and their verified rewards.
        arrays = source.collect(context, state.params, iteration)
        t_rollout = time.time()

        # 2. Advantages, packing, and the log-probs of the policy before this update.
        targets = ({} if algorithm.advantages is None
                   else algorithm.advantages(arrays["rewards"], config.group_size))
        if not isinstance(targets, dict):
            targets = {"advantages": targets}
        packed = rollout.pack_sequences(
            array_to_prompts(arrays["prompt_tokens"], arrays["prompt_lengths"]),
            arrays["tokens"], arrays["lengths"], pad_id=context.pad_id)
        batch = packed.model_inputs()
        batch.update(behaviour_logp=arrays["behaviour_logp"], rewards=arrays["rewards"],
                     group_index=arrays["group_index"])
        batch.update({k: np.asarray(v, np.float32) for k, v in targets.items()})
        old = log_probs(state.params, batch)
        if previous_params is not None:
            # log π_{k−1}; then π_k (before this iteration's updates) is the next one's π_{k−1}.
            batch["prev_logp"] = log_probs(previous_params, batch)["logp"]
            previous_params = jax.tree.map(jnp.copy, state.params)
        batch["old_logp"] = old["logp"]
        if algorithm.needs_vocab_mean:
            batch["old_vocab_mean"] = old["vocab_mean"]
        if algorithm.value_fn is not None:
            batch["old_values"] = old["values"]
        if reference_params is not None:
            batch["ref_logp"] = log_probs(reference_params, batch)["logp"]
        if algorithm.batch_targets is not None:
            extra = algorithm.batch_targets(jax.device_get(batch), iteration)
            batch.update({k: np.asarray(v) for k, v in extra.items()})
        t_prepare = time.time()

        # 3. Updates: `updates_per_batch` passes, each split into `num_minibatches` steps.
        step_metrics = []
        num_rows = arrays["tokens"].shape[0]
        for epoch in range(algorithm.updates_per_batch):
            order = np.random.default_rng([config.seed, iteration, epoch]).permutation(num_rows)
            for part in np.array_split(order, algorithm.num_minibatches):
                minibatch = jax.tree.map(lambda x: np.asarray(x)[part], batch)
                state, metrics = train_step(
                    state, distributed.host_to_global(minibatch, batch_sharding))
                guard.check(state, metrics)
                step_metrics.append(metrics)
        t_update = time.time()
        if algorithm.reset_reference_after == iteration:
            reference_params = jax.tree.map(jnp.copy, state.params)   # policy reincarnation

        # 4. Metrics, evaluation, checkpoint.
        meta["rollouts"] = context.generated
        meta["iteration"] = iteration
        step_metrics = jax.device_get(step_metrics)
        record = {f"train/{k}": float(np.mean([m[k] for m in step_metrics]))
                  for k in step_metrics[-1]}
        staleness = (iteration - 1) - arrays["policy_version"]
        record.update({
            "reward_mean": float(np.mean(arrays["rewards"])),
            "response_length": float(np.mean(arrays["lengths"])),
            "rollouts": meta["rollouts"],
            "staleness_mean": float(np.mean(staleness)),
            "staleness_max": int(np.max(staleness)),
            "skipped_steps": int(np.asarray(state.skipped_steps)),
            "rollout_s": t_rollout - t0, "update_s": t_update - t_prepare,
            "step_s": time.time() - t0,
            "tokens_per_s": float(np.sum(arrays["lengths"]) * algorithm.updates_per_batch)
            / max(t_update - t_prepare, 1e-9),
        })
        if iteration == config.steps:
            meta["eval_after"] = held_out(state.params)
            record.update(meta["eval_after"])
        elif config.eval_every and iteration % config.eval_every == 0:
            record.update(held_out(state.params))
        logger.write(iteration, record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}",
                        loss=f"{record['train/loss']:.4f}", len=f"{record['response_length']:.1f}")
        bar.update(1)
        if iteration % config.ckpt_every == 0 or iteration == config.steps:
            meta["data_iterator"] = iterator.get_state()
            meta["rollout_source"], source_arrays = source.state_dict()
            copies = {"previous": previous_params}
            if algorithm.reset_reference_after is not None \
                    and iteration >= algorithm.reset_reference_after:
                copies["reference"] = reference_params
            source_arrays = {**source_arrays, **policy_copies_to_arrays(copies)}
            checkpointer.save(iteration, state, meta, source_arrays)

    bar.close()
    pool.close()
    checkpointer.close()
    logger.close()
    k = config.eval_samples
    summary = {
        "algorithm": algorithm.name,
        "steps": meta["iteration"],
        "rollouts": meta["rollouts"],
        "pass@1_before": meta["eval_before"]["eval/pass@1"],
        "pass@1_after": meta["eval_after"]["eval/pass@1"],
        f"pass@{k}_before": meta["eval_before"].get(f"eval/pass@{k}"),
        f"pass@{k}_after": meta["eval_after"].get(f"eval/pass@{k}"),
        "skipped_steps": int(np.asarray(state.skipped_steps)),
        "workdir": config.workdir,
        "wall_s": time.time() - start_time,
    }
    if is_main:
        with open(os.path.join(config.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    logger_lib.print_summary(summary, is_main=is_main)
    return summary
