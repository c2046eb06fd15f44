"""Prefill and single-token decode step of the decoder, laid out for fast autoregressive decoding.

``models.apply_cached`` is the general cached forward (any number of new tokens, a
layer-stacked ``[L, B, S, KV, hd]`` cache, ``nn.scan`` over layers). For one token at a time that
layout costs more than the matmuls themselves on CPU: every step slices each layer's stacked
weights and cache out of the scan carry (copies of ~all weights and cache), and attention over a
``[B, S, KV, hd]`` cache transposes it. This module computes the *same function* with

* per-layer weights, split once per ``generate`` call into plain 2-D matrices (the fused
  ``qkv`` ``[D, KV*(G+2)*hd]`` and ``gate_up`` ``[D, 2F]`` projections stay fused), and the
  layers unrolled, so no weight is copied inside the decode loop;
* a per-layer cache, keys as ``[B, KV, hd, S]`` and values as ``[B, KV, S, hd]``: the new
  key/value is written in place (``dynamic_update_slice`` on a donated buffer) and both attention
  matmuls are plain batched ``[G, hd] @ [hd, S]`` / ``[G, S] @ [S, hd]`` products over ``(b, kv)``
  (keys stored transposed make the score matmul ~2.5x faster on CPU than ``[S, hd]`` keys);
* prefill through ``models.Decoder`` computing hidden states only, projecting just the last
  position of each prompt to the vocabulary (the full ``[B, P, V]`` prompt logits are never
  formed).

Cost: the split weights are a second copy of the parameters (in the compute dtype) for the
duration of a ``generate`` call; with a mesh each device holds a copy of its own shards only.

It reuses the model's own building blocks (``rms_norm``, ``rope_angles``, ``apply_rope``,
``hidden_to_logits``) and is checked against ``models.apply`` and transformers in
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
    """Per-layer 2-D weights in the compute dtype, for :func:`decode_step`.

    Returns:
      ``{"embed", "final_norm", ["lm_head"], "layers": (layer_0, ..., layer_{L-1})}`` where each
      layer holds ``attn_norm [D], qkv [D, KV*(G+2)*hd], [qkv_bias [KV*(G+2)*hd]],
      [q_norm, k_norm [hd]], o [H*hd, D], mlp_norm [D], gate_up [D, 2F], down [F, D]``.
    """
    dt = jnp.dtype(cfg.dtype)
    d, f = cfg.hidden_size, cfg.intermediate_size
    stacked = params["layers"]
    reshape = {"qkv": (d, -1), "qkv_bias": (-1,), "gate_up": (d, 2 * f)}
    layers = []
    for layer in range(cfg.num_layers):
        weights = {}
        for name, value in stacked.items():
            value = value[layer]
            weights[name] = value.reshape(reshape[name]) if name in reshape else value
        layers.append(jax.tree.map(lambda w: w.astype(dt), weights))
    split = {"embed": params["embed"], "final_norm": params["final_norm"], "layers": tuple(layers)}
    if "lm_head" in params:
        split["lm_head"] = params["lm_head"]
    return split


def to_decode_cache(cache: dict) -> dict:
    """Converts a ``models.init_cache`` / ``apply_cached`` cache to the per-layer layout.

    ``{"k", "v": [L, B, S, KV, hd], "mask", "index"}`` -> ``{"k": L-tuple of [B, KV, hd, S],
    "v": L-tuple of [B, KV, S, hd], "mask": [B, S], "index": []}``.
    """
    def per_layer(stacked, order):
        return tuple(stacked[layer].transpose(order) for layer in range(stacked.shape[0]))

    return {"k": per_layer(cache["k"], (0, 2, 3, 1)), "v": per_layer(cache["v"], (0, 2, 1, 3)),
            "mask": cache["mask"], "index": cache["index"]}


def prefill_last_logits(cfg: models.ModelConfig, params: dict, tokens: jax.Array,
                        token_mask: jax.Array, max_len: int):
    """Runs left-padded prompts into a fresh cache; returns the last position's logits.

    Same semantics as ``models.init_cache`` + ``models.apply_cached`` (positions continue each
    row's count of real tokens; pad slots stay invisible), but only the last column -- where
    left padding puts every prompt's final token -- is projected to the vocabulary.

    Args:
      tokens, token_mask: [B, P] left-padded prompts and their 0/1 mask.
      max_len: cache slots S >= P.

    Returns:
      (logits [B, V] float32, cache in the ``models.init_cache`` layout with index P).
    """
    batch, length = tokens.shape
    token_mask = token_mask.astype(bool)
    cache = models.init_cache(cfg, batch, max_len)
    positions = models.default_positions(token_mask)
    mask = lax.dynamic_update_slice(cache["mask"], token_mask, (0, 0))
    causal = jnp.arange(max_len)[None, :] <= jnp.arange(length)[:, None]  # [P, S]
    allowed = causal[None] & mask[:, None, :]
    hidden, (k, v) = models.Decoder(cfg).apply({"params": params}, tokens, positions, allowed,
                                               (cache["k"], cache["v"]), jnp.int32(0))
    logits = transformer.hidden_to_logits(cfg, params, hidden[:, -1])
    return logits, {"k": k, "v": v, "mask": mask, "index": jnp.int32(length)}


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` accumulated in float32, returned in x's dtype. With bfloat16 operands this is
    what lets XLA:CPU use its native bf16 kernels (AMX where present); without the float32
    result type it converts both operands -- all the weights, every step -- to float32."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


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
                positions: jax.Array, cache: dict):
    """Feeds one token per row; returns next-token logits and the cache with it written.

    Args:
      cfg: the model.
      split_params: from :func:`split_layer_params`.
      tokens: [B] int token ids; positions: [B] their RoPE positions.
      cache: per-layer cache from :func:`to_decode_cache` (donate it: the write is in place).

    Returns:
      (logits [B, V] float32, updated cache with ``index + 1``).
    """
    dt = jnp.dtype(cfg.dtype)
    kv_heads, groups, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
    f = cfg.intermediate_size
    batch = tokens.shape[0]
    index = cache["index"]
    max_len = cache["mask"].shape[1]

    x = jnp.take(split_params["embed"], tokens, axis=0, mode="clip").astype(dt)  # [B, D]
    cos, sin = transformer.rope_angles(cfg, positions[:, None], dt)  # [B, 1, hd/2]
    mask = lax.dynamic_update_slice(cache["mask"], jnp.ones((batch, 1), bool), (0, index))
    allowed = mask & (jnp.arange(max_len)[None, :] <= index)  # [B, S]

    new_k, new_v = [], []
    for layer, w in enumerate(split_params["layers"]):
        h = transformer.rms_norm(x, w["attn_norm"], cfg.rms_norm_eps)
        qkv = _matmul(h, w["qkv"])
        if cfg.qkv_bias:
            qkv = qkv + w["qkv_bias"][None, :]
        qkv = qkv.reshape(batch, kv_heads, groups + 2, hd)
        q, k, v = qkv[:, :, :groups], qkv[:, :, groups], qkv[:, :, groups + 1]
        if cfg.qk_norm:
            q = transformer.rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
            k = transformer.rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
        # apply_rope wants [B, T, *heads, hd]: add the T = 1 axis.
        q = transformer.apply_rope(q[:, None], cos, sin)[:, 0]
        k = transformer.apply_rope(k[:, None], cos, sin)[:, 0]
        k_cache = _write_slot(cache["k"][layer], k[:, :, :, None], (0, 0, 0, index))
        v_cache = _write_slot(cache["v"][layer], v[:, :, None, :], (0, 0, index, 0))
        new_k.append(k_cache)
        new_v.append(v_cache)
        attended = _attend(q, k_cache, v_cache, allowed).reshape(batch, cfg.num_heads * hd)
        x = x + _matmul(attended, w["o"])
        h = transformer.rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
        gate_up = _matmul(h, w["gate_up"])
        x = x + _matmul(jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:], w["down"])

    hidden = transformer.rms_norm(x, split_params["final_norm"], cfg.rms_norm_eps)
    logits = transformer.hidden_to_logits(cfg, split_params, hidden)
    return logits, {"k": tuple(new_k), "v": tuple(new_v), "mask": mask, "index": index + 1}
