"""Named frozen copies of the policy, each with a declared update rule, checkpointed generically.

An algorithm declares the stored policies its loss compares against; the trainer keeps them in a
:class:`PolicyStore` and computes their forward outputs (``<name>_logp``, ...) for every batch.

    reference(name)        the initial policy, never updated (a KL anchor: GRPO's π_ref)
    behind(name, k)        the policy at the start of iteration i − k, the initial policy while
                           i − k < 1 (k = 1: ReMix's π_{k−1}, updated every iteration)
    reset_after(name, T)   the initial policy up to iteration T, then the policy after iteration
                           T's updates, fixed from then on (ReMix's policy reincarnation at T)
    snapshots(name, starts) the policy at the start of the latest of the iterations ``starts``
                           that is <= i, the initial policy before the first (SPIN's opponent:
                           one snapshot per SPIN iteration of several trainer iterations)

A loop of several stages (VerIPO) restarts a store from the policy at a stage's start
(:meth:`PolicyStore.restart`): every stored policy becomes that policy.

The copies are device arrays with the policy's shardings. Copies still equal to the initial policy
share one array and are not written to checkpoints (they are rebuilt from the model on resume),
so a reference costs one copy of the parameters in memory and nothing on disk.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from offpolicy_jax import distributed

_RULES = ("never", "behind", "reset_after", "snapshots")
_INITIAL = "initial"


@dataclasses.dataclass(frozen=True)
class StoredPolicy:
    """A named copy of the policy and when it changes (build with the functions below).

    Attributes:
      name: the key prefix of its forward outputs (``ref`` gives ``ref_logp``).
      rule: "never", "behind" (``iterations`` behind the current iteration's start),
        "reset_after" (becomes the policy after iteration ``iterations``) or "snapshots"
        (becomes the current policy at the start of each iteration in ``starts``).
      iterations: k for "behind", T for "reset_after"; unused otherwise.
      starts: the increasing iterations (>= 1) at whose start "snapshots" copies the policy.
    """

    name: str
    rule: str = "never"
    iterations: int = 0
    starts: tuple = ()

    def __post_init__(self):
        if self.rule not in _RULES:
            raise ValueError(f"stored policy {self.name!r}: rule must be one of {_RULES}, got "
                             f"{self.rule!r}")
        if self.rule == "behind" and self.iterations < 1:
            raise ValueError(f"stored policy {self.name!r}: behind(k) needs k >= 1, got "
                             f"{self.iterations}")
        if self.rule == "reset_after" and self.iterations < 0:
            raise ValueError(f"stored policy {self.name!r}: reset_after(T) needs T >= 0, got "
                             f"{self.iterations}")
        if self.rule == "snapshots" and (
                not self.starts or self.starts[0] < 1
                or any(b <= a for a, b in zip(self.starts, self.starts[1:]))):
            raise ValueError(f"stored policy {self.name!r}: snapshots(starts) needs increasing "
                             f"iterations >= 1, got {self.starts}")
        if not self.name.isidentifier() or self.name in ("old", "current"):
            raise ValueError(f"stored policy name {self.name!r} must be an identifier other "
                             f"than 'old' and 'current' (those name the trainer's own policies)")


def reference(name: str = "ref") -> StoredPolicy:
    """The initial policy, never updated."""
    return StoredPolicy(name, "never")


def behind(name: str, iterations: int = 1) -> StoredPolicy:
    """The policy at the start of iteration i − ``iterations`` (the initial policy before)."""
    return StoredPolicy(name, "behind", iterations)


def reset_after(name: str, iteration: int) -> StoredPolicy:
    """The initial policy until iteration ``iteration``'s updates are done, then that policy."""
    return StoredPolicy(name, "reset_after", iteration)


def snapshots(name: str, starts) -> StoredPolicy:
    """The policy at the start of the latest iteration of ``starts`` that is <= the current one
    (the initial policy before the first)."""
    return StoredPolicy(name, "snapshots", starts=tuple(int(s) for s in starts))


def _copy(params):
    # A copy, not an alias: the train step donates the state's parameter buffers.
    return jax.tree.map(jnp.copy, params)


class PolicyStore:
    """The stored policies of one run.

    Per iteration the trainer calls :meth:`for_iteration` once, before any update (it returns the
    copies this iteration's batch is scored with and records the current policy for the "behind"
    rules), and :meth:`after_updates` once the iteration's updates are applied.

    Args:
      policies: the declared stored policies (names must be distinct).
      initial_params: the policy at iteration 0 (copied; the caller may donate its own).
    """

    def __init__(self, policies, initial_params):
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            raise ValueError(f"stored policy names must be distinct, got {names}")
        self.policies = tuple(policies)
        self._initial = _copy(initial_params) if self.policies else None
        # Each slot is (params, tag): tag "initial" for the shared initial copy, else the
        # iteration whose starting (or, for a reset, final) parameters it holds.
        self._slots: dict[str, collections.deque] = {}
        for policy in self.policies:
            depth = policy.iterations if policy.rule == "behind" else 1
            self._slots[policy.name] = collections.deque(
                [(self._initial, _INITIAL)] * depth, maxlen=depth)

    def __bool__(self) -> bool:
        return bool(self.policies)

    def for_iteration(self, iteration: int, params) -> dict:
        """``{name: params}`` to score iteration ``iteration``'s batch with; ``params`` is the
        current policy at the start of the iteration (before its updates)."""
        current = {}
        for policy in self.policies:
            slots = self._slots[policy.name]
            current[policy.name] = slots[0][0]
            if policy.rule == "behind":
                slots.append(self._start_of(iteration, params))
            elif policy.rule == "snapshots" and iteration in policy.starts:
                slots.append(self._start_of(iteration, params))
                current[policy.name] = slots[0][0]
        return current

    def _start_of(self, iteration: int, params) -> tuple:
        """The slot of the policy at the start of ``iteration``: iteration 1 starts from the
        initial policy, whose copy is shared."""
        return (self._initial, _INITIAL) if iteration == 1 else (_copy(params), iteration)

    def after_updates(self, iteration: int, params) -> None:
        """Applies the "reset_after" rules: ``params`` is the policy after this iteration."""
        for policy in self.policies:
            if policy.rule == "reset_after" and policy.iterations == iteration:
                self._slots[policy.name] = collections.deque([(_copy(params), iteration)],
                                                             maxlen=1)

    def restart(self, params, iteration: int) -> None:
        """Every stored policy becomes ``params``, the policy at the start of ``iteration`` (a new
        stage of a multi-stage loop: its reference is the policy the stage starts from). One copy
        is shared by all slots and written to checkpoints under that iteration."""
        if not self.policies:
            return
        copy = _copy(params)
        for name, slots in self._slots.items():
            self._slots[name] = collections.deque([(copy, iteration)] * slots.maxlen,
                                                  maxlen=slots.maxlen)

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict]:
        """``(meta, arrays)``: every slot's tag, and the parameters of the slots that are not the
        initial policy as flat host arrays ``policy/<name>/<slot>/<parameter path>``."""
        meta, arrays = {}, {}
        for name, slots in self._slots.items():
            meta[name] = [tag for _, tag in slots]
            for index, (params, tag) in enumerate(slots):
                if tag == _INITIAL:
                    continue
                # to_host: with several processes the shards live on other hosts' devices too.
                flat = jax.tree_util.tree_flatten_with_path(distributed.to_host(params))[0]
                for path, leaf in flat:
                    arrays[f"policy/{name}/{index}/{_path_name(path)}"] = np.asarray(leaf)
        return meta, arrays

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        """Restores the slots saved by :meth:`state_dict`; the structure and shardings of the
        parameters are those of the initial policy."""
        if sorted(meta) != sorted(self._slots):
            raise ValueError(f"checkpoint holds stored policies {sorted(meta)}, the algorithm "
                             f"declares {sorted(self._slots)}")
        for name, tags in meta.items():
            slots = self._slots[name]
            if len(tags) != slots.maxlen:
                raise ValueError(f"stored policy {name!r}: checkpoint holds {len(tags)} copies, "
                                 f"the rule keeps {slots.maxlen}")
            restored = []
            for index, tag in enumerate(tags):
                if tag == _INITIAL:
                    restored.append((self._initial, _INITIAL))
                else:
                    prefix = f"policy/{name}/{index}/"
                    restored.append((_rebuild(arrays, prefix, self._initial), tag))
            self._slots[name] = collections.deque(restored, maxlen=slots.maxlen)


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _rebuild(arrays: dict, prefix: str, like):
    """Parameters with ``like``'s structure, dtypes and shardings from flat host arrays."""

    def restore(path, leaf):
        key = prefix + _path_name(path)
        if key not in arrays:
            raise ValueError(f"checkpoint lacks the stored-policy array {key}")
        # Every process holds the whole array; each places only its own devices' shards.
        return distributed.host_to_global(np.asarray(arrays[key], leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(restore, like)
