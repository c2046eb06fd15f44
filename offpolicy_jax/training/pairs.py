"""Preference pairs for DPO, SPIN and VerIPO: their construction, the stages that feed them to the
trainer, the judges that vet a response's reasoning, and the pairwise losses over a pair batch.

A pair batch is a :class:`~offpolicy_jax.training.batch.Rollouts` whose rows ``2j`` and ``2j + 1``
are the chosen and the rejected response to one prompt; an algorithm with
``minibatch_unit="pair"`` keeps them in one minibatch (and microbatch), and a batch holds
``--batch_size`` pairs. Both rows of a pair carry the prompt's ``group_index`` and the policy
version of the iteration that made the pair; rows that no policy sampled (a JSONL file's responses,
SPIN's demonstrations) have zero behaviour log-probs.

Where pairs come from:

* :func:`pairs_from_groups` — groups of sampled responses to one prompt: chosen rows are the
  responses the caller marks (verified correct, and for VerIPO a sound working), rejected rows
  the others, paired within the group, each response used once. A group with no chosen or no
  rejected response gives no pair; no pair mixes prompts.
* :func:`rows_from_texts` + :func:`interleave` — texts: a JSONL file of (prompt, chosen,
  rejected), or SPIN's (demonstration, own sample) pairs.

Stages (``training.stages``): :class:`PairDataset` replays a fixed set of pairs ``--batch_size``
at a time, reshuffled every epoch (built by a ``source`` at the first iteration, or handed over by
a multi-stage loop); :class:`SelfPlayPairs` rebuilds SPIN's set at the start of each SPIN
iteration; :class:`RolloutCollector` keeps a GRPO stage's rollouts for VerIPO's verifier.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import json
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from offpolicy_jax import losses
from offpolicy_jax.data import arith
from offpolicy_jax.losses import common
from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import policies, stages
from offpolicy_jax.training.algorithm import Algorithm
from offpolicy_jax.training.batch import Rollouts

# ---------------------------------------------------------------------------------------------
# Building pairs.


def interleave(chosen: Rollouts, rejected: Rollouts, pad_id: int) -> Rollouts:
    """Pair rows: ``chosen[j]`` at row ``2j``, ``rejected[j]`` at row ``2j + 1``."""
    if chosen.num_rows != rejected.num_rows:
        raise ValueError(f"{chosen.num_rows} chosen and {rejected.num_rows} rejected rows do not "
                         f"pair up")
    order = np.stack([np.arange(chosen.num_rows),
                      chosen.num_rows + np.arange(rejected.num_rows)], 1).reshape(-1)
    return batch_lib.concat([chosen, rejected], pad_id).take(order)


def pairs_from_groups(rollouts: Rollouts, group_size: int, chosen: np.ndarray, *,
                      rng: np.random.Generator, max_pairs_per_prompt: int = 0,
                      prefer_longer: bool = False) -> tuple[Rollouts | None, dict]:
    """Preference pairs from groups of responses to one prompt.

    In each group (rows ``[g·G, (g+1)·G)``), the rows marked ``chosen`` are paired with the other
    rows, each response used at most once: ``min(#chosen, #rejected)`` pairs (at most
    ``max_pairs_per_prompt`` when > 0). The chosen rows are taken in a seeded random order, or
    longest first with ``prefer_longer`` (VerIPO's preference for long, reflective working); the
    rejected rows in a seeded random order.

    Returns: ``(pairs, stats)``: the pair rows (None when no group has both kinds) and counts:
    ``pairs``, ``groups``, ``groups_with_pairs``, ``groups_all_chosen``, ``groups_none_chosen``,
    and the mean response length of the chosen and the rejected rows.
    """
    num_groups = rollouts.num_groups(group_size)
    chosen = np.asarray(chosen, bool)
    if chosen.shape != (rollouts.num_rows,):
        raise ValueError(f"chosen has shape {chosen.shape}, expected ({rollouts.num_rows},)")
    winners, losers = [], []
    for group in range(num_groups):
        rows = np.arange(group * group_size, (group + 1) * group_size)
        good = rng.permutation(rows[chosen[rows]])
        bad = rng.permutation(rows[~chosen[rows]])
        if prefer_longer:
            good = good[np.argsort(-rollouts.lengths[good], kind="stable")]
        count = min(len(good), len(bad))
        if max_pairs_per_prompt > 0:
            count = min(count, max_pairs_per_prompt)
        winners += good[:count].tolist()
        losers += bad[:count].tolist()
    grouped = chosen.reshape(num_groups, group_size)
    stats = {
        "pairs": len(winners),
        "groups": num_groups,
        "groups_with_pairs": int(np.sum(grouped.any(1) & ~grouped.all(1))),
        "groups_all_chosen": int(np.sum(grouped.all(1))),
        "groups_none_chosen": int(np.sum(~grouped.any(1))),
        "chosen_length": float(np.mean(rollouts.lengths[winners])) if winners else 0.0,
        "rejected_length": float(np.mean(rollouts.lengths[losers])) if losers else 0.0,
    }
    if not winners:
        return None, stats
    # Both halves come from one batch, so their prompts have one width: nothing is padded.
    return interleave(rollouts.take(winners), rollouts.take(losers), pad_id=0), stats


def rows_from_texts(sampler, prompts: list[str], responses: list[str], *, max_new_tokens: int,
                    rewards: np.ndarray, policy_version: int = 0,
                    group_index: np.ndarray | None = None) -> tuple[Rollouts, int]:
    """One row per (prompt, response) text: the response tokenized as the sampler's tokenizer does
    (no special tokens) with EOS appended, cut to ``max_new_tokens`` (the EOS is then lost).

    Returns ``(rows, number of responses cut)``; behaviour log-probs are 0 (no policy sampled
    them), ``group_index`` defaults to the row number."""
    width = max_new_tokens
    tokens = np.full((len(responses), width), sampler.pad_id, np.int32)
    lengths = np.zeros(len(responses), np.int32)
    cut = 0
    for row, text in enumerate(responses):
        ids = sampler.encode(text) + [sampler.eos_ids[0]]
        cut += len(ids) > width
        ids = ids[:width]
        tokens[row, :len(ids)] = ids
        lengths[row] = len(ids)
    prompt_tokens, prompt_lengths = batch_lib.prompts_to_array(
        [sampler.encode(p) for p in prompts], sampler.pad_id)
    rows = Rollouts(
        prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths, tokens=tokens,
        lengths=lengths, behaviour_logp=np.zeros(tokens.shape, np.float32),
        rewards=np.asarray(rewards, np.float32),
        group_index=(np.arange(len(responses), dtype=np.int32) if group_index is None
                     else np.asarray(group_index, np.int32)),
        policy_version=np.full(len(responses), policy_version, np.int32))
    return rows, cut


def read_jsonl(path: str, fields: tuple[str, ...]) -> list[dict]:
    """The records of a JSONL file (``.gz`` too), each checked to have ``fields`` as strings."""
    opener = gzip.open if str(path).endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in fields if not isinstance(record.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{number}: the record has no text field {missing} "
                                 f"(it has {sorted(record)})")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def decode_rows(rollouts: Rollouts, tokenizer) -> tuple[list[str], list[str]]:
    """Each row's prompt and response text (special tokens dropped)."""
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p in rollouts.prompts()]
    responses = [tokenizer.decode(rollouts.tokens[r, :rollouts.lengths[r]].tolist(),
                                  skip_special_tokens=True) for r in range(rollouts.num_rows)]
    return prompts, responses


