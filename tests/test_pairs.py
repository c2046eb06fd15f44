"""Preference pairs (``training.pairs``) and the methods built on them: DPO, SPIN and VerIPO.

* Model-free: pair construction from groups (no pair mixes prompts; a group with no chosen or no
  rejected response gives none; each response used once; longest-first), pair batches through
  ``Learner.update`` (a pair never split across minibatches or microbatches), the config counting
  pairs, the ``snapshots`` stored-policy rule and ``PolicyStore.restart``, the arith process check
  against hand-made workings, judges, the pair stages (epochs, checkpoint state, SPIN's self-play
  at the start of each SPIN iteration) and the pairwise loss wrappers.
* In-process runs on a tiny random model: SPIN's reference (the opponent) moves at the start of
  each SPIN iteration, and VerIPO's stage-switching loop ends with the same metrics and
  parameters when it crashes between writing a metrics line and its checkpoint at stage
  boundaries and is restarted (a SPIN run likewise at a SPIN-iteration boundary).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses
from offpolicy_jax.data import arith
from offpolicy_jax.training import algorithm as algorithm_lib
from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import loop, pairs, policies, stages
from offpolicy_jax.training.algorithm import Algorithm, StepInfo
from offpolicy_jax.training.batch import Rollouts
from offpolicy_jax.training.config import RunConfig
from offpolicy_jax.training.logger import TIMING_KEYS

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Pair construction.


def _groups(chosen_by_group, lengths=None) -> Rollouts:
    """Groups of G rows: group g's prompt is ``[g + 1] * (g + 1)``, row j's tokens
    ``[g + 1, j + 1, 0, ...]``; rewards 1 where chosen."""
    chosen = np.asarray(chosen_by_group, np.float32)
    num_groups, group_size = chosen.shape
    num_rows = num_groups * group_size
    group = np.repeat(np.arange(num_groups), group_size)
    sample = np.tile(np.arange(group_size), num_groups)
    prompt_tokens, prompt_lengths = batch_lib.prompts_to_array(
        [[int(g) + 1] * (int(g) + 1) for g in group], 0)
    tokens = np.zeros((num_rows, 6), np.int32)
    tokens[:, 0], tokens[:, 1] = group + 1, sample + 1
    return Rollouts(
        prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths, tokens=tokens,
        lengths=(np.full(num_rows, 3, np.int32) if lengths is None
                 else np.asarray(lengths, np.int32).reshape(-1)),
        behaviour_logp=np.zeros(tokens.shape, np.float32), rewards=chosen.reshape(-1),
        group_index=group.astype(np.int32), policy_version=np.zeros(num_rows, np.int32))


def test_pairs_from_groups_pair_within_a_prompt_and_skip_one_sided_groups():
    chosen = [[1, 0, 1, 0],      # 2 chosen, 2 rejected: 2 pairs
              [1, 1, 1, 1],      # no rejected response: no pair
              [0, 0, 0, 0],      # no chosen response: no pair
              [0, 1, 0, 0]]      # 1 pair
    rollouts = _groups(chosen)
    flags = rollouts.rewards > 0
    pair_rows, stats = pairs.pairs_from_groups(rollouts, 4, flags,
                                               rng=np.random.default_rng(0))
    assert stats == {"pairs": 3, "groups": 4, "groups_with_pairs": 2, "groups_all_chosen": 1,
                     "groups_none_chosen": 1, "chosen_length": 3.0, "rejected_length": 3.0}
    assert pair_rows.num_rows == 6
    winners, losers = pair_rows.take(np.arange(0, 6, 2)), pair_rows.take(np.arange(1, 6, 2))
    # No pair mixes prompts: same group, same prompt tokens; chosen over rejected.
    np.testing.assert_array_equal(winners.group_index, losers.group_index)
    assert winners.prompts() == losers.prompts()
    np.testing.assert_array_equal(winners.tokens[:, 0], losers.tokens[:, 0])
    assert sorted(winners.group_index.tolist()) == [0, 0, 3]
    np.testing.assert_array_equal(winners.rewards, 1.0)
    np.testing.assert_array_equal(losers.rewards, 0.0)
    # Each response in at most one pair.
    used = {tuple(row) for row in pair_rows.tokens[:, :2].tolist()}
    assert len(used) == 6

    capped, stats = pairs.pairs_from_groups(rollouts, 4, flags, rng=np.random.default_rng(0),
                                            max_pairs_per_prompt=1)
    assert stats["pairs"] == 2 and capped.num_rows == 4

    none, stats = pairs.pairs_from_groups(_groups([[1, 1], [0, 0]]), 2,
                                          np.array([1, 1, 0, 0], bool),
                                          rng=np.random.default_rng(0))
    assert none is None and stats["pairs"] == 0


def test_pairs_from_groups_prefers_the_longest_chosen_working():
    rollouts = _groups([[1, 1, 1, 0, 0, 0]], lengths=[[4, 9, 6, 5, 5, 5]])
    pair_rows, stats = pairs.pairs_from_groups(rollouts, 6, rollouts.rewards > 0,
                                               rng=np.random.default_rng(1), prefer_longer=True)
    # Chosen rows longest first: 9, 6, 4 (samples 2, 3, 1).
    np.testing.assert_array_equal(pair_rows.lengths[0::2], [9, 6, 4])
    np.testing.assert_array_equal(pair_rows.tokens[0::2, 1], [2, 3, 1])
    assert stats["chosen_length"] == pytest.approx(19 / 3)


# ---------------------------------------------------------------------------------------------
# Pair batches in the trainer.


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_learner_update_never_splits_a_pair(num_microbatches):
    """Every loss call (each microbatch of each minibatch) sees whole pairs, chosen first: its
    rows' halves are (2j, 2j + 1)."""
    import optax

    from offpolicy_jax.training import state as state_lib, step as step_lib, trainer
    num_pairs, iteration = 8, 2

    def loss_fn(params, batch, rng, context):
        del rng, context
        chosen, rejected = pairs.halves(batch["row_id"])
        whole = jnp.all(chosen % 2 == 0) & jnp.all(rejected == chosen + 1)
        return jnp.sum(params["w"] ** 2), {"whole_pairs": whole.astype(jnp.float32),
                                           "rows": jnp.float32(chosen.shape[0] * 2)}

    optimizer = optax.sgd(0.1)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    learner = types.SimpleNamespace(
        config=RunConfig(workdir="", batch_size=num_pairs, group_size=8, num_minibatches=2,
                         num_microbatches=num_microbatches, num_passes=2),
        algorithm=Algorithm(name="fake", loss=None, minibatch_unit="pair"),
        state=state_lib.create_train_state({"w": jnp.ones(3)}, optimizer, rng=0),
        train_step=step_lib.make_train_step(loss_fn, optimizer,
                                            num_microbatches=num_microbatches),
        batch_sharding=device, replicated=device, guard=step_lib.NonFiniteGuard(5),
        adapted=None,
        # The model's inputs as the padded layout passes them (no model here to pack for).
        model_inputs=lambda minibatch, num_microbatches: {"tokens": minibatch["tokens"]})
    learner.config.validate(learner.algorithm)
    batch = {"tokens": np.zeros((2 * num_pairs, 1), np.int32),
             "row_id": np.arange(2 * num_pairs, dtype=np.int32)}
    metrics = trainer.Learner.update(learner, batch, iteration)
    assert len(metrics) == 4
    assert [float(m["whole_pairs"]) for m in metrics] == [1.0] * 4
    assert [float(m["rows"]) for m in metrics] == [2 * num_pairs / 2 / num_microbatches] * 4


