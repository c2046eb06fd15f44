"""The rollout pipeline: prompt selection → generation → reward → replay / mixing stages.

One iteration's rollouts come from :meth:`RolloutPipeline.collect`:

1. each stage says how many of the iteration's ``--batch_size`` prompts to sample fresh
   (:meth:`Stage.fresh_prompts`: ReMix replays a fraction p of the batch instead; TOPR's offline
   dataset samples none after its first draw);
2. the selection stage picks that many prompt records (:class:`PromptStream`: the shuffled,
   checkpointable prompt stream; MoPPS-style selection plugs in here) and sees their rewards
   afterwards (:meth:`PromptStream.observe`);
3. :class:`RolloutSampler` samples ``--group_size`` responses per prompt from the current policy,
   keeping each token's behaviour log-prob, and scores each response with the reward function
   (:func:`verifier_reward` by default: any function of the prompt record and the response text);
4. each stage's :meth:`Stage.process` turns the fresh batch into the training batch (mixing in
   replayed groups, injecting stored successes, replacing it by an offline dataset).

Composition is configuration: ``Algorithm(stages=(ReplayWindow(...),), selection=...)``. Every
stage keeps its own checkpointable state (``state_dict`` / ``load_state_dict``) and reports its
own metrics, which the trainer writes to ``metrics.jsonl`` as ``<stage name>/<metric>``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from offpolicy_jax import distributed, replay, rewards, sampling
from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training.batch import Rollouts


def verifier_reward(records: list[dict], responses: list[str], pool) -> np.ndarray:
    """1.0 for a response whose final answer the math verifier judges equal to the record's
    ``gold``, else 0.0; ``pool`` is the verifier's process pool (hard deadline per answer)."""
    scored = rewards.score_batch(responses, [r["gold"] for r in records], pool=pool)
    return np.asarray(scored.rewards, np.float32)


@dataclasses.dataclass
class RolloutSampler:
    """Samples groups of responses from a policy and scores them: the generation and reward steps.

    Attributes:
      cfg, tokenizer: the policy's model config and tokenizer.
      config: the run settings (group size, sampling settings, seed).
      pool: the verifier's process pool (passed to ``reward_fn``).
      mesh: the device mesh generation runs on (None: one device).
      pad_id, eos_ids: the tokenizer's padding and end-of-sequence ids.
      reward_fn: ``(records, responses, pool) -> [n] rewards``.
      generated: responses sampled so far in this run (the "rollouts" budget); checkpointed.
      reward_seconds: wall time spent decoding responses and in ``reward_fn`` so far (the
        verifier's share of the rollout stage; not checkpointed).
    """

    cfg: object
    tokenizer: object
    config: object
    pool: object
    mesh: object
    pad_id: int
    eos_ids: tuple
    reward_fn: object = verifier_reward
    generated: int = 0
    reward_seconds: float = 0.0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def sample(self, params, records: list[dict], seed_index: int, policy_version: int,
               num_samples: int | None = None, *, reward_fn=None,
               task: int = batch_lib.SOLVE) -> Rollouts:
        """``num_samples`` (default ``group_size``) responses per record from ``params``, scored
        by the reward function.

        ``seed_index`` picks the sampling key, ``fold_in(PRNGKey(seed), seed_index)`` (the RL
        iteration for online batches); ``policy_version`` is stamped on every row. ``reward_fn``
        replaces the sampler's own for this call and ``task`` is stamped on every row (a second
        generation stage, e.g. RISE's verifications, scores its rows with its own reward)."""
        config = self.config
        prompt_tokens = [self.encode(r["prompt"]) for r in records]
        out = sampling.generate(
            self.cfg, params, prompt_tokens, max_new_tokens=config.max_new_tokens,
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            eos_token_ids=self.eos_ids,
            seed=jax.random.fold_in(jax.random.PRNGKey(config.seed), seed_index),
            num_samples=num_samples or config.group_size, mesh=self.mesh,
            pad_token_id=self.pad_id)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        group_index = np.asarray(out.prompt_index)
        self.generated += tokens.shape[0]
        # Every process holds all rows (generate gathers them); each scores its own share and
        # the rewards are all-gathered, so all processes continue with identical host data.
        mine = distributed.process_rows(tokens.shape[0])
        start = time.time()
        responses = [self.tokenizer.decode(tokens[i, :lengths[i]].tolist(),
                                           skip_special_tokens=True)
                     for i in range(mine.start, mine.stop)]
        scores = (reward_fn or self.reward_fn)([records[i] for i in group_index[mine]],
                                               responses, self.pool)
        row_rewards = distributed.gather_rows(np.asarray(scores, np.float32), tokens.shape[0])
        self.reward_seconds += time.time() - start
        prompt_array, prompt_lengths = batch_lib.prompts_to_array(
            [prompt_tokens[i] for i in group_index], self.pad_id)
        return Rollouts(
            prompt_tokens=prompt_array, prompt_lengths=prompt_lengths,
            tokens=tokens.astype(np.int32), lengths=lengths.astype(np.int32),
            behaviour_logp=np.asarray(out.logprobs, np.float32), rewards=row_rewards,
            group_index=group_index.astype(np.int32),
            policy_version=np.full(tokens.shape[0], policy_version, np.int32),
            task=np.full(tokens.shape[0], task, np.int32))

    def decode(self, rollouts: Rollouts, rows) -> list[str]:
        """The response text of the given rows (special tokens removed)."""
        return [self.tokenizer.decode(rollouts.tokens[row, :rollouts.lengths[row]].tolist(),
                                      skip_special_tokens=True) for row in rows]


