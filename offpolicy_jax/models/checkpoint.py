"""Hugging Face checkpoints in both directions, through one key-map table, without torch.

``load_hf_checkpoint`` reads ``config.json`` and the safetensors file(s) (single
``model.safetensors`` or sharded with ``model.safetensors.index.json``) with
``safetensors.safe_open(framework="np")``; bfloat16 tensors arrive as ``ml_dtypes.bfloat16``
numpy arrays. ``save_hf_checkpoint`` writes the same layout back, so
``transformers.AutoModelForCausalLM.from_pretrained`` loads it.

The key map (``key_map(cfg)``) has one row per parameter of ours: its path in the parameter
tree, the Hugging Face tensor name(s) it corresponds to (``{layer}`` is filled in for stacked
per-layer parameters), and a ``Transform`` with both directions (``from_hf`` and ``to_hf``) plus
the Hugging Face shapes it expects. PyTorch ``nn.Linear`` stores ``[out, in]``; we store
``[in, out]``; q/k/v and gate/up are fused (see ``transformer`` for the layouts).

Before any tensor is read, every expected tensor is located and shape-checked, and all missing,
unexpected and mis-shaped tensors are reported together in one ``CheckpointError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from offpolicy_jax.models import partitioning
from offpolicy_jax.models.config import ModelConfig
from offpolicy_jax.models.transformer import param_shapes

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
# Non-parameter buffers some older exports carry; safe to skip.
_IGNORED_HF_TENSORS = re.compile(r".*\.rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, inconsistent with its config, or unreadable."""


# ---------------------------------------------------------------------------------------------
# The key-map table.


@dataclasses.dataclass(frozen=True)
class Transform:
    """A bijection between Hugging Face tensor(s) and one of our (per-layer) parameters.

    Attributes:
      from_hf: HF tensors (tuple) -> our array.
      to_hf: our array -> HF tensors (tuple, same order as the row's names).
      hf_shapes: our per-layer shape -> the HF shapes (tuple of tuples).
    """

    from_hf: Callable[[tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], tuple]
    hf_shapes: Callable[[tuple], tuple]


IDENTITY = Transform(from_hf=lambda ts: ts[0], to_hf=lambda x: (x,),
                     hf_shapes=lambda shape: (tuple(shape),))
# nn.Linear weight [out, in]  <->  our kernel [in, out].
TRANSPOSE = Transform(from_hf=lambda ts: ts[0].T, to_hf=lambda x: (x.T,),
                      hf_shapes=lambda shape: (tuple(shape[::-1]),))
# gate_proj, up_proj [F, D] each  <->  gate_up [D, 2, F].
FUSED_GATE_UP = Transform(
    from_hf=lambda ts: np.stack(ts, axis=0).transpose(2, 0, 1),
    to_hf=lambda x: (x[:, 0, :].T, x[:, 1, :].T),
    hf_shapes=lambda shape: ((shape[2], shape[0]),) * 2)


