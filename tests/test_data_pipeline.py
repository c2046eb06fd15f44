"""The grain prompt iterator: determinism, exact resume from a saved state, process sharding."""

import itertools
import json

import pytest

from offpolicy_jax.data import pipeline

RECORDS = [{"id": f"r{i}", "prompt": f"Q: {i}", "gold": str(i)} for i in range(23)]


def ids(batches):
    return [[record["id"] for record in batch] for batch in batches]


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_same_seed_same_stream_and_epochs_cover_everything():
    a = ids(take(pipeline.PromptIterator(RECORDS, 4, seed=1, shard_index=0, shard_count=1), 23))
    b = ids(take(pipeline.PromptIterator(RECORDS, 4, seed=1, shard_index=0, shard_count=1), 23))
    c = ids(take(pipeline.PromptIterator(RECORDS, 4, seed=2, shard_index=0, shard_count=1), 23))
    assert a == b and a != c
    assert all(len(batch) == 4 for batch in a)
    flat = list(itertools.chain.from_iterable(a))              # 92 records = 4 epochs of 23
    epochs = [flat[i * 23:(i + 1) * 23] for i in range(4)]
    assert all(sorted(epoch) == sorted(r["id"] for r in RECORDS) for epoch in epochs)
    assert epochs[0] != epochs[1]                              # reshuffled every epoch
    assert epochs[0] != [r["id"] for r in RECORDS]             # actually shuffled


def test_restoring_state_mid_stream_reproduces_the_following_batches():
    iterator = pipeline.PromptIterator(RECORDS, 5, seed=7, shard_index=0, shard_count=1)
    take(iterator, 6)                                          # past the first epoch boundary
    state = json.loads(json.dumps(iterator.get_state()))       # as saved in a checkpoint
    expected = ids(take(iterator, 10))
    restored = pipeline.PromptIterator(RECORDS, 5, seed=7, shard_index=0, shard_count=1)
    take(restored, 2)                                          # somewhere else first
    restored.set_state(state)
    assert ids(take(restored, 10)) == expected


def test_state_from_different_settings_is_rejected():
    state = pipeline.PromptIterator(RECORDS, 5, seed=7, shard_index=0, shard_count=1).get_state()
    with pytest.raises(ValueError, match="seed"):
        pipeline.PromptIterator(RECORDS, 5, seed=8, shard_index=0, shard_count=1).set_state(state)
    with pytest.raises(ValueError, match="num_records"):
        pipeline.PromptIterator(RECORDS[:20], 5, seed=7, shard_index=0,
                                shard_count=1).set_state(state)
    with pytest.raises(ValueError, match="not a PromptIterator state"):
        pipeline.PromptIterator(RECORDS, 5, seed=7, shard_index=0,
                                shard_count=1).set_state({"next_index": 3})


def test_process_shards_are_disjoint_and_cover_the_records():
    shard_count = 3
    seen = []
    for shard_index in range(shard_count):
        iterator = pipeline.PromptIterator(RECORDS, 2, seed=0, shard_index=shard_index,
                                           shard_count=shard_count)
        epoch = list(itertools.chain.from_iterable(ids(take(iterator, 4))))[
            :iterator.records_per_shard]
        seen.append(set(epoch))
        assert len(epoch) == len(set(epoch))
    assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]
    assert set.union(*seen) == {r["id"] for r in RECORDS}


def test_defaults_follow_jax_processes():
    iterator = pipeline.PromptIterator(RECORDS, 3, seed=0)
    assert (iterator.shard_index, iterator.shard_count) == (0, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2, shard_index=3, shard_count=3), "shard_index"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipeline.PromptIterator(RECORDS, seed=0, **kwargs)


def test_too_few_records_for_the_shards():
    with pytest.raises(ValueError, match="shards"):
        pipeline.PromptIterator(RECORDS[:2], 1, seed=0, shard_index=0, shard_count=3)
