"""In-process tests of the RL engine's redesigned parts (``training.algorithm``, ``policies``,
``stages``, ``trainer``, ``loop``), each asserting values derived by hand:

* ``algorithm.minibatches``: every row once per pass, units ("row" / "group" / "pair") kept whole
  and in order, seeded, and the "row" split equal to the historical ``array_split`` of a
  permutation; ``Learner.update`` feeding the loss those minibatches, pass after pass.
* ``policies.PolicyStore``: the reference / behind(k) / reset_after(T) update rules, copies that
  survive the donation of the caller's buffers, and checkpoint state (copies equal to the initial
  policy are not written; a restored store continues identically; a mismatch is refused).
* ``stages.RolloutPipeline`` with a fake sampler (no model) and a MoPPS-style selection stage: the
  batch composition per iteration with ``SuccessReplay``, every part's metrics under
  ``<stage name>/<key>``, and state_dict → load_state_dict (in memory and through a real orbax
  ``Checkpointer``) continuing identically, with ``ReplayWindow`` and with ``OfflineDataset``.
* ``loop.run`` on a tiny random model with a fake algorithm and MoPPS prompt selection: ``prepare``
  sees the whole batch,
  minibatches hold whole groups, a ``behind`` stored policy equals the old policy at iteration 1
  and lags after, the replay stage's metrics reach ``metrics.jsonl``, and a run restarted from
  its last checkpoint ends with the metrics and parameters of a run that never stopped.
* ``--rollout_lag``: a lagged run's behaviour log-probs are those of the checkpoint k iterations
  back (not the current policy's), with ``--rollout_correction`` on and decoupled PPO as the
  loss; it resumes exactly, and refuses to resume with another lag.

The model-free tests take well under a second each; the end-to-end test dominates the runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from offpolicy_jax.training import algorithm as algorithm_lib
from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax import losses
from offpolicy_jax.training import loop, policies, stages, trainer
from offpolicy_jax.training import selection as selection_lib
from offpolicy_jax.training.algorithm import Algorithm
from offpolicy_jax.training.batch import Rollouts
from offpolicy_jax.training.config import RunConfig
# Metrics that measure the machine, not the run: left out when comparing runs.
from offpolicy_jax.training.logger import TIMING_KEYS


# ---------------------------------------------------------------------------------------------
# Minibatch splitting.


@pytest.mark.parametrize("num_rows,num_minibatches", [(12, 3), (10, 4), (7, 1)])
def test_row_minibatches_are_the_array_split_of_a_permutation(num_rows, num_minibatches):
    # The behaviour before units existed: any change here silently changes every run's numbers.
    parts = algorithm_lib.minibatches(num_rows, num_minibatches, "row", 4,
                                      np.random.default_rng(3))
    expected = np.array_split(np.random.default_rng(3).permutation(num_rows), num_minibatches)
    assert len(parts) == num_minibatches
    for part, want in zip(parts, expected):
        np.testing.assert_array_equal(part, want)


@pytest.mark.parametrize("unit,group_size,size", [("group", 3, 3), ("group", 2, 2),
                                                  ("pair", 4, 2), ("row", 4, 1)])
@pytest.mark.parametrize("num_minibatches", [1, 2, 3])
def test_minibatches_keep_units_whole_and_cover_every_row_once(unit, group_size, size,
                                                               num_minibatches):
    num_rows = 12 * size
    parts = algorithm_lib.minibatches(num_rows, num_minibatches, unit, group_size,
                                      np.random.default_rng(0))
    assert len(parts) == num_minibatches
    # 12 units split evenly into 1, 2 or 3 minibatches.
    assert [len(p) for p in parts] == [num_rows // num_minibatches] * num_minibatches
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(num_rows))
    for part in parts:
        units = part.reshape(-1, size)
        # Each unit is `size` consecutive rows starting at a unit boundary, in order.
        np.testing.assert_array_equal(units[:, 0] % size, 0)
        np.testing.assert_array_equal(units - units[:, :1],
                                      np.tile(np.arange(size), (len(units), 1)))
    # The unit order is the seeded permutation of the units, split like the "row" case.
    want = np.array_split(np.random.default_rng(0).permutation(12), num_minibatches)
    for part, units in zip(parts, want):
        np.testing.assert_array_equal(part[::size] // size, units)


def test_minibatches_are_seeded():
    def split(seed):
        return algorithm_lib.minibatches(32, 4, "group", 4, np.random.default_rng(seed))

    for a, b in zip(split(5), split(5)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(split(5), split(6)))


@pytest.mark.parametrize("num_rows,unit,group_size", [(10, "group", 4), (7, "pair", 4)])
def test_minibatches_refuse_rows_that_do_not_form_whole_units(num_rows, unit, group_size):
    with pytest.raises(ValueError, match=f"do not split into whole {unit}s"):
        algorithm_lib.minibatches(num_rows, 1, unit, group_size, np.random.default_rng(0))


def test_config_refuses_minibatches_that_would_cut_a_group():
    algorithm = Algorithm(name="fake", loss=lambda inputs, info: (0.0, {}),
                          minibatch_unit="group")
    # 3 groups of 2 rows cannot form 2 minibatches of whole groups (6 rows would split 3 + 3).
    with pytest.raises(ValueError, match="the 3 groups of 2 rows .* must divide into 2 "
                                         "minibatches"):
        RunConfig(workdir="", batch_size=3, group_size=2, num_minibatches=2).validate(algorithm)
    RunConfig(workdir="", batch_size=4, group_size=2, num_minibatches=2).validate(algorithm)


def _group_report(row_id, group_size):
    """Metrics of the rows a loss call sees: whether they are whole groups in row order, and
    Σ 2^row (a set of rows as bits: over a pass the sums add up to 2^N − 1 exactly when every
    row came once, since N powers of two have N bits set only if they are distinct)."""
    units = row_id.reshape(-1, group_size)
    whole = (jnp.all(units[:, 0] % group_size == 0)
             & jnp.all(units - units[:, :1] == jnp.arange(group_size)[None, :]))
    return {"whole_groups": whole.astype(jnp.float32),
            "row_bits": jnp.sum(jnp.left_shift(jnp.int32(1), row_id)).astype(jnp.float32)}


# With microbatches the step takes rows m, m + M, ... of a minibatch into microbatch m; the
# learner orders each minibatch's rows so that every microbatch still holds whole groups.
@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_learner_update_feeds_the_loss_whole_groups(num_microbatches):
    import types

    import optax

    from offpolicy_jax.training import state as state_lib, step as step_lib, trainer
    group_size, num_rows, iteration, seed = 2, 16, 3, 0

    def loss_fn(params, batch, rng, context):
        del rng, context
        return jnp.sum(params["w"] ** 2), _group_report(batch["row_id"], group_size)

    # The attributes Learner.update reads, without a model: one device, a toy parameter.
    optimizer = optax.sgd(0.1)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    learner = types.SimpleNamespace(
        config=RunConfig(workdir="", batch_size=num_rows // group_size, group_size=group_size,
                         num_minibatches=2, num_microbatches=num_microbatches, num_passes=2,
                         seed=seed),
        algorithm=Algorithm(name="fake", loss=None, minibatch_unit="group"),
        state=state_lib.create_train_state({"w": jnp.ones(3)}, optimizer, rng=0),
        train_step=step_lib.make_train_step(loss_fn, optimizer,
                                            num_microbatches=num_microbatches),
        batch_sharding=device, replicated=device, guard=step_lib.NonFiniteGuard(5),
        adapted=None,
        # The model's inputs as the padded layout passes them (no model here to pack for).
        model_inputs=lambda minibatch, num_microbatches: {"tokens": minibatch["tokens"]})
    learner.config.validate(learner.algorithm)
    batch = {"tokens": np.zeros((num_rows, 1), np.int32),
             "row_id": np.arange(num_rows, dtype=np.int32)}
    metrics = trainer.Learner.update(learner, batch, iteration)

    # 2 passes x 2 minibatches, each pass's split seeded by (seed, iteration, pass).
    want = [rows for epoch in range(2) for rows in algorithm_lib.minibatches(
        num_rows, 2, "group", group_size, np.random.default_rng([seed, iteration, epoch]))]
    assert len(metrics) == 4
    for step_metrics, rows in zip(metrics, want):
        # Metrics are means over the microbatches.
        assert step_metrics["row_bits"] * num_microbatches == np.sum(2 ** rows)
    assert [float(m["whole_groups"]) for m in metrics] == [1.0] * 4


# ---------------------------------------------------------------------------------------------
# Stored policies.


def _mesh():
    return jax.make_mesh((len(jax.devices()),), ("x",))


def _params(version: float):
    """A small parameter tree whose every entry equals ``version``: one leaf sharded over the 8
    devices, one bfloat16 leaf in a nested dict (so restore must bring back shardings, dtypes and
    nested paths)."""
    sharded = NamedSharding(_mesh(), PartitionSpec("x"))
    return {"w": jax.device_put(jnp.full((8, 3), version, jnp.float32), sharded),
            "b": {"c": jnp.full((3,), version, jnp.bfloat16)}}


def _version(params) -> float:
    values = {float(v) for leaf in jax.tree.leaves(params) for v in np.asarray(leaf).ravel()}
    assert len(values) == 1, values
    return values.pop()


STORED = (policies.reference("ref"), policies.behind("prev", 1), policies.behind("prev2", 2),
          policies.reset_after("anchor", 3))


def _drive(store, first: int, last: int) -> dict:
    """Plays the trainer's calls for iterations first..last, the policy's "version" after
    iteration i being i; returns {name: [version scored with at each iteration]}."""
    seen = {p.name: [] for p in store.policies}
    for iteration in range(first, last + 1):
        start = _params(iteration - 1)
        scored = store.for_iteration(iteration, start)
        # The train step donates the state's buffers: the store must hold copies, not aliases.
        jax.tree.map(lambda leaf: leaf.delete(), start)
        for name, params in scored.items():
            seen[name].append(_version(params))
            # Copies (restored ones too) keep the policy's dtypes and shardings.
            for leaf, like in zip(jax.tree.leaves(params), jax.tree.leaves(_params(0))):
                assert leaf.dtype == like.dtype
                assert leaf.sharding.is_equivalent_to(like.sharding, leaf.ndim)
        store.after_updates(iteration, _params(iteration))
    return seen


def test_stored_policy_update_rules():
    seen = _drive(policies.PolicyStore(STORED, _params(0)), 1, 6)
    assert seen == {
        "ref": [0, 0, 0, 0, 0, 0],
        # The start of iteration i − 1 (version i − 2); the initial policy at iteration 1.
        "prev": [0, 0, 1, 2, 3, 4],
        # The start of iteration i − 2 (version i − 3); the initial policy while i − 2 < 1.
        "prev2": [0, 0, 0, 1, 2, 3],
        # The initial policy through iteration 3, then the policy after iteration 3, for good.
        "anchor": [0, 0, 0, 3, 3, 3],
    }


def test_stored_policy_declarations_are_validated():
    with pytest.raises(ValueError, match="behind\\(k\\) needs k >= 1"):
        policies.behind("prev", 0)
    with pytest.raises(ValueError, match="other than 'old' and 'current'"):
        policies.reference("old")
    with pytest.raises(ValueError, match="must be distinct"):
        policies.PolicyStore((policies.reference("a"), policies.behind("a", 1)), _params(0))
    with pytest.raises(ValueError, match="neither 'current', 'old' nor a declared stored policy"):
        Algorithm(name="fake", loss=lambda inputs, info: (0.0, {}), forward={"ref": ("logp",)})


def test_policy_store_state_omits_initial_copies():
    store = policies.PolicyStore(STORED, _params(0))
    _drive(store, 1, 1)
    assert store.state_dict() == ({"ref": ["initial"], "prev": ["initial"],
                                   "prev2": ["initial", "initial"], "anchor": ["initial"]}, {})
    _drive(store, 2, 2)
    meta, arrays = store.state_dict()
    # Slots hold the start of an iteration (behind) or its end (reset_after), tagged by it.
    assert meta == {"ref": ["initial"], "prev": [2], "prev2": ["initial", 2],
                    "anchor": ["initial"]}
    assert sorted(arrays) == ["policy/prev/0/b/c", "policy/prev/0/w",
                              "policy/prev2/1/b/c", "policy/prev2/1/w"]
    assert all(isinstance(a, np.ndarray) and np.all(a == 1) for a in arrays.values())
    _drive(store, 3, 4)
    meta, arrays = store.state_dict()
    assert meta == {"ref": ["initial"], "prev": [4], "prev2": [3, 4], "anchor": [3]}
    assert {"/".join(k.split("/")[1:3]) for k in arrays} == {"prev/0", "prev2/0", "prev2/1",
                                                             "anchor/0"}


@pytest.mark.parametrize("saved_after", [1, 2, 4])
def test_policy_store_restore_continues_identically(saved_after):
    original = policies.PolicyStore(STORED, _params(0))
    _drive(original, 1, saved_after)
    meta, arrays = original.state_dict()
    # JSON, as the checkpoint's meta item stores it.
    meta = json.loads(json.dumps(meta))

    restored = policies.PolicyStore(STORED, _params(0))
    restored.load_state_dict(meta, arrays)
    assert _drive(restored, saved_after + 1, 7) == _drive(original, saved_after + 1, 7)


def test_policy_store_refuses_a_checkpoint_of_other_policies():
    store = policies.PolicyStore(STORED, _params(0))
    _drive(store, 1, 2)
    meta, arrays = store.state_dict()
    other = (policies.reference("ref"), policies.behind("previous", 1),
             policies.behind("prev2", 2), policies.reset_after("anchor", 3))
    with pytest.raises(ValueError, match="checkpoint holds stored policies"):
        policies.PolicyStore(other, _params(0)).load_state_dict(meta, arrays)
    deeper = (policies.reference("ref"), policies.behind("prev", 1),
              policies.behind("prev2", 3), policies.reset_after("anchor", 3))
    with pytest.raises(ValueError, match="'prev2': checkpoint holds 2 copies, the rule keeps 3"):
        policies.PolicyStore(deeper, _params(0)).load_state_dict(meta, arrays)
    with pytest.raises(ValueError, match="lacks the stored-policy array policy/prev/0/w"):
        policies.PolicyStore(STORED, _params(0)).load_state_dict(
            meta, {k: v for k, v in arrays.items() if k != "policy/prev/0/w"})


# ---------------------------------------------------------------------------------------------
# The rollout pipeline, without a model.


class FakeSampler:
    """Stands in for ``stages.RolloutSampler``: no model, and every row says where it came from.

    Response ``j`` of prompt ``id`` sampled with ``seed_index`` t (the iteration) has tokens
    ``[id + 1, t, j + 1]`` (length 3), prompt ``[id + 1] * (id + 1)`` (ragged, so concatenation
    pads), behaviour log-probs ``−tokens / 10`` and reward ``reward(t, id, j)``."""

    pad_id = 0

    def __init__(self, config: RunConfig, reward):
        self.config = config
        self.reward = reward
        self.generated = 0

    def sample(self, params, records, seed_index, policy_version) -> Rollouts:
        del params
        group_size = self.config.group_size
        ids = np.repeat([r["id"] for r in records], group_size)
        samples = np.tile(np.arange(group_size), len(records))
        num_rows = ids.shape[0]
        prompt_tokens, prompt_lengths = batch_lib.prompts_to_array(
            [[int(i) + 1] * (int(i) + 1) for i in ids], self.pad_id)
        tokens = np.stack([ids + 1, np.full(num_rows, seed_index), samples + 1], 1)
        self.generated += num_rows
        return Rollouts(
            prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
            tokens=tokens.astype(np.int32), lengths=np.full(num_rows, 3, np.int32),
            behaviour_logp=-tokens.astype(np.float32) / 10,
            rewards=np.array([self.reward(seed_index, int(i), int(j))
                              for i, j in zip(ids, samples)], np.float32),
            group_index=np.repeat(np.arange(len(records)), group_size).astype(np.int32),
            policy_version=np.full(num_rows, policy_version, np.int32))


class LowestRewardSelection:
    """A difficulty-aware selection stage (the duck type of ``stages.PromptStream``, as a
    MoPPS-style selector would be): picks the prompts whose posterior mean success rate
    (s + 1) / (n + 2) is lowest, ties to the lower id, and updates s, n from the fresh rows."""

    name = "lowest_reward"

    def bind(self, records, config):
        del config
        self.records = list(records)
        self.successes = np.zeros(len(records), np.float32)
        self.counts = np.zeros(len(records), np.int32)

    def estimates(self) -> np.ndarray:
        return (self.successes + 1) / (self.counts + 2)

    def select(self, num_prompts, iteration):
        del iteration
        return [self.records[i] for i in np.argsort(self.estimates(), kind="stable")[:num_prompts]]

    def observe(self, records, rollouts, iteration):
        del iteration
        if rollouts is None:
            return
        for group, record in enumerate(records):
            rows = rollouts.group_index == group
            self.successes[record["id"]] += rollouts.rewards[rows].sum()
            self.counts[record["id"]] += int(rows.sum())

    def metrics(self):
        return {"observed_rows": int(self.counts.sum()),
                "min_estimate": float(self.estimates().min())}

    def state_dict(self):
        return {"num_records": len(self.records)}, {"successes": self.successes,
                                                    "counts": self.counts}

    def load_state_dict(self, meta, arrays):
        assert meta["num_records"] == len(self.records)
        self.successes = np.array(arrays["successes"], np.float32)
        self.counts = np.array(arrays["counts"], np.int32)


def _records(num):
    return [{"id": i, "prompt": f"q{i}"} for i in range(num)]


def _pipeline(reward, num_records, extra_stages=(), **config):
    config = RunConfig(workdir="unused", **{"batch_size": 2, "group_size": 2, **config})
    selection = LowestRewardSelection()
    selection.bind(_records(num_records), config)
    return stages.RolloutPipeline(selection, FakeSampler(config, reward),
                                  (stages.SuccessReplay(capacity=1), *extra_stages))


def test_selection_and_success_replay_compose():
    # Successes, as (iteration, prompt id, response j): prompt 0 succeeds once at iteration 1,
    # prompt 1 once at iteration 2; everything else fails.
    successes = {(1, 0, 0), (2, 1, 1)}
    pipeline = _pipeline(lambda t, i, j: float((t, i, j) in successes), num_records=4)
    batches, metrics = [], []
    for iteration in (1, 2, 3):
        batches.append(pipeline.collect(params=None, iteration=iteration))
        metrics.append(pipeline.metrics())

    # Iteration 1: all estimates 1/2, so prompts 0, 1. Prompt 0's group has a success (stored);
    # prompt 1's failed but nothing is stored for it yet.
    # Iteration 2: estimates 2/4, 1/4, 1/2, 1/2: prompts 1, 0. Prompt 0's group failed: its first
    # row becomes the success stored at iteration 1 (tokens [1, 1, 1], version 0).
    # Iteration 3: estimates 2/6, 2/6, 1/2, 1/2: prompts 0, 1; both groups fail and both get their
    # stored success (prompt 1's is iteration 2's second response, version 1).
    want_tokens = [
        [[1, 1, 1], [1, 1, 2], [2, 1, 1], [2, 1, 2]],
        [[2, 2, 1], [2, 2, 2], [1, 1, 1], [1, 2, 2]],
        [[1, 1, 1], [1, 3, 2], [2, 2, 2], [2, 3, 2]],
    ]
    want_rewards = [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0]]
    want_versions = [[0, 0, 0, 0], [1, 1, 0, 1], [0, 2, 1, 2]]
    # Injected rows keep their group's prompt; prompts are padded to the batch's widest.
    want_prompts = [[[1], [1], [2, 2], [2, 2]], [[2, 2], [2, 2], [1], [1]],
                    [[1], [1], [2, 2], [2, 2]]]
    for iteration, batch in enumerate(batches):
        np.testing.assert_array_equal(batch.tokens, want_tokens[iteration])
        np.testing.assert_array_equal(batch.rewards, want_rewards[iteration])
        np.testing.assert_array_equal(batch.policy_version, want_versions[iteration])
        # Injected rows carry their own behaviour log-probs.
        np.testing.assert_array_equal(batch.behaviour_logp,
                                      -np.asarray(want_tokens[iteration], np.float32) / 10)
        np.testing.assert_array_equal(batch.group_index, [0, 0, 1, 1])
        assert batch.prompts() == want_prompts[iteration]
    assert metrics == [
        {"lowest_reward/observed_rows": 4, "lowest_reward/min_estimate": 0.25,
         "success_replay/injected_groups": 0, "success_replay/stored_successes": 1},
        {"lowest_reward/observed_rows": 8, "lowest_reward/min_estimate": pytest.approx(1 / 3),
         "success_replay/injected_groups": 1, "success_replay/stored_successes": 2},
        {"lowest_reward/observed_rows": 12, "lowest_reward/min_estimate": 0.25,
         "success_replay/injected_groups": 2, "success_replay/stored_successes": 2},
    ]
    # Only fresh responses count towards the rollout budget.
    assert pipeline.sampler.generated == 12


def test_pipeline_stage_names_must_be_distinct():
    config = RunConfig(workdir="unused", batch_size=2, group_size=2)
    with pytest.raises(ValueError, match="names must be distinct"):
        stages.RolloutPipeline(stages.PromptStream(), FakeSampler(config, None),
                               (stages.ReplayWindow(), stages.ReplayWindow()))


def _composed(num_records=6):
    """Selection + success replay + a replay window over 2 policies: every part has state."""
    return _pipeline(lambda t, i, j: float((t + i + j) % 3 == 0), num_records,
                     (stages.ReplayWindow(off_policy_fraction=0.5, window=2),))


def _collect(pipeline, iterations):
    out = []
    for iteration in iterations:
        batch = pipeline.collect(params=None, iteration=iteration)
        out.append((batch.as_dict(), pipeline.metrics(), pipeline.sampler.generated))
    return out


def _assert_same_results(got, want):
    assert len(got) == len(want)
    for (arrays, metrics, generated), (want_arrays, want_metrics, want_generated) in zip(got, want):
        assert metrics == want_metrics and generated == want_generated
        assert arrays.keys() == want_arrays.keys()
        for key in arrays:
            np.testing.assert_array_equal(arrays[key], want_arrays[key], err_msg=key)
            assert arrays[key].dtype == want_arrays[key].dtype, key


def _through_checkpoint(tmp_path, meta, arrays):
    """``(meta, arrays)`` of a pipeline after an orbax save and restore, as ``Learner.save`` and
    ``restore_or_start`` do it (JSON meta; arrays prefixed ``rollouts/``; a stand-in state)."""
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"))
    state = {"step": jnp.zeros((), jnp.int32)}
    checkpointer.save(2, state, {"pipeline": meta}, {f"rollouts/{k}": v for k, v in arrays.items()})
    _, restored_meta, restored_arrays = checkpointer.restore(2, checkpoint_lib.abstract_like(state))
    checkpointer.close()
    return restored_meta["pipeline"], {k[len("rollouts/"):]: v for k, v in restored_arrays.items()}


def test_pipeline_state_round_trip_continues_identically(tmp_path):
    straight = _collect(_composed(), range(1, 6))
    # Iterations 3-5 do replay and inject, so a restore that lost state would show.
    later = [metrics for _, metrics, _ in straight[2:]]
    assert all(m["replay_window/replayed_groups"] == 1 for m in later)
    assert sum(m["success_replay/injected_groups"] for m in later) > 0

    first = _composed()
    _collect(first, (1, 2))
    meta, arrays = first.state_dict()
    assert {key.split("/")[0] for key in arrays} == {"lowest_reward", "success_replay",
                                                     "replay_window"}
    assert meta["generated"] == 6 and set(meta) == {"generated", "lowest_reward",
                                                    "success_replay", "replay_window"}

    # In memory.
    resumed = _composed()
    resumed.load_state_dict(json.loads(json.dumps(meta)), arrays)
    _assert_same_results(_collect(resumed, range(3, 6)), straight[2:])

    # Through orbax, as the trainer saves it.
    resumed = _composed()
    resumed.load_state_dict(*_through_checkpoint(tmp_path, meta, arrays))
    _assert_same_results(_collect(resumed, range(3, 6)), straight[2:])

    # Sanity: without the state the continuation differs (so the comparisons above can fail).
    fresh = _collect(_composed(), range(3, 6))
    with pytest.raises(AssertionError):
        _assert_same_results(fresh, straight[2:])


def test_offline_dataset_is_drawn_once_and_restored_from_the_checkpoint(tmp_path):
    """TOPR's offline stage behind the real prompt stream: at iteration 1 it draws 3 prompts x 2
    responses (a stream batch of 2, then 1 of the next; sampling seed indices 2^30 and 2^30 + 1),
    then every iteration takes the next 2 of those groups in a per-epoch shuffled order."""

    def make():
        config = RunConfig(workdir="unused", batch_size=2, group_size=2, seed=0)
        selection = stages.PromptStream()
        selection.bind(_records(6), config)
        return stages.RolloutPipeline(selection, FakeSampler(config, lambda t, i, j: 0.0),
                                      (stages.OfflineDataset(num_prompts=3),))

    straight = _collect(make(), range(1, 6))
    arrays = [a for a, _, _ in straight]
    # Iteration i takes cursors 2i − 2 and 2i − 1; the latter is in epoch (2i − 1) // 3.
    assert [m for _, m, _ in straight] == [{"offline/epoch": e} for e in (0, 1, 1, 2, 3)]
    assert [generated for _, _, generated in straight] == [6] * 5
    for a in arrays:
        assert set(a["tokens"][:, 1]) <= {2 ** 30, 2 ** 30 + 1}
        np.testing.assert_array_equal(a["policy_version"], 0)
    # Epoch 0 (iteration 1 and the first group of iteration 2) visits every drawn group once.
    epoch = np.concatenate([arrays[0]["tokens"], arrays[1]["tokens"][:2]])[::2, :2]
    assert len({tuple(group) for group in epoch}) == 3
    assert sorted(epoch[:, 1]) == [2 ** 30, 2 ** 30, 2 ** 30 + 1]

    first = make()
    _collect(first, (1, 2))
    meta, state_arrays = first.state_dict()
    assert set(meta) == {"generated", "prompts", "offline"}
    assert {k.split("/")[0] for k in state_arrays} == {"offline"}
    resumed = make()
    resumed.load_state_dict(*_through_checkpoint(tmp_path, meta, state_arrays))
    # A lost dataset would be redrawn (other prompts, more rollouts): the results would differ.
    _assert_same_results(_collect(resumed, range(3, 6)), straight[2:])


def test_pipeline_refuses_a_checkpoint_without_a_stage():
    meta, arrays = _pipeline(lambda t, i, j: 0.0, 6).state_dict()
    resumed = _composed()
    with pytest.raises(ValueError, match=r"no state for rollout stages \['replay_window'\]"):
        resumed.load_state_dict(meta, arrays)
    assert resumed.sampler.generated == 0            # refused before anything was restored


# ---------------------------------------------------------------------------------------------
# The whole loop, in process, on a tiny random model.


@pytest.fixture(scope="module")
def tiny_model(random_tiny_model):
    """The tiny random checkpoint of ``conftest.random_tiny_model`` (no SFT warm start: the fake
    algorithm needs a sampler, not a solver)."""
    return random_tiny_model


# 8 prompts x 2 responses = 16 rows in 2 minibatches of 8: the batch splits over the 8 fake
# devices of the default mesh (1,-1,1), and each minibatch holds 4 of the 8 groups.
BATCH_SIZE, GROUP_SIZE, NUM_MINIBATCHES = 8, 2, 2
NUM_ROWS = BATCH_SIZE * GROUP_SIZE


def _reward(records, responses, pool):
    """Any deterministic function of the response text will do (no verifier needed)."""
    del records, pool
    return np.array([float(len(text) % 2) for text in responses], np.float32)


def _fake_algorithm(seen: list) -> Algorithm:
    """A loss that reports what it was fed, and a ``prepare`` that records what it saw."""

    def prepare(inputs, info):
        num_rows = inputs["tokens"].shape[0]
        groups = inputs["group_index"].reshape(-1, info.group_size)
        seen.append({
            "iteration": int(info.iteration), "rows": num_rows, "group_size": info.group_size,
            "groups_contiguous": bool(np.all(groups == groups[:, :1])),
            "prev_gap": float(np.max(np.abs(inputs["prev_logp"] - inputs["old_logp"])
                                     * inputs["mask"])),
            # Fresh rows were sampled from the policy the trainer scores as "old": their
            # behaviour log-probs must agree (LoRA: the sampler used the adapted weights).
            "fresh_gap": float(np.max(np.abs(inputs["behaviour_logp"] - inputs["old_logp"])
                                      * inputs["mask"]
                                      * (inputs["policy_version"] == info.iteration - 1)[:, None])),
        })
        # Never zero (rewards are 0 or 1), so every update moves the policy.
        return {"advantages": inputs["rewards"] - 0.5,
                "row_id": np.arange(num_rows, dtype=np.int32)}

    def loss(inputs, info):
        mask = inputs["mask"]
        loss = -jnp.sum(inputs["advantages"][:, None] * inputs["logp"] * mask) / \
            jnp.maximum(jnp.sum(mask), 1.0)
        row_id = inputs["row_id"]
        return loss, {
            **_group_report(row_id, info.group_size),
            "rows": jnp.float32(row_id.shape[0]),
            "seen_iteration": info.iteration.astype(jnp.float32),
            "prev_gap": jnp.max(jnp.abs(inputs["prev_logp"] - inputs["old_logp"]) * mask),
        }

    return Algorithm(name="fake", loss=loss, prepare=prepare,
                     forward={"old": ("logp",), "prev": ("logp",)},
                     policies=(policies.behind("prev", 1),), minibatch_unit="group",
                     reward_fn=_reward, selection=selection_lib.MoPPS(candidates=2),
                     stages=(stages.ReplayWindow(off_policy_fraction=0.5, window=1),))


def _config(workdir, model) -> RunConfig:
    # eval_samples=2 makes evaluation's generation (2 prompts x 2, padded to the 8 devices) the
    # same shape as the rollouts', so it reuses their compiled sampler.
    return RunConfig(workdir=str(workdir), model=model, iterations=3,
                     batch_size=BATCH_SIZE, group_size=GROUP_SIZE, max_new_tokens=8,
                     eval_size=2, eval_samples=2, ckpt_every=1,
                     num_minibatches=NUM_MINIBATCHES, num_passes=1, progress=False,
                     learning_rate=1e-3)


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                for line in f]


def _params_at(workdir, iteration):
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return checkpointer.read_state(iteration)["params"]
    finally:
        checkpointer.close()


def test_loop_runs_a_fake_algorithm_and_resumes_exactly(tiny_model, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    seen = []
    summary = loop.run(_config(straight, tiny_model), _fake_algorithm(seen))
    assert summary["iterations"] == 3 and summary["rollouts"] == 2 * NUM_ROWS

    # prepare ran once per iteration, on the host, with the whole batch of whole groups.
    assert [s["iteration"] for s in seen] == [1, 2, 3]
    for s in seen:
        assert (s["rows"], s["group_size"], s["groups_contiguous"]) == (NUM_ROWS, GROUP_SIZE, True)
    # At iteration 1 the stored "prev" policy and the old policy are both the initial one; at
    # iteration 2 "prev" is still the initial policy, the old one has had iteration 1's updates.
    assert seen[0]["prev_gap"] == 0.0
    assert seen[1]["prev_gap"] > 0.0

    records = _metrics(straight)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert "eval/pass@1" in records[0] and "eval/pass@1" in records[3]
    train = records[1:]
    for iteration, r in enumerate(train, start=1):
        assert r["train/seen_iteration"] == iteration
        assert r["train/whole_groups"] == 1.0
        assert r["train/rows"] == NUM_ROWS / NUM_MINIBATCHES
        # The mean over the pass's minibatches of Σ 2^row.
        assert r["train/row_bits"] == (2 ** NUM_ROWS - 1) / NUM_MINIBATCHES
        assert r["skipped_steps"] == 0
    assert [r["train/prev_gap"] == 0.0 for r in train] == [True, False, False]
    # ReplayWindow(p=0.5, window=1): iteration 1 is fresh (8 groups stored); iterations 2 and 3
    # replay round(0.5 * 8) = 4 groups of the previous policy (staleness 1 on half the rows) and
    # sample 4 fresh ones, which replace the window.
    assert [r["replay_window/replayed_groups"] for r in train] == [0, 4, 4]
    assert [r["replay_window/window_groups"] for r in train] == [8, 4, 4]
    assert [r["rollouts"] for r in train] == [16, 24, 32]
    assert [r["staleness_max"] for r in train] == [0, 1, 1]
    assert [r["staleness_mean"] for r in train] == [0.0, 0.5, 0.5]
    # MoPPS chose the fresh prompts (8, then 4 of a pool of 16 each time) and updated their
    # posteriors; its state (posteriors, candidate stream) is part of the resume below.
    assert [round(r["mopps/seen_fraction"] * 10333) for r in train] == [8, 12, 16]

    # A run killed after logging iteration 3 but before its checkpoint was written: the workdir
    # holds checkpoint 2 (of the last two kept, 2 and 3) and a metrics line for iteration 3.
    # Restarting it restores iteration 2 (train state, replay window, the "prev" copy of the
    # start of iteration 2), drops the orphaned line, and must redo iteration 3 exactly.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    seen_resumed = []
    summary = loop.run(_config(resumed, tiny_model), _fake_algorithm(seen_resumed))
    assert summary["iterations"] == 3 and summary["rollouts"] == 2 * NUM_ROWS
    assert [s["iteration"] for s in seen_resumed] == [3]
    assert seen_resumed == seen[2:]
    assert _metrics(resumed) == records

    got, want = _params_at(resumed, 3), _params_at(straight, 3)
    leaves = jax.tree.leaves(got)
    assert len(leaves) == len(jax.tree.leaves(want)) > 0
    for a, b in zip(leaves, jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # ... and the policy did move in iteration 3, so equal parameters are not a vacuous check.
    assert any(not np.array_equal(a, b)
               for a, b in zip(leaves, jax.tree.leaves(_params_at(straight, 2))))


def test_learner_places_the_state_on_a_mesh_whose_tensor_axis_does_not_divide_the_heads(
        tiny_model, tmp_path):
    """tensor=4 over 2 key/value heads: the parameters and the optimizer state are replicated
    along that dimension instead of failing to place (before: jax.device_put raised)."""
    from offpolicy_jax.training import trainer
    config = RunConfig(workdir=str(tmp_path), model=tiny_model, mesh="1,2,4", batch_size=4,
                       group_size=2, eval_size=2, progress=False)
    session = trainer.Session(config, "fake")
    try:
        learner = trainer.Learner(session, Algorithm(name="fake", loss=None))
        qkv = learner.state.params["layers"]["qkv"]           # [L, D, KV=2, G+2, hd]
        assert qkv.sharding.spec[2] is None                   # the KV axis: replicated
        mu = learner.state.opt_state[1][0].mu["layers"]["qkv"]
        assert mu.sharding.is_equivalent_to(qkv.sharding, qkv.ndim)
    finally:
        session.pool.close()
        session.checkpointer.close()
        session.logger.close()


# ---------------------------------------------------------------------------------------------
# Bounded staleness: --rollout_lag and --rollout_correction.


def _lagged_algorithm(seen: list) -> Algorithm:
    """Decoupled PPO on ``rewards − 0.5``, recording each batch's rows as ``prepare`` sees them."""
    from offpolicy_jax import losses

    def prepare(inputs, info):
        seen.append({"iteration": int(info.iteration),
                     **{k: np.array(inputs[k]) for k in ("tokens", "attention_mask", "positions",
                                                         "mask", "behaviour_logp",
                                                         "policy_version")}})
        return {"advantages": inputs["rewards"] - 0.5}

    def loss(inputs, info):
        del info
        return losses.decoupled_ppo(inputs["logp"], inputs["old_logp"], inputs["behaviour_logp"],
                                    inputs["advantages"], inputs["mask"])

    return Algorithm(name="lagged", loss=loss, prepare=prepare, forward={"old": ("logp",)},
                     minibatch_unit="group", reward_fn=_reward)


