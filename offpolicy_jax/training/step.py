"""One jitted optimizer update: gradient accumulation, global norms, and the non-finite guard.

The step is built once per run (``make_train_step``) and compiled once: the loss is a pure function
``loss_fn(params, batch, rng) -> (loss, metrics)`` of a dict of ``[B, ...]`` arrays (or
``loss_fn(params, batch, rng, context)`` when the step is called with a ``context``: a small pytree
that is the same for every row, e.g. the RL iteration as a scalar), the state is donated, and on a
mesh the state and batch carry explicit shardings (state as the partition rules say, batch split
over ``("data", "fsdp")``, the context replicated).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from offpolicy_jax.training.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
BATCH_AXES = ("data", "fsdp")


class NonFiniteError(RuntimeError):
    """Raised when a run keeps producing non-finite losses or gradients."""


def _split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """``[B, ...] -> [M, B/M, ...]`` with microbatch ``m`` holding rows ``m, m+M, m+2M, ...``.

    Strided rather than contiguous so that, with the batch sharded over devices, every device holds
    an equal part of every microbatch.
    """

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}")
        x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _loss_and_grads(loss_fn: LossFn, params, batch: dict, rng, num_microbatches: int,
                    context=None):
    """Mean loss, mean gradient and mean metrics over ``num_microbatches`` equal microbatches.

    The microbatch losses are averaged with equal weights, so a ``token-mean`` loss is exactly the
    global token mean only when every microbatch holds the same number of tokens (the same caveat
    as verl's gradient accumulation).
    """
    if context is not None:
        loss_fn = functools.partial(_with_context, loss_fn, context=context)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, grads, metrics

    microbatches = _split_microbatches(batch, num_microbatches)

    def accumulate(carry, inputs):
        index, microbatch = inputs
        (loss, metrics), grads = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
        loss_sum, grad_sum, metric_sum = carry
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads),
                jax.tree.map(jnp.add, metric_sum, metrics)), None

    first = jax.tree.map(lambda x: x[0], microbatches)
    _, metrics_shape = jax.eval_shape(loss_fn, params, first, rng)
    zeros = (jnp.zeros((), jnp.float32),
             jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
             jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.float32), metrics_shape))
    (loss_sum, grad_sum, metric_sum), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(num_microbatches), microbatches))
    scale = 1.0 / num_microbatches
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
    return loss_sum * scale, grads, jax.tree.map(lambda m: m * scale, metric_sum)


def _with_context(loss_fn: LossFn, params, batch: dict, rng, *, context):
    return loss_fn(params, batch, rng, context)


def apply_gradients(state: TrainState, grads, loss, optimizer: optax.GradientTransformation,
                    max_grad_norm_for_finite: float = float("inf")):
    """Applies ``grads`` unless the loss or the gradient norm is non-finite.

    A non-finite step leaves ``params`` and ``opt_state`` bit-for-bit unchanged and increments
    ``skipped_steps``/``consecutive_skips``; ``step`` counts applied updates only.
    Returns ``(new_state, norms)`` with the global grad, param and update norms.
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (grad_norm < max_grad_norm_for_finite)
    # Zeroing non-finite gradients keeps NaNs out of the (discarded) optimizer arithmetic.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_finite(new, old):
        return jnp.where(finite, new, old)

    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + (1 - skipped),
        params=jax.tree.map(keep_if_finite, new_params, state.params),
        opt_state=jax.tree.map(keep_if_finite, new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    norms = {
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state.params),
        "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
        "skipped": skipped,
    }
    return new_state, norms


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    num_microbatches: int = 1, mesh=None, state_sharding=None,
                    learning_rate_fn: Callable | None = None, donate: bool = True,
                    params_fn: Callable | None = None, frozen_sharding=None):
    """Builds ``train_step(state, batch, context=None) -> (state, metrics)``, jitted once.

    With ``params_fn`` the step is ``train_step(state, batch, context, frozen)``: ``state.params``
    are the trainable parameters only (e.g. LoRA adapters), ``frozen`` a pytree that is an input
    but never differentiated, donated or stored in the state, and the loss sees
    ``params_fn(frozen, state.params)``. Gradients, the optimizer state and the norms then cover
    the trainable parameters alone.

    Args:
      loss_fn: ``(params, batch, rng) -> (scalar loss, dict of scalar metrics)``; called as
        ``loss_fn(params, batch, rng, context)`` when the step is given a ``context``.
      optimizer: the optax transformation the state was created with.
      num_microbatches: gradient-accumulation steps; the batch's leading dim must divide by it.
      mesh: optional ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "tensor")``.
      state_sharding: pytree of ``NamedSharding`` for the state (see ``state_shardings``); needed
        with ``mesh``.
      learning_rate_fn: optional schedule, to log the learning rate of each step.
      donate: donate the input state's buffers (the caller must not reuse that state).
      params_fn: ``(frozen, trainable) -> params`` for the loss; None: the state's params are
        the model's.
      frozen_sharding: ``NamedSharding``s of ``frozen`` (with ``mesh`` and ``params_fn``).

    Metrics: the loss, the loss's own metrics, ``grad_norm``, ``param_norm``, ``update_norm``,
    ``skipped`` (1 when the update was not applied) and ``learning_rate``.
    """

    def train_step(state: TrainState, batch: dict, context=None, frozen=None):
        rng = jax.random.fold_in(state.rng, state.step)
        step_loss_fn = loss_fn
        if params_fn is not None:
            def step_loss_fn(trainable, *args):
                return loss_fn(params_fn(frozen, trainable), *args)
        loss, grads, loss_metrics = _loss_and_grads(step_loss_fn, state.params, batch, rng,
                                                    num_microbatches, context)
        new_state, norms = apply_gradients(state, grads, loss, optimizer)
        metrics = {"loss": loss, **loss_metrics, **norms}
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(train_step, donate_argnums=donate_argnums)
    if state_sharding is None:
        raise ValueError("make_train_step(mesh=...) needs state_sharding (see state_shardings)")
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    if params_fn is not None:
        if frozen_sharding is None:
            raise ValueError("make_train_step(mesh=..., params_fn=...) needs frozen_sharding")
        jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, replicated,
                                                   frozen_sharding),
                         out_shardings=(state_sharding, replicated), donate_argnums=donate_argnums)
        sharded_frozen_step = functools.partial(_call_with_frozen, jitted)
        sharded_frozen_step._cache_size = jitted._cache_size
        return sharded_frozen_step
    jitted = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, replicated),
                     out_shardings=(state_sharding, replicated), donate_argnums=donate_argnums)

    def sharded_train_step(state: TrainState, batch: dict, context=None):
        # jit's in_shardings name all three arguments; None is an empty (replicated) context.
        return jitted(state, batch, context)

    sharded_train_step._cache_size = jitted._cache_size   # compile counts, for tests
    return sharded_train_step