# ---------------------------------------------------------------------------------------------
# Judges: does a response's reasoning hold up, beyond its final answer?


def accept_all(prompt: str, response: str) -> bool:
    """No process check: pairs follow the outcome reward alone."""
    del prompt, response
    return True


def arith_judge(prompt: str, response: str) -> bool:
    """The embedded task's process check (``data.arith.check_working``): every step right, every
    operand a number of the problem or an earlier result, and the boxed answer the working's."""
    return arith.check_working(arith.expression_of(prompt), response).valid


JUDGES = {"none": accept_all, "arith": arith_judge}


def resolve_judge(name: str) -> Callable[[str, str], bool]:
    """``"none"``, ``"arith"``, or ``"package.module:function"``: any importable
    ``judge(prompt: str, response: str) -> bool`` (True: the reasoning is acceptable)."""
    if name in JUDGES:
        return JUDGES[name]
    module, separator, attribute = name.partition(":")
    if not separator:
        raise ValueError(f"judge {name!r}: expected one of {sorted(JUDGES)} or "
                         f"'package.module:function'")
    return getattr(importlib.import_module(module), attribute)


def judge_rows(rollouts: Rollouts, tokenizer, judge) -> np.ndarray:
    """[N] bool: the judge's verdict on each row's response."""
    prompts, responses = decode_rows(rollouts, tokenizer)
    return np.array([bool(judge(p, r)) for p, r in zip(prompts, responses)], bool)


