"""Replay buffers and the rollout stages built on them (ReMix window, ARPO successes, TOPR's
offline dataset): eviction, capacity, injection rules, the reincarnation switch, and state round
trips through a real orbax checkpoint. A fake sampler stands in for the model, so every test runs
in milliseconds."""

import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import replay
from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import stages
from offpolicy_jax.training.batch import Rollouts
from offpolicy_jax.training.config import RunConfig

RESPONSE_WIDTH = 3


class FakeSampler:
    """Stands in for stages.RolloutSampler. Response tokens are ``[prompt id, row in group,
    seed_index]``, so where each replayed row came from is observable; rewards come from
    ``reward_fn(prompt_id, row_in_group, seed_index)``."""

    def __init__(self, batch_size, group_size, reward_fn=lambda *_: 0.0, seed=0):
        self.config = RunConfig(workdir="", batch_size=batch_size, group_size=group_size,
                                seed=seed)
        self.pad_id = 0
        self.generated = 0
        self.reward_fn = reward_fn

    def sample(self, params, records, seed_index, policy_version) -> Rollouts:
        g = self.config.group_size
        ids = np.repeat([int(r["id"]) for r in records], g)
        within = np.tile(np.arange(g), len(records))
        n = ids.shape[0]
        self.generated += n
        # Prompt length varies with the id so that padding on concatenation is exercised.
        plen = 1 + ids % 3
        prompt_tokens = np.zeros((n, int(plen.max())), np.int32)
        for row in range(n):
            prompt_tokens[row, :plen[row]] = ids[row] + 1
        tokens = np.stack([ids, within, np.full(n, seed_index)], axis=1).astype(np.int32)
        return Rollouts(
            prompt_tokens=prompt_tokens, prompt_lengths=plen.astype(np.int32), tokens=tokens,
            lengths=np.full(n, RESPONSE_WIDTH, np.int32),
            behaviour_logp=np.full((n, RESPONSE_WIDTH), -float(policy_version) - 1.0,
                                   np.float32),
            rewards=np.array([self.reward_fn(i, w, seed_index) for i, w in zip(ids, within)],
                             np.float32),
            group_index=np.repeat(np.arange(len(records)), g).astype(np.int32),
            policy_version=np.full(n, policy_version, np.int32))


class FakeSelection(stages.PromptStream):
    """The prompt stream over a fixed list of prompt ids (``{"id": str(p)}`` records)."""

    def __init__(self, prompts=None, batch_size=1):
        super().__init__()
        prompts = list(prompts if prompts is not None else range(100000))
        self.batches = [[{"id": str(p), "prompt": f"p{p}"} for p in prompts[i:i + batch_size]]
                        for i in range(0, len(prompts), batch_size)]
        self.position = 0

    def select(self, num_prompts, iteration):
        if num_prompts == 0:
            return []
        self.position += 1
        return self.batches[self.position - 1][:num_prompts]

    def state_dict(self):
        return {"position": self.position}, {}

    def load_state_dict(self, meta, arrays):
        self.position = meta["position"]


def pipeline(batch_size, group_size, *stage_list, reward_fn=lambda *_: 0.0, prompts=None):
    sampler = FakeSampler(batch_size, group_size, reward_fn=reward_fn)
    return stages.RolloutPipeline(FakeSelection(prompts, batch_size), sampler, stage_list)


def _groups_are_contiguous(batch, group_size):
    prompt_ids = batch.tokens[:, 0].reshape(-1, group_size)
    return bool((prompt_ids == prompt_ids[:, :1]).all())


def _fresh(batch_size, group_size, version, prompts=None, reward_fn=lambda *_: 0.0):
    """One fresh batch of ``batch_size`` prompts (ids ``prompts`` or 0..)."""
    sampler = FakeSampler(batch_size, group_size, reward_fn=reward_fn)
    prompts = list(prompts if prompts is not None else range(batch_size))
    return sampler.sample(None, [{"id": str(p)} for p in prompts], version, version)


# --- policy window (ReMix) ---------------------------------------------------------------------