def test_config_counts_a_pair_batch_in_pairs():
    dpo = pairs.dpo_algorithm(0.1, pairs.PairDataset())
    # --batch_size=3 pairs are 6 rows, whatever --group_size: 3 minibatches of one pair each.
    RunConfig(workdir="", batch_size=3, group_size=8, num_minibatches=3).validate(dpo)
    with pytest.raises(ValueError, match="the 3 pairs of 2 rows .* must divide into 2 "
                                         "minibatches"):
        RunConfig(workdir="", batch_size=3, group_size=8, num_minibatches=2).validate(dpo)


# ---------------------------------------------------------------------------------------------
# Stored policies: snapshots and restart.


def _params(version: float) -> dict:
    return {"w": jnp.full((2, 3), version, jnp.float32), "b": {"c": jnp.full((3,), version)}}


def _version(params) -> float:
    values = {float(v) for leaf in jax.tree.leaves(params) for v in np.asarray(leaf).ravel()}
    assert len(values) == 1, values
    return values.pop()


def _drive(store, first, last) -> list[float]:
    seen = []
    for iteration in range(first, last + 1):
        start = _params(iteration - 1)
        scored = store.for_iteration(iteration, start)
        jax.tree.map(lambda leaf: leaf.delete(), start)       # the train step donates it
        seen.append(_version(scored["opponent"]))
        store.after_updates(iteration, _params(iteration))
    return seen


def test_snapshots_rule_moves_the_opponent_at_each_start_and_restores():
    stored = (policies.snapshots("opponent", (1, 3, 6)),)
    store = policies.PolicyStore(stored, _params(0))
    # The start of iterations 1, 3 and 6 (versions 0, 2, 5), each until the next.
    assert _drive(store, 1, 7) == [0, 0, 2, 2, 2, 5, 5]

    for saved_after in (1, 2, 4):
        original = policies.PolicyStore(stored, _params(0))
        _drive(original, 1, saved_after)
        meta, arrays = original.state_dict()
        restored = policies.PolicyStore(stored, _params(0))
        restored.load_state_dict(json.loads(json.dumps(meta)), arrays)
        assert _drive(restored, saved_after + 1, 7) == _drive(original, saved_after + 1, 7)

    with pytest.raises(ValueError, match="needs increasing iterations >= 1"):
        policies.snapshots("opponent", (3, 3))


