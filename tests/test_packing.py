"""Sequence packing (``rollout.pack_segments``, ``--pack_sequences``): the packed layout by hand,
and the packed forward, loss and gradients against the padded ones (float32 round-off), for a
plain forward, for the train step's microbatches and for a batch sharded over 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses, models
from offpolicy_jax.training import rollout, step as step_lib, trainer
from offpolicy_jax.training.algorithm import Algorithm
from offpolicy_jax.training.config import RunConfig


def test_layout_by_hand():
    # Width 4 + 4. Row 0: prompt [5, 6], response [7, 8, 9]; row 1: prompt [3], response [4];
    # row 2: prompt [1, 2, 3], response [4, 5, 6, 7] (7 tokens: a row of its own).
    packed = rollout.pack_sequences([[5, 6], [3], [1, 2, 3]],
                                    np.array([[7, 8, 9, 0], [4, 0, 0, 0], [4, 5, 6, 7]]),
                                    np.array([3, 1, 4]), pad_id=0, prompt_bucket=4)
    assert packed.tokens.shape == (3, 8)
    out = rollout.pack_segments(packed.tokens, packed.attention_mask, 4, parts=3)
    # First-fit decreasing: row 2 (7 tokens) opens bin 0, row 0 (5) bin 1, row 1 (2) fits bin 1.
    np.testing.assert_array_equal(out["segment_tokens"], [[1, 2, 3, 4, 5, 6, 7, 0],
                                                          [5, 6, 7, 8, 9, 3, 4, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 1, 1, 1, 0],
                                                       [1, 1, 1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(out["segment_positions"], [[0, 1, 2, 3, 4, 5, 6, 0],
                                                             [0, 1, 2, 3, 4, 0, 1, 0]])
    # Flat positions (row * 8 + column) of the states predicting each response token; 16 = none.
    np.testing.assert_array_equal(out["token_index"], [[9, 10, 11, 16], [13, 16, 16, 16],
                                                       [2, 3, 4, 5]])


def test_groups_follow_the_microbatch_and_shard_split():
    # 8 rows, 2 microbatches x 2 shards: microbatch m takes rows m, m + 2, ...; within it, shard s
    # the s-th half. Every group packs into the same number of rows, interleaved like the rows.
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 6, 8)
    packed = rollout.pack_sequences([[1, 2]] * 8, rng.integers(3, 9, (8, 6)), lengths, pad_id=0)
    out = rollout.pack_segments(packed.tokens, packed.attention_mask, 6, num_microbatches=2,
                                num_shards=2, parts=2)
    rows_per_group = out["segment_tokens"].shape[0] // 4
    flat = out["segment_tokens"]
    for row in range(8):
        microbatch, shard = row % 2, (row // 2) // 2
        group_rows = [(shard * rows_per_group + p) * 2 + microbatch for p in range(rows_per_group)]
        group = flat[group_rows].reshape(-1)
        n = lengths[row]
        # The predicted tokens, read one past each predicting position, are the row's response.
        np.testing.assert_array_equal(group[out["token_index"][row, :n] + 1],
                                      packed.tokens[row, 8:8 + n])


def test_refuses_rows_that_do_not_split_and_empty_prompts():
    packed = rollout.pack_sequences([[1], [2], [3]], np.ones((3, 2), int), np.array([1, 2, 1]),
                                    pad_id=0)
    with pytest.raises(ValueError, match="3 rows do not split into 2 microbatches x 1 shards"):
        rollout.pack_segments(packed.tokens, packed.attention_mask, 2, num_microbatches=2)
    mask = packed.attention_mask.copy()
    mask[1, :-2] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have an empty prompt"):
        rollout.pack_segments(packed.tokens, mask, 2)


def _model_and_batch(num_rows=16, budget=12, seed=0):
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, budget + 1, num_rows)
    prompts = [list(rng.integers(1, 64, n)) for n in rng.integers(1, 7, num_rows)]
    packed = rollout.pack_sequences(prompts, rng.integers(1, 64, (num_rows, budget)), lengths,
                                    pad_id=0)
    return cfg, params, packed


OPTIONS = dict(temperature=0.7, with_vocab_mean=True, with_entropy=True, with_hidden=True)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_packed_outputs_equal_the_padded_ones(num_shards):
    cfg, params, packed = _model_and_batch()
    budget = packed.num_response_tokens

    def forward(params, batch):
        return rollout.policy_outputs(cfg, params, batch, num_response=budget,
                                      num_shards=num_shards, **OPTIONS)

    padded = jax.jit(forward)(params, packed.model_inputs())
    segments = rollout.pack_segments(packed.tokens, packed.attention_mask, budget,
                                     num_shards=num_shards)
    assert segments["segment_tokens"].size < packed.tokens.size
    for use_jit in (True, False):
        out = (jax.jit(forward) if use_jit else forward)(params, segments)
        mask = packed.response_mask
        for name in ("logp", "vocab_mean", "entropy"):
            assert out[name].shape == padded[name].shape
            np.testing.assert_allclose(out[name] * mask, padded[name] * mask, atol=2e-5)
            np.testing.assert_array_equal(np.asarray(out[name])[mask == 0], 0.0)
        np.testing.assert_allclose(out["hidden"] * mask[..., None],
                                   padded["hidden"] * mask[..., None], atol=2e-5)


def _clip_loss(inputs, info):
    loss, _ = losses.ppo_clip(inputs["logp"], inputs["old_logp"], inputs["advantages"],
                              inputs["mask"])
    return loss, {}


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_train_step_on_packed_rows_equals_the_padded_one(num_microbatches):
    """One optimizer update from the same state: loss and new parameters agree within float32
    round-off, with gradient accumulation over microbatches, rows sharded over 4 of the 8
    devices' batch axes and the heads over the other 2."""
    import optax

    from offpolicy_jax.training import state as state_lib

    cfg, params, packed = _model_and_batch(num_rows=32, seed=1)
    budget = packed.num_response_tokens
    rng = np.random.default_rng(2)
    rows = {"mask": packed.response_mask,
            "old_logp": rng.normal(-4.0, 0.1, packed.response_mask.shape).astype(np.float32),
            "advantages": rng.normal(size=32).astype(np.float32)}
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    num_shards = 4   # data x fsdp; tensor splits the heads
    config = RunConfig(workdir="unused", max_new_tokens=budget, group_size=2, remat="none",
                       num_microbatches=num_microbatches)
    optimizer = optax.sgd(1.0)
    specs = models.partition_specs(params, mesh)
    state = state_lib.create_train_state(params, optimizer, rng=0)
    state_sharding = step_lib.state_shardings(state, specs, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(step_lib.BATCH_AXES))

    def run(batch):
        loss_fn = trainer.make_loss_fn(cfg, Algorithm(name="clip", loss=_clip_loss), config,
                                       num_shards=num_shards)
        train_step = step_lib.make_train_step(loss_fn, optimizer,
                                              num_microbatches=num_microbatches, mesh=mesh,
                                              state_sharding=state_sharding, donate=False)
        placed = jax.device_put(batch, sharding)
        new_state, metrics = train_step(jax.device_put(state, state_sharding), placed,
                                        jnp.int32(1))
        return jax.device_get(new_state.params), jax.device_get(metrics)

    padded_params, padded_metrics = run({**packed.model_inputs(), **rows})
    segments = rollout.pack_segments(packed.tokens, packed.attention_mask, budget,
                                     num_microbatches=num_microbatches, num_shards=num_shards)
    packed_params, packed_metrics = run({**segments, **rows})
    np.testing.assert_allclose(packed_metrics["loss"], padded_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(packed_metrics["entropy"], padded_metrics["entropy"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_params), jax.tree.leaves(padded_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), padded_params,
                                           params))
    assert max(changed) > 1e-3   # the update moved the parameters: the comparison means something