def test_window_evicts_versions_older_than_the_window():
    buffer = replay.PolicyWindowBuffer(window=2, group_size=2)
    for version in range(4):
        buffer.add(_fresh(2, 2, version, prompts=[2 * version, 2 * version + 1]),
                   newest_version=version)
        kept = sorted(set(buffer.versions().tolist()))
        assert kept == list(range(max(0, version - 1), version + 1))
    assert buffer.num_groups == 4                     # two batches of two groups


def test_window_max_groups_drops_the_oldest():
    buffer = replay.PolicyWindowBuffer(window=10, group_size=2, max_groups=4)
    for version in range(3):
        buffer.add(_fresh(3, 2, version), newest_version=version)
    assert buffer.num_groups == 4
    assert buffer.versions().tolist() == [1, 2, 2, 2]


def test_window_rejects_partial_groups_and_oversampling():
    buffer = replay.PolicyWindowBuffer(window=1, group_size=3)
    batch = _fresh(1, 2, 0, prompts=[1])
    with pytest.raises(ValueError, match="whole groups of group_size=3"):
        buffer.add(batch, newest_version=0)
    with pytest.raises(ValueError, match="buffer holds 0"):
        buffer.sample_groups(1, np.random.default_rng(0))


def test_replay_window_fraction_budget_grouping_and_metrics():
    batch_size, group_size = 5, 2
    window = stages.ReplayWindow(off_policy_fraction=0.4, window=2)
    source = pipeline(batch_size, group_size, window)
    for iteration in range(1, 6):
        before = source.sampler.generated
        batch = source.collect(None, iteration)
        assert batch.num_rows == batch_size * group_size
        assert _groups_are_contiguous(batch, group_size)
        replayed = (batch.policy_version < iteration - 1).reshape(-1, group_size)[:, 0]
        # The first batch is all fresh (empty window); then round(0.4 * 5) = 2 replayed groups.
        assert replayed.sum() == (0 if iteration == 1 else 2)
        assert source.metrics()["replay_window/replayed_groups"] == replayed.sum()
        # Replayed groups come from the last two policies only.
        versions = batch.policy_version[::group_size][replayed]
        assert ((versions >= iteration - 3) & (versions <= iteration - 2)).all()
        # Only fresh rows count towards the rollout budget.
        assert source.sampler.generated - before == (batch_size - replayed.sum()) * group_size
        # Behaviour log-probs travel with the replayed rows (the fake sets -version-1).
        np.testing.assert_array_equal(batch.behaviour_logp[:, 0], -batch.policy_version - 1.0)


def test_replay_window_reincarnation_switches_to_on_policy_at_the_configured_step():
    window = stages.ReplayWindow(off_policy_fraction=0.5, window=2, reincarnation_step=3)
    source = pipeline(4, 2, window)
    replayed = []
    for iteration in range(1, 7):
        batch = source.collect(None, iteration)
        replayed.append(int((batch.policy_version < iteration - 1).sum()))
        assert window.reincarnated(iteration) == (iteration > 3)
    assert replayed == [0, 4, 4, 0, 0, 0]
    assert window.buffer.num_groups == 0              # discarded, and never refilled


def test_replay_window_state_round_trip_through_a_checkpoint(tmp_path):
    source = pipeline(4, 2, stages.ReplayWindow(off_policy_fraction=0.5, window=2))
    for iteration in (1, 2):
        source.collect(None, iteration)
    restored = _through_checkpoint(
        tmp_path, source, pipeline(4, 2, stages.ReplayWindow(0.5, window=2)))
    assert restored.stages[0].buffer.num_groups == source.stages[0].buffer.num_groups == 6
    assert restored.sampler.generated == source.sampler.generated == 12     # 8 + 4 fresh
    expected = source.collect(None, 3)
    actual = restored.collect(None, 3)
    for key, value in expected.as_dict().items():
        np.testing.assert_array_equal(getattr(actual, key), value, err_msg=key)


def _through_checkpoint(tmp_path, source, fresh):
    """Saves ``source``'s state in a real orbax checkpoint and loads it into ``fresh``."""
    meta, arrays = source.state_dict()
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
    state = {"w": jnp.arange(3.0)}
    checkpointer.save(1, state, {"pipeline": meta}, arrays)
    _, restored_meta, restored_arrays = checkpointer.restore(
        1, checkpoint_lib.abstract_like(state))
    checkpointer.close()
    fresh.load_state_dict(restored_meta["pipeline"], restored_arrays)
    return fresh