def _response_logp(model_dir, params, row: dict):
    from offpolicy_jax import models
    from offpolicy_jax.training import rollout
    cfg, _ = models.load_hf_checkpoint(model_dir)
    out = rollout.response_log_probs(cfg, params, row["tokens"], row["attention_mask"],
                                     row["positions"], num_response=row["mask"].shape[1],
                                     temperature=1.0)
    return np.asarray(out["logp"])


def test_lagged_run_samples_from_the_policy_k_iterations_back_and_resumes_exactly(
        tiny_model, tmp_path, monkeypatch):
    import dataclasses
    import functools
    # Keep every checkpoint: the lagged policy of iteration 3 is checkpoint 1.
    monkeypatch.setattr(checkpoint_lib, "Checkpointer",
                        functools.partial(checkpoint_lib.Checkpointer, max_to_keep=10))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    def config(workdir, **changes):
        return dataclasses.replace(_config(workdir, tiny_model), **{
            "iterations": 3, "rollout_lag": 1, "rollout_correction": "tis", **changes})

    seen = []
    loop.run(config(straight), _lagged_algorithm(seen))
    records = _metrics(straight)
    train = records[1:]
    # Iteration i samples from the start of iteration i − 1: version max(i − 2, 0).
    assert [int(np.unique(s["policy_version"])[0]) for s in seen] == [0, 0, 1]
    assert [r["staleness_max"] for r in train] == [0, 1, 1]
    assert all("correction/weight_mean" in r for r in train)
    assert train[0]["correction/mismatch_kl"] < 1e-6 < train[2]["correction/mismatch_kl"]

    # The behaviour log-probs of iteration 3 are the policy's after iteration 1 (checkpoint 1):
    # the sampler's log-probs agree with the trainer's forward within float32 round-off, and
    # are far from the current policy's (checkpoint 2), so the check is not vacuous.
    row = seen[2]
    mask = row["mask"] > 0
    lagged = _response_logp(tiny_model, _params_at(straight, 1), row)
    current = _response_logp(tiny_model, _params_at(straight, 2), row)
    np.testing.assert_allclose(row["behaviour_logp"][mask], lagged[mask], atol=2e-4)
    assert np.max(np.abs(row["behaviour_logp"] - current)[mask]) > 1e-2

    # Killed after iteration 2's checkpoint: the sampler's stored copy comes back with it.
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    loop.run(config(resumed), _lagged_algorithm([]))
    assert _metrics(resumed) == records
    for a, b in zip(jax.tree.leaves(_params_at(resumed, 3)),
                    jax.tree.leaves(_params_at(straight, 3))):
        np.testing.assert_array_equal(a, b)

    with pytest.raises(ValueError, match="--rollout_lag=1"):
        loop.run(config(resumed, rollout_lag=2, iterations=4), _lagged_algorithm([]))


