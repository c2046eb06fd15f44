"""Multi-process (multi-controller) JAX: detecting a launch, and moving host data to global arrays.

JAX runs one Python process per host (or per GPU); every process executes the same program and
``jax.devices()`` lists the devices of all of them once ``jax.distributed.initialize`` has
connected the processes through a coordinator. This module decides, from the environment,
whether the current process is part of such a launch and connects it (``maybe_initialize``), and
holds the two conversions the RL loop needs at the host/device boundary:

* ``host_to_global(tree, sharding)``: host numpy data that is *identical on every process*
  (the loop's rollout batch is) becomes a global ``jax.Array``; each process copies only the
  shards its own devices hold, so nothing is broadcast;
* ``to_host(tree)``: a global array (e.g. sampled tokens sharded over every process's devices)
  becomes a full numpy copy on every process.

Launch conventions recognised by ``maybe_initialize`` (first match wins):

1. ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (set by
   ``launch/local.sh`` and ``launch/gpu_slurm.sh``), with ``JAX_NUM_PROCESSES > 1``;
2. SLURM: ``SLURM_NTASKS > 1`` inside a job step (``SLURM_PROCID`` set); JAX's own SLURM
   detection derives the coordinator (first node of the step) and the process ids;
3. Cloud TPU slices with several workers: ``TPU_WORKER_HOSTNAMES`` lists more than one host (GKE)
   or ``MEGASCALE_COORDINATOR_ADDRESS`` is set; JAX's TPU cluster detection does the rest. On a
   TPU VM slice launched with ``gcloud ... ssh --worker=all`` neither variable is set, so
   ``launch/tpu_vm.sh`` exports ``OFFPOLICY_JAX_DISTRIBUTED=1``, which asks JAX to auto-detect.

``OFFPOLICY_JAX_DISTRIBUTED=0`` turns detection off; anything else leaves single-process runs
exactly as they were (no coordinator, no extra threads).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
import numpy as np

FORCE_VARIABLE = "OFFPOLICY_JAX_DISTRIBUTED"

_initialized_here = False


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """How ``jax.distributed.initialize`` should be called for this process.

    ``None`` fields are left for JAX's cluster auto-detection (SLURM, Cloud TPU) to fill.
    """

    source: str                       # "env", "slurm", "tpu" or "auto": which convention matched
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def initialize_kwargs(self) -> dict:
        return {k: v for k, v in (("coordinator_address", self.coordinator_address),
                                  ("num_processes", self.num_processes),
                                  ("process_id", self.process_id)) if v is not None}


def _int_variable(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (it is part "
                         "of a multi-process launch: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                         "JAX_PROCESS_ID)") from err


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchSpec | None:
    """Which multi-process launch (if any) the environment describes; ``None`` for one process.

    Pure function of the environment (pass a dict to test it); see the module docstring for the
    recognised conventions.

    Raises:
      ValueError: for a half-specified or inconsistent ``JAX_*`` launch (naming the variable).
    """
    env = os.environ if env is None else env
    forced = env.get(FORCE_VARIABLE, "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return None

    jax_variables = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [name for name in jax_variables if env.get(name)]
    if "JAX_NUM_PROCESSES" in present or "JAX_PROCESS_ID" in present:
        missing = [name for name in jax_variables if name not in present]
        if missing:
            raise ValueError(f"multi-process launch is missing {', '.join(missing)} (set all of "
                             f"{', '.join(jax_variables)}, or none)")
        num_processes = _int_variable(env, "JAX_NUM_PROCESSES")
        process_id = _int_variable(env, "JAX_PROCESS_ID")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"need 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES, got "
                             f"JAX_PROCESS_ID={process_id}, JAX_NUM_PROCESSES={num_processes}")
        if num_processes > 1:
            return LaunchSpec("env", env["JAX_COORDINATOR_ADDRESS"], num_processes, process_id)
        return None

    if env.get("SLURM_PROCID") is not None and env.get("SLURM_NTASKS"):
        if _int_variable(env, "SLURM_NTASKS") > 1:
            return LaunchSpec("slurm")
        return None

    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(tpu_hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return LaunchSpec("tpu")
    if forced in ("1", "true", "yes", "on", "auto"):
        return LaunchSpec("auto")       # JAX's own cluster detection (TPU metadata, SLURM, ...)
    return None


def maybe_initialize(env: Mapping[str, str] | None = None) -> bool:
    """Connects this process to a multi-process launch, once; a no-op for single-process runs.

    Must run before anything touches a JAX device (``jax.devices()``, creating an array): after
    that, JAX has already committed to a single-process backend. Safe to call repeatedly.

    Returns:
      True when this process is part of a multi-process run (now or from an earlier call).

    Raises:
      RuntimeError: when a multi-process launch is detected but JAX's backend was already
        initialised in this process (the message says which launch was detected).
    """
    global _initialized_here
    if _initialized_here or jax.distributed.is_initialized():
        return True
    launch = detect_launch(env)
    if launch is None:
        return False
    from jax._src import xla_bridge  # no public "is the backend up?" query exists
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"a multi-process launch was detected ({launch}), but JAX devices were already "
            "used in this process; call offpolicy_jax.distributed.maybe_initialize() before "
            "any JAX computation (the RL loop does it first thing in loop.run)")
    jax.distributed.initialize(**launch.initialize_kwargs())
    _initialized_here = True
    return True


def host_to_global(tree, sharding):
    """Global ``jax.Array``s from host arrays that hold the *same* values on every process.

    Each process materialises only the shards addressable by its own devices
    (``jax.make_array_from_callback``), so this is as cheap as a local ``device_put`` and needs
    no communication. In a single process it is equivalent to ``jax.device_put(x, sharding)``.

    Args:
      tree: pytree of numpy-convertible arrays, every leaf ``[B, ...]`` with ``B`` divisible by the
        sharding's split of the leading axis.
      sharding: one ``jax.sharding.Sharding`` applied to every leaf.
    """

    def place(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # Typed PRNG keys have no numpy form: move their raw key data, then re-wrap it.
            raw = place(jax.random.key_data(x))
            return jax.random.wrap_key_data(raw, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def to_host(tree):
    """Numpy copies of (possibly process-spanning) arrays, the full global value on every process.

    Fully addressable arrays (always the case with one process) are fetched with
    ``jax.device_get``; arrays sharded over other processes' devices are all-gathered first
    (``multihost_utils.process_allgather``), which every process must call at the same point.
    """
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def process_rows(num_rows: int) -> slice:
    """This process's contiguous share of ``num_rows`` rows (e.g. the responses it verifies).

    Shares differ by at most one row (``numpy.array_split`` bounds) and, concatenated in process
    order, cover ``range(num_rows)`` exactly once.
    """
    count, index = jax.process_count(), jax.process_index()
    base, extra = divmod(num_rows, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def gather_rows(part: np.ndarray, num_rows: int) -> np.ndarray:
    """Every process's ``process_rows(num_rows)`` part, concatenated: the full ``[num_rows, ...]``
    array on every process (one all-gather; each process must call it at the same point).

    Args:
      part: this process's rows, ``[len(process_rows(num_rows)), ...]``.
      num_rows: the total across processes.
    """
    part = np.asarray(part)
    expected = process_rows(num_rows)
    if part.shape[0] != expected.stop - expected.start:
        raise ValueError(f"gather_rows: process {jax.process_index()} passed {part.shape[0]} rows "
                         f"but owns rows {expected.start}:{expected.stop} of {num_rows}")
    count = jax.process_count()
    if count == 1:
        return part
    from jax.experimental import multihost_utils
    # The all-gather needs equal shapes: pad every part to the largest share, then cut.
    share = -(-num_rows // count)
    padded = np.zeros((share,) + part.shape[1:], part.dtype)
    padded[:part.shape[0]] = part
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
    pieces = []
    for index in range(count):
        base, extra = divmod(num_rows, count)
        pieces.append(gathered[index, :base + (index < extra)])
    return np.concatenate(pieces)