# --- success buffer (ARPO) ---------------------------------------------------------------------


def _response(value, prompt_length=2):
    return {"prompt_tokens": np.arange(prompt_length, dtype=np.int32),
            "tokens": np.full(RESPONSE_WIDTH, value, np.int32), "lengths": np.int32(RESPONSE_WIDTH),
            "behaviour_logp": np.full(RESPONSE_WIDTH, -1.0, np.float32),
            "rewards": np.float32(1.0), "policy_version": np.int32(value)}


def test_success_buffer_is_a_fifo_of_capacity_per_prompt():
    buffer = replay.SuccessBuffer(capacity=3)
    for value in range(5):
        buffer.add("a", _response(value))
    buffer.add("b", _response(9))
    assert buffer.count("a") == 3 and buffer.count("b") == 1 and len(buffer) == 4
    assert [int(r["tokens"][0]) for r in buffer.entries["a"]] == [2, 3, 4]   # oldest evicted
    rng = np.random.default_rng(0)
    assert {int(buffer.sample("a", rng)["tokens"][0]) for _ in range(50)} == {2, 3, 4}
    assert buffer.sample("missing", rng) is None


def test_success_buffer_bounds_the_number_of_prompts():
    buffer = replay.SuccessBuffer(capacity=2, max_prompts=2)
    buffer.add("a", _response(0))
    buffer.add("b", _response(1))
    buffer.add("a", _response(2))         # "a" is now the most recently updated
    buffer.add("c", _response(3))         # evicts "b"
    assert list(buffer.entries) == ["a", "c"]


def test_injection_only_into_all_failed_groups_with_a_stored_success():
    group_size = 3
    # prompt 0: all failed, has a success stored; 1: all failed, nothing stored;
    # 2: one success in the group (not all-failed), has a success stored.
    reward_of = {0: [0, 0, 0], 1: [0, 0, 0], 2: [0, 1, 0]}
    batch = _fresh(3, group_size, 4, prompts=[0, 1, 2],
                   reward_fn=lambda p, w, s: reward_of[p][w])
    buffer = replay.SuccessBuffer()
    buffer.add("0", _response(70, prompt_length=1))
    buffer.add("2", _response(72, prompt_length=3))
    out, injected = replay.inject_successes(batch, ["0", "1", "2"], buffer, group_size,
                                            np.random.default_rng(0))
    assert injected.tolist() == [True, False, False]
    assert out.tokens[0].tolist() == [70] * RESPONSE_WIDTH             # first row of group 0
    assert out.rewards[0] == 1.0 and out.policy_version[0] == 70
    changed = np.nonzero((out.tokens != batch.tokens).any(axis=1))[0]
    assert changed.tolist() == [0]
    np.testing.assert_array_equal(out.rewards[1:], batch.rewards[1:])
    assert batch.rewards[0] == 0.0                                      # input untouched


def test_all_failed_rule_uses_std_and_mean_thresholds():
    rewards = np.array([0, 0, 0, 0, 0.1, 0.1, 1, 1, 0.3, 0.3, 0, 1], np.float32)
    assert replay.all_failed_groups(rewards, 2).tolist() == [True, True, True, False, False,
                                                             False]


def test_success_replay_checks_the_buffer_before_adding_this_batch():
    # Prompt 0 succeeds only in iteration 1 (row 1); afterwards it always fails.
    success = stages.SuccessReplay(capacity=8)
    source = pipeline(1, 2, success, prompts=[0, 0, 0],
                      reward_fn=lambda p, w, s: float(s == 1 and w == 1))
    first = source.collect(None, 1)
    assert success.injected_groups == 0 and first.rewards.tolist() == [0.0, 1.0]
    assert success.buffer.count("0") == 1
    second = source.collect(None, 2)
    assert source.metrics() == {"success_replay/injected_groups": 1,
                                "success_replay/stored_successes": 1}
    assert second.rewards.tolist() == [1.0, 0.0]
    assert second.tokens[0].tolist() == [0, 1, 1]             # the success sampled at iteration 1
    assert second.policy_version.tolist() == [0, 1]
    assert success.buffer.count("0") == 1                     # the injected copy is not re-added


