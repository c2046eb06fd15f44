"""Model configuration: one frozen dataclass for the Qwen2/Qwen2.5, Llama 3.x and Qwen3 families.

``ModelConfig`` is hashable, so it can be a static argument of ``jax.jit``. It is built from a
Hugging Face ``config.json`` in either of the two layouts found in practice:

* transformers 4.x (what published hub checkpoints carry): ``rope_theta`` and ``rope_scaling``
  at top level (``rope_scaling`` may spell its type as ``type`` or ``rope_type``);
* transformers 5.x: one ``rope_parameters`` dict holding ``rope_theta``, ``rope_type`` and the
  scaling constants.

Anything the decoder does not implement (another rope scaling type, a sliding window that some
layer actually uses, mixture-of-experts, biases on the output or MLP projections, an activation
other than SiLU, an unknown ``model_type``) raises ``UnsupportedConfigError`` naming the field
and its value, instead of silently producing a different model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# transformers' defaults for fields a config.json may omit, per family.
_FAMILY_DEFAULTS = {
    "qwen2": {"rope_theta": 10000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "llama": {"rope_theta": 10000.0, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "qwen3": {"rope_theta": 10000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
}
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
# Config fields that mean "mixture of experts" in the Qwen/Llama/Mixtral/DeepSeek config families.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
               "num_experts_per_tok")


class UnsupportedConfigError(ValueError):
    """A ``config.json`` asks for something this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (``rope_type: "llama3"``).

    Wavelengths ``λ_i = 2π / θ_i`` longer than ``original_max_position_embeddings /
    low_freq_factor`` are stretched by ``factor``; those shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept; the band between is a
    linear blend of the two (see ``transformer.rope_inverse_frequencies``).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise UnsupportedConfigError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: 'default', 'llama3'")
        if self.high_freq_factor <= self.low_freq_factor:
            raise UnsupportedConfigError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}")

    def to_hf(self) -> dict:
        return {"rope_type": self.rope_type, "factor": float(self.factor),
                "low_freq_factor": float(self.low_freq_factor),
                "high_freq_factor": float(self.high_freq_factor),
                "original_max_position_embeddings": int(self.original_max_position_embeddings)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (pre-norm, RoPE, GQA, SwiGLU).

    Attributes:
      vocab_size: V, rows of the embedding (may exceed the tokenizer's size, as in Qwen).
      hidden_size: D, the residual width.
      intermediate_size: F, the SwiGLU width.
      num_layers: L.
      num_heads: H, query heads.
      num_kv_heads: KV, key/value heads (H must be a multiple: grouped-query attention).
      head_dim: hd; defaults to D // H (Qwen3 sets it independently).
      rope_theta: RoPE base θ.
      rope_scaling: ``None`` (plain RoPE) or a ``RopeScaling`` (llama3); a dict is converted.
      rms_norm_eps: ε of every RMSNorm.
      tie_word_embeddings: the output projection is the embedding matrix transposed.
      qkv_bias: biases on the q/k/v projections (Qwen2).
      qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
      max_position_embeddings: context length the checkpoint was configured for (informational;
        positions beyond it are computed the same way).
      model_type: ``"qwen2"``, ``"llama"`` or ``"qwen3"``; inferred from ``qk_norm``/``qkv_bias``
        when ``None``.
      dtype: compute dtype of activations and matmul inputs ("float32", "bfloat16");
        normalisation statistics, softmax, logits and log-softmax are always float32.
      bos_token_id, eos_token_id: carried through from config.json so that a saved checkpoint
        keeps them (int, tuple of ints, or None).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    model_type: str | None = None
    dtype: str = "float32"
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        set_field = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                                 f"{self.num_heads}; give head_dim explicitly")
            set_field("head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, Mapping):
            set_field("rope_scaling", _rope_scaling_from_dict(dict(self.rope_scaling), "rope_scaling"))
        if isinstance(self.eos_token_id, list):
            set_field("eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.bos_token_id, list):
            set_field("bos_token_id", tuple(self.bos_token_id))
        if hasattr(self.dtype, "dtype") or not isinstance(self.dtype, str):
            # Accept jnp.bfloat16 / np.dtype as a convenience; store the canonical name.
            import numpy as np
            set_field("dtype", np.dtype(self.dtype).name)
        if self.model_type is None:
            set_field("model_type", "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(f"unsupported model_type {self.model_type!r}; supported: "
                                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        expected_flags = {"qwen2": (True, False), "llama": (False, False), "qwen3": (False, True)}
        if (self.qkv_bias, self.qk_norm) != expected_flags[self.model_type]:
            raise ValueError(
                f"model_type {self.model_type!r} implies qkv_bias={expected_flags[self.model_type][0]}"
                f", qk_norm={expected_flags[self.model_type][1]}; got qkv_bias={self.qkv_bias}, "
                f"qk_norm={self.qk_norm}")

    @property
    def num_groups(self) -> int:
        """G = H / KV: query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_heads_per_group(self) -> int:
        """G + 2: the fused projection holds G query heads, one key and one value head per group."""
        return self.num_groups + 2

    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * hd
        per_layer = qkv + self.num_heads * hd * d + 3 * d * f + 2 * d
        per_layer += (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        per_layer += 2 * hd if self.qk_norm else 0
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + d

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, dtype: str = "float32") -> "ModelConfig":
        """Builds a config from a ``config.json`` dict (transformers 4.x or 5.x layout).

        Args:
          config: the parsed config.json.
          dtype: the compute dtype to record (the checkpoint's own ``torch_dtype`` is a storage
            detail and is not used).

        Raises:
          UnsupportedConfigError: naming the field and value we cannot honour.
        """
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"unsupported model_type {model_type!r} in config.json; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        for field in _MOE_FIELDS:
            if config.get(field):
                raise UnsupportedConfigError(
                    f"mixture-of-experts is not supported: config.json field {field!r} = "
                    f"{config[field]!r}")
        activation = config.get("hidden_act", "silu")
        if activation != "silu":
            raise UnsupportedConfigError(f"unsupported hidden_act {activation!r}; only 'silu' "
                                         "(SwiGLU) is implemented")
        for field in ("attention_bias", "mlp_bias"):
            # Qwen2 hard-codes its q/k/v biases and has no such field; on Llama and Qwen3 these
            # flags would also add biases to o_proj / the MLP, which we do not implement.
            if config.get(field):
                raise UnsupportedConfigError(f"config.json field {field!r} = True is not supported "
                                             f"for model_type {model_type!r}")
        _check_no_sliding_window(config)
        defaults = _FAMILY_DEFAULTS[model_type]
        rope_theta, rope_scaling = _parse_rope(config, defaults["rope_theta"])
        num_heads = int(config["num_attention_heads"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", defaults["rms_norm_eps"])),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(config.get("max_position_embeddings",
                                                   defaults["max_position_embeddings"])),
            model_type=model_type,
            dtype=dtype,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )

    def to_hf_config(self, *, torch_dtype: str | None = None) -> dict:
        """A ``config.json`` dict that transformers (4.x and 5.x) loads as the same model.

        We write the 4.x layout (top-level ``rope_theta`` / ``rope_scaling``): transformers 5.x
        reads it too, whereas 4.x would silently ignore a 5.x ``rope_parameters`` dict.

        Args:
          torch_dtype: storage dtype of the saved tensors ("float32", "bfloat16"), recorded as
            ``torch_dtype`` and ``dtype``; defaults to the compute dtype.
        """
        storage = torch_dtype or self.dtype
        config = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": float(self.rope_theta),
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": storage,
            "dtype": storage,
            "bos_token_id": _json_token_ids(self.bos_token_id),
            "eos_token_id": _json_token_ids(self.eos_token_id),
        }
        if self.model_type in ("qwen2", "qwen3"):
            config.update(use_sliding_window=False, sliding_window=None,
                          max_window_layers=self.num_layers)
        if self.model_type in ("llama", "qwen3"):
            config["attention_bias"] = False
        if self.model_type == "llama":
            config["mlp_bias"] = False
        return config


def _json_token_ids(value):
    return list(value) if isinstance(value, tuple) else value


def _parse_rope(config: Mapping[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """(θ, scaling) from either layout; scaling is None for plain RoPE."""
    parameters = dict(config.get("rope_parameters") or {})
    source = "rope_parameters"
    if any(isinstance(v, Mapping) for v in parameters.values()):
        raise UnsupportedConfigError(
            f"per-layer-type rope_parameters {sorted(parameters)} are not supported")
    if config.get("rope_scaling"):
        parameters.update(config["rope_scaling"])
        source = "rope_scaling"
    theta = float(parameters.get("rope_theta", config.get("rope_theta", default_theta)))
    partial = parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(
            f"partial_rotary_factor = {partial!r} is not supported (only full rotary embedding)")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    parameters.setdefault("original_max_position_embeddings",
                          config.get("max_position_embeddings"))
    return theta, _rope_scaling_from_dict(parameters, source)


def _rope_scaling_from_dict(parameters: dict, source: str) -> RopeScaling:
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"unsupported rope scaling type {rope_type!r} (config.json field {source}); "
            "supported: 'default', 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if parameters.get(k) is None]
    if missing:
        raise UnsupportedConfigError(f"llama3 rope scaling in {source} lacks {missing}")
    return RopeScaling(factor=float(parameters["factor"]),
                       low_freq_factor=float(parameters["low_freq_factor"]),
                       high_freq_factor=float(parameters["high_freq_factor"]),
                       original_max_position_embeddings=int(
                           parameters["original_max_position_embeddings"]))


def _check_no_sliding_window(config: Mapping[str, Any]) -> None:
    """Raises if any layer would use sliding-window attention.

    Qwen2/Qwen3 configs always carry ``sliding_window``, but it only takes effect when
    ``use_sliding_window`` is true, and then only from layer ``max_window_layers`` on (4.x
    semantics); 5.x spells the outcome out as ``layer_types``.
    """
    layer_types = config.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        bad = sorted({t for t in layer_types if t != "full_attention"})
        raise UnsupportedConfigError(
            f"sliding-window attention is not supported: config.json layer_types contains {bad}")
    if config.get("use_sliding_window") and config.get("sliding_window"):
        num_layers = int(config["num_hidden_layers"])
        first_sliding = int(config.get("max_window_layers", 0) or 0)
        if first_sliding < num_layers:
            raise UnsupportedConfigError(
                f"sliding-window attention is not supported: use_sliding_window = True with "
                f"sliding_window = {config['sliding_window']} and max_window_layers = "
                f"{first_sliding} < num_hidden_layers = {num_layers}")
