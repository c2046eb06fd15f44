"""Train step, non-finite guard, gradient accumulation, sharded step and checkpoint round trip,
on a small least-squares model (no language model needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from offpolicy_jax import training
from offpolicy_jax.training import checkpoint, step as step_lib


def _loss_fn(params, batch, rng):
    del rng
    prediction = batch["x"] @ params["w"] + params["b"][None, :]
    error = (prediction - batch["y"]) ** 2
    loss = jnp.mean(error)
    return loss, {"max_error": jnp.max(error)}


def _setup(seed=0, batch_size=8):
    key_w, key_x, key_y = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"w": jax.random.normal(key_w, (4, 2)), "b": jnp.zeros((2,))}
    batch = {"x": jax.random.normal(key_x, (batch_size, 4)),
             "y": jax.random.normal(key_y, (batch_size, 2))}
    optimizer = training.make_optimizer(training.OptimizerConfig(name="adamw", learning_rate=1e-2))
    return params, batch, optimizer


def test_step_decreases_loss_and_reports_norms():
    params, batch, optimizer = _setup()
    state = training.create_train_state(params, optimizer, rng=0)
    train_step = training.make_train_step(_loss_fn, optimizer)
    losses = []
    for _ in range(20):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert int(state.step) == 20 and int(state.skipped_steps) == 0
    for key in ("grad_norm", "param_norm", "update_norm", "max_error", "skipped"):
        assert np.isfinite(float(metrics[key])), key


def test_microbatching_matches_full_batch_gradient():
    params, batch, optimizer = _setup()
    full = training.make_train_step(_loss_fn, optimizer, donate=False)
    accumulated = training.make_train_step(_loss_fn, optimizer, num_microbatches=4, donate=False)
    state = training.create_train_state(params, optimizer, rng=0)
    # Mean squared error over equal-size microbatches averages to the full-batch mean exactly.
    state_full, m_full = full(state, batch)
    state_acc, m_acc = accumulated(state, batch)
    np.testing.assert_allclose(m_full["loss"], m_acc["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full["grad_norm"], m_acc["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_full.params), jax.tree.leaves(state_acc.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_microbatching_rejects_indivisible_batch():
    params, batch, optimizer = _setup(batch_size=6)
    train_step = training.make_train_step(_loss_fn, optimizer, num_microbatches=4)
    state = training.create_train_state(params, optimizer, rng=0)
    with pytest.raises(ValueError, match="not divisible by num_microbatches=4"):
        train_step(state, batch)


def test_non_finite_loss_never_updates_parameters():
    params, batch, optimizer = _setup()
    state = training.create_train_state(params, optimizer, rng=0)
    train_step = training.make_train_step(_loss_fn, optimizer, donate=False)
    poisoned = dict(batch, y=batch["y"].at[0, 0].set(jnp.nan))
    new_state, metrics = train_step(state, poisoned)
    assert int(metrics["skipped"]) == 1
    assert int(new_state.step) == 0 and int(new_state.skipped_steps) == 1
    for before, after in zip(jax.tree.leaves((state.params, state.opt_state)),
                             jax.tree.leaves((new_state.params, new_state.opt_state))):
        np.testing.assert_array_equal(before, after)
    # A good step afterwards applies and resets the streak.
    good_state, good_metrics = train_step(new_state, batch)
    assert int(good_metrics["skipped"]) == 0 and int(good_state.consecutive_skips) == 0
    assert int(good_state.step) == 1


def test_guard_stops_a_run_that_keeps_producing_non_finite_values():
    params, batch, optimizer = _setup()
    state = training.create_train_state(params, optimizer, rng=0)
    train_step = training.make_train_step(_loss_fn, optimizer)
    guard = training.NonFiniteGuard(max_consecutive=3)
    poisoned = dict(batch, x=batch["x"] * jnp.inf)
    with pytest.raises(training.NonFiniteError, match="3 consecutive updates"):
        for _ in range(5):
            state, metrics = train_step(state, poisoned)
            guard.check(state, metrics)


def test_sharded_step_matches_single_device():
    from offpolicy_jax import models
    params, batch, optimizer = _setup(batch_size=8)
    mesh = models.make_mesh("2,2,2")
    param_specs = {"w": PartitionSpec("fsdp", "tensor"), "b": PartitionSpec()}
    state = training.create_train_state(params, optimizer, rng=0)
    shardings = step_lib.state_shardings(state, param_specs, mesh)
    # AdamW's moments mirror the parameters, so they take the parameters' specs.
    adam_state = shardings.opt_state[1][0]
    assert adam_state.mu["w"].spec == PartitionSpec("fsdp", "tensor")
    sharded_state = jax.device_put(state, shardings)
    sharded_step = training.make_train_step(_loss_fn, optimizer, mesh=mesh,
                                            state_sharding=shardings, donate=False)
    single_step = training.make_train_step(_loss_fn, optimizer, donate=False)
    for _ in range(3):
        sharded_state, _ = sharded_step(sharded_state, batch)
        state, _ = single_step(state, batch)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(sharded_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sharded_state.params["w"].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert sharded_step._cache_size() == 1


def test_checkpoint_round_trip(tmp_path):
    params, batch, optimizer = _setup()
    state = training.create_train_state(params, optimizer, rng=3)
    train_step = training.make_train_step(_loss_fn, optimizer, donate=False)
    state, _ = train_step(state, batch)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    meta = {"data_iterator": {"epoch": 1, "index": 5}, "rollouts": 64}
    arrays = {"replay/tokens": np.arange(12, dtype=np.int32).reshape(3, 4)}
    ckpt.save(1, state, meta, arrays)
    assert ckpt.latest_step() == 1
    restored, restored_meta, restored_arrays = ckpt.restore(1, checkpoint.abstract_like(state))
    assert restored_meta == meta
    np.testing.assert_array_equal(restored_arrays["replay/tokens"], arrays["replay/tokens"])
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    ckpt.close()


@pytest.mark.parametrize("name,schedule", [("adamw", "cosine"), ("adafactor", "linear")])
def test_optimizers_and_schedules(name, schedule):
    config = training.OptimizerConfig(name=name, learning_rate=1e-3, schedule=schedule,
                                      warmup_steps=2, total_steps=10)
    lr = training.make_schedule(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(2)), 1e-3, rtol=1e-6)
    assert float(lr(10)) < 1e-3
    params, batch, _ = _setup()
    optimizer = training.make_optimizer(config)
    state = training.create_train_state(params, optimizer, rng=0)
    state, metrics = training.make_train_step(_loss_fn, optimizer)(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_optimizer_config_errors():
    with pytest.raises(ValueError, match="optimizer name must be one of"):
        training.OptimizerConfig(name="sgd")
    with pytest.raises(ValueError, match="needs total_steps > warmup_steps"):
        training.OptimizerConfig(schedule="cosine", warmup_steps=5, total_steps=5)
