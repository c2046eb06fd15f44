"""Prefill and single-token decode step of the decoder, laid out for fast autoregressive decoding.

``models.apply_cached`` is the general cached forward (any number of new tokens, a
layer-stacked ``[L, B, S, KV, hd]`` cache, ``nn.scan`` over layers). For sampling that layout
costs more than the matmuls themselves on CPU: every decode step slices each layer's stacked
weights and cache out of the scan carry (copies of ~all weights and cache), attention over a
``[B, S, KV, hd]`` cache transposes it, and a prefill attends over every cache slot although only
the prompt's own are filled. This module computes the *same function* with

* per-layer weights, split once per ``generate`` call into plain 2-D ``[out, in]`` matrices
  (the fused ``qkv`` and ``gate_up`` projections stay fused), and the layers unrolled, so no
  weight is copied inside the decode loop;
* a per-layer cache, keys as ``[B, KV, hd, S]`` and values as ``[B, KV, S, hd]``: the new
  key/value is written in place (``dynamic_update_slice`` on a donated buffer) and both attention
  matmuls are plain batched ``[G, hd] @ [hd, S]`` / ``[G, S] @ [S, hd]`` products over ``(b, kv)``
  (keys stored transposed make the score matmul ~2.5x faster on CPU than ``[S, hd]`` keys);
* RoPE's cos/sin looked up in a table computed once per dispatch (:func:`rope_table`);
* a prefill that attends among the prompt tokens only (``[P, P]``, not ``[P, S]``), writes the
  cache in the decode layout directly, and in the last layer computes queries, attention and the
  MLP for the last position alone -- the only one projected to the vocabulary (the full
  ``[B, P, V]`` prompt logits are never formed).

Cost: the split weights are a second copy of the parameters (in the compute dtype) for the
duration of a ``generate`` call; with a mesh each device holds a copy of its own shards only.

It reuses the model's own building blocks (``rms_norm``, ``rope_angles``, ``apply_rope``,
``grouped_attention``) and is checked against ``models.apply_cached`` and transformers in
tests/test_sampling_model.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from offpolicy_jax import models
from offpolicy_jax.models import transformer

# Score of a masked key: finite (a fully masked row stays NaN-free), far below any real score.
_MASKED_SCORE = float(np.finfo(np.float32).min)


def split_layer_params(cfg: models.ModelConfig, params: dict) -> dict:
    """Per-layer 2-D weights in the compute dtype, stored transposed, for :func:`prefill` and
    :func:`decode_step`.

    Every matrix is kept as ``[out, in]`` and multiplied by :func:`_matmul` (contracting both
    operands' last axis): on a chain of the benchmark model's decode matmuls (32 rows) XLA:CPU
    ran that form 9-12% faster than ``[in, out]`` weights (the tied embedding already has this
    layout; the transposes add 20-35 ms per ``generate`` call to the split).

    Returns:
      ``{"embed" [V, D], "final_norm" [D], "head" [V, D], "layers": (layer_0, ...,
      layer_{L-1})}`` where each layer holds ``attn_norm [D], qkv [KV*(G+2)*hd, D],
      [qkv_bias [KV*(G+2)*hd]], [q_norm, k_norm [hd]], o [D, H*hd], mlp_norm [D],
      gate_up [2F, D], down [D, F]``.
    """
    dt = jnp.dtype(cfg.dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size
    stacked = params["layers"]
    attached = sorted(name for name in stacked if name.startswith("lora_"))
    if attached:
        # Decoding would silently sample from the base model, ignoring the adapters.
        raise ValueError(f"the sampler got LoRA factors {attached} attached to the parameters; "
                         f"pass the merged weights (models.lora.merge) instead")
    matrices = {"qkv": (d, -1), "o": None, "gate_up": (d, 2 * f), "down": None}
    layers = []
    for layer in range(cfg.num_layers):
        weights = {}
        for name, value in stacked.items():
            value = value[layer]
            if name in matrices:
                value = (value if matrices[name] is None else value.reshape(matrices[name])).T
            elif name == "qkv_bias":
                value = value.reshape(-1)
            weights[name] = value.astype(dt)
        layers.append(weights)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T
    return {"embed": params["embed"], "final_norm": params["final_norm"],
            "head": head.astype(dt), "layers": tuple(layers)}


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ wᵀ`` for x [N, in] and w [out, in], accumulated in float32, returned in x's dtype.

    With bfloat16 operands the float32 result type is what lets XLA:CPU use its native bf16
    kernels (AMX where present); without it, it converts both operands -- all the weights, every
    step -- to float32.
    """
    product = lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return product.astype(x.dtype)


def _write_slot(buffer: jax.Array, update: jax.Array, start) -> jax.Array:
    """In-place ``dynamic_update_slice`` of ``update`` (cast to the buffer's dtype) at ``start``.

    16-bit float buffers are updated through a uint16 bit view: XLA:CPU otherwise widens a
    bfloat16 update to float32, which turns the in-place write of one slot into a conversion of
    the whole cache every step.
    """
    update = update.astype(buffer.dtype)
    if buffer.dtype.itemsize != 2:
        return lax.dynamic_update_slice(buffer, update, start)
    bits = lax.dynamic_update_slice(lax.bitcast_convert_type(buffer, jnp.uint16),
                                    lax.bitcast_convert_type(update, jnp.uint16), start)
    return lax.bitcast_convert_type(bits, buffer.dtype)


def rope_table(cfg: models.ModelConfig, num_positions: int):
    """RoPE (cos, sin) for positions ``0 .. num_positions - 1``, each [num_positions, 1, hd/2]
    in the compute dtype; rows are looked up per token with :func:`_rope_rows`.

    Computing the table once, outside the decode loop, matters on CPU: cos/sin of the step's
    positions would otherwise be fused into every layer's query and key rotation and the
    transcendental functions re-evaluated per element and layer (about 4% of a decode step of
    the benchmark model; ``lax.optimization_barrier`` does not stop XLA:CPU from doing it).
    """
    positions = jnp.arange(num_positions, dtype=jnp.int32)[:, None]
    return transformer.rope_angles(cfg, positions, jnp.dtype(cfg.dtype))


def _rope_rows(table, positions: jax.Array):
    """The table's rows for positions [N]: (cos, sin) [N, 1, hd/2]."""
    cos, sin = table
    return (jnp.take(cos, positions, axis=0, mode="clip"),
            jnp.take(sin, positions, axis=0, mode="clip"))


def _project_qkv(cfg: models.ModelConfig, w: dict, x: jax.Array, cos, sin):
    """Attention inputs of one layer for rows x [N, D]: pre-norm, fused q/k/v projection,
    optional q/k RMSNorm (Qwen3), RoPE.

    Returns:
      q [N, KV, G, hd], k [N, KV, hd], v [N, KV, hd] in the compute dtype.
    """
    kv_heads, groups, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    h = transformer.rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
    qkv = _matmul(h, w["qkv"])
    if cfg.qkv_bias:
        qkv = qkv + w["qkv_bias"][None, :]
    qkv = qkv.reshape(x.shape[0], kv_heads, groups + 2, hd)
    q, k, v = qkv[:, :, :groups], qkv[:, :, groups], qkv[:, :, groups + 1]
    if cfg.qk_norm:
        q = transformer.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = transformer.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    # apply_rope wants [N, T, *heads, hd] with angles [N, T, hd/2]: T = 1.
    q = transformer.apply_rope(q[:, None], cos, sin)[:, 0]
    k = transformer.apply_rope(k[:, None], cos, sin)[:, 0]
    return q, k, v


def _finish_layer(cfg: models.ModelConfig, w: dict, x: jax.Array, attended: jax.Array):
    """Output projection and SwiGLU MLP with their residuals, rows x [N, D], attended [N, H*hd]."""
    f = cfg.intermediate_size
    x = x + _matmul(attended, w["o"])
    h = transformer.rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
    gate_up = _matmul(h, w["gate_up"])
    return x + _matmul(jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:], w["down"])