def test_policy_store_restart_makes_every_stored_policy_the_given_one():
    stored = (policies.reference("ref"), policies.behind("prev", 2))
    store = policies.PolicyStore(stored, _params(0))
    for iteration in (1, 2):
        store.for_iteration(iteration, _params(iteration - 1))
    store.restart(_params(7), 3)
    scored = store.for_iteration(3, _params(7))
    assert {name: _version(p) for name, p in scored.items()} == {"ref": 7, "prev": 7}
    # The restarted copies are not the initial policy: they are written to checkpoints.
    meta, arrays = store.state_dict()
    assert meta == {"ref": [3], "prev": [3, 3]}
    restored = policies.PolicyStore(stored, _params(0))
    restored.load_state_dict(meta, arrays)
    assert _version(restored.for_iteration(4, _params(9))["ref"]) == 7


# ---------------------------------------------------------------------------------------------
# The process check and judges.


@pytest.mark.parametrize("expression,response,want", [
    # A sound working: every check passes.
    ("12+7*3", "7*3=21, 12+21=33. \\boxed{33}", (True, True, True, True)),
    ("9-(8-3)*5", "8-3=5, 5*5=25, 9-25=-16. \\boxed{-16}", (True, True, True, True)),
    ("2*3+4*5", "4*5=20, 2*3=6, 6+20=26. \\boxed{26}", (True, True, True, True)),  # any order
    # Right answer, wrong working: a slip the next step cancels (21 is not 7*3's result 22).
    ("12+7*3", "7*3=22, 12+21=33. \\boxed{33}", (True, False, False, True)),
    # Two slips, each consistent with the working: 8*4=33 wrong, the rest follows.
    ("8*4+8", "8*4=33, 33+8=40. \\boxed{40}", (True, False, True, True)),
    # Inconsistent: the boxed answer is not the working's.
    ("12+7*3", "7*3=21, 12+21=33. \\boxed{34}", (True, True, True, False)),
    # A skipped step (21 comes from nowhere) and an invented number (0).
    ("12+7*3", "12+21=33. \\boxed{33}", (True, True, False, True)),
    ("3+3", "3+3=6, 6+0=6. \\boxed{6}", (True, True, False, True)),
    # Not the task's format.
    ("12+7*3", "7*3=21, 12+21=33.\\boxed{33}", (False, False, False, False)),
    ("12+7*3", "the answer is \\boxed{33}", (False, False, False, False)),
    ("12+7*3", "", (False, False, False, False)),
])
def test_check_working_on_hand_made_workings(expression, response, want):
    check = arith.check_working(expression, response)
    assert (check.well_formed, check.steps_correct, check.grounded, check.consistent) == want
    assert check.valid == all(want)


def test_every_demonstration_of_the_task_passes_the_check():
    for problem in arith.generate_problems(200, "train", seed=1,
                                           config=arith.ArithConfig(parentheses=True)):
        assert arith.check_working(problem.expression, problem.response).valid, problem


def test_judges():
    prompt = arith.format_prompt("12+7*3")
    assert arith.expression_of(prompt) == "12+7*3"
    assert pairs.resolve_judge("arith")(prompt, "7*3=21, 12+21=33. \\boxed{33}")
    assert not pairs.resolve_judge("arith")(prompt, "7*3=22, 12+21=33. \\boxed{33}")
    assert pairs.resolve_judge("none")(prompt, "anything")
    assert pairs.resolve_judge("offpolicy_jax.training.pairs:arith_judge") is pairs.arith_judge
    with pytest.raises(ValueError, match="expected one of"):
        pairs.resolve_judge("llm")
    with pytest.raises(ValueError, match="not an arith prompt"):
        pairs.arith_judge("What is 2+2?", "4")
    # Agreement with the outcome reward: 4 of 5 verdicts match; one correct answer unsound.
    stats = pairs.verifier_stats(np.array([1, 1, 0, 0, 1], bool),
                                 np.array([1, 0, 0, 0, 1], bool))
    assert stats == {"judge_agreement": 0.8, "correct_unsound": pytest.approx(1 / 3),
                     "wrong_sound": 0.0}


# ---------------------------------------------------------------------------------------------
# Pair stages.


