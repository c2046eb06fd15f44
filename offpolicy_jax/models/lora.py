"""LoRA adapters on the decoder's projections, and PEFT adapter files in both directions.

LoRA (Hu et al. 2021, arXiv:2106.09685) trains a low-rank update of a frozen weight:

    W' = W + (α / r) · A B          A: [in, r] (random),  B: [r, out] (zeros at the start)

so an adapted model starts exactly at the base model. Targets are named like the Hugging Face
modules they adapt: ``q``, ``k``, ``v``, ``o`` (attention) and ``gate``, ``up``, ``down`` (MLP).

The adapters are a separate pytree, stacked over layers like the base parameters::

    {"lora": {"q": {"a": [L, D, r], "b": [L, r, H·hd]},   "k"/"v": b [L, r, KV·hd],
              "o": {"a": [L, H·hd, r], "b": [L, r, D]},
              "gate"/"up": {"a": [L, D, r], "b": [L, r, F]},  "down": {"a": [L, F, r], "b": [L, r, D]}}}

Two ways to run the adapted model:

* ``attach`` puts the factors next to the base kernels (``layers/lora_q_a``, ``layers/lora_q_b``
  with B pre-scaled by α/r); the decoder layer then adds ``(x A) B`` to each targeted
  projection. Training uses this form: no merged copy of the weights is formed and the backward
  pass computes no gradient of the base weights (they are not differentiated), only the small
  ``[in, r]`` / ``[r, out]`` ones.
* ``merge`` adds the products into the base kernels (into the right slice of the fused ``qkv``
  and ``gate_up`` kernels) and returns an ordinary parameter tree: what the sampler's decode
  loop (which has no adapter path and refuses attached factors), the evaluation and the export
  use.

Why our own ~200 lines rather than qwix (Tunix's LoRA): qwix attaches an adapter to each matmul
call it intercepts. Our q/k/v projection is one einsum on a fused ``[D, KV, G+2, hd]`` kernel,
so qwix would train one adapter shared by q, k and v (not PEFT's separate ``q_proj``/``k_proj``/
``v_proj`` adapters, and no way to target q alone); and its adapters live inside the Linen
variables, while our trainer differentiates an explicit parameter pytree. A merge over that
pytree is smaller than either adaptation.

PEFT layout (what ``peft.PeftModel.from_pretrained`` reads): ``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A
.weight`` ``[r, in]`` and ``... .lora_B.weight`` ``[out, r]``; scaling ``lora_alpha / r``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from offpolicy_jax.models.config import ModelConfig

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# The Hugging Face module each target adapts (PEFT's target_modules names).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
_PEFT_PREFIX = "base_model.model.model.layers."

# Column-parallel targets (q/k/v/gate/up) take their input D over fsdp and their output over
# tensor, as the base kernels do; row-parallel ones (o/down) the reverse. A is [L, in, r] and B
# [L, r, out], so each factor is split like the base kernel along the dimension it shares with it.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"^lora/(q|k|v|gate|up)/a$", P(None, "fsdp", None)),
    (r"^lora/(q|k|v|gate|up)/b$", P(None, None, "tensor")),
    (r"^lora/(o|down)/a$", P(None, "tensor", None)),
    (r"^lora/(o|down)/b$", P(None, None, "fsdp")),
)


class AdapterError(ValueError):
    """A PEFT adapter directory is incomplete or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank ``r``, ``alpha`` (the update is scaled by alpha / r) and the adapted projections."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        targets = tuple(self.targets)
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"--lora_targets must be distinct names from {', '.join(TARGETS)}; "
                             f"got {','.join(targets)!r}")
        if self.rank < 1:
            raise ValueError(f"--lora_rank must be >= 1 for LoRA, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.alpha}")
        # Canonical order, so that the same set of targets gives the same pytree.
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """``--lora_targets`` ("q,k,v,o" or "all") to a tuple of target names."""
    if text.strip() == "all":
        return TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def target_dims(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """``(in, out)`` of the projection ``target`` adapts (the Hugging Face nn.Linear's)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {"q": (d, cfg.num_heads * hd), "k": (d, cfg.num_kv_heads * hd),
            "v": (d, cfg.num_kv_heads * hd), "o": (cfg.num_heads * hd, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}[target]


def init_adapters(cfg: ModelConfig, lora: LoraConfig, rng) -> dict:
    """Float32 adapters: A uniform in ±1/sqrt(in) (the fan-in bound PEFT's default init uses),
    B zeros, so the adapted model equals the base model until the first update."""
    adapters = {}
    for index, target in enumerate(lora.targets):
        fan_in, fan_out = target_dims(cfg, target)
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, index), (cfg.num_layers, fan_in, lora.rank),
                               jnp.float32, -bound, bound)
        adapters[target] = {"a": a, "b": jnp.zeros((cfg.num_layers, lora.rank, fan_out),
                                                   jnp.float32)}
    return {"lora": adapters}


def _delta(lora: LoraConfig, adapter: dict) -> jax.Array:
    """(α/r) · A B per layer: [L, in, out], in float32."""
    return lora.scale * jnp.einsum("lir,lro->lio", adapter["a"].astype(jnp.float32),
                                   adapter["b"].astype(jnp.float32))


def merge(cfg: ModelConfig, lora: LoraConfig, base: dict, trainable: dict) -> dict:
    """The parameters of the adapted model: ``base`` with every target's update added.

    ``trainable`` is ``{"lora": adapters, **extra}``; extra entries (PPO's value head) are passed
    through. The sum is formed in float32 and stored in the base parameter's dtype (the dtype the
    decoder casts weights to anyway when base and compute dtype agree).
    """
    adapters = trainable["lora"]
    layers = dict(base["layers"])
    kv, g, hd, num_layers = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim, cfg.num_layers

    def add(kernel, delta):
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)

    if any(t in adapters for t in "qkv"):
        d = cfg.hidden_size
        # Per key/value head: its G query heads, then k, then v (transformer's fused layout).
        parts = [jnp.zeros((num_layers, d, kv, g, hd), jnp.float32) if "q" not in adapters else
                 _delta(lora, adapters["q"]).reshape(num_layers, d, kv, g, hd)]
        for name in "kv":
            parts.append(jnp.zeros((num_layers, d, kv, 1, hd), jnp.float32) if name not in adapters
                         else _delta(lora, adapters[name]).reshape(num_layers, d, kv, 1, hd))
        layers["qkv"] = add(layers["qkv"], jnp.concatenate(parts, axis=3))
    if "gate" in adapters or "up" in adapters:
        f = cfg.intermediate_size
        parts = [_delta(lora, adapters[name]) if name in adapters else
                 jnp.zeros((num_layers, cfg.hidden_size, f), jnp.float32)
                 for name in ("gate", "up")]
        layers["gate_up"] = add(layers["gate_up"], jnp.stack(parts, axis=2))
    for name in ("o", "down"):
        if name in adapters:
            layers[name] = add(layers[name], _delta(lora, adapters[name]))
    extra = {k: v for k, v in trainable.items() if k != "lora"}
    return {**base, "layers": layers, **extra}


def attach(cfg: ModelConfig, lora: LoraConfig, base: dict, trainable: dict) -> dict:
    """``base`` with the factors as per-layer entries ``lora_<target>_a`` and ``lora_<target>_b``
    (B scaled by α/r): the decoder applies them as ``y + (x A) B``. No weight is copied."""
    del cfg  # the layout needs no model sizes; the argument keeps the signature of ``merge``
    layers = dict(base["layers"])
    for target, adapter in trainable["lora"].items():
        layers[f"lora_{target}_a"] = adapter["a"]
        layers[f"lora_{target}_b"] = lora.scale * adapter["b"]
    extra = {k: v for k, v in trainable.items() if k != "lora"}
    return {**base, "layers": layers, **extra}


def adapter_param_count(cfg: ModelConfig, lora: LoraConfig) -> int:
    """Number of adapter parameters: r · (in + out) per target and layer."""
    return cfg.num_layers * lora.rank * sum(sum(target_dims(cfg, t)) for t in lora.targets)


def partition_specs(trainable, mesh=None):
    """Specs for ``{"lora": adapters, **extra}`` (extra entries by the model's own rules)."""
    from offpolicy_jax.models import partitioning
    return partitioning.partition_specs(trainable, mesh,
                                        rules=PARTITION_RULES + partitioning.PARTITION_RULES)


# ---------------------------------------------------------------------------------------------
# PEFT adapter directories.


def peft_config(lora: LoraConfig, base_model: str) -> dict:
    """``adapter_config.json`` for ``peft.LoraConfig`` (no dropout, no bias, plain α/r scaling)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": [HF_MODULES[t].split(".")[1] for t in lora.targets],
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }


def peft_tensors(cfg: ModelConfig, trainable: dict) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names: lora_A.weight ``[r, in]``, lora_B.weight ``[out, r]``."""
    out = {}
    for target, adapter in trainable["lora"].items():
        a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
        for layer in range(cfg.num_layers):
            name = f"{_PEFT_PREFIX}{layer}.{HF_MODULES[target]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    return out


def save_peft_adapter(path, cfg: ModelConfig, lora: LoraConfig, trainable: dict, *,
                      base_model: str) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` into ``path``."""
    from safetensors.numpy import save_file
    directory = pathlib.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(cfg, trainable), os.fspath(directory / ADAPTER_WEIGHTS_FILE),
              metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_FILE).write_text(
        json.dumps(peft_config(lora, base_model), indent=2, sort_keys=True) + "\n")


def read_peft_config(path) -> LoraConfig:
    """The ``LoraConfig`` of a PEFT adapter directory; refuses options we do not implement."""
    config_path = pathlib.Path(path) / ADAPTER_CONFIG_FILE
    if not config_path.exists():
        raise AdapterError(f"no {ADAPTER_CONFIG_FILE} in {path}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"cannot parse {config_path}: {err}") from err
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, allowed in (("use_rslora", (False, None)), ("use_dora", (False, None)),
                         ("bias", ("none", None)), ("modules_to_save", (None, [])),
                         ("fan_in_fan_out", (False, None))):
        if config.get(key) not in allowed:
            raise AdapterError(f"{config_path}: {key}={config.get(key)!r} is not supported "
                               f"(supported: {allowed[0]!r})")
    modules = config.get("target_modules")
    if not isinstance(modules, list):
        raise AdapterError(f"{config_path}: target_modules must be a list of module names "
                           f"(e.g. ['q_proj', 'v_proj']), got {modules!r}")
    by_module = {m.split(".")[1]: t for t, m in HF_MODULES.items()}
    unknown = sorted(set(modules) - set(by_module))
    if unknown:
        raise AdapterError(f"{config_path}: target_modules {unknown} are not among "
                           f"{sorted(by_module)}")
    try:
        return LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          targets=tuple(by_module[m] for m in modules))
    except KeyError as err:
        raise AdapterError(f"{config_path}: missing key {err}") from err


def load_peft_adapter(path, cfg: ModelConfig) -> tuple[LoraConfig, dict]:
    """``(lora config, {"lora": adapters})`` from a PEFT adapter directory, shape-checked.

    Raises:
      AdapterError: naming the file and listing missing, unexpected and mis-shaped tensors.
    """
    from safetensors import safe_open
    lora = read_peft_config(path)
    weights = pathlib.Path(path) / ADAPTER_WEIGHTS_FILE
    if not weights.exists():
        raise AdapterError(f"no {ADAPTER_WEIGHTS_FILE} in {path}")
    with safe_open(os.fspath(weights), framework="np") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    # PEFT files written for a named adapter carry ".<name>" before ".weight"; take the plain form.
    tensors = {re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", k): v
               for k, v in tensors.items()}
    expected = {}
    for target in lora.targets:
        fan_in, fan_out = target_dims(cfg, target)
        for layer in range(cfg.num_layers):
            name = f"{_PEFT_PREFIX}{layer}.{HF_MODULES[target]}"
            expected[f"{name}.lora_A.weight"] = (lora.rank, fan_in)
            expected[f"{name}.lora_B.weight"] = (fan_out, lora.rank)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mis_shaped = sorted(f"{n}: expected {expected[n]}, found {tuple(tensors[n].shape)}"
                        for n in set(expected) & set(tensors)
                        if tuple(tensors[n].shape) != expected[n])
    if missing or unexpected or mis_shaped:
        raise AdapterError(f"{weights} does not fit the model ({cfg.num_layers} layers) and "
                           f"{ADAPTER_CONFIG_FILE} (r={lora.rank}, targets {lora.targets}): "
                           f"missing {missing}, unexpected {unexpected}, mis-shaped {mis_shaped}")
    adapters = {}
    for target in lora.targets:
        names = [f"{_PEFT_PREFIX}{layer}.{HF_MODULES[target]}" for layer in range(cfg.num_layers)]
        adapters[target] = {
            "a": jnp.asarray(np.stack([tensors[f"{n}.lora_A.weight"].T for n in names]),
                             jnp.float32),
            "b": jnp.asarray(np.stack([tensors[f"{n}.lora_B.weight"].T for n in names]),
                             jnp.float32)}
    return lora, {"lora": adapters}


# ---------------------------------------------------------------------------------------------
# Training: frozen base + trainable adapters.


class AdaptedModel:
    """A frozen base model and the merge the trainer applies to its trainable adapters.

    Attributes:
      lora: the adapter settings.
      base: the base parameters (sharded like a full fine-tuning run's; never updated).
      base_sharding: their ``NamedSharding``s (an input sharding of the train step).
    """

    def __init__(self, cfg: ModelConfig, lora: LoraConfig, base: dict, base_specs, mesh):
        self.cfg, self.lora, self.base = cfg, lora, base
        self.base_sharding = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec),
                                          base_specs, is_leaf=lambda x: isinstance(x, P))
        self._merge = jax.jit(functools.partial(merge, cfg, lora))
        self._attach = jax.jit(self.params_fn)

    def params_fn(self, base: dict, trainable: dict) -> dict:
        """``(frozen, trainable) -> params``, the train step's view of the model (attached)."""
        return attach(self.cfg, self.lora, base, trainable)

    def attached(self, trainable: dict) -> dict:
        """The adapted model for the decoder (forward passes: scoring the old/stored policies)."""
        return self._attach(self.base, trainable)

    def merged(self, trainable: dict) -> dict:
        """The adapted model as plain weights, merged afresh from ``trainable`` (sampling,
        evaluation, export): never a cached copy that could fall behind the adapters."""
        return self._merge(self.base, trainable)

    @classmethod
    def for_run(cls, cfg: ModelConfig, params: dict, param_specs, mesh, *, rank: int,
                alpha: float, targets, init: str | None, seed: int):
        """Splits a run's parameters: ``(adapted model, trainable params, their specs)``.

        The model's own entries become the frozen base; anything else (PPO's value head) stays
        trainable next to the adapters. ``init`` is a PEFT adapter directory to start from (its
        rank, alpha and targets apply; ``rank``, when > 0, must match); otherwise the adapters
        start at zero update.
        """
        from offpolicy_jax.models.transformer import param_shapes
        model_keys = set(param_shapes(cfg))
        base = {k: v for k, v in params.items() if k in model_keys}
        base_specs = {k: v for k, v in param_specs.items() if k in model_keys}
        extra = {k: v for k, v in params.items() if k not in model_keys}
        if init:
            lora, adapters = load_peft_adapter(init, cfg)
            if rank and rank != lora.rank:
                raise ValueError(f"--lora_rank={rank} but the adapter in --lora_init={init} has "
                                 f"r={lora.rank}; drop --lora_rank or make them agree")
        else:
            lora = LoraConfig(rank=rank, alpha=alpha, targets=tuple(targets))
            adapters = init_adapters(cfg, lora, jax.random.PRNGKey(seed))
        trainable = {**adapters, **extra}
        specs = partition_specs(trainable, mesh)
        trainable = jax.device_put(trainable, jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(mesh, spec), specs,
            is_leaf=lambda x: isinstance(x, P)))
        return cls(cfg, lora, base, base_specs, mesh), trainable, specs
