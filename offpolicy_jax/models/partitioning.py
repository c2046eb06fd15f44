"""Device mesh and partition rules for the decoder's parameters.

Mesh axes are ``("data", "fsdp", "tensor")``:

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3,
  Rajbhandari et al. 2019, arXiv:1910.02054), here over each matrix's model-width axis D;
* ``tensor``: Megatron-style tensor parallelism (Shoeybi et al. 2019, arXiv:1909.08053): the
  attention heads (key/value groups), the FFN width and the vocabulary are split, so the
  q/k/v and gate/up matmuls are column-parallel and ``o`` / ``down`` row-parallel.

``PARTITION_RULES`` is an ordered table of (regex over the "/"-joined parameter path,
``PartitionSpec``); the first match wins and a parameter that matches no rule is an error, so a
new parameter cannot silently end up replicated. Layer-stacked parameters carry a leading
``None`` for the layer axis.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch dimension of activations and of the KV cache: split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed$", P("tensor", "fsdp")),                      # [V, D]
    (r"^lm_head$", P("fsdp", "tensor")),                    # [D, V]
    (r"^final_norm$", P(None)),                             # [D]
    (r"^layers/(attn_norm|mlp_norm|q_norm|k_norm)$", P(None, None)),    # [L, D] / [L, hd]
    (r"^layers/qkv$", P(None, "fsdp", "tensor", None, None)),           # [L, D, KV, G+2, hd]
    (r"^layers/qkv_bias$", P(None, "tensor", None, None)),              # [L, KV, G+2, hd]
    (r"^layers/o$", P(None, "tensor", "fsdp")),                         # [L, H*hd, D]
    (r"^layers/gate_up$", P(None, "fsdp", None, "tensor")),             # [L, D, 2, F]
    (r"^layers/down$", P(None, "tensor", "fsdp")),                      # [L, F, D]
    (r"^value_head/(kernel|bias)$", P(None)),              # [D] / [1]: PPO's critic (critic.py)
    # LoRA factors attached to a layer (models/lora.py): A [L, in, r], B [L, r, out], each split
    # like the base kernel along the dimension it shares with it (q/k/v/gate/up column-parallel,
    # o/down row-parallel).
    (r"^layers/lora_(q|k|v|gate|up)_a$", P(None, "fsdp", None)),
    (r"^layers/lora_(q|k|v|gate|up)_b$", P(None, None, "tensor")),
    (r"^layers/lora_(o|down)_a$", P(None, "tensor", None)),
    (r"^layers/lora_(o|down)_b$", P(None, None, "fsdp")),
)


def make_mesh(spec: str | Sequence[int], devices=None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh from e.g. ``"1,-1,1"``.

    Args:
      spec: three comma-separated sizes (or a sequence of three ints); one may be -1, meaning
        all remaining devices.
      devices: defaults to ``jax.devices()``.

    Raises:
      ValueError: if the spec is malformed or its product is not the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, str):
        try:
            sizes = [int(part) for part in spec.split(",")]
        except ValueError as err:
            raise ValueError(f"mesh spec {spec!r} must be three comma-separated integers, e.g. "
                             "'1,-1,1'") from err
    else:
        sizes = [int(s) for s in spec]
    if len(sizes) != len(MESH_AXES) or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh spec {spec!r} must give sizes for {MESH_AXES}, positive or a "
                         "single -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices are not divisible by "
                             f"{known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh spec {spec!r} needs {math.prod(sizes)} devices "
                         f"({' x '.join(map(str, sizes))}) but {len(devices)} are available")
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def _path_string(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _fit_to_mesh(spec: P, shape: tuple, mesh: Mesh) -> P:
    """Replicates any dimension the mesh axes do not divide (e.g. 2 KV heads over tensor=4)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if dim % size == 0 else None)
    return P(*fitted)


def partition_specs(params, mesh: Mesh | None = None, rules=PARTITION_RULES):
    """A pytree of ``PartitionSpec`` matching ``params`` (arrays or ShapeDtypeStructs).

    Args:
      params: the parameter tree.
      mesh: if given, dimensions its axes do not divide are replicated instead of failing at
        placement time.
      rules: the ordered (regex, spec) table.

    Raises:
      ValueError: listing parameters no rule matches, or whose rank differs from the spec.
    """
    unmatched, bad_rank = [], []

    def spec_for(path, leaf):
        name = _path_string(path)
        for pattern, spec in rules:
            if re.search(pattern, name):
                if len(spec) != len(leaf.shape):
                    bad_rank.append(f"{name} {tuple(leaf.shape)} vs {spec}")
                    return P()
                return spec if mesh is None else _fit_to_mesh(spec, tuple(leaf.shape), mesh)
        unmatched.append(name)
        return P()

    specs = jax.tree_util.tree_map_with_path(spec_for, params)
    if unmatched:
        raise ValueError(f"no partition rule matches parameter(s) {unmatched}; add a rule to "
                         "PARTITION_RULES")
    if bad_rank:
        raise ValueError(f"partition rule rank mismatch: {bad_rank}")
    return specs


def param_shardings(params, mesh: Mesh):
    """``NamedSharding``s for ``params`` on ``mesh``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(params, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh):
    """Places ``params`` in their sharded layout on ``mesh``."""
    return jax.device_put(params, param_shardings(params, mesh))


def cache_partition_specs(cache) -> dict:
    """Specs for a KV cache from ``init_cache``: batch over ("data", "fsdp"), KV heads over
    "tensor" (matching the head split of the attention weights)."""
    del cache  # the layout is fixed; the argument keeps call sites symmetric with params
    return {"k": P(None, BATCH_AXES, None, "tensor", None),
            "v": P(None, BATCH_AXES, None, "tensor", None),
            "mask": P(BATCH_AXES, None), "index": P()}