class PromptStream:
    """Prompt selection: the next prompts of a shuffled, endless, checkpointable stream.

    One global stream, the same on every process (not a per-process shard): generation splits
    the batch over all devices anyway, and identical host data on every process keeps a run's
    numbers, checkpoints and resume independent of the number of processes.
    """

    name = "prompts"

    def __init__(self):
        self.iterator = None

    def bind(self, records: list[dict], config) -> None:
        """Builds the stream over the training records (called once by the trainer)."""
        from offpolicy_jax.data import pipeline
        self.iterator = pipeline.PromptIterator(records, config.batch_size, seed=config.seed,
                                                shard_index=0, shard_count=1)

    def select(self, num_prompts: int, iteration: int) -> list[dict]:
        """The first ``num_prompts`` records of the stream's next batch (the rest of that batch
        is skipped, which keeps the stream's state a single position); none for 0."""
        del iteration
        if num_prompts == 0:
            return []
        if num_prompts > self.iterator.batch_size:
            raise ValueError(f"asked for {num_prompts} prompts, the stream yields batches of "
                             f"{self.iterator.batch_size} (--batch_size)")
        return next(self.iterator)[:num_prompts]

    def observe(self, records: list[dict], rollouts: Rollouts | None, iteration: int) -> None:
        """The selected prompts' rollouts (a difficulty-aware selection updates itself here)."""
        del records, rollouts, iteration

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> tuple[dict, dict]:
        return {"iterator": self.iterator.get_state()}, {}

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        del arrays
        self.iterator.set_state(meta["iterator"])


@dataclasses.dataclass
class StageStep:
    """What a stage's ``process`` may use: the iteration, the sampling policy and its version
    (the current policy, or an older one with ``--rollout_lag``), the fresh prompt records and the
    fresh batch sampled from them (its ``group_index`` indexes ``records``), the sampler and the
    selection."""

    iteration: int
    params: object
    policy_version: int
    records: list
    fresh: Rollouts | None
    sampler: RolloutSampler
    selection: PromptStream
    config: object