class FakeSampler:
    """``stages.RolloutSampler``'s duck type without a model: text is tokenized as characters
    (``ord``), EOS is 1, pad 0; sample ``j`` of a record has tokens ``[id + 10, seed_index % 97,
    j + 2]`` (padded to ``--max_new_tokens``); its reward is 1 for every third sample index, a
    text's reward 1 if it ends with "!"."""

    pad_id, eos_ids = 0, (1,)

    def __init__(self, config):
        self.config, self.generated, self.pool = config, 0, None

    def encode(self, text):
        return [ord(c) for c in text]

    def reward_fn(self, records, responses, pool):
        del pool
        return np.array([float(r.endswith("!")) for r in responses], np.float32)

    def sample(self, params, records, seed_index, policy_version, num_samples=None):
        del params
        num = num_samples or self.config.group_size
        ids = np.repeat([r["id"] for r in records], num)
        samples = np.tile(np.arange(num), len(records))
        prompt_tokens, prompt_lengths = batch_lib.prompts_to_array(
            [self.encode(r["prompt"]) for r in records for _ in range(num)], self.pad_id)
        # [N, --max_new_tokens], as the real sampler returns them.
        tokens = np.zeros((len(ids), self.config.max_new_tokens), np.int32)
        tokens[:, :3] = np.stack([ids + 10, np.full(len(ids), seed_index % 97), samples + 2], 1)
        self.generated += len(ids)
        return Rollouts(
            prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
            tokens=tokens.astype(np.int32), lengths=np.full(len(ids), 3, np.int32),
            behaviour_logp=np.full(tokens.shape, -0.5, np.float32),
            rewards=(samples % 3 == 0).astype(np.float32),
            group_index=np.repeat(np.arange(len(records)), num).astype(np.int32),
            policy_version=np.full(len(ids), policy_version, np.int32))