def verifier_stats(correct: np.ndarray, sound: np.ndarray) -> dict:
    """How a process judge relates to the outcome reward over a set of rollouts:
    ``judge_agreement`` (verdict == outcome), ``correct_unsound`` (share of the correct answers
    whose working the judge rejects) and ``wrong_sound`` (share of the wrong answers whose working
    it accepts)."""
    correct, sound = np.asarray(correct, bool), np.asarray(sound, bool)
    return {"judge_agreement": float(np.mean(sound == correct)),
            "correct_unsound": float(np.mean(~sound[correct])) if correct.any() else 0.0,
            "wrong_sound": float(np.mean(sound[~correct])) if (~correct).any() else 0.0}


# ---------------------------------------------------------------------------------------------
# Stages.


class PairDataset(stages.Stage):
    """A fixed set of preference pairs, ``--batch_size`` pairs per iteration, in an order
    reshuffled every epoch; nothing is sampled fresh.

    The set comes from ``source(step) -> (pairs, stats)`` at the first iteration (DPO: a JSONL
    file, or pairs from groups drawn once from the initial policy), or is handed over with
    :meth:`reset` (VerIPO's DPO stage). It is saved in every checkpoint, with ``stats`` (logged
    every iteration as ``pairs/<key>``, with ``num_pairs`` and ``epoch``).
    """

    name = "pairs"

    def __init__(self, source: Callable | None = None):
        self.source = source
        self.pairs: Rollouts | None = None
        self.cursor = 0
        self.salt = 0
        self.epoch = 0
        self.stats: dict = {}

    def reset(self, pairs: Rollouts, salt: int = 0, stats: dict | None = None) -> None:
        """Replaces the set (``salt`` seeds its epoch orders with the run's seed)."""
        if pairs.num_rows < 2 or pairs.num_rows % 2:
            raise ValueError(f"a pair set needs whole pairs, got {pairs.num_rows} rows")
        self.pairs, self.cursor, self.salt, self.epoch = pairs, 0, int(salt), 0
        self.stats = dict(stats or {})

    def clear(self) -> None:
        self.pairs, self.cursor, self.epoch, self.stats = None, 0, 0, {}

    @property
    def num_pairs(self) -> int:
        return 0 if self.pairs is None else self.pairs.num_rows // 2

    def fresh_prompts(self, wanted: int, iteration: int) -> int:
        del wanted, iteration
        return 0

    def process(self, rollouts: Rollouts | None, step: stages.StageStep) -> Rollouts:
        del rollouts
        if self.pairs is None:
            if self.source is None:
                raise ValueError(f"iteration {step.iteration}: the pair set is empty (no source, "
                                 f"and none was handed over)")
            pairs, stats = self.source(step)
            self.reset(pairs, stats=stats)
        return self.next_batch(step.config)

    def next_batch(self, config) -> Rollouts:
        units, self.cursor, self.epoch = stages.next_units(
            self.num_pairs, self.cursor, config.batch_size, (config.seed, self.salt))
        return self.pairs.take_groups(units, 2)

    def metrics(self) -> dict:
        return {"num_pairs": self.num_pairs, "epoch": self.epoch, **self.stats}

    def state_dict(self) -> tuple[dict, dict]:
        meta = {"cursor": self.cursor, "salt": self.salt, "stats": self.stats}
        return meta, {} if self.pairs is None else self.pairs.as_dict()

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        self.cursor, self.salt = meta["cursor"], meta["salt"]
        self.stats = dict(meta["stats"])
        self.pairs = Rollouts.from_dict(arrays) if arrays else None


