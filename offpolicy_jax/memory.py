"""Memory per device of an RL run, from a ``ModelConfig`` and a mesh; recommended meshes.

The README's "Scaling up" table is printed by ``python -m offpolicy_jax.memory``, so its numbers
are derived from the published model configs, not typed in.

What is counted, per device, for a mesh ``(data, fsdp, tensor)`` (``N = data * fsdp * tensor``):

    training state = P * (b_param + b_grad + 2 * b_moment [+ b_param for a reference copy])
                     / (fsdp * tensor)
    KV cache       = 2 * L * KV * hd * S * rows * b_kv / (data * fsdp * t_kv)

with ``P`` parameters (``ModelConfig.num_params``); the partition rules shard every matrix over
``fsdp`` (ZeRO-3, arXiv:1910.02054) and ``tensor`` (Megatron, arXiv:1909.08053) and replicate it
over ``data``. AdamW keeps two moments (m, v) per parameter. The KV cache of a rollout holds keys
and values for ``L`` layers, ``KV`` key/value heads of width ``hd``, ``S`` slots (prompt +
response bucket) and ``rows`` sequences (prompts x samples); rows are split over
``data * fsdp`` and the KV heads over ``t_kv = tensor`` when it divides ``KV`` (else replicated).

With LoRA (``lora``: rank r on some projections, ``P_a = L · r · Σ (in + out)`` adapter
parameters, trained in float32 next to frozen base weights):

    training state = (P * b_param + P_a * 4 * (1 + 1 + 2 [+ 1 for the reference adapters]))
                     / (fsdp * tensor)
    merged copy    = P_t * b_param / (fsdp * tensor)   (sampling: weights with adapters merged)

where ``P_t`` counts the adapted matrices' weights: the decode loop samples from merged weights,
so a merged copy of the adapted matrices exists next to the base while rollouts are generated.
The train step itself applies the factors unmerged: no gradient or moment of a base weight.

Not counted: activations of the training forward/backward (they scale with the minibatch and
the remat policy; ``--num_microbatches`` bounds them), the logits buffer, and XLA temporaries.
``recommend_mesh`` therefore keeps ``reserve_fraction`` of each device free for them.
"""

from __future__ import annotations

import dataclasses
import math

from offpolicy_jax.models.config import ModelConfig

GIB = 1024 ** 3

# The published config.json fields that determine the parameter count and the KV-cache size.
PUBLISHED_CONFIGS: dict[str, dict] = {
    "Qwen2.5-1.5B": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0},
    "DeepSeek-R1-Distill-Qwen-1.5B": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rope_theta": 10000.0},
    "Qwen2.5-7B": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0},
    "Llama-3.1-8B": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "Qwen3-8B": {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0},
}

# Hardware the README table targets: (name, number of devices, memory per device in GiB).
HARDWARE = (
    ("v5e-8", 8, 16.0),           # one TPU v5e host, 8 chips x 16 GiB HBM
    ("v5e-32", 32, 16.0),         # 8 hosts x 4 chips
    ("v4-8", 4, 32.0),            # one TPU v4 host, 4 chips x 32 GiB
    ("8xH100", 8, 80.0),          # one GPU node
    ("2x8xH100", 16, 80.0),       # two GPU nodes (launch/gpu_slurm.sh)
)


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per element of each stored quantity (defaults: bf16 weights, fp32 AdamW moments)."""

    param: int = 2
    grad: int = 2
    moment: int = 4
    kv: int = 2


@dataclasses.dataclass(frozen=True)
class Rollout:
    """The generation batch whose KV cache must fit: ``rows`` sequences of ``slots`` positions."""

    rows: int = 512          # e.g. 64 prompts x 8 samples
    slots: int = 2048        # prompt bucket + response bucket


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each part (see the module docstring for the formulas)."""

    mesh: tuple[int, int, int]
    num_params: int
    params: float
    grads: float
    optimizer: float
    reference: float
    kv_cache: float
    merged: float = 0.0

    @property
    def total(self) -> float:
        return (self.params + self.grads + self.optimizer + self.reference + self.kv_cache
                + self.merged)

    @property
    def state(self) -> float:
        """Weights, gradients, optimizer moments and reference: the training state."""
        return self.params + self.grads + self.optimizer + self.reference

    @property
    def mesh_flag(self) -> str:
        return "--mesh=" + ",".join(map(str, self.mesh))


