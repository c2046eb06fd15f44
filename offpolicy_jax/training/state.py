"""The train state: parameters, optimizer state, step counter, RNG and non-finite bookkeeping."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything an update changes; a pytree, so it can be jitted, sharded, donated and saved.

    Attributes:
      step: number of applied (finite) optimizer updates, int32 scalar.
      params: model parameters (any pytree).
      opt_state: the optax state for ``params``.
      rng: PRNG key of the run; per-step keys are ``fold_in(rng, step)``, never split-and-carry,
        so a resumed run draws the same numbers.
      skipped_steps: updates skipped because the loss or a gradient was not finite, int32 scalar.
      consecutive_skips: skips since the last good update, int32 scalar (the loop stops a run that
        keeps producing non-finite values).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array
    consecutive_skips: jax.Array


def create_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    """A fresh state at step 0. ``rng`` is an int seed or a PRNG key (raw uint32 key data)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=rng,
        skipped_steps=jnp.zeros((), jnp.int32),
        consecutive_skips=jnp.zeros((), jnp.int32),
    )