def fused_qkv(cfg: ModelConfig, *, bias: bool) -> Transform:
    """q/k/v projections (weights [n·hd, D] or biases [n·hd])  <->  [D?, KV, G+2, hd].

    HF query head ``h`` belongs to key/value head ``h // G`` (transformers' ``repeat_kv``
    repeats each key/value head G times consecutively), so query rows reshape to
    ``[KV, G, hd]`` and the key and value heads append as group members G and G+1.
    """
    kv_heads, groups, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim

    def from_hf(tensors):
        q, k, v = tensors
        rest = q.shape[1:]  # (D,) for weights, () for biases
        fused = np.concatenate([q.reshape(kv_heads, groups, hd, *rest),
                                k.reshape(kv_heads, 1, hd, *rest),
                                v.reshape(kv_heads, 1, hd, *rest)], axis=1)
        return fused if bias else fused.transpose(3, 0, 1, 2)

    def to_hf(fused):
        grouped = fused if bias else fused.transpose(1, 2, 3, 0)  # [KV, G+2, hd, D?]
        rest = grouped.shape[3:]
        q = grouped[:, :groups].reshape(kv_heads * groups * hd, *rest)
        k = grouped[:, groups].reshape(kv_heads * hd, *rest)
        v = grouped[:, groups + 1].reshape(kv_heads * hd, *rest)
        return q, k, v

    def hf_shapes(shape):
        rest = () if bias else (shape[0],)
        return ((cfg.num_heads * hd, *rest), (kv_heads * hd, *rest), (kv_heads * hd, *rest))

    return Transform(from_hf=from_hf, to_hf=to_hf, hf_shapes=hf_shapes)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One row of the key map: our ``path`` <-> HF ``hf_names`` through ``transform``.

    ``per_layer`` rows hold a ``[L, ...]`` stack; their names contain ``{layer}``.
    """

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    transform: Transform
    per_layer: bool = False

    def names_for(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf_names)


def key_map(cfg: ModelConfig) -> list[KeyMapping]:
    """The table for ``cfg`` (rows for optional parameters only when the family has them)."""
    layer = "model.layers.{layer}."
    attn = layer + "self_attn."
    rows = [
        KeyMapping(("embed",), ("model.embed_tokens.weight",), IDENTITY),
        KeyMapping(("final_norm",), ("model.norm.weight",), IDENTITY),
        KeyMapping(("layers", "attn_norm"), (layer + "input_layernorm.weight",), IDENTITY, True),
        KeyMapping(("layers", "qkv"), tuple(attn + f"{p}_proj.weight" for p in "qkv"),
                   fused_qkv(cfg, bias=False), True),
        KeyMapping(("layers", "o"), (attn + "o_proj.weight",), TRANSPOSE, True),
        KeyMapping(("layers", "mlp_norm"), (layer + "post_attention_layernorm.weight",),
                   IDENTITY, True),
        KeyMapping(("layers", "gate_up"),
                   (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"),
                   FUSED_GATE_UP, True),
        KeyMapping(("layers", "down"), (layer + "mlp.down_proj.weight",), TRANSPOSE, True),
    ]
    if cfg.qkv_bias:
        rows.append(KeyMapping(("layers", "qkv_bias"), tuple(attn + f"{p}_proj.bias" for p in "qkv"),
                               fused_qkv(cfg, bias=True), True))
    if cfg.qk_norm:
        rows.append(KeyMapping(("layers", "q_norm"), (attn + "q_norm.weight",), IDENTITY, True))
        rows.append(KeyMapping(("layers", "k_norm"), (attn + "k_norm.weight",), IDENTITY, True))
    if not cfg.tie_word_embeddings:
        rows.append(KeyMapping(("lm_head",), ("lm_head.weight",), TRANSPOSE))
    return rows


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _expected_hf_shapes(cfg: ModelConfig, rows, our_shapes) -> dict[str, tuple]:
    """HF tensor name -> expected shape, for every tensor the table will read."""
    expected = {}
    for row in rows:
        shape = tuple(_get_path(our_shapes, row.path).shape)
        layers = range(cfg.num_layers) if row.per_layer else [None]
        hf_shapes = row.transform.hf_shapes(shape[1:] if row.per_layer else shape)
        for layer in layers:
            expected.update(zip(row.names_for(layer), hf_shapes))
    return expected


# ---------------------------------------------------------------------------------------------
# Reading safetensors.


class _SafetensorsReader:
    """Name -> file lookup over a single or sharded safetensors checkpoint, opened lazily."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index_path = directory / INDEX_FILE
        single_path = directory / SINGLE_FILE
        self._handles = {}
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"cannot parse {index_path}: {err}") from err
            missing_files = sorted({f for f in weight_map.values() if not (directory / f).exists()})
            if missing_files:
                raise CheckpointError(f"{index_path} names shard files that do not exist in "
                                      f"{directory}: {missing_files}")
            self.file_of = dict(weight_map)
            files = sorted(set(weight_map.values()))
        elif single_path.exists():
            files = [SINGLE_FILE]
            self.file_of = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        self.files = files

    def _open(self, filename: str):
        from safetensors import safe_open

        if filename not in self._handles:
            try:
                self._handles[filename] = safe_open(os.fspath(self.directory / filename),
                                                    framework="np")
            except Exception as err:  # safetensors raises its own SafetensorError / OSError
                raise CheckpointError(f"cannot read safetensors file {self.directory / filename}: "
                                      f"{err} (truncated or corrupt file?)") from err
        return self._handles[filename]

    def shape(self, name: str) -> tuple:
        handle = self._open(self.file_of[name])
        try:
            return tuple(handle.get_slice(name).get_shape())
        except Exception as err:
            raise CheckpointError(f"tensor {name!r} listed for {self.file_of[name]} cannot be "
                                  f"read from it: {err}") from err

    def read(self, name: str) -> np.ndarray:
        filename = self.file_of[name]
        try:
            return self._open(filename).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.directory / filename}: "
                                  f"{err} (truncated or corrupt file?)") from err

    def check_files_readable(self) -> None:
        """Opens every file (parses every header) so corruption is reported up front."""
        for filename in self.files:
            self._open(filename)
            file_path = self.directory / filename
            # A header that parses but promises more bytes than the file holds means truncation.
            end = max(_data_end_offsets(file_path), default=0)
            size = file_path.stat().st_size
            if end > size:
                raise CheckpointError(f"safetensors file {file_path} is truncated: its header "
                                      f"describes {end} bytes, the file has {size}")