def test_rows_from_texts_and_a_jsonl_pair_file(tmp_path):
    config = RunConfig(workdir="", batch_size=2, max_new_tokens=4)
    sampler = FakeSampler(config)
    rows, cut = pairs.rows_from_texts(sampler, ["Q", "QQ"], ["ab", "abcd"], max_new_tokens=4,
                                      rewards=np.array([1.0, 0.0]), policy_version=3)
    # "ab" + EOS fits; "abcd" + EOS is cut to 4 tokens (its EOS lost).
    np.testing.assert_array_equal(rows.tokens, [[97, 98, 1, 0], [97, 98, 99, 100]])
    np.testing.assert_array_equal(rows.lengths, [3, 4])
    assert cut == 1 and rows.prompts() == [[81], [81, 81]]
    np.testing.assert_array_equal(rows.policy_version, [3, 3])
    np.testing.assert_array_equal(rows.behaviour_logp, 0.0)

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "P1", "chosen": "good", "rejected": "bad"},
        {"prompt": "P2", "chosen": "fine", "rejected": "worse"}]) + "\n")
    step = types.SimpleNamespace(sampler=sampler, config=config)
    pair_rows, stats = pairs.jsonl_pairs_source(str(path))(step)
    assert stats == {"cut": 3}                   # good, fine, worse are cut at 4 tokens
    np.testing.assert_array_equal(pair_rows.rewards, [1, 0, 1, 0])
    np.testing.assert_array_equal(pair_rows.group_index, [0, 0, 1, 1])
    np.testing.assert_array_equal(pair_rows.tokens[:, 0], [ord(c) for c in "gbfw"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "P", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: the record has no text field"):
        pairs.jsonl_pairs_source(str(tmp_path / "bad.jsonl"))(step)


def _batches(stage, config, iterations, sampler=None):
    sampler = sampler or FakeSampler(config)
    out = []
    for iteration in iterations:
        step = stages.StageStep(iteration=iteration, params=None, policy_version=iteration - 1,
                                records=[], fresh=None, sampler=sampler, selection=None,
                                config=config)
        batch = stage.process(None, step)
        out.append((batch.as_dict(), stage.metrics(), sampler.generated))
    return out


def _same(got, want):
    assert len(got) == len(want)
    for (arrays, metrics, generated), (want_arrays, want_metrics, want_generated) in zip(got, want):
        assert metrics == want_metrics and generated == want_generated
        for key in want_arrays:
            np.testing.assert_array_equal(arrays[key], want_arrays[key], err_msg=key)


def test_pair_dataset_replays_whole_pairs_epoch_by_epoch_and_restores(tmp_path):
    config = RunConfig(workdir="", batch_size=2, seed=4)
    pair_rows, _ = pairs.pairs_from_groups(_groups([[1, 0], [0, 1], [1, 0]]), 2,
                                           np.array([1, 0, 0, 1, 1, 0], bool),
                                           rng=np.random.default_rng(0))

    def make():
        stage = pairs.PairDataset()
        stage.reset(pair_rows, salt=5, stats={"made_by": 1})
        return stage

    straight = _batches(make(), config, range(1, 5))
    # 3 pairs, 2 per iteration: epochs 0, 1, 1, 2; each epoch a permutation seeded (4, 5, epoch).
    assert [m for _, m, _ in straight] == [{"num_pairs": 3, "epoch": e, "made_by": 1}
                                           for e in (0, 1, 1, 2)]
    taken = np.concatenate([a["group_index"] for a, _, _ in straight]).reshape(-1, 2)
    np.testing.assert_array_equal(taken[:, 0], taken[:, 1])         # whole pairs
    want = [int(pair_rows.group_index[2 * u]) for epoch in range(3)
            for u in np.random.default_rng([4, 5, epoch]).permutation(3)][:8]
    assert taken[:, 0].tolist() == want

    first = make()
    _batches(first, config, (1, 2))
    meta, arrays = first.state_dict()
    resumed = pairs.PairDataset()
    resumed.load_state_dict(json.loads(json.dumps(meta)), arrays)
    _same(_batches(resumed, config, (3, 4)), straight[2:])
    with pytest.raises(ValueError, match="the pair set is empty"):
        _batches(pairs.PairDataset(), config, (1,))


def test_self_play_pairs_sample_the_opponent_at_each_spin_iteration_start(tmp_path):
    """3 demonstrations, 2 pairs per iteration, 1 epoch, keeping the previous pairs: SPIN
    iteration 0 is ⌈3/2⌉ = 2 trainer iterations, iteration 1 ⌈6/2⌉ = 3 (starts 1 and 3)."""
    config = RunConfig(workdir="", batch_size=2, max_new_tokens=4, seed=0)
    schedule = pairs.SpinSchedule(iterations=2, num_demonstrations=3, batch_size=2,
                                  epochs=(1.0,), lambdas=(0.1, 5.0), keep_previous=True)
    assert (schedule.starts, schedule.ends, schedule.total) == ((1, 3), (2, 5), 5)
    demos = [{"id": i, "prompt": f"P{i}", "response": "ok!" if i else "no", "gold": "1"}
             for i in range(3)]

    def make():
        return pairs.SelfPlayPairs(demos, schedule)

    straight = _batches(make(), config, range(1, 6))
    # One sample per demonstration, at iterations 1 and 3 only.
    assert [generated for _, _, generated in straight] == [3, 3, 6, 6, 6]
    metrics = [m for _, m, _ in straight]
    assert [m["iteration"] for m in metrics] == [0, 0, 1, 1, 1]
    assert [m["num_pairs"] for m in metrics] == [3, 3, 6, 6, 6]
    assert metrics[0]["demo_reward"] == pytest.approx(2 / 3)      # "ok!" x 2 of 3
    assert metrics[0]["generated_reward"] == 1.0                  # sample 0 of each prompt
    for arrays, metric, _ in straight:
        chosen, rejected = (Rollouts.from_dict(arrays).take(np.arange(k, 4, 2)) for k in (0, 1))
        # The chosen row is the demonstration ("ok!"/"no" + EOS, cut at 4), the rejected row
        # the opponent's sample of the same prompt, sampled at a SPIN iteration's start.
        np.testing.assert_array_equal(chosen.group_index, rejected.group_index)
        assert chosen.prompts() == rejected.prompts()
        for row, index in enumerate(chosen.group_index):
            text = demos[index]["response"]
            assert chosen.tokens[row, :chosen.lengths[row]].tolist() == \
                [ord(c) for c in text] + [1]
        # Sampled in chunks of --batch_size prompts, seed index 2^29 + (start << 8) + chunk.
        chunk = rejected.group_index // 2
        starts = {((1 << 29) + (start << 8)) % 97 for start in (1, 3)}
        assert set((rejected.tokens[:, 1] - chunk) % 97) <= starts
        np.testing.assert_array_equal(rejected.tokens[:, 0] - 10, rejected.group_index)
    # SPIN iteration 1 trains on its own pairs (version 2) and iteration 0's (version 0).
    versions = np.concatenate([a["policy_version"] for a, _, _ in straight[2:]])
    assert set(versions) == {0, 2}

    first = make()
    _batches(first, config, (1, 2, 3))
    meta, arrays = first.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(meta)), arrays)
    resumed_batches = _batches(resumed, config, (4, 5), sampler=FakeSampler(config))
    # The restored sampler count is the pipeline's business; compare batches and metrics.
    _same([(a, m, 6) for a, m, _ in resumed_batches], straight[3:])
    # A restart from iteration 2's state must regenerate at 3 and keep iteration 0's pairs.
    second = make()
    _batches(second, config, (1, 2))
    meta, arrays = second.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(meta)), arrays)
    sampler = FakeSampler(config)
    sampler.generated = 3
    _same(_batches(resumed, config, (3, 4, 5), sampler=sampler), straight[2:])