def _logits(cfg: models.ModelConfig, split_params: dict, x: jax.Array) -> jax.Array:
    """Final RMSNorm and output projection of rows x [N, D]: [N, V] float32 (as
    ``transformer.hidden_to_logits``: compute-dtype operands, float32 accumulation)."""
    hidden = transformer.rms_norm(x, split_params["final_norm"], cfg.rms_norm_eps)
    return lax.dot_general(hidden, split_params["head"], (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def prefill(cfg: models.ModelConfig, split_params: dict, tokens: jax.Array,
            token_mask: jax.Array, max_len: int):
    """Runs left-padded prompts into a fresh cache; returns the last position's logits.

    Same function as ``models.init_cache`` + ``models.apply_cached`` (positions count each row's
    real tokens; pad slots stay invisible), with the cache in the decode layout; but attention
    runs among the P prompt slots only -- the other ``max_len - P`` are empty -- and only the
    last column, where left padding puts every prompt's final token, is carried through the last
    layer's attention and MLP and projected to the vocabulary.

    Args:
      split_params: from :func:`split_layer_params`.
      tokens, token_mask: [B, P] left-padded prompts and their 0/1 mask.
      max_len: cache slots S >= P.

    Returns:
      (logits [B, V] float32, decode cache ``{"k": L-tuple of [B, KV, hd, S], "v": L-tuple of
      [B, KV, S, hd], "mask": [B, S], "index": P}``).
    """
    batch, length = tokens.shape
    kv_heads, groups, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    token_mask = token_mask.astype(bool)
    dt = jnp.dtype(cfg.dtype)
    rows = batch * length

    positions = models.default_positions(token_mask).reshape(rows)
    cos, sin = _rope_rows(rope_table(cfg, length), positions)
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]  # [P, P]
    allowed = causal[None] & token_mask[:, None, :]  # [B, P, P]
    x = jnp.take(split_params["embed"], tokens.reshape(rows), axis=0, mode="clip").astype(dt)

    pad_slots = max_len - length
    keys, values = [], []
    last_layer = len(split_params["layers"]) - 1
    for layer, w in enumerate(split_params["layers"]):
        q, k, v = _project_qkv(cfg, w, x, cos, sin)
        k = k.reshape(batch, length, kv_heads, hd)
        v = v.reshape(batch, length, kv_heads, hd)
        keys.append(jnp.pad(k.transpose(0, 2, 3, 1), ((0, 0),) * 3 + ((0, pad_slots),)))
        values.append(jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad_slots), (0, 0))))
        q = q.reshape(batch, length, kv_heads, groups, hd)
        if layer == last_layer:
            # Past the last attention only the final position matters: keep that query alone.
            q, allowed, x = q[:, -1:], allowed[:, -1:], x.reshape(batch, length, -1)[:, -1]
        attended = transformer.grouped_attention(q, k, v, allowed)
        x = _finish_layer(cfg, w, x, attended.reshape(x.shape[0], cfg.num_heads * hd))
    if not split_params["layers"]:
        x = x.reshape(batch, length, -1)[:, -1]

    logits = _logits(cfg, split_params, x)
    mask = jnp.pad(token_mask, ((0, 0), (0, pad_slots)))
    cache = {"k": tuple(keys), "v": tuple(values), "mask": mask, "index": jnp.int32(length)}
    return logits, cache


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, allowed: jax.Array):
    """One query token per row against the cache (grouped-query attention, arXiv:2305.13245).

    ``out[b,k,g] = Σ_s softmax_s(q[b,k,g]·K[b,k,s] / sqrt(hd) | allowed[b,s]) V[b,k,s]``

    Args:
      q: [B, KV, G, hd]; keys: [B, KV, hd, S]; values: [B, KV, S, hd]; allowed: [B, S] bool.

    Returns:
      [B, KV, G, hd] in q's dtype.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.einsum("bkgh,bkhs->bkgs", q, keys.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None, None, :], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgs,bksh->bkgh", probs, values.astype(q.dtype),
                      preferred_element_type=jnp.float32).astype(q.dtype)


def decode_step(cfg: models.ModelConfig, split_params: dict, tokens: jax.Array,
                positions: jax.Array, cache: dict, rope=None):
    """Feeds one token per row; returns next-token logits and the cache with it written.

    Args:
      cfg: the model.
      split_params: from :func:`split_layer_params`.
      tokens: [B] int token ids; positions: [B] their RoPE positions (< the cache's slots S).
      cache: per-layer cache from :func:`prefill` (donate it: the write is in place).
      rope: ``rope_table(cfg, S)``; a decode loop should compute it once, outside the loop
        (default: computed here).

    Returns:
      (logits [B, V] float32, updated cache with ``index + 1``).
    """
    dt = jnp.dtype(cfg.dtype)
    batch = tokens.shape[0]
    index = cache["index"]
    max_len = cache["mask"].shape[1]

    x = jnp.take(split_params["embed"], tokens, axis=0, mode="clip").astype(dt)  # [B, D]
    cos, sin = _rope_rows(rope_table(cfg, max_len) if rope is None else rope, positions)
    mask = lax.dynamic_update_slice(cache["mask"], jnp.ones((batch, 1), bool), (0, index))
    allowed = mask & (jnp.arange(max_len)[None, :] <= index)  # [B, S]

    new_k, new_v = [], []
    for layer, w in enumerate(split_params["layers"]):
        q, k, v = _project_qkv(cfg, w, x, cos, sin)
        k_cache = _write_slot(cache["k"][layer], k[:, :, :, None], (0, 0, 0, index))
        v_cache = _write_slot(cache["v"][layer], v[:, :, None, :], (0, 0, index, 0))
        new_k.append(k_cache)
        new_v.append(v_cache)
        attended = _attend(q, k_cache, v_cache, allowed)
        attended = attended.reshape(batch, cfg.num_heads * cfg.head_dim)
        x = _finish_layer(cfg, w, x, attended)

    logits = _logits(cfg, split_params, x)
    return logits, {"k": tuple(new_k), "v": tuple(new_v), "mask": mask, "index": index + 1}