class Stage:
    """A step of the rollout pipeline. Every hook is optional; the defaults change nothing."""

    name = "stage"

    def fresh_prompts(self, wanted: int, iteration: int) -> int:
        """How many of ``wanted`` prompts to sample fresh this iteration."""
        del iteration
        return wanted

    def process(self, rollouts: Rollouts | None, step: StageStep) -> Rollouts:
        """The batch after this stage (``rollouts`` is None when nothing was sampled fresh)."""
        del step
        return rollouts

    def metrics(self) -> dict:
        """Scalars about this iteration's work, logged as ``<name>/<key>``."""
        return {}

    def state_dict(self) -> tuple[dict, dict]:
        """``(JSON-able meta, {key: numpy array})``, saved in every checkpoint."""
        return {}, {}

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        del meta, arrays


class RolloutPipeline:
    """Selection, generation with rewards, then the stages in order (see the module docstring)."""

    def __init__(self, selection: PromptStream, sampler: RolloutSampler, stages=(), config=None):
        names = [selection.name] + [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"rollout stage names must be distinct (they prefix metrics and "
                             f"checkpoint keys), got {names}")
        self.selection = selection
        self.sampler = sampler
        self.stages = tuple(stages)
        # The settings of the learner this pipeline feeds (its --batch_size), by default the
        # sampler's; a stage of a multi-stage loop may train with its own (VerIPO's DPO stage).
        self.config = config or sampler.config

    def collect(self, params, iteration: int, policy_version: int | None = None) -> Rollouts:
        """This iteration's training batch; fresh rows sample from ``params``, the policy of
        version ``policy_version`` (default ``iteration − 1``, the current policy; older with
        ``--rollout_lag``)."""
        version = iteration - 1 if policy_version is None else policy_version
        wanted = self.config.batch_size
        for stage in self.stages:
            wanted = stage.fresh_prompts(wanted, iteration)
        records = self.selection.select(wanted, iteration)
        fresh = (self.sampler.sample(params, records, iteration, policy_version=version)
                 if records else None)
        self.selection.observe(records, fresh, iteration)
        step = StageStep(iteration=iteration, params=params, policy_version=version,
                         records=records, fresh=fresh, sampler=self.sampler,
                         selection=self.selection, config=self.config)
        rollouts = fresh
        for stage in self.stages:
            rollouts = stage.process(rollouts, step)
        if rollouts is None:
            raise ValueError(f"iteration {iteration}: the rollout pipeline produced no rows")
        return rollouts

    def _parts(self):
        return (self.selection,) + self.stages

    def metrics(self) -> dict:
        return {f"{part.name}/{k}": v for part in self._parts() for k, v in part.metrics().items()}

    def state_dict(self) -> tuple[dict, dict]:
        meta, arrays = {"generated": self.sampler.generated}, {}
        for part in self._parts():
            part_meta, part_arrays = part.state_dict()
            meta[part.name] = part_meta
            arrays.update({f"{part.name}/{k}": v for k, v in part_arrays.items()})
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        missing = [part.name for part in self._parts() if part.name not in meta]
        if missing:
            raise ValueError(f"the checkpoint has no state for rollout stages {missing} (it holds "
                             f"{sorted(k for k in meta if k != 'generated')})")
        self.sampler.generated = meta["generated"]
        for part in self._parts():
            part.load_state_dict(meta[part.name],
                                 checkpoint_lib.with_prefix(arrays, f"{part.name}/"))


# ---------------------------------------------------------------------------------------------
# Replay and mixing stages.