def test_lora_run_trains_only_adapters_resumes_exactly_and_exports(tiny_model, tmp_path,
                                                                   monkeypatch):
    """The same in-process run with --lora_rank: checkpoints hold the adapters only, the sampler
    uses the adapted weights every iteration, a killed run resumes to identical adapters and
    metrics, and the final export and the eval harness see the trained policy."""
    from offpolicy_jax import export as export_lib, models
    from offpolicy_jax.eval import harness, runner
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora_config = lambda workdir: dataclasses.replace(   # noqa: E731
        _config(workdir, tiny_model), lora_rank=4, lora_alpha=8.0, lora_targets="q,v,o,up",
        learning_rate=3e-2)
    seen = []
    loop.run(lora_config(straight), _fake_algorithm(seen))
    # Iteration 2 samples after iteration 1's updates moved the adapters (prev_gap > 0); the
    # sampled log-probs still match the trainer's adapted policy, not the base model's.
    assert seen[1]["prev_gap"] > 1e-3
    assert max(s["fresh_gap"] for s in seen) < 1e-4, seen

    adapters = _params_at(straight, 3)
    assert set(adapters) == {"lora"} and set(adapters["lora"]) == {"q", "v", "o", "up"}
    assert float(np.max(np.abs(adapters["lora"]["o"]["b"]))) > 0
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(straight, "checkpoints"))
    opt_shapes = {x.shape for x in jax.tree.leaves(checkpointer.read_state(3)["opt_state"])}
    checkpointer.close()
    assert opt_shapes - {()} <= {x.shape for x in jax.tree.leaves(adapters)}

    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    shutil.rmtree(resumed / "export")
    seen_resumed = []
    loop.run(lora_config(resumed), _fake_algorithm(seen_resumed))
    assert seen_resumed == seen[2:]
    assert _metrics(resumed) == _metrics(straight)
    for a, b in zip(jax.tree.leaves(_params_at(resumed, 3)), jax.tree.leaves(adapters)):
        np.testing.assert_array_equal(a, b)

    # The end-of-run export is the policy of the last checkpoint, merged; plus its adapter.
    cfg, merged, *_ = export_lib.load_run_policy(str(straight))
    _, exported = models.load_hf_checkpoint(straight / "export")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(a, b)
    _, base = models.load_hf_checkpoint(tiny_model)
    assert not np.array_equal(exported["layers"]["o"], base["layers"]["o"])
    assert (straight / "export" / "adapter" / "adapter_model.safetensors").exists()

    # A new run continues from the exported PEFT adapter (--lora_init): same settings, same
    # adapters in its fresh train state; a --lora_rank that disagrees with the file is refused.
    from offpolicy_jax.models import lora as lora_lib
    from offpolicy_jax.training import trainer
    adapter_dir = str(straight / "export" / "adapter")
    for rank in (0, 8):
        config = dataclasses.replace(lora_config(tmp_path / f"continued{rank}"), lora_rank=rank,
                                     lora_init=adapter_dir)
        session = trainer.Session(config, "fake")
        try:
            if rank:
                with pytest.raises(ValueError, match="--lora_rank=8 but the adapter"):
                    trainer.Learner(session, _fake_algorithm([]))
                continue
            learner = trainer.Learner(session, _fake_algorithm([]))
            assert learner.adapted.lora == lora_lib.LoraConfig(4, 8.0, ("q", "v", "o", "up"))
            for a, b in zip(jax.tree.leaves(learner.state.params), jax.tree.leaves(adapters)):
                np.testing.assert_array_equal(a, b)
        finally:
            session.pool.close()
            session.checkpointer.close()
            session.logger.close()

    # The eval harness given the run directory evaluates that policy with the base tokenizer.
    class Evaluated(Exception):
        pass

    def capture(cfg, params, tokenizer, *args, **kwargs):
        raise Evaluated(params)

    monkeypatch.setattr(runner, "evaluate_prompts", capture)
    with pytest.raises(Evaluated) as caught:
        harness.run(harness.HarnessConfig(model=str(straight), benchmarks=("arith",), limit=2),
                    str(tmp_path / "eval"), progress=False)
    for a, b in zip(jax.tree.leaves(caught.value.args[0]), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(a, b)


def _single_update_algorithm() -> Algorithm:
    """A clipped objective (as GRPO's) whose metrics show the old policy it was given."""

    def loss(inputs, info):
        del info
        advantages = inputs["rewards"] - 0.5
        total, metrics = losses.ppo_clip(inputs["logp"], inputs["old_logp"], advantages,
                                         inputs["mask"])
        gap = jnp.max(jnp.abs(inputs["logp"] - inputs["old_logp"]) * inputs["mask"])
        return total, {**metrics, "old_gap": gap}

    return Algorithm(name="single_update", loss=loss, forward={"old": ("logp",)},
                     reward_fn=_reward, needs_groups=False)


def _single_update_config(workdir, model) -> RunConfig:
    return dataclasses.replace(_config(workdir, model), iterations=1, num_minibatches=1)


def test_single_update_takes_the_old_policy_from_its_own_forward(tiny_model, tmp_path):
    """One update per batch: no separate old-policy pass; the old log-probs are the current
    ones exactly (ratio 1), not a second forward's equal-within-round-off copy."""
    config = _single_update_config(tmp_path, tiny_model)
    algorithm = _single_update_algorithm()
    assert trainer.old_outputs_in_update(algorithm, config)
    assert not trainer.old_outputs_in_update(algorithm,
                                             dataclasses.replace(config, num_minibatches=2))
    assert not trainer.old_outputs_in_update(algorithm,
                                             dataclasses.replace(config, rollout_correction="tis"))
    assert not trainer.old_outputs_in_update(
        dataclasses.replace(algorithm, prepare=lambda inputs, info: {},
                            prepare_reads=("old_logp",)), config)
    loop.run(config, algorithm)
    record = _metrics(tmp_path)[1]
    assert record["train/old_gap"] == 0.0 and record["train/ratio_max"] == 1.0
    assert record["train/ratio_min"] == 1.0


@pytest.mark.slow
def test_single_update_matches_the_run_with_a_separate_old_pass(tiny_model, tmp_path,
                                                                monkeypatch):
    loop.run(_single_update_config(tmp_path / "fused", tiny_model), _single_update_algorithm())
    monkeypatch.setattr(trainer, "old_outputs_in_update", lambda algorithm, config: False)
    loop.run(_single_update_config(tmp_path / "separate", tiny_model),
             _single_update_algorithm())
    fused, separate = _metrics(tmp_path / "fused"), _metrics(tmp_path / "separate")
    assert separate[1]["train/old_gap"] < 1e-5     # the two forwards agree to round-off
    for key in ("train/loss", "train/pg_loss", "reward_mean", "eval/pass@1"):
        np.testing.assert_allclose(fused[1][key], separate[1][key], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(_params_at(tmp_path / "fused", 1)),
                    jax.tree.leaves(_params_at(tmp_path / "separate", 1))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_prepare_must_declare_the_old_outputs_it_reads():
    with pytest.raises(ValueError, match=r"prepare_reads \['old_values'\]"):
        Algorithm(name="x", loss=None, forward={"old": ("logp",)}, prepare_reads=("old_values",))
    inputs = trainer.PrepareInputs({"mask": 1}, {"old_logp"}, "x")
    assert inputs["mask"] == 1 and "old_logp" not in inputs
    for read in (lambda: inputs["old_logp"], lambda: inputs.get("old_logp")):
        with pytest.raises(KeyError, match="x: prepare read 'old_logp'.*prepare_reads"):
            read()