def test_success_replay_state_round_trip_through_a_checkpoint(tmp_path):
    def make():
        return pipeline(2, 2, stages.SuccessReplay(capacity=2), prompts=list(range(6)),
                        reward_fn=lambda p, w, s: float(w == 0 and p % 2 == 0))

    source = make()
    for iteration in (1, 2):
        source.collect(None, iteration)
    restored = _through_checkpoint(tmp_path, source, make())
    entries, restored_entries = (p.stages[0].buffer.entries for p in (source, restored))
    assert list(restored_entries) == list(entries)
    for key, queue in entries.items():
        for a, b in zip(queue, restored_entries[key]):
            for field in replay.SuccessBuffer.FIELDS:
                np.testing.assert_array_equal(a[field], b[field])


# --- TOPR's offline dataset --------------------------------------------------------------------


def test_offline_dataset_samples_once_and_cycles_through_every_group():
    offline = stages.OfflineDataset(num_prompts=5)
    source = pipeline(2, 3, offline)
    seen = []
    for iteration in range(1, 6):  # 5 iterations x 2 groups = 2 epochs over 5 groups
        batch = source.collect(None, iteration)
        assert batch.num_rows == 6
        # Rows stay grouped: each group of 3 rows is one prompt.
        groups = batch.tokens[:, 0].reshape(2, 3)
        assert (groups == groups[:, :1]).all()
        seen.extend(groups[:, 0].tolist())
        assert (batch.policy_version == 0).all()
    assert source.selection.position == 3  # 5 prompts drawn once, in batches of 2 (2 + 2 + 1)
    assert source.sampler.generated == 15
    assert sorted(seen) == sorted(list(range(5)) * 2)
    assert source.metrics() == {"offline/epoch": 1}


def test_offline_dataset_state_round_trip(tmp_path):
    source = pipeline(2, 2, stages.OfflineDataset(num_prompts=4))
    source.collect(None, 1)
    restored = _through_checkpoint(tmp_path, source,
                                   pipeline(2, 2, stages.OfflineDataset(num_prompts=4)))
    np.testing.assert_array_equal(source.collect(None, 2).tokens,
                                  restored.collect(None, 2).tokens)
    assert restored.selection.position == source.selection.position == 2   # nothing re-drawn


# --- DAPO's dynamic sampling ------------------------------------------------------------------


def test_dynamic_sampling_refills_with_informative_groups_and_counts_the_rollouts():
    # Even prompt ids get rewards (1, 0) (informative), odd ids (0, 0) (uninformative).
    dynamic = stages.DynamicSampling(max_rounds=10)
    source = pipeline(4, 2, dynamic, reward_fn=lambda p, w, s: float(p % 2 == 0 and w == 0))
    batch = source.collect(None, 1)
    ids = batch.tokens[::2, 0]
    assert (ids % 2 == 0).all() and batch.num_rows == 8            # only informative groups
    # Each round of 4 prompts gives 2 informative groups: 2 rounds, 8 extra responses.
    assert source.metrics() == {"dynamic_sampling/rounds": 2, "dynamic_sampling/extra_rollouts": 8,
                                "dynamic_sampling/filled": 0}
    assert source.sampler.generated == 16
    assert _groups_are_contiguous(batch, 2)


def test_dynamic_sampling_fills_with_uninformative_groups_when_the_rounds_run_out():
    dynamic = stages.DynamicSampling(max_rounds=2)
    source = pipeline(4, 2, dynamic, reward_fn=lambda p, w, s: float(p == 0 and w == 0))
    batch = source.collect(None, 1)
    assert batch.num_rows == 8 and batch.tokens[0, 0] == 0          # the one informative group
    assert source.metrics()["dynamic_sampling/filled"] == 3
    assert source.metrics()["dynamic_sampling/rounds"] == 2
    with pytest.raises(ValueError, match="must come first among the stages"):
        pipeline(4, 2, stages.OfflineDataset(4), stages.DynamicSampling()).collect(None, 1)