def config_for(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a model in ``PUBLISHED_CONFIGS``."""
    if name not in PUBLISHED_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(PUBLISHED_CONFIGS)}")
    return ModelConfig.from_hf_config(PUBLISHED_CONFIGS[name], dtype="bfloat16")


def kv_cache_bytes(cfg: ModelConfig, rollout: Rollout, kv_bytes: int = 2) -> int:
    """Whole KV cache (all devices together): ``2 * L * KV * hd * S * rows * b_kv``."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * rollout.slots * rollout.rows \
        * kv_bytes


def adapted_weight_count(cfg: ModelConfig, lora) -> int:
    """``P_t``: weights of the matrices LoRA adapts (in · out per target and layer)."""
    from offpolicy_jax.models import lora as lora_lib
    return cfg.num_layers * sum(math.prod(lora_lib.target_dims(cfg, t)) for t in lora.targets)


def estimate(cfg: ModelConfig, mesh: tuple[int, int, int], *, precision: Precision = Precision(),
             rollout: Rollout = Rollout(), with_reference: bool = False,
             lora=None) -> MemoryEstimate:
    """Memory per device of the train state and the rollout KV cache on ``mesh``.

    Args:
      cfg: the model.
      mesh: ``(data, fsdp, tensor)`` sizes.
      precision: bytes per parameter, gradient, AdamW moment and cached key/value element.
      rollout: the generation batch (rows and cache slots).
      with_reference: count a frozen reference copy of the parameters (KL-regularised methods).
      lora: a ``models.lora.LoraConfig``: frozen base weights, float32 adapters (see above).
    """
    data, fsdp, tensor = mesh
    if min(mesh) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got {mesh}")
    num_params = cfg.num_params()
    state_shards = fsdp * tensor
    kv_tensor = tensor if cfg.num_kv_heads % tensor == 0 else 1
    kv_cache = kv_cache_bytes(cfg, rollout, precision.kv) / (data * fsdp * kv_tensor)
    if lora is not None:
        from offpolicy_jax.models import lora as lora_lib
        adapters = lora_lib.adapter_param_count(cfg, lora)
        return MemoryEstimate(
            mesh=tuple(mesh), num_params=num_params,
            params=(num_params * precision.param + adapters * 4) / state_shards,
            grads=adapters * 4 / state_shards,
            optimizer=2 * adapters * 4 / state_shards,
            reference=(adapters * 4 / state_shards) if with_reference else 0.0,
            kv_cache=kv_cache,
            merged=adapted_weight_count(cfg, lora) * precision.param / state_shards)
    return MemoryEstimate(
        mesh=tuple(mesh), num_params=num_params,
        params=num_params * precision.param / state_shards,
        grads=num_params * precision.grad / state_shards,
        optimizer=2 * num_params * precision.moment / state_shards,
        reference=(num_params * precision.param / state_shards) if with_reference else 0.0,
        kv_cache=kv_cache_bytes(cfg, rollout, precision.kv) / (data * fsdp * kv_tensor),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def recommend_mesh(cfg: ModelConfig, num_devices: int, device_gib: float, *,
                   precision: Precision = Precision(), rollout: Rollout = Rollout(),
                   with_reference: bool = False, lora=None,
                   reserve_fraction: float = 0.25) -> MemoryEstimate | None:
    """The cheapest mesh whose estimate fits ``(1 - reserve_fraction)`` of each device.

    Preference order, cheapest communication first: no tensor parallelism before tensor
    parallelism (it all-reduces activations inside every layer), and the smallest ``fsdp``
    (parameters are all-gathered every step over ``fsdp``; ``data`` only all-reduces gradients).
    Returns ``None`` when even ``fsdp = num_devices`` with the widest tensor split does not fit.
    """
    budget = (1.0 - reserve_fraction) * device_gib * GIB
    for tensor in _divisors(num_devices):
        for fsdp in _divisors(num_devices // tensor):
            data = num_devices // (tensor * fsdp)
            guess = estimate(cfg, (data, fsdp, tensor), precision=precision, rollout=rollout,
                             with_reference=with_reference, lora=lora)
            if guess.total <= budget:
                return guess
    return None


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def readme_table(models=tuple(PUBLISHED_CONFIGS), hardware=HARDWARE, *,
                 precision: Precision = Precision(), rollout: Rollout = Rollout(),
                 with_reference: bool = False, reserve_fraction: float = 0.25) -> str:
    """The markdown table of the README's "Scaling up" section: per model, its size, its whole
    train state and rollout KV cache, then per hardware the recommended mesh and the estimated
    memory per device ("-": does not fit)."""
    bytes_per_param = precision.param + precision.grad + 2 * precision.moment + (
        precision.param if with_reference else 0)
    header = ["model", "params", f"state ({bytes_per_param} B/param)",
              f"KV cache ({rollout.rows} x {rollout.slots})"]
    header += [f"{label} ({devices} x {gib:g} GiB)" for label, devices, gib in hardware]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        cfg = config_for(name)
        row = [name, f"{cfg.num_params() / 1e9:.2f}B",
               f"{_gib(cfg.num_params() * bytes_per_param)} GiB",
               f"{_gib(kv_cache_bytes(cfg, rollout, precision.kv))} GiB"]
        for _, devices, gib in hardware:
            plan = recommend_mesh(cfg, devices, gib, precision=precision, rollout=rollout,
                                  with_reference=with_reference,
                                  reserve_fraction=reserve_fraction)
            row.append("-" if plan is None
                       else f"`{','.join(map(str, plan.mesh))}`: {_gib(plan.total)} GiB")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def lora_table(models=("Qwen2.5-1.5B", "Qwen2.5-7B"), rank: int = 8, hardware=HARDWARE[:1] +
               HARDWARE[3:4], *, precision: Precision = Precision(), rollout: Rollout = Rollout(),
               reserve_fraction: float = 0.25) -> str:
    """The README's LoRA rows: full fine-tuning against LoRA (rank ``rank`` on all seven
    projections) per model: trainable parameters, the whole training state split into weights,
    gradients and AdamW moments, the merged copy sampling needs, and the recommended mesh."""
    from offpolicy_jax.models import lora as lora_lib
    lora = lora_lib.LoraConfig(rank=rank, alpha=2.0 * rank)
    header = ["model", "training", "trainable", "weights", "gradients", "AdamW moments",
              "state", "merged copy (sampling)"]
    header += [f"{label} ({devices} x {gib:g} GiB)" for label, devices, gib in hardware]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in models:
        cfg = config_for(name)
        for mode, adapters in (("full", None), (f"LoRA r={rank}", lora)):
            whole = estimate(cfg, (1, 1, 1), precision=precision, rollout=rollout, lora=adapters)
            trainable = (cfg.num_params() if adapters is None
                         else lora_lib.adapter_param_count(cfg, adapters))
            # Two decimals: the adapters' gradients and moments are tens of MiB.
            gib = lambda value: f"{value / GIB:.2f} GiB"   # noqa: E731
            row = [name, mode, f"{trainable / 1e6:,.1f}M", gib(whole.params), gib(whole.grads),
                   gib(whole.optimizer), f"**{gib(whole.state)}**",
                   "-" if adapters is None else gib(whole.merged)]
            for _, devices, gib in hardware:
                plan = recommend_mesh(cfg, devices, gib, precision=precision, rollout=rollout,
                                      lora=adapters, reserve_fraction=reserve_fraction)
                row.append("-" if plan is None
                           else f"`{','.join(map(str, plan.mesh))}`: {_gib(plan.total)} GiB")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    precision, rollout = Precision(), Rollout()
    print(f"bf16 params and grads ({precision.param} B), fp32 AdamW moments "
          f"(2 x {precision.moment} B), bf16 KV cache; rollout {rollout.rows} rows x "
          f"{rollout.slots} slots; 25% of each device reserved for activations.\n")
    print(readme_table(precision=precision, rollout=rollout))
    print("\nLoRA (rank 8 on q, k, v, o, gate, up, down; float32 adapters, frozen bf16 base):\n")
    print(lora_table(precision=precision, rollout=rollout))


if __name__ == "__main__":
    main()