class ReplayWindow(Stage):
    """ReMix's mix-policy batches: a fraction p of replayed groups, the rest sampled fresh.

    Liang et al., "Squeeze the Soaked Sponge", https://arxiv.org/abs/2507.06892. Iteration k
    (policy π_k = version k − 1) draws ``round(p · batch_size)`` groups uniformly from the window
    of the last N policies' samples (``replay.PolicyWindowBuffer``; fewer while it is still
    filling) and samples the other groups from π_k; the fresh groups then join the window. Only
    fresh responses count towards the rollout budget. After the reincarnation step T (iterations
    k > T) the window is discarded and every batch is fresh (p = 0), the paper's switch to
    on-policy training. Replayed groups come first in the batch; every group stays contiguous.

    Args:
      off_policy_fraction: p (ReMix: 0.4).
      window: N past policies (ReMix: 2).
      reincarnation_step: T, or None for no reincarnation.
      max_groups: cap on the window's stored groups.

    Departure: the fresh part takes the first ``batch_size − replayed`` prompts of the stream's
    next batch (the rest is skipped).

    Metrics: ``replayed_groups`` (this iteration), ``window_groups`` (stored after it).
    """

    name = "replay_window"

    def __init__(self, off_policy_fraction: float = 0.4, window: int = 2,
                 reincarnation_step: int | None = None, max_groups: int = 4096):
        if not 0.0 <= off_policy_fraction < 1.0:
            raise ValueError(f"off-policy fraction p must be in [0, 1), got {off_policy_fraction}")
        if reincarnation_step is not None and reincarnation_step < 0:
            raise ValueError(f"reincarnation_step must be >= 0, got {reincarnation_step}")
        self.off_policy_fraction = off_policy_fraction
        self.window = window
        self.reincarnation_step = reincarnation_step
        self.max_groups = max_groups
        self.buffer: replay.PolicyWindowBuffer | None = None
        self.replayed_groups = 0

    def reincarnated(self, iteration: int) -> bool:
        """True for iterations after T: on-policy batches, no window."""
        return self.reincarnation_step is not None and iteration > self.reincarnation_step

    def fresh_prompts(self, wanted: int, iteration: int) -> int:
        if self.reincarnated(iteration) and self.buffer is not None:
            self.buffer.clear()
        stored = 0 if self.buffer is None else self.buffer.num_groups
        self.replayed_groups = 0 if self.reincarnated(iteration) else min(
            int(round(self.off_policy_fraction * wanted)), stored)
        return wanted - self.replayed_groups

    def process(self, rollouts: Rollouts | None, step: StageStep) -> Rollouts:
        config = step.config
        if self.buffer is None:
            self.buffer = replay.PolicyWindowBuffer(self.window, config.group_size,
                                                    self.max_groups)
        parts = []
        if self.replayed_groups:
            rng = np.random.default_rng([config.seed, step.iteration, 7])
            parts.append(self.buffer.sample_groups(self.replayed_groups, rng))
        if rollouts is not None:
            parts.append(rollouts)
            if not self.reincarnated(step.iteration):
                self.buffer.add(rollouts, newest_version=step.policy_version,
                                pad_id=step.sampler.pad_id)
        return batch_lib.concat(parts, step.sampler.pad_id)

    def metrics(self) -> dict:
        return {"replayed_groups": self.replayed_groups,
                "window_groups": 0 if self.buffer is None else self.buffer.num_groups}

    def state_dict(self) -> tuple[dict, dict]:
        if self.buffer is None:
            return {"group_size": None}, {}
        meta, arrays = self.buffer.state_dict()
        return {"group_size": self.buffer.group_size, "buffer": meta}, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        if meta.get("group_size") is None:
            self.buffer = None
            return
        self.buffer = replay.PolicyWindowBuffer(self.window, meta["group_size"], self.max_groups)
        self.buffer.load_state_dict(meta["buffer"], arrays)


