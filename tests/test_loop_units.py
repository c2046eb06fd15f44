"""Unit tests of the loop's host-side pieces: packing, prompt arrays, the offline source, config
validation. (The end-to-end runs live in test_experiments.py.)"""

import numpy as np
import pytest

from offpolicy_jax.training import algorithm as algorithm_lib
from offpolicy_jax.training import loop, rollout


def test_pack_sequences_layout():
    prompts = [[5, 6, 7], [8]]
    response = np.array([[1, 2, 3, 9], [4, 9, 0, 0]])
    packed = rollout.pack_sequences(prompts, response, np.array([4, 2]), pad_id=0,
                                    prompt_bucket=4)
    np.testing.assert_array_equal(packed.tokens, [[0, 5, 6, 7, 1, 2, 3, 9],
                                                  [0, 0, 0, 8, 4, 9, 0, 0]])
    np.testing.assert_array_equal(packed.attention_mask, [[0, 1, 1, 1, 1, 1, 1, 1],
                                                          [0, 0, 0, 1, 1, 1, 0, 0]])
    # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
    np.testing.assert_array_equal(packed.positions, [[0, 0, 1, 2, 3, 4, 5, 6],
                                                     [0, 0, 0, 0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(packed.response_mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert packed.prompt_length == 4


def test_pack_sequences_errors():
    with pytest.raises(ValueError, match="must agree on N"):
        rollout.pack_sequences([[1]], np.zeros((2, 3)), np.array([1, 1]), pad_id=0)
    with pytest.raises(ValueError, match="more than prompt_bucket=2"):
        rollout.pack_sequences([[1, 2, 3]], np.zeros((1, 3)), np.array([1]), pad_id=0,
                               prompt_bucket=2)


def test_bucket_length():
    assert [rollout.bucket_length(n) for n in (1, 8, 9, 33)] == [8, 8, 16, 64]


def test_prompt_array_round_trip():
    prompts = [[1, 2, 3], [4], [5, 6]]
    array, lengths = loop.prompts_to_array(prompts, pad_id=0)
    assert array.shape == (3, 3)
    assert loop.array_to_prompts(array, lengths) == prompts


class _FakeContext:
    """Stands in for RolloutContext: 'samples' are row numbers, so order is observable."""

    def __init__(self, batch_size, group_size, seed=0):
        self.config = loop.RunConfig(workdir="", batch_size=batch_size, group_size=group_size,
                                     seed=seed)
        self.pad_id = 0
        self.calls = 0
        self.iterator = iter([[{"prompt": str(i)} for i in range(start, start + batch_size)]
                              for start in range(0, 1000, batch_size)])

    def sample_and_score(self, params, records, seed_index, policy_version):
        self.calls += 1
        ids = np.repeat([int(r["prompt"]) for r in records], self.config.group_size)
        n = ids.shape[0]
        return {"prompt_tokens": ids[:, None].astype(np.int32),
                "prompt_lengths": np.ones(n, np.int32), "tokens": ids[:, None],
                "lengths": np.ones(n, np.int32), "behaviour_logp": np.zeros((n, 1), np.float32),
                "rewards": np.zeros(n, np.float32), "group_index": np.zeros(n, np.int32),
                "policy_version": np.full(n, policy_version, np.int32)}


def test_offline_rollouts_sample_once_and_cycle_through_every_group():
    context = _FakeContext(batch_size=2, group_size=3)
    source = loop.OfflineRollouts(num_prompts=5)
    seen = []
    for iteration in range(1, 6):  # 5 iterations x 2 groups = 2 epochs over 5 groups
        batch = source.collect(context, None, iteration)
        assert batch["tokens"].shape[0] == 6
        # Rows stay grouped: each group of 3 rows is one prompt.
        groups = batch["tokens"][:, 0].reshape(2, 3)
        assert (groups == groups[:, :1]).all()
        seen.extend(groups[:, 0].tolist())
        assert (batch["policy_version"] == 0).all()
    assert context.calls == 3  # 5 prompts drawn once, in batches of 2 (2 + 2 + 1)
    assert sorted(seen) == sorted(list(range(5)) * 2)


def test_offline_rollouts_state_round_trip():
    context = _FakeContext(batch_size=2, group_size=2)
    source = loop.OfflineRollouts(num_prompts=4)
    source.collect(context, None, 1)
    meta, arrays = source.state_dict()
    restored = loop.OfflineRollouts(num_prompts=4)
    restored.load_state_dict(meta, arrays)
    np.testing.assert_array_equal(source.collect(context, None, 2)["tokens"],
                                  restored.collect(context, None, 2)["tokens"])


def test_run_config_validation_names_the_flag():
    grouped = algorithm_lib.Algorithm(name="grpo", loss=None, advantages=None)
    with pytest.raises(ValueError, match="--group_size=1: grpo normalises advantages"):
        loop.RunConfig(workdir="w", group_size=1).validate(grouped)
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        loop.RunConfig(workdir="w", temperature=0.0).validate(grouped)
    split = algorithm_lib.Algorithm(name="x", loss=None, advantages=None, num_minibatches=3)
    with pytest.raises(ValueError, match="must divide into 3 minibatches"):
        loop.RunConfig(workdir="w", batch_size=4, group_size=2).validate(split)
    with pytest.raises(ValueError, match="--remat must be 'none', 'full' or a jax.checkpoint"):
        loop.RunConfig(workdir="w", remat="dots_only").validate(grouped)
    for remat in ("none", "full", "dots_saveable"):
        loop.RunConfig(workdir="w", remat=remat).validate(grouped)
    assert (loop.remat_policy("none"), loop.remat_policy("full")) == (False, True)
    ungrouped = algorithm_lib.Algorithm(name="topr", loss=None, advantages=None,
                                        needs_groups=False)
    loop.RunConfig(workdir="w", group_size=1).validate(ungrouped)