@dataclasses.dataclass(frozen=True)
class SpinSchedule:
    """SPIN's iterations as trainer iterations.

    SPIN iteration t (0-based) trains on the pairs (demonstration, sample of the opponent θ_t)
    of ``num_demonstrations`` prompts — with ``keep_previous``, after the first, also on the
    previous iteration's pairs (the paper's 50k, then 100k) — for ``epochs[t]`` epochs of
    ``batch_size`` pairs per trainer iteration, with λ = ``lambdas[t]``.

    Attributes:
      iterations: T, the number of SPIN iterations.
      num_demonstrations: N, demonstration prompts (each gets one sample per iteration).
      batch_size: pairs per trainer iteration.
      epochs: per SPIN iteration (one value: all of them).
      lambdas: λ per SPIN iteration (one value: all of them).
      keep_previous: also train on the previous iteration's pairs.
    """

    iterations: int
    num_demonstrations: int
    batch_size: int
    epochs: tuple = (2.0,)
    lambdas: tuple = (0.1,)
    keep_previous: bool = True

    def __post_init__(self):
        for name in ("epochs", "lambdas"):
            values = getattr(self, name)
            if len(values) not in (1, self.iterations):
                raise ValueError(f"SPIN {name}: give one value or one per iteration "
                                 f"({self.iterations}), got {list(values)}")
            if any(v <= 0 for v in values):
                raise ValueError(f"SPIN {name} must be > 0, got {list(values)}")
        if self.iterations < 1 or self.num_demonstrations < 1 or self.batch_size < 1:
            raise ValueError(f"SPIN needs iterations, demonstrations and batch size >= 1, got "
                             f"{self.iterations}, {self.num_demonstrations}, {self.batch_size}")

    def _per_iteration(self, values: tuple, t: int) -> float:
        return float(values[t] if len(values) > 1 else values[0])

    def num_pairs(self, t: int) -> int:
        return self.num_demonstrations * (2 if self.keep_previous and t > 0 else 1)

    def length(self, t: int) -> int:
        """Trainer iterations of SPIN iteration t: ⌈epochs · pairs / batch size⌉."""
        return math.ceil(self._per_iteration(self.epochs, t) * self.num_pairs(t)
                         / self.batch_size)

    @property
    def starts(self) -> tuple[int, ...]:
        """The trainer iteration (1-based) each SPIN iteration starts at."""
        starts = [1]
        for t in range(self.iterations - 1):
            starts.append(starts[-1] + self.length(t))
        return tuple(starts)

    @property
    def total(self) -> int:
        return self.starts[-1] + self.length(self.iterations - 1) - 1

    @property
    def ends(self) -> tuple[int, ...]:
        """The trainer iteration each SPIN iteration ends at."""
        return tuple(s - 1 for s in self.starts[1:]) + (self.total,)

    def lam(self, t: int) -> float:
        return self._per_iteration(self.lambdas, t)

    def spin_iteration(self, iteration):
        """The SPIN iteration (0-based) of trainer iteration ``iteration`` (an int or a traced
        scalar)."""
        return jnp.searchsorted(jnp.asarray(self.starts), iteration, side="right") - 1