class SuccessReplay(Stage):
    """ARPO's replay: all-failed groups get a stored success of the same prompt.

    Lu et al., https://arxiv.org/abs/2505.16282 (rule from the official code's
    ``replay_buffer.py`` / ``apply_replay``). Each iteration injects stored successes into the
    fresh batch's all-failed groups (``replay.inject_successes``, with the buffer *before* this
    batch), then stores this batch's own fresh successes. Injected responses carry their stored
    behaviour log-probs and policy version; they are not rollouts of this iteration and do not
    count towards the budget. Prompts are keyed by the record's ``id`` (else its text).

    Args:
      capacity: successes per prompt (ARPO: 8).
      success_threshold: reward above which a response is stored (ARPO: 0.1).
      max_prompts: cap on the prompts the buffer tracks.

    Metrics: ``injected_groups`` (this iteration), ``stored_successes`` (after it).
    """

    name = "success_replay"

    def __init__(self, capacity: int = 8, success_threshold: float = 0.1,
                 max_prompts: int = 4096):
        self.buffer = replay.SuccessBuffer(capacity, success_threshold, max_prompts)
        self.injected_groups = 0

    @staticmethod
    def prompt_key(record: dict) -> str:
        return str(record["id"]) if "id" in record else str(record["prompt"])

    def process(self, rollouts: Rollouts | None, step: StageStep) -> Rollouts:
        if rollouts is None or rollouts is not step.fresh:
            raise ValueError(f"{self.name} looks each group's prompt up in this iteration's fresh "
                             f"selection, so it must come first among the stages, on a fresh "
                             f"batch (an earlier stage replaced or mixed the rows)")
        group_size = step.config.group_size
        keys = [self.prompt_key(step.records[int(i)])
                for i in rollouts.group_index[::group_size]]
        rng = np.random.default_rng([step.config.seed, step.iteration, 11])
        batch, injected = replay.inject_successes(rollouts, keys, self.buffer, group_size, rng)
        self.injected_groups = int(injected.sum())
        for row in np.nonzero(rollouts.rewards > self.buffer.success_threshold)[0]:
            self.buffer.add(keys[row // group_size], replay.response_of(rollouts, row))
        return batch

    def metrics(self) -> dict:
        return {"injected_groups": self.injected_groups, "stored_successes": len(self.buffer)}

    def state_dict(self) -> tuple[dict, dict]:
        return self.buffer.state_dict()

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        self.buffer.load_state_dict(meta, arrays)


class OfflineDataset(Stage):
    """One dataset sampled from the initial policy, then replayed in order (TOPR's offline setting).

    The dataset (``num_prompts`` prompts × group size responses with their behaviour log-probs) is
    drawn at the first iteration and saved in every checkpoint; each iteration takes the next
    ``batch_size`` groups, reshuffling the group order every epoch with the run's seed. Nothing
    is sampled fresh after the first draw.

    ``sample(step, records, seed_index) -> Rollouts`` draws the dataset's rows for a chunk of
    prompt records (default: ``group_size`` responses each from the initial policy); TOPR's
    generative verifier plugs in verifications of those responses instead
    (:meth:`SelfVerification.verify`).

    Metrics: ``epoch`` (of the group order the iteration's last group came from).
    """

    name = "offline"

    def __init__(self, num_prompts: int, sample=None):
        if num_prompts < 1:
            raise ValueError(f"offline dataset needs num_prompts >= 1, got {num_prompts}")
        self.num_prompts = num_prompts
        self.sample = sample
        self.dataset: Rollouts | None = None
        self.cursor = 0
        self.epoch = 0

    def fresh_prompts(self, wanted: int, iteration: int) -> int:
        del wanted, iteration
        return 0

    def process(self, rollouts: Rollouts | None, step: StageStep) -> Rollouts:
        del rollouts
        if self.dataset is None:
            self.dataset = draw_groups(step, self.num_prompts, self.sample)
        config = step.config
        units, self.cursor, self.epoch = next_units(
            self.dataset.num_groups(config.group_size), self.cursor, config.batch_size,
            (config.seed,))
        return self.dataset.take_groups(units, config.group_size)

    def metrics(self) -> dict:
        return {"epoch": self.epoch}

    def state_dict(self) -> tuple[dict, dict]:
        arrays = {} if self.dataset is None else self.dataset.as_dict()
        return {"cursor": self.cursor}, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        self.cursor = meta.get("cursor", 0)
        self.dataset = Rollouts.from_dict(arrays) if arrays else None


def draw_groups(step: StageStep, num_prompts: int, sample=None) -> Rollouts:
    """``num_prompts`` prompts of the selection × ``--group_size`` responses from ``step.params``
    (version 0), drawn ``--batch_size`` prompts at a time: the offline dataset of TOPR's setting,
    the same for every method that draws one with the same seed and settings. ``sample(step,
    records, seed_index)``, when given, draws each chunk's rows instead (TOPR's generative
    verifier: verifications of those responses)."""
    parts, drawn = [], 0
    while drawn < num_prompts:
        records = step.selection.select(min(num_prompts - drawn, step.config.batch_size),
                                        step.iteration)
        # Seed indices far above any iteration number keep these draws independent of the
        # online ones (fold_in needs a non-negative index).
        if sample is None:
            parts.append(step.sampler.sample(step.params, records,
                                             seed_index=(1 << 30) + len(parts), policy_version=0))
        else:
            parts.append(sample(step, records, (1 << 30) + len(parts)))
        drawn += len(records)
    return batch_lib.concat(parts, step.sampler.pad_id)


def next_units(num_units: int, cursor: int, count: int, salt: tuple
               ) -> tuple[np.ndarray, int, int]:
    """The next ``count`` units of a dataset replayed in order, its unit order reshuffled every
    epoch by ``default_rng([*salt, epoch])``: ``(unit indices, new cursor, epoch of the last)``.
    ``cursor`` counts the units taken so far; a batch may run on into the next epoch."""
    units, epoch, order = [], None, None
    for _ in range(count):
        current, position = divmod(cursor, num_units)
        if current != epoch:
            epoch, order = current, np.random.default_rng([*salt, current]).permutation(num_units)
        units.append(order[position])
        cursor += 1
    return np.asarray(units, np.int64), cursor, epoch


class DynamicSampling(Stage):
    """DAPO's dynamic sampling: drop groups whose rewards are all equal, sample more until the
    batch is full.

    Yu et al., "DAPO", https://arxiv.org/abs/2503.14476 (§3.2; verl's ``max_num_gen_batches``). A
    group whose responses all got the same reward has zero group-relative advantage and gives no
    gradient. This stage keeps the fresh batch's informative groups and, while fewer than
    ``batch_size`` are kept, samples another ``batch_size`` prompts from the selection (which
    observes their rewards, as after the first round), up to ``max_rounds`` generation rounds in
    all. Every sampled response counts towards the rollout budget: that cost is what prompt
    selection such as MoPPS tries to save. If the rounds run out first, the batch is completed
    with the last uninformative groups (their advantage is 0; DAPO's loss also masks them), so
    its shape never changes. It must come first among the stages (it looks rows up in the fresh
    selection).

    Args:
      max_rounds: generation rounds per iteration, the first included (verl: 10).

    Metrics: ``rounds`` (generation rounds this iteration), ``extra_rollouts`` (responses sampled
    after the first round), ``filled`` (uninformative groups left in the batch).
    """

    name = "dynamic_sampling"

    def __init__(self, max_rounds: int = 4):
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.max_rounds = max_rounds
        self._metrics = {}

    def process(self, rollouts: Rollouts | None, step: StageStep) -> Rollouts:
        if rollouts is None or rollouts is not step.fresh:
            raise ValueError(f"{self.name} must come first among the stages, on a fresh batch")
        group_size, wanted = step.config.group_size, rollouts.num_groups(step.config.group_size)
        kept, spare, rounds, extra = [], [], 1, 0
        batch = rollouts
        while True:
            informative = _informative(batch.rewards, group_size)
            kept.append(batch.take_groups(np.nonzero(informative)[0], group_size))
            spare = batch.take_groups(np.nonzero(~informative)[0], group_size)
            if sum(k.num_rows for k in kept) >= wanted * group_size or rounds == self.max_rounds:
                break
            records = step.selection.select(wanted, step.iteration)
            # Seed indices far above any iteration keep every round's draws independent.
            batch = step.sampler.sample(step.params, records, (rounds << 24) + step.iteration,
                                        policy_version=step.policy_version)
            step.selection.observe(records, batch, step.iteration)
            rounds, extra = rounds + 1, extra + batch.num_rows
        full = batch_lib.concat(kept + [spare], step.sampler.pad_id)
        result = full.take(np.arange(wanted * group_size))
        filled = int(np.sum(~_informative(result.rewards, group_size)))
        self._metrics = {"rounds": rounds, "extra_rollouts": extra, "filled": filled}
        return result

    def metrics(self) -> dict:
        return dict(self._metrics)


def _informative(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[num_groups] bool: the group's rewards are not all equal."""
    grouped = np.asarray(rewards).reshape(-1, group_size)
    return grouped.max(axis=1) > grouped.min(axis=1)


# ---------------------------------------------------------------------------------------------
# A second generation stage: self-verification.


class SelfVerification(Stage):
    """RISE's online self-verification: the policy also rates some of its own fresh solutions.

    Liu et al., "Trust, But Verify", https://arxiv.org/abs/2505.13445 (code: xyliu-cs/RISE and its
    verl fork, ``ray_trainer.py`` with ``trainer.online_critique``). After this iteration's
    solutions are sampled and scored with the outcome reward, this stage

    1. picks ``num_solutions`` of them spread evenly over the groups
       (``verification.spread_rows``, the fork's ``DataProto.downsampling``);
    2. builds a verification prompt from each solution and its problem (``make_prompt(record,
       solution text, tokenizer)``: the paper's template, or the embedded model's compact one);
    3. samples ``group_size`` verifications per prompt from the same policy, each scored with the
       verification reward: its boxed rating against the solution's true outcome
       (``verification.RATINGS``: "1", "-0.5", "-1"), rewarded with the same outcome rule;
    4. appends these groups after the solutions: one batch holding both tasks, told apart by
       ``Rollouts.task`` (0 solve, 1 verify); every group stays whole and in place.

    Verification rows are fresh rollouts: they count in ``rollouts`` (and so in
    ``--rollout_budget``); this stage also counts each task's rollouts on its own. A
    verification row's ``group_index`` is ``len(records) +`` the index of its verification
    prompt, so group ids never collide with the solutions'. The stage must come first among the
    stages (it looks each solution's problem up in the fresh selection).

    Args:
      num_solutions: solutions verified per iteration (RISE's ``critique_batch_size``: 128 of
        1024 prompts x 8 solutions).
      make_prompt: ``(record, solution text, tokenizer) -> verification prompt text``.
      reward: the outcome rewards (the same for solving and verifying, as in the paper's code).
      keep_solutions: False trains on the verification rows only.
      selection: ``"spread"`` (the paper's: evenly over the groups) or ``"balanced"`` (half
        correct, half not, as far as the batch has them: ``verification.balanced_rows``, an
        option against a verifier that learns the base rate).

    Metrics (this iteration's verification rows, ``verification.verification_metrics``):
    ``accuracy`` (rating = the solution's), ``accuracy_correct`` / ``accuracy_wrong`` /
    ``accuracy_no_answer`` (on solutions of that outcome), ``balanced_accuracy``, ``no_rating``
    (no rating extracted), ``solutions_correct`` (share of the rated solutions that are correct),
    ``solve_accuracy`` (share of all of this iteration's solutions that are correct),
    ``solutions`` (verified this iteration), and the cumulative ``rollouts`` /
    ``solve_rollouts`` of each task.
    """

    name = "verify"
    # Sampling keys of the verifications: fold_in(key(seed), offset + iteration), a range no
    # solving draw uses (iterations, DynamicSampling's rounds << 24, OfflineDataset's 1 << 30).
    SEED_OFFSET = 1 << 29

    def __init__(self, num_solutions: int, make_prompt, reward=None, keep_solutions: bool = True,
                 selection: str = "spread"):
        from offpolicy_jax import verification
        if num_solutions < 0:
            raise ValueError(f"num_solutions must be >= 0, got {num_solutions}")
        if selection not in ("spread", "balanced"):
            raise ValueError(f"selection must be 'spread' or 'balanced', got {selection!r}")
        self.selection = selection
        self.num_solutions = num_solutions
        self.make_prompt = make_prompt
        self.reward = reward or verification.OutcomeReward()
        self.reward_fn = verification.make_outcome_reward(self.reward)
        self.keep_solutions = keep_solutions
        self.verify_rollouts = 0
        self.solve_rollouts = 0
        self._metrics = {}

    def verify(self, step: StageStep, solutions: Rollouts, records: list[dict], total: int,
               seed_index: int, rng: np.random.Generator) -> Rollouts:
        """Verification rows for ``total`` of ``solutions`` (spread over their groups, whose
        ``group_index`` indexes ``records``), sampled with ``seed_index``."""
        from offpolicy_jax import verification
        group_size = step.config.group_size
        try:
            all_outcomes = self.reward.outcomes(solutions.rewards)
        except ValueError as error:
            raise ValueError(f"{self.name}: the solutions must be scored by outcome "
                             f"(Algorithm.reward_fn = verification.make_outcome_reward(...) with "
                             f"the stage's rewards): {error}") from None
        if self.selection == "balanced":
            rows = verification.balanced_rows(all_outcomes, total, rng)
        else:
            rows = verification.spread_rows(solutions.num_groups(group_size), group_size, total,
                                            rng)
        texts = step.sampler.decode(solutions, rows)
        outcomes = [all_outcomes[row] for row in rows]
        prompts = []
        for row, text, outcome in zip(rows, texts, outcomes):
            record = records[int(solutions.group_index[row])]
            prompts.append({"id": f"{record.get('id', '')}/verify", "gold":
                            verification.RATINGS[outcome],
                            "prompt": self.make_prompt(record, text, step.sampler.tokenizer)})
        verifications = step.sampler.sample(step.params, prompts, seed_index=seed_index,
                                            policy_version=step.policy_version,
                                            reward_fn=self.reward_fn, task=batch_lib.VERIFY)
        verifications.group_index = (verifications.group_index + len(records)).astype(np.int32)
        self._record(outcomes, group_size, verifications, solutions)
        return verifications

    def _record(self, solution_outcomes: list[str], group_size: int, verifications: Rollouts,
                solutions: Rollouts) -> None:
        """This iteration's metrics (see the class docstring)."""
        from offpolicy_jax import verification
        outcomes = np.asarray(self.reward.outcomes(verifications.rewards))
        metrics = verification.verification_metrics(np.repeat(solution_outcomes, group_size),
                                                    outcomes == "correct")
        metrics["no_rating"] = float(np.mean(outcomes == "no_answer"))
        metrics["solve_accuracy"] = float(np.mean(
            np.asarray(self.reward.outcomes(solutions.rewards)) == "correct"))
        metrics["solutions"] = len(solution_outcomes)
        self._metrics = metrics

    def process(self, rollouts: Rollouts | None, step: StageStep) -> Rollouts:
        if rollouts is None or rollouts is not step.fresh:
            raise ValueError(f"{self.name} looks each solution's problem up in this iteration's "
                             f"fresh selection, so it must come first among the stages, on a "
                             f"fresh batch")
        self.solve_rollouts += rollouts.num_rows
        if not self.num_solutions:
            self._metrics = {"solutions": 0}
            return rollouts
        rng = np.random.default_rng([step.config.seed, step.iteration, 13])
        verifications = self.verify(step, rollouts, step.records, self.num_solutions,
                                    self.SEED_OFFSET + step.iteration, rng)
        self.verify_rollouts += verifications.num_rows
        if not self.keep_solutions:
            return verifications
        return batch_lib.concat([rollouts, verifications], step.sampler.pad_id)

    def metrics(self) -> dict:
        return {**self._metrics, "rollouts": self.verify_rollouts,
                "solve_rollouts": self.solve_rollouts}

    def state_dict(self) -> tuple[dict, dict]:
        return {"rollouts": self.verify_rollouts, "solve_rollouts": self.solve_rollouts}, {}

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        del arrays
        self.verify_rollouts = meta["rollouts"]
        self.solve_rollouts = meta["solve_rollouts"]