def _ppo_algorithm() -> Algorithm:
    """PPO's clip on group-normalised rewards, with a separate old-policy forward (read by
    ``prepare``), so both the prepare forward and the update run on the batch's layout."""

    def prepare(inputs, info):
        rewards = inputs["rewards"].reshape(-1, info.group_size)
        advantages = (rewards - rewards.mean(axis=1, keepdims=True)).reshape(-1)
        # Reads the old policy's log-probs, so they come from prepare's own forward.
        assert np.all(np.isfinite(inputs["old_logp"]))
        return {"advantages": advantages.astype(np.float32)}

    return Algorithm(name="packed_ppo", loss=_clip_loss, prepare=prepare,
                     forward={"old": ("logp",)}, prepare_reads=("old_logp",),
                     minibatch_unit="group")


def _learner_update(model, workdir, pack, rollouts):
    config = RunConfig(workdir=str(workdir), model=model, mesh="2,1,4", batch_size=16,
                       group_size=2, max_new_tokens=rollouts.tokens.shape[1], eval_size=2,
                       num_minibatches=2, num_microbatches=2, progress=False,
                       learning_rate=1e-3, pack_sequences=pack, remat="none")
    session = trainer.Session(config, "packed_ppo")
    try:
        learner = trainer.Learner(session, _ppo_algorithm())
        batch = learner.prepare(rollouts, iteration=1)
        metrics = learner.update(batch, iteration=1)
        fractions = dict(learner.token_fractions)
        # 6 rows do not split into 2 microbatches x 2 shards: that step stays padded.
        uneven = learner.model_inputs({k: v[:6] for k, v in batch.items()}, num_microbatches=2)
        assert sorted(uneven) == sorted(rollout.PADDED_KEYS)
        return batch["old_logp"], jax.device_get(learner.state.params), metrics, fractions
    finally:
        session.pool.close()
        session.checkpointer.close()
        session.logger.close()