class SelfPlayPairs(PairDataset):
    """SPIN's pairs: at the start of each SPIN iteration (``schedule.starts``), one sample y' per
    demonstration from the current policy (the opponent θ_t, which the loss's stored policy
    snapshots at the same iteration); the pairs are (demonstration y, y'), plus the previous
    iteration's with ``keep_previous``; the trainer iterations of the SPIN iteration replay them.

    Args:
      demonstrations: records with ``prompt``, ``response`` (the demonstration y) and ``gold``
        (scored with the run's reward function for the metrics only).
      schedule: the :class:`SpinSchedule`.

    Metrics (``spin/<key>``): ``iteration`` (t), ``generated_reward`` (the verifier's mean
    reward of this iteration's samples y'), ``demo_reward`` (of the demonstrations),
    ``num_pairs``, ``epoch``, ``cut`` (demonstrations cut at ``--max_new_tokens``).
    """

    name = "spin"

    def __init__(self, demonstrations: list[dict], schedule: SpinSchedule):
        super().__init__()
        if len(demonstrations) != schedule.num_demonstrations:
            raise ValueError(f"{len(demonstrations)} demonstrations, the schedule expects "
                             f"{schedule.num_demonstrations}")
        self.demonstrations = list(demonstrations)
        self.schedule = schedule
        self.previous: Rollouts | None = None

    def process(self, rollouts: Rollouts | None, step: stages.StageStep) -> Rollouts:
        del rollouts
        if step.iteration in self.schedule.starts:
            self._self_play(step, self.schedule.starts.index(step.iteration))
        elif self.pairs is None:
            raise ValueError(f"iteration {step.iteration}: no SPIN pairs (a SPIN iteration starts "
                             f"at {self.schedule.starts})")
        return self.next_batch(step.config)

    def _self_play(self, step: stages.StageStep, t: int) -> None:
        sampler, config = step.sampler, step.config
        chunks = [self.demonstrations[i:i + config.batch_size]
                  for i in range(0, len(self.demonstrations), config.batch_size)]
        # One sample per demonstration prompt from the opponent θ_t (the current policy); seed
        # indices far above any iteration number keep these draws apart from every other one.
        generated = batch_lib.concat(
            [sampler.sample(step.params, chunk, seed_index=(1 << 29) + (step.iteration << 8)
                            + index, policy_version=step.policy_version, num_samples=1)
             for index, chunk in enumerate(chunks)], sampler.pad_id)
        demo_texts = [d["response"] for d in self.demonstrations]
        demo_rewards = sampler.reward_fn(self.demonstrations, demo_texts, sampler.pool)
        demos, cut = rows_from_texts(
            sampler, [d["prompt"] for d in self.demonstrations], demo_texts,
            max_new_tokens=config.max_new_tokens, rewards=demo_rewards,
            policy_version=step.policy_version)
        generated = dataclasses.replace(generated, group_index=demos.group_index)
        current = interleave(demos, generated, sampler.pad_id)
        pairs = current
        if self.schedule.keep_previous and self.previous is not None:
            pairs = batch_lib.concat([current, self.previous], sampler.pad_id)
        self.previous = current
        self.reset(pairs, salt=t, stats={
            "iteration": t, "generated_reward": float(np.mean(generated.rewards)),
            "demo_reward": float(np.mean(demos.rewards)), "cut": int(cut)})

    def state_dict(self) -> tuple[dict, dict]:
        meta, arrays = super().state_dict()
        arrays = {f"pairs/{k}": v for k, v in arrays.items()}
        if self.previous is not None:
            arrays.update({f"previous/{k}": v for k, v in self.previous.as_dict().items()})
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        super().load_state_dict(meta, checkpoint_lib.with_prefix(arrays, "pairs/"))
        previous = checkpoint_lib.with_prefix(arrays, "previous/")
        self.previous = Rollouts.from_dict(previous) if previous else None