def _data_end_offsets(file_path: pathlib.Path):
    """Byte offsets (from file start) at which each tensor's data ends, per the header."""
    with open(file_path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    for name, entry in header.items():
        if name != "__metadata__":
            yield 8 + header_len + int(entry["data_offsets"][1])


# ---------------------------------------------------------------------------------------------
# Load and save.


def read_hf_config(path) -> dict:
    config_path = pathlib.Path(path) / CONFIG_FILE
    if not config_path.exists():
        raise CheckpointError(f"no {CONFIG_FILE} in {path}")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"cannot parse {config_path}: {err}") from err


def load_hf_checkpoint(path, dtype=jnp.float32, mesh=None, *, compute_dtype=None
                       ) -> tuple[ModelConfig, dict]:
    """Loads a Hugging Face checkpoint directory into ``(cfg, params)``.

    Args:
      path: directory with config.json and model.safetensors (or shards + index).
      dtype: parameter dtype (float32 or bfloat16); tensors are converted on the host.
      mesh: if given, each parameter is placed directly in its sharded layout
        (``partitioning.PARTITION_RULES`` over this mesh); otherwise on the default device.
      compute_dtype: ``cfg.dtype``; defaults to ``dtype``.

    Raises:
      CheckpointError: listing every missing, unexpected and mis-shaped tensor, or naming an
        unreadable file.
      UnsupportedConfigError: for a config.json field the decoder does not implement.
    """
    directory = pathlib.Path(path)
    param_dtype = jnp.dtype(dtype)
    cfg = ModelConfig.from_hf_config(read_hf_config(directory),
                                     dtype=jnp.dtype(compute_dtype or dtype).name)
    reader = _SafetensorsReader(directory)
    reader.check_files_readable()
    rows = key_map(cfg)
    our_shapes = param_shapes(cfg, param_dtype)
    _validate_tensors(cfg, rows, our_shapes, reader)

    specs = partitioning.partition_specs(our_shapes, mesh) if mesh is not None else None
    params = {}
    for row in rows:
        shape_struct = _get_path(our_shapes, row.path)
        host = np.empty(shape_struct.shape, dtype=param_dtype)
        if row.per_layer:
            for layer in range(cfg.num_layers):
                tensors = tuple(reader.read(n) for n in row.names_for(layer))
                host[layer] = row.transform.from_hf(tensors).astype(param_dtype)
        else:
            tensors = tuple(reader.read(n) for n in row.names_for(None))
            host[...] = row.transform.from_hf(tensors).astype(param_dtype)
        if mesh is None:
            placed = jax.device_put(host)
        else:
            # Each device receives only its own shard; also correct on multi-host meshes, where
            # every process holds the full host copy but addresses only its local devices.
            sharding = jax.sharding.NamedSharding(mesh, _get_path(specs, row.path))
            placed = jax.make_array_from_callback(host.shape, sharding,
                                                  lambda index, host=host: host[index])
        _set_path(params, row.path, placed)
    return cfg, params


