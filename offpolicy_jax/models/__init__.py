"""Decoder-only transformer (Qwen2/Qwen2.5, Llama 3.x, Qwen3) with Hugging Face checkpoint import
and export, KV-cache decoding and partition rules.

    cfg, params = models.load_hf_checkpoint(path, dtype=jnp.float32)
    logits = models.apply(cfg, params, tokens, attention_mask)          # [B, T, V] float32
    cache = models.init_cache(cfg, batch_size, max_len)
    logits, cache = models.apply_cached(cfg, params, tokens, cache, positions, token_mask)
    models.save_hf_checkpoint(path, cfg, params)

See ``transformer`` for the parameter-tree and cache layouts, ``checkpoint`` for the key map and
``partitioning`` for the mesh and partition rules.
"""

from offpolicy_jax.models.checkpoint import (CheckpointError, hf_tensors, key_map,
                                             load_hf_checkpoint, load_tokenizer, read_hf_config,
                                             save_hf_checkpoint, write_hf_tensors)
from offpolicy_jax.models.config import (ModelConfig, RopeScaling, UnsupportedConfigError,
                                         SUPPORTED_MODEL_TYPES)
from offpolicy_jax.models.partitioning import (BATCH_AXES, MESH_AXES, PARTITION_RULES,
                                               cache_partition_specs, make_mesh, param_shardings,
                                               partition_specs, shard_params)
from offpolicy_jax.models.transformer import (Decoder, apply, apply_cached, apply_hidden,
                                              default_positions, hidden_to_logits, init_cache,
                                              init_params, log_softmax, param_shapes,
                                              rope_inverse_frequencies)

__all__ = [
    "BATCH_AXES", "CheckpointError", "Decoder", "MESH_AXES", "ModelConfig", "PARTITION_RULES",
    "RopeScaling", "SUPPORTED_MODEL_TYPES", "UnsupportedConfigError", "apply", "apply_cached",
    "apply_hidden", "cache_partition_specs", "default_positions", "hf_tensors",
    "hidden_to_logits", "init_cache", "init_params", "key_map", "load_hf_checkpoint",
    "load_tokenizer", "log_softmax", "make_mesh", "param_shapes", "param_shardings",
    "partition_specs", "read_hf_config", "rope_inverse_frequencies", "save_hf_checkpoint",
    "shard_params", "write_hf_tensors",
]