class RolloutCollector(stages.Stage):
    """Keeps every batch the pipeline produced until :meth:`take` (VerIPO: a GRPO stage's rollouts,
    for the verifier that builds the next DPO stage's pairs); checkpointed."""

    name = "collector"

    def __init__(self):
        self.parts: list[Rollouts] = []
        self.pad_id = 0

    def process(self, rollouts: Rollouts | None, step: stages.StageStep) -> Rollouts:
        self.parts.append(rollouts)
        self.pad_id = step.sampler.pad_id
        return rollouts

    def take(self) -> Rollouts | None:
        """Everything kept so far (in order), and forgets it."""
        kept = batch_lib.concat(self.parts, self.pad_id) if self.parts else None
        self.parts = []
        return kept

    def metrics(self) -> dict:
        return {"rows": sum(p.num_rows for p in self.parts)}

    def state_dict(self) -> tuple[dict, dict]:
        if not self.parts:
            return {"pad_id": self.pad_id}, {}
        return {"pad_id": self.pad_id}, batch_lib.concat(self.parts, self.pad_id).as_dict()

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        self.pad_id = meta["pad_id"]
        self.parts = [Rollouts.from_dict(arrays)] if arrays else []



# ---------------------------------------------------------------------------------------------
# Pairwise losses over a pair batch.


def halves(x):
    """``(x[0::2], x[1::2])``: the chosen and the rejected rows of a pair batch."""
    return x[0::2], x[1::2]


def log_ratio_metrics(logp, ref_logp, mask) -> dict:
    """Mean sequence log-ratio log π_θ(y|x) − log π_ref(y|x) of the chosen and the rejected
    responses (DPO's implicit rewards divided by β)."""
    out = {}
    for name, (lp, ref, m) in zip(("chosen", "rejected"),
                                  zip(halves(logp), halves(ref_logp), halves(mask))):
        out[f"{name}_logratio"] = jnp.mean(common.sequence_sum(lp - ref, m))
    return out


def _rename_accuracy(metrics: dict) -> dict:
    metrics = dict(metrics)
    metrics["pair_accuracy"] = metrics.pop("reward_accuracy")
    return metrics


def dpo_loss(beta: float, label_smoothing: float = 0.0, reference: str = "ref"):
    """``(inputs, info) -> (loss, metrics)``: ``losses.dpo`` on a pair batch, the reference being
    the stored policy ``reference``. Metrics: ``dpo_loss``, ``pair_accuracy`` (share of pairs
    with h > 0), ``reward_margin`` (mean h), ``chosen_reward`` / ``rejected_reward`` (β ×
    log-ratio), ``chosen_logratio`` / ``rejected_logratio``."""

    def loss(inputs, info):
        del info
        logp, ref, mask = inputs["logp"], inputs[f"{reference}_logp"], inputs["mask"]
        (c, r), (c_ref, r_ref), (c_mask, r_mask) = halves(logp), halves(ref), halves(mask)
        value, metrics = losses.dpo(c, r, c_ref, r_ref, c_mask, r_mask, beta=beta,
                                    label_smoothing=label_smoothing)
        return value, {**_rename_accuracy(metrics), **log_ratio_metrics(logp, ref, mask)}

    return loss


def spin_loss(schedule: SpinSchedule, opponent: str = "opponent"):
    """``(inputs, info) -> (loss, metrics)``: ``losses.spin`` on a pair batch (demonstration,
    opponent's sample), λ of the SPIN iteration the trainer iteration belongs to. Metrics:
    ``spin_loss``, ``pair_accuracy``, ``reward_margin``, ``chosen_logratio`` /
    ``rejected_logratio`` (against the opponent), ``lambda``."""
    lambdas = jnp.asarray([schedule.lam(t) for t in range(schedule.iterations)], jnp.float32)

    def loss(inputs, info):
        lam = lambdas[schedule.spin_iteration(info.iteration)]
        logp, ref, mask = inputs["logp"], inputs[f"{opponent}_logp"], inputs["mask"]
        (y, y_gen), (y_ref, y_gen_ref), (y_mask, y_gen_mask) = halves(logp), halves(ref), \
            halves(mask)
        value, metrics = losses.spin(y, y_gen, y_ref, y_gen_ref, y_mask, y_gen_mask, lam=lam)
        return value, {**_rename_accuracy(metrics), **log_ratio_metrics(logp, ref, mask),
                       "lambda": lam}

    return loss


