"""The RL loop's prompt iterator: a grain pipeline over in-memory prompt records.

Order of operations (grain ``MapDataset``): take this process's shard of the records
(``records[shard_index::shard_count]``, so shards are disjoint and together cover every record),
shuffle with ``seed`` (grain reshuffles each epoch with a seed derived from ``seed`` and the epoch),
repeat forever, and group consecutive records into lists of ``batch_size`` (a batch may straddle
two epochs). The iterator's position is a small JSON-serialisable dict; restoring it into a new
iterator built from the same records and settings continues with exactly the batches the old one
would have produced, which is what makes a resumed run identical to an uninterrupted one.
"""

import grain
import jax

_STATE_VERSION = 1


class PromptIterator:
    """Endless, shuffled, sharded batches of prompt records with a checkpointable position.

    Args:
      records: the prompt records (dicts such as ``{"id", "prompt", "gold"}``); yielded as they are.
      batch_size: records per batch (per process).
      seed: shuffle seed; the same seed, records and shard give the same stream.
      shard_index: this process's shard; defaults to ``jax.process_index()``.
      shard_count: number of shards; defaults to ``jax.process_count()``.

    ``next(iterator)`` returns a list of ``batch_size`` records. ``get_state()`` returns a JSON-
    serialisable dict; ``set_state(state)`` moves the iterator to that position.
    """

    def __init__(self, records: list[dict], batch_size: int, seed: int,
                 shard_index: int | None = None, shard_count: int | None = None):
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        if batch_size < 1:
            raise ValueError(f"PromptIterator: batch_size must be >= 1, got {batch_size}")
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"PromptIterator: need 0 <= shard_index < shard_count, got "
                             f"shard_index={shard_index}, shard_count={shard_count}")
        if len(records) < shard_count:
            raise ValueError(f"PromptIterator: {len(records)} records cannot fill "
                             f"{shard_count} shards (one per process)")
        self.batch_size = batch_size
        self.seed = seed
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.num_records = len(records)
        dataset = (grain.MapDataset.source(list(records))[shard_index::shard_count]
                   .shuffle(seed=seed)
                   .repeat(None)
                   .batch(batch_size, batch_fn=list))
        # The records are already in memory: reading threads would only contend for the GIL
        # (grain's advice for in-memory data) and a prefetch buffer would gain nothing.
        self._dataset = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        self._iterator = iter(self._dataset)

    @property
    def records_per_shard(self) -> int:
        """Records in this process's shard (one epoch)."""
        return len(range(self.shard_index, self.num_records, self.shard_count))

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        return next(self._iterator)

    def _settings(self) -> dict:
        return {"num_records": self.num_records, "batch_size": self.batch_size, "seed": self.seed,
                "shard_index": self.shard_index, "shard_count": self.shard_count}

    def get_state(self) -> dict:
        """The position as a JSON-serialisable dict (grain's iterator state plus the settings it
        is only meaningful with)."""
        return {"version": _STATE_VERSION, "grain": self._iterator.get_state(),
                **self._settings()}

    def set_state(self, state: dict) -> None:
        """Moves to the position saved by ``get_state``.

        Raises:
          ValueError: if the state was saved by an iterator with different records count, batch
            size, seed or sharding (its position would then mean different batches).
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"PromptIterator.set_state: not a PromptIterator state (version "
                             f"{_STATE_VERSION}): {state!r}")
        saved = {key: state.get(key) for key in self._settings()}
        if saved != self._settings():
            mismatched = {key: (saved[key], value) for key, value in self._settings().items()
                          if saved[key] != value}
            raise ValueError(f"PromptIterator.set_state: the saved iterator had different "
                             f"settings (saved, current): {mismatched}")
        self._iterator.set_state(state["grain"])
