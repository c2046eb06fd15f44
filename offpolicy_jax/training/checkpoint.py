"""Checkpoints with orbax: everything a run needs to continue exactly where it stopped.

A checkpoint at step ``s`` holds the train state (params, optimizer state, step, RNG, skip counters),
any replay buffer (as arrays), and a JSON record with the data iterator state, the metrics history
length and whatever else the loop needs (policy version, rollouts so far). Restoring it and running
on gives the same parameters and the same logged metrics as a run that never stopped.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin, explicit wrapper around ``ocp.CheckpointManager``.

    Items: ``state`` (the TrainState pytree), ``arrays`` (a dict of numpy arrays, e.g. a replay
    buffer; may be empty) and ``meta`` (JSON). Saves are synchronous so that a SIGKILL right after
    ``save`` returns cannot leave a half-written latest checkpoint; orbax writes to a temporary
    directory and renames it, so a kill *during* a save leaves the previous checkpoint intact.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "arrays", "meta"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, arrays: dict | None = None) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                # orbax saves neither an empty tree nor a zero-size array; a one-element marker
                # stands in for "no arrays" and is dropped again on restore.
                arrays=ocp.args.PyTreeSave(arrays or {"_empty": np.zeros((1,), np.int8)}),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """Returns ``(state, meta, arrays)`` of checkpoint ``step``; ``abstract_state`` gives the
        structure, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves with ``sharding``)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                arrays=ocp.args.PyTreeRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        arrays = {k: v for k, v in dict(restored["arrays"]).items() if k != "_empty"}
        arrays = jax.tree.map(lambda x: jax.device_get(x), arrays)
        return restored["state"], dict(restored["meta"]), arrays

    def read_meta(self, step: int) -> dict:
        """The JSON record of checkpoint ``step`` alone (e.g. which stage a multi-stage loop was
        in, before restoring that stage's train state)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def read_state(self, step: int):
        """The raw state pytree of checkpoint ``step`` (host arrays, no target structure needed):
        for inspection, comparison and export."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return jax.device_get(restored["state"])

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree):
    """``ShapeDtypeStruct``s (with shardings where the leaves have them) for restoring ``tree``."""

    def to_abstract(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(to_abstract, tree)


def with_prefix(arrays: dict, prefix: str) -> dict:
    """The entries of ``arrays`` whose key starts with ``prefix``, with it removed (the arrays a
    part of the run saved under its own prefix)."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