def _validate_tensors(cfg, rows, our_shapes, reader: _SafetensorsReader) -> None:
    expected = _expected_hf_shapes(cfg, rows, our_shapes)
    present = set(reader.file_of)
    missing = sorted(set(expected) - present)
    unexpected = sorted(n for n in present - set(expected) if not _IGNORED_HF_TENSORS.match(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        # Some exports duplicate the tied matrix; the embedding is the one that is used.
        unexpected.remove("lm_head.weight")
    mis_shaped = []
    for name in sorted(set(expected) & present):
        found = reader.shape(name)
        if found != tuple(expected[name]):
            mis_shaped.append(f"{name}: expected {tuple(expected[name])}, found {found} "
                              f"(in {reader.file_of[name]})")
    if missing or unexpected or mis_shaped:
        lines = [f"checkpoint {reader.directory} does not match its config.json "
                 f"(model_type={cfg.model_type!r}, {cfg.num_layers} layers):"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        if mis_shaped:
            lines.append(f"  mis-shaped tensors ({len(mis_shaped)}):")
            lines.extend(f"    {m}" for m in mis_shaped)
        raise CheckpointError("\n".join(lines))


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def hf_tensors(cfg: ModelConfig, params: dict, dtype=None) -> dict[str, np.ndarray]:
    """Our parameters as HF-named, C-contiguous numpy tensors (in table order)."""
    out = {}
    for row in key_map(cfg):
        value = _to_host(_get_path(params, row.path))
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        layers = range(cfg.num_layers) if row.per_layer else [None]
        for layer in layers:
            tensors = row.transform.to_hf(value[layer] if row.per_layer else value)
            for name, tensor in zip(row.names_for(layer), tensors):
                out[name] = np.ascontiguousarray(tensor)
    return out


def save_hf_checkpoint(path, cfg: ModelConfig, params: dict, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype=None) -> None:
    """Writes config.json + safetensors that ``AutoModelForCausalLM.from_pretrained`` loads.

    Above ``max_shard_bytes`` the tensors are split over ``model-0000i-of-0000n.safetensors``
    files with a ``model.safetensors.index.json``. Existing model weight files in ``path`` are
    replaced (tokenizer files are left alone).

    Args:
      path: output directory (created).
      cfg, params: the model; params may be sharded (they are gathered to the host).
      max_shard_bytes: largest shard size.
      dtype: storage dtype; default the parameters' own dtype.
    """
    write_hf_tensors(path, cfg, hf_tensors(cfg, params, dtype), max_shard_bytes=max_shard_bytes)


def write_hf_tensors(path, cfg: ModelConfig, tensors: dict[str, np.ndarray], *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The writing half of ``save_hf_checkpoint``: ``tensors`` from ``hf_tensors`` (which every
    process of a multi-process run must call, as it gathers) written by one process."""
    from safetensors.numpy import save_file

    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    storage_dtype = next(iter(tensors.values())).dtype.name
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        if stale.exists():
            stale.unlink()

    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors.items():
        if current and current_bytes + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += tensor.nbytes
    shards.append(current)

    metadata = {"format": "pt"}  # transformers refuses files without a known framework tag
    if len(shards) == 1:
        save_file(shards[0], os.fspath(directory / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.fspath(directory / filename), metadata=metadata)
            weight_map.update({name: filename for name in shard})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    config = cfg.to_hf_config(torch_dtype=storage_dtype)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# Tokenizer classes that mean "the pipeline is exactly what tokenizer.json says".
GENERIC_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(path):
    """The checkpoint directory's tokenizer (local files only, no remote code).

    ``transformers.AutoTokenizer`` in general. One exception: a directory whose
    ``tokenizer_config.json`` declares a generic class (``PreTrainedTokenizerFast`` or
    ``TokenizersBackend``) is loaded with that class. transformers 5 otherwise replaces the declared
    class with the model type's own (e.g. ``Qwen2Tokenizer`` for a ``qwen2`` config), whose
    hard-coded pre-tokenizer silently drops the spaces and newlines of a character-level
    tokenizer such as the embedded ``tiny-arith`` one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = os.fspath(path)
    declared = None
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            declared = json.load(f).get("tokenizer_class")
    if declared in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