def test_learner_on_packed_rows_equals_the_padded_layout(random_tiny_model, tmp_path):
    """The whole prepare → update path of the Learner, rows sharded over 2 devices (tensor=4),
    2 minibatches of 2 microbatches: old log-probs, losses and updated parameters agree; the
    packed forward computes fewer positions."""
    from offpolicy_jax.training.batch import Rollouts

    rng = np.random.default_rng(0)
    num_rows, budget = 32, 24
    lengths = np.minimum(rng.geometric(1 / 6, num_rows), budget).astype(np.int32)
    prompt_lengths = rng.integers(3, 9, num_rows).astype(np.int32)
    prompt_tokens = rng.integers(4, 20, (num_rows, 8)).astype(np.int32)
    rollouts = Rollouts(prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths,
                        tokens=rng.integers(4, 20, (num_rows, budget)).astype(np.int32),
                        lengths=lengths, behaviour_logp=np.full((num_rows, budget), -3.0,
                                                                np.float32),
                        rewards=rng.integers(0, 2, num_rows).astype(np.float32),
                        group_index=np.repeat(np.arange(16), 2).astype(np.int32),
                        policy_version=np.zeros(num_rows, np.int32))
    padded = _learner_update(random_tiny_model, tmp_path / "padded", False, rollouts)
    packed = _learner_update(random_tiny_model, tmp_path / "packed", True, rollouts)
    mask = np.arange(padded[0].shape[1])[None, :] < lengths[:, None]
    np.testing.assert_allclose(packed[0] * mask, padded[0] * mask, atol=2e-5)
    assert len(packed[2]) == len(padded[2]) == 2
    for got, want in zip(packed[2], padded[2]):
        for name in ("loss", "grad_norm", "entropy"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4)
    # AdamW's first steps are about lr * sign(g): compare within a tenth of the learning rate.
    for a, b in zip(jax.tree.leaves(packed[1]), jax.tree.leaves(padded[1])):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert packed[3]["packed_token_fraction"] > 1.5 * packed[3]["padded_token_fraction"]
    assert "packed_token_fraction" not in padded[3]