def test_pairwise_losses_split_a_pair_batch():
    rng = np.random.default_rng(0)
    num_pairs, length = 3, 5
    logp = jnp.asarray(rng.normal(size=(2 * num_pairs, length)), jnp.float32)
    ref = jnp.asarray(rng.normal(size=(2 * num_pairs, length)), jnp.float32)
    mask = jnp.asarray(rng.random((2 * num_pairs, length)) > 0.3, jnp.float32)
    info = StepInfo(iteration=jnp.int32(1), rng=jax.random.PRNGKey(0), group_size=2)

    value, metrics = pairs.dpo_loss(0.2)({"logp": logp, "ref_logp": ref, "mask": mask}, info)
    want, want_metrics = losses.dpo(logp[0::2], logp[1::2], ref[0::2], ref[1::2], mask[0::2],
                                    mask[1::2], beta=0.2)
    assert float(value) == pytest.approx(float(want))
    assert float(metrics["pair_accuracy"]) == float(want_metrics["reward_accuracy"])
    assert float(metrics["reward_margin"]) == pytest.approx(float(want_metrics["reward_margin"]))
    assert float(metrics["chosen_logratio"]) * 0.2 == pytest.approx(
        float(want_metrics["chosen_reward"]), rel=1e-5)
    assert float(metrics["rejected_logratio"]) * 0.2 == pytest.approx(
        float(want_metrics["rejected_reward"]), rel=1e-5)

    # SPIN: λ of the SPIN iteration the trainer iteration belongs to (starts 1 and 3).
    schedule = pairs.SpinSchedule(iterations=2, num_demonstrations=3, batch_size=2,
                                  epochs=(1.0,), lambdas=(0.1, 5.0))
    loss = jax.jit(pairs.spin_loss(schedule))
    for iteration, lam in ((1, 0.1), (2, 0.1), (3, 5.0), (5, 5.0)):
        info = StepInfo(iteration=jnp.int32(iteration), rng=jax.random.PRNGKey(0), group_size=2)
        value, metrics = loss({"logp": logp, "opponent_logp": ref, "mask": mask}, info)
        want, _ = losses.spin(logp[0::2], logp[1::2], ref[0::2], ref[1::2], mask[0::2],
                              mask[1::2], lam=lam)
        assert float(value) == pytest.approx(float(want), rel=1e-6), iteration
        assert float(metrics["lambda"]) == pytest.approx(lam)


# ---------------------------------------------------------------------------------------------
# Whole runs, in process, on a tiny random model.


@pytest.fixture(scope="module")
def tiny_model(random_tiny_model):
    """The tiny random checkpoint of ``conftest.random_tiny_model``."""
    return random_tiny_model


def _reward(records, responses, pool):
    """Deterministic in the response text, no verifier needed."""
    del records, pool
    return np.array([float(len(text) % 2) for text in responses], np.float32)


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in f]


def _params_at(workdir, step):
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return checkpointer.read_state(step)["params"]
    finally:
        checkpointer.close()