def _call_with_frozen(jitted, state: TrainState, batch: dict, context=None, frozen=None):
    # jit's in_shardings name all four arguments; None is an empty (replicated) context.
    return jitted(state, batch, context, frozen)


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_partition_specs(state: TrainState, param_specs) -> TrainState:
    """PartitionSpecs for a whole train state from the parameters' specs.

    Optimizer-state leaves that mirror a parameter (AdamW's ``mu``/``nu``; their key path ends with
    the parameter's path and they have its shape) take that parameter's spec; everything else
    (counts, Adafactor's factored moments, scalars, the RNG) is replicated.
    """
    param_leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    spec_leaves = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    by_path = {_path_key(path): (leaf.shape, spec)
               for (path, leaf), spec in zip(param_leaves, spec_leaves)}

    def opt_spec(path, leaf):
        key = _path_key(path)
        shape = getattr(leaf, "shape", ())
        for start in range(len(key)):
            match = by_path.get(key[start:])
            if match is not None and match[0] == shape:
                return match[1]
        return PartitionSpec()

    opt_specs = jax.tree_util.tree_map_with_path(opt_spec, state.opt_state)
    return TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs,
                      rng=PartitionSpec(), skipped_steps=PartitionSpec(),
                      consecutive_skips=PartitionSpec())


def state_shardings(state: TrainState, param_specs, mesh) -> TrainState:
    """``NamedSharding``s for ``state`` on ``mesh`` (see ``state_partition_specs``)."""
    specs = state_partition_specs(state, param_specs)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


class NonFiniteGuard:
    """Host-side policy for non-finite updates: count them, and stop a run that keeps producing them.

    The jitted step already refuses to apply a non-finite update; this turns a streak of
    ``max_consecutive`` refused updates into a ``NonFiniteError`` that names the step, so the run
    ends with its last good checkpoint intact instead of spinning.
    """

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive

    def check(self, state: TrainState, metrics: dict) -> None:
        consecutive = int(np.asarray(jax.device_get(state.consecutive_skips)))
        if consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{consecutive} consecutive updates had a non-finite loss or gradient "
                f"(last loss={float(np.asarray(jax.device_get(metrics['loss'])))}, "
                f"grad_norm={float(np.asarray(jax.device_get(metrics['grad_norm'])))}); "
                f"stopping. The last checkpoint holds the last good parameters "
                f"(applied updates: {int(np.asarray(jax.device_get(state.step)))}).")