def dpo_algorithm(beta: float, pair_stage: stages.Stage, *, label_smoothing: float = 0.0,
                  name: str = "dpo") -> Algorithm:
    """DPO against the policy it starts from (frozen), on the pairs ``pair_stage`` yields."""
    return Algorithm(name=name, loss=dpo_loss(beta, label_smoothing),
                     forward={"ref": ("logp",)}, policies=(policies.reference("ref"),),
                     minibatch_unit="pair", needs_groups=False, stages=(pair_stage,))


def spin_algorithm(schedule: SpinSchedule, demonstrations: list[dict]) -> Algorithm:
    """SPIN: the pairs of :class:`SelfPlayPairs` against the opponent θ_t, a stored policy that
    snapshots the current one at the start of each SPIN iteration (both y''s sampler and the
    reference: the reference advances every SPIN iteration); evaluated at each one's end."""
    return Algorithm(
        name="spin", loss=spin_loss(schedule, opponent="opponent"),
        forward={"opponent": ("logp",)},
        policies=(policies.snapshots("opponent", schedule.starts),),
        minibatch_unit="pair", needs_groups=False,
        stages=(SelfPlayPairs(demonstrations, schedule),), evaluate_after=schedule.ends)


def offline_pairs_source(num_prompts: int, judge, *, max_pairs_per_prompt: int = 0,
                         prefer_longer: bool = False):
    """A :class:`PairDataset` source: ``num_prompts`` prompts × ``--group_size`` responses drawn
    once from the initial policy exactly as TOPR's offline dataset is
    (``stages.draw_groups``), paired within each group: a verified-correct response whose
    reasoning ``judge`` accepts against one that is not. Stats: the group counts of
    :func:`pairs_from_groups`, ``dataset_reward_mean`` and, with a judge other than
    :func:`accept_all`, its :func:`verifier_stats`."""

    def source(step: stages.StageStep) -> tuple[Rollouts, dict]:
        dataset = stages.draw_groups(step, num_prompts)
        correct = dataset.rewards > 0
        sound = judge_rows(dataset, step.sampler.tokenizer, judge)
        pairs, stats = pairs_from_groups(
            dataset, step.config.group_size, correct & sound,
            rng=np.random.default_rng([step.config.seed, 17]),
            max_pairs_per_prompt=max_pairs_per_prompt, prefer_longer=prefer_longer)
        if pairs is None:
            raise ValueError(f"none of the {num_prompts} prompts got both a chosen and a rejected "
                             f"response among its {step.config.group_size} samples: no pairs")
        del stats["pairs"]           # the stage logs the set's size as num_pairs
        stats["dataset_reward_mean"] = float(np.mean(dataset.rewards))
        if judge is not accept_all:
            stats.update(verifier_stats(correct, sound))
        return pairs, stats

    return source


def jsonl_pairs_source(path: str, *, prompt_field: str = "prompt", chosen_field: str = "chosen",
                       rejected_field: str = "rejected"):
    """A :class:`PairDataset` source: the (prompt, chosen, rejected) texts of a JSONL file, the
    prompt used as is (the text the model continues). Rewards are 1 (chosen) and 0 (rejected),
    the preference; stats: ``cut`` (responses cut at ``--max_new_tokens``)."""

    def source(step: stages.StageStep) -> tuple[Rollouts, dict]:
        records = read_jsonl(path, (prompt_field, chosen_field, rejected_field))
        prompts = [r[prompt_field] for r in records]
        parts, cut = [], 0
        for field, reward in ((chosen_field, 1.0), (rejected_field, 0.0)):
            rows, cut_here = rows_from_texts(
                step.sampler, prompts, [r[field] for r in records],
                max_new_tokens=step.config.max_new_tokens,
                rewards=np.full(len(records), reward, np.float32))
            parts.append(rows)
            cut += cut_here
        return interleave(*parts, step.sampler.pad_id), {"cut": cut}

    return source