def _assert_same_params(a, b):
    leaves = jax.tree.leaves(a)
    assert len(leaves) == len(jax.tree.leaves(b)) > 0
    for x, y in zip(leaves, jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


class Crash(Exception):
    """Stands in for a kill between a metrics line and its checkpoint."""


@pytest.fixture
def crash_before_saving(monkeypatch):
    """``crash_at`` (a set of steps): the first save of each of them raises ``Crash`` instead."""
    crash_at = set()
    save = checkpoint_lib.Checkpointer.save

    def crashing_save(self, step, *args, **kwargs):
        if step in crash_at:
            crash_at.discard(step)
            raise Crash(step)
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", crashing_save)
    return crash_at


def test_dpo_pairs_come_from_topr_offline_dataset(tiny_model):
    """DPO on the model's own rollouts draws exactly TOPR's offline dataset (same prompts, same
    responses, same rewards) and pairs a rewarded response with an unrewarded one of its prompt."""
    from offpolicy_jax import models
    config = RunConfig(workdir="", model=tiny_model, batch_size=4, group_size=4,
                       max_new_tokens=8, seed=3)
    cfg, params = models.load_hf_checkpoint(tiny_model)
    tokenizer = models.load_tokenizer(tiny_model)

    def draw(stage):
        selection = stages.PromptStream()
        selection.bind([{"id": i, "prompt": arith.format_prompt(f"{i}+{i}"), "gold": "0"}
                        for i in range(40)], config)
        sampler = stages.RolloutSampler(cfg=cfg, tokenizer=tokenizer, config=config, pool=None,
                                        mesh=None, pad_id=tokenizer.pad_token_id,
                                        eos_ids=(tokenizer.eos_token_id,), reward_fn=_reward)
        stage.process(None, stages.StageStep(iteration=1, params=params, policy_version=0,
                                             records=[], fresh=None, sampler=sampler,
                                             selection=selection, config=config))
        return stage

    offline = draw(stages.OfflineDataset(num_prompts=6)).dataset
    stage = draw(pairs.PairDataset(pairs.offline_pairs_source(6, pairs.accept_all)))
    assert offline.num_rows == 24
    rows = {(tuple(r.prompt_tokens[:r.prompt_lengths].tolist()), tuple(r.tokens.tolist()),
             float(r.reward)) for r in _row_views(offline)}
    chosen_rows = _row_views(stage.pairs)[0::2]
    rejected_rows = _row_views(stage.pairs)[1::2]
    for c, r in zip(chosen_rows, rejected_rows):
        for row in (c, r):
            key = (tuple(row.prompt_tokens[:row.prompt_lengths].tolist()),
                   tuple(row.tokens.tolist()), float(row.reward))
            assert key in rows                       # a row of TOPR's dataset
        assert c.reward == 1.0 and r.reward == 0.0
        assert c.prompt_tokens.tolist() == r.prompt_tokens.tolist()
    # As many disjoint pairs as the groups allow.
    grouped = offline.rewards.reshape(6, 4)
    want = int(np.sum(np.minimum(grouped.sum(1), 4 - grouped.sum(1))))
    assert stage.num_pairs == want > 0
    assert stage.stats["dataset_reward_mean"] == pytest.approx(float(offline.rewards.mean()))


def _row_views(rollouts: Rollouts) -> list:
    return [types.SimpleNamespace(prompt_tokens=rollouts.prompt_tokens[i],
                                  prompt_lengths=int(rollouts.prompt_lengths[i]),
                                  tokens=rollouts.tokens[i, :rollouts.lengths[i]],
                                  reward=rollouts.rewards[i])
            for i in range(rollouts.num_rows)]


def _spin_run(workdir, model, seen):
    """SPIN over 8 arith demonstrations, 2 SPIN iterations, 4 pairs (8 rows, one per fake
    device) per trainer iteration, 1 epoch, previous pairs kept: starts 1 and 3, 6 iterations."""
    schedule = pairs.SpinSchedule(iterations=2, num_demonstrations=8, batch_size=4,
                                  epochs=(1.0,), lambdas=(0.1,), keep_previous=True)
    demos = [{"prompt": p, "response": r, "gold": "0"}
             for p, r in arith.demonstrations(8, seed=0)]
    spin = pairs.spin_algorithm(schedule, demos)

    def prepare(inputs, info):
        mask = inputs["mask"]
        generated = np.arange(mask.shape[0]) % 2 == 1
        fresh = generated & (inputs["policy_version"] == info.iteration - 1)
        seen.append({
            "iteration": int(info.iteration),
            "opponent_vs_old": float(np.max(np.abs(inputs["opponent_logp"] - inputs["old_logp"])
                                            * mask)),
            "opponent_vs_initial": float(np.max(np.abs(inputs["opponent_logp"]
                                                       - inputs["init_logp"]) * mask)),
            # The opponent sampled this iteration's y': its log-probs are the behaviour ones.
            "sampler_gap": float(np.max(np.abs(inputs["opponent_logp"] - inputs["behaviour_logp"])
                                        * mask * fresh[:, None])) if fresh.any() else None,
        })
        return {}

    probe = dataclasses.replace(
        spin, prepare=prepare, prepare_reads=("old_logp",), reward_fn=_reward,
        forward={**spin.forward, "old": ("logp",), "init": ("logp",)},
        policies=spin.policies + (policies.reference("init"),))
    config = RunConfig(workdir=str(workdir), model=model, iterations=schedule.total,
                       batch_size=4, group_size=2, max_new_tokens=8, eval_size=2, eval_samples=2,
                       ckpt_every=1, progress=False, learning_rate=1e-3)
    return loop.run(config, probe), schedule


def test_spin_reference_moves_each_spin_iteration_and_resumes_exactly(
        tiny_model, tmp_path, crash_before_saving):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    seen = []
    summary, schedule = _spin_run(straight, tiny_model, seen)
    assert summary["iterations"] == 6 and summary["rollouts"] == 16
    assert [s["iteration"] for s in seen] == [1, 2, 3, 4, 5, 6]
    gaps = {s["iteration"]: s for s in seen}
    # At each SPIN iteration's start the opponent is the current policy (θ_t) ...
    assert gaps[1]["opponent_vs_old"] == 0.0 and gaps[3]["opponent_vs_old"] == 0.0
    # ... and stays fixed while the policy trains on.
    assert all(gaps[i]["opponent_vs_old"] > 0 for i in (2, 4, 5, 6))
    # The reference moved: SPIN iteration 1's opponent is no longer the initial policy.
    assert [gaps[i]["opponent_vs_initial"] == 0.0 for i in range(1, 7)] == \
        [True, True, False, False, False, False]
    # The opponent sampled y' (behaviour log-probs agree up to round-off).
    assert gaps[1]["sampler_gap"] < 1e-4 and gaps[3]["sampler_gap"] < 1e-4
    records = _metrics(straight)
    # Held-out evaluation at the start and at the end of each SPIN iteration.
    assert [r["iteration"] for r in records if "eval/pass@1" in r] == [0, 2, 6]
    assert [r["spin/iteration"] for r in records[1:]] == [0, 0, 1, 1, 1, 1]
    assert [r["spin/num_pairs"] for r in records[1:]] == [8, 8, 16, 16, 16, 16]
    assert all(np.isfinite(r["train/spin_loss"]) for r in records[1:])

    # Killed at the second SPIN iteration's first checkpoint (after its self-play): the restart
    # restores iteration 2 and redoes the self-play with the same opponent.
    crash_before_saving.add(3)
    with pytest.raises(Crash):
        _spin_run(resumed, tiny_model, [])
    seen_resumed = []
    _spin_run(resumed, tiny_model, seen_resumed)
    assert [s["iteration"] for s in seen_resumed] == [3, 4, 5, 6]
    assert seen_resumed == seen[2:]
    assert _metrics(resumed) == records
    _assert_same_params(_params_at(resumed, 6), _params_at(straight, 6))


def _load_veripo():
    if "experiments_veripo" not in globals():
        spec = importlib.util.spec_from_file_location("experiments_veripo",
                                                      ROOT / "experiments" / "veripo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        globals()["experiments_veripo"] = module
    return globals()["experiments_veripo"]


def _veripo_run(workdir, model):
    """2 cycles of 2 GRPO iterations (2 prompts x 4 responses) and a DPO stage of ⌈pairs / 4⌉
    iterations of 4 pairs; a judge that rejects every third response length."""
    veripo = _load_veripo()

    def advantages(inputs, info):
        return {"advantages": np.asarray(losses.grpo_advantages(inputs["rewards"],
                                                                info.group_size))}

    def loss(inputs, info):
        del info
        return losses.grpo(inputs["logp"], inputs["old_logp"], inputs["advantages"],
                           inputs["mask"], kl_coef=0.0)

    grpo = Algorithm(name="grpo", loss=loss, prepare=advantages, forward={"old": ("logp",)},
                     reward_fn=_reward)
    config = RunConfig(workdir=str(workdir), model=model, iterations=100, batch_size=2,
                       group_size=4, max_new_tokens=8, eval_size=2, eval_samples=2,
                       ckpt_every=1, progress=False, learning_rate=1e-3)
    options = veripo.Options(cycles=2, grpo_iterations=2, dpo_epochs=1.0, dpo_batch_size=4,
                             dpo_learning_rate=1e-3, pairs_per_prompt=0)
    return veripo.run(config, options, grpo, lambda prompt, response: len(response) % 3 != 0)


def test_veripo_switches_stages_and_resumes_exactly_across_boundaries(
        tiny_model, tmp_path, crash_before_saving):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = _veripo_run(straight, tiny_model)
    records = _metrics(straight)
    stages_seen = [(r["cycle"], r["stage"]) for r in records[1:]]
    grpo_ends = [r["iteration"] for r in records if "verifier/pairs" in r]
    assert len(grpo_ends) == 2 and all(r["verifier/pairs"] > 0 for r in records
                                       if "verifier/pairs" in r)
    dpo_iterations = [r["iteration"] for r in records[1:] if r["stage"] == "dpo"]
    assert dpo_iterations, "no DPO stage ran: the boundaries below would not be tested"
    # GRPO (2 iterations) → DPO (⌈pairs / 4⌉) → GRPO (2) → DPO, evaluated at each stage's end.
    first_dpo = [i for i in dpo_iterations if i > grpo_ends[0] and i < grpo_ends[1]]
    assert stages_seen[:2] == [(0, "grpo"), (0, "grpo")]
    assert stages_seen[2:2 + len(first_dpo)] == [(0, "dpo")] * len(first_dpo)
    pairs_first = records[grpo_ends[0]]["verifier/pairs"]
    assert len(first_dpo) == -(-pairs_first // 4)
    ends = sorted({grpo_ends[0], first_dpo[-1], grpo_ends[1], dpo_iterations[-1]})
    assert [r["iteration"] for r in records if "eval/pass@1" in r] == [0] + ends
    assert summary["iterations"] == dpo_iterations[-1] and summary["rollouts"] == 32
    # The DPO stage trains against the policy it started from: its first update sees log-ratio
    # 0 and nothing is sampled (the rollout count stays).
    assert records[first_dpo[0]]["train/chosen_logratio"] == 0.0
    assert {r["rollouts"] for r in records if r.get("stage") == "dpo"} <= {16, 32}
    for key in ("judge_agreement", "correct_unsound", "wrong_sound", "groups_with_pairs"):
        assert f"verifier/{key}" in records[grpo_ends[0]]

    # Crashes between the metrics line and the checkpoint at the GRPO→DPO boundary, at the
    # first DPO iteration, at the DPO→GRPO boundary and right after it: each restart restores
    # the checkpoint before (mid-GRPO stage with its kept rollouts; the boundary's DPO state with
    # its pairs and reference; mid-DPO stage or the boundary; the fresh GRPO stage) and redoes
    # the rest, the verifier and the stage switches included.
    crash_points = {grpo_ends[0], grpo_ends[0] + 1, first_dpo[-1], first_dpo[-1] + 1}
    crash_before_saving.update(crash_points)
    for _ in crash_points:
        with pytest.raises(Crash):
            _veripo_run(resumed, tiny_model)
    _veripo_run(resumed, tiny_model)
    assert not crash_before_saving
    assert _metrics(resumed) == records
    last = dpo_iterations[-1]
    _assert_same_params(_params_at(resumed, last), _params_at(straight, last))
