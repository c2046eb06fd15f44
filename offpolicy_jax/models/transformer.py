"""Decoder-only transformer (Qwen2/Qwen2.5, Llama 3.x, Qwen3) as a Flax Linen module with a
pure-functional interface: ``apply(cfg, params, tokens, ...)``.

Architecture (pre-norm; Llama: Touvron et al. 2023, arXiv:2302.13971; Qwen2: arXiv:2407.10671;
Qwen3: arXiv:2505.09388), for every layer ℓ:

    h = x + Attn(RMSNorm(x))                      (GQA, RoPE; Qwen2 q/k/v bias; Qwen3 q/k RMSNorm)
    x = h + W_down (SiLU(W_gate RMSNorm(h)) ⊙ W_up RMSNorm(h))          (SwiGLU, arXiv:2002.05202)

then a final RMSNorm and the output projection (the embedding transposed when tied).

* RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): ``y = w ⊙ x / sqrt(mean(x²) + ε)``, the
  statistics in float32 and the result cast back to the compute dtype before the scale, as
  transformers does.
* RoPE (Su et al. 2021, arXiv:2104.09864) in the "rotate half" convention used by these
  checkpoints: the head dimension is split into halves (x₁, x₂) and rotated by angle
  ``p·θ_i`` with ``θ_i = base^(-2i/hd)``: ``(x₁ cos − x₂ sin, x₂ cos + x₁ sin)``.
* Attention scores ``q·k / sqrt(hd)`` are computed in float32 and softmaxed in float32.

Parameter tree (nested dict; per-layer tensors are stacked on a leading axis of size L and the
layers run under ``nn.scan`` so compile time does not grow with depth)::

    embed        [V, D]
    lm_head      [D, V]                 (absent when tie_word_embeddings)
    final_norm   [D]
    layers/
      attn_norm  [L, D]
      qkv        [L, D, KV, G+2, hd]    fused q/k/v: per key/value head, its G query heads,
                                        then the key head, then the value head
      qkv_bias   [L, KV, G+2, hd]       (Qwen2)
      q_norm     [L, hd]                (Qwen3)
      k_norm     [L, hd]                (Qwen3)
      o          [L, H*hd, D]
      mlp_norm   [L, D]
      gate_up    [L, D, 2, F]           fused SwiGLU input projections (index 0 gate, 1 up)
      down       [L, F, D]

The fused kernels keep a head (or FFN) axis of their own, so sharding that axis over the
``tensor`` mesh axis never splits a query head from its key/value head, or a gate column from
its up column.

The KV cache is an explicit pytree (see ``init_cache``)::

    {"k": [L, B, S, KV, hd], "v": [L, B, S, KV, hd], "mask": [B, S] bool, "index": int32 []}

``index`` is the next slot to write; ``mask`` marks slots holding real (non-pad) tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from offpolicy_jax.models.config import ModelConfig

Array = jax.Array
# Scores of masked keys. Finite, so a query with no visible key (a left-pad position) gets a
# uniform, NaN-free distribution; its output is never used.
_MASKED_SCORE = float(np.finfo(np.float32).min)
_INIT_STD = 0.02  # transformers' initializer_range for these families


# ---------------------------------------------------------------------------------------------
# Building blocks (pure functions).


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm over the last axis: ``scale ⊙ x / sqrt(mean(x²) + ε)``, statistics in float32.

    Args:
      x: [..., N] activations in the compute dtype.
      scale: [N] learned gain.
      eps: ε.
    """
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * lax.rsqrt(variance + eps)).astype(x.dtype)
    return normed * scale.astype(x.dtype).reshape((1,) * (x.ndim - 1) + scale.shape)


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """θ_i for i < hd/2, float32 [hd/2], with llama3 scaling applied when configured.

    Plain RoPE: ``θ_i = base^(-2i/hd)`` (arXiv:2104.09864). Llama 3.1 scaling with wavelength
    ``λ_i = 2π/θ_i``, original context ``C``, factor ``s``, and ``λ_low = C/low_freq_factor``,
    ``λ_high = C/high_freq_factor``:

        θ'_i = θ_i                        if λ_i < λ_high
             = θ_i / s                    if λ_i > λ_low
             = (1 − a) θ_i / s + a θ_i    otherwise, a = (C/λ_i − low_freq_factor) /
                                                         (high_freq_factor − low_freq_factor)
    """
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    inv_freq = 1.0 / (float(cfg.rope_theta) ** exponents)
    scaling = cfg.rope_scaling
    if scaling is not None:
        context = float(scaling.original_max_position_embeddings)
        low_freq_wavelen = context / scaling.low_freq_factor
        high_freq_wavelen = context / scaling.high_freq_factor
        wavelen = 2.0 * np.pi / inv_freq
        stretched = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        blend = ((context / wavelen - scaling.low_freq_factor)
                 / (scaling.high_freq_factor - scaling.low_freq_factor))
        smoothed = (1.0 - blend) * stretched / scaling.factor + blend * stretched
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, stretched)
    return inv_freq.astype(np.float32)


def rope_angles(cfg: ModelConfig, positions: Array, dtype) -> tuple[Array, Array]:
    """(cos, sin) of ``p·θ_i``, each [B, T, hd/2] in ``dtype`` (angles computed in float32)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` [B, T, *heads, hd] by the angles (cos, sin) [B, T, hd/2] (rotate-half form)."""
    extra_axes = x.ndim - cos.ndim
    shape = cos.shape[:2] + (1,) * extra_axes + cos.shape[2:]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def grouped_attention(q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """Softmax attention with grouped key/value heads (GQA, arXiv:2305.13245).

    ``out[b,t,k,g] = Σ_s softmax_s(q[b,t,k,g]·k[b,s,k] / sqrt(hd) | allowed[b,t,s]) v[b,s,k]``

    Args:
      q: [B, T, KV, G, hd] queries (G query heads per key/value head).
      k, v: [B, S, KV, hd].
      allowed: [B, T, S] bool, which keys each query may see.

    Returns: [B, T, KV, G, hd] in q's dtype.
    """
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(q.dtype))


def dense(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` contracting x's last axis with kernel's first, as one 2-D matmul.

    Args:
      x: [..., D] activations.
      kernel: [D, *out] weight (e.g. the fused ``qkv`` kernel [D, KV, G+2, hd]).

    Returns: [..., *out]. Both operands are flattened to matrices first: XLA's CPU backend runs
    the gradients of a rank-3 einsum (a contraction over batch and time together) at about half
    the speed of the same 2-D matmuls (measured on the tiny-arith training step).
    """
    lead, out = x.shape[:-1], kernel.shape[1:]
    flat = x.reshape(-1, x.shape[-1]) @ kernel.reshape(kernel.shape[0], -1)
    return flat.reshape(lead + out)


# ---------------------------------------------------------------------------------------------
# Linen modules.


class DecoderLayer(nn.Module):
    """One pre-norm block; scanned over the layer axis by ``Decoder``.

    The carry is the residual stream ``x`` [B, T, D], or ``(x, k_all, v_all)`` when decoding with
    a cache: the new keys/values are written in place at ``[layer, :, write_index]`` and the
    layer attends over its whole cache slice.
    """

    cfg: ModelConfig
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, layer_index, cos, sin, allowed, write_index):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        kv_heads, groups, hd = cfg.num_kv_heads, cfg.num_groups, cfg.head_dim
        d, f = cfg.hidden_size, cfg.intermediate_size
        normal = nn.initializers.normal(_INIT_STD)

        def weight(name, init, shape):
            return self.param(name, init, shape, self.param_dtype).astype(dt)

        def lora(target, x):
            """(x A) B of the target's LoRA adapter (B pre-scaled by α/r; ``lora.attach``), or
            None: a model without adapters computes exactly what it did before they existed."""
            if not self.has_variable("params", f"lora_{target}_a"):
                return None
            a = self.get_variable("params", f"lora_{target}_a").astype(dt)
            return dense(dense(x, a), self.get_variable("params", f"lora_{target}_b").astype(dt))

        cached = isinstance(carry, tuple)
        x, k_all, v_all = carry if cached else (carry, None, None)

        # Attention.
        h = rms_norm(x, weight("attn_norm", nn.initializers.ones, (d,)), cfg.rms_norm_eps)
        qkv = dense(h, weight("qkv", normal, (d, kv_heads, groups + 2, hd)))
        deltas = [lora(t, h) for t in "qkv"]
        if any(delta is not None for delta in deltas):
            # Into the fused layout: per key/value head its G query heads, then k, then v.
            members = (groups, 1, 1)
            qkv = qkv + jnp.concatenate(
                [jnp.zeros(qkv.shape[:3] + (m, hd), qkv.dtype) if delta is None
                 else delta.reshape(qkv.shape[:3] + (m, hd)) for delta, m in zip(deltas, members)],
                axis=3)
        if cfg.qkv_bias:
            qkv = qkv + weight("qkv_bias", nn.initializers.zeros,
                               (kv_heads, groups + 2, hd))[None, None]
        q, k, v = qkv[:, :, :, :groups], qkv[:, :, :, groups], qkv[:, :, :, groups + 1]
        if cfg.qk_norm:
            q = rms_norm(q, weight("q_norm", nn.initializers.ones, (hd,)), cfg.rms_norm_eps)
            k = rms_norm(k, weight("k_norm", nn.initializers.ones, (hd,)), cfg.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cached:
            start = (layer_index, 0, write_index, 0, 0)
            k_all = lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            k = lax.dynamic_index_in_dim(k_all, layer_index, axis=0, keepdims=False)
            v = lax.dynamic_index_in_dim(v_all, layer_index, axis=0, keepdims=False)
        attended = grouped_attention(q, k, v, allowed)
        batch, length = x.shape[:2]
        attended = attended.reshape(batch, length, cfg.num_heads * hd)
        out = dense(attended, weight("o", normal, (cfg.num_heads * hd, d)))
        delta = lora("o", attended)
        x = x + (out if delta is None else out + delta)

        # SwiGLU MLP.
        h = rms_norm(x, weight("mlp_norm", nn.initializers.ones, (d,)), cfg.rms_norm_eps)
        gate_up = weight("gate_up", normal, (d, 2, f))
        # Two matmuls on slices of the weight, not one on the fused weight and slices of its
        # output: slicing activations costs a strided copy forward and backward.
        gate, up = dense(h, gate_up[:, 0]), dense(h, gate_up[:, 1])
        gate_delta, up_delta = lora("gate", h), lora("up", h)
        gate = gate if gate_delta is None else gate + gate_delta
        up = up if up_delta is None else up + up_delta
        activated = jax.nn.silu(gate) * up
        out = dense(activated, weight("down", normal, (f, d)))
        delta = lora("down", activated)
        x = x + (out if delta is None else out + delta)
        return ((x, k_all, v_all) if cached else x), None


class Decoder(nn.Module):
    """Embedding, L scanned ``DecoderLayer``s and the final RMSNorm; returns hidden states.

    The output projection is a parameter of this module (so ``init`` creates it) but is applied
    by ``hidden_to_logits``, which lets callers project only the positions they need.
    """

    cfg: ModelConfig
    param_dtype: Any = jnp.float32
    remat: bool | str = False

    @nn.compact
    def __call__(self, tokens, positions, allowed, cache_kv=None, write_index=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        normal = nn.initializers.normal(_INIT_STD)
        embed = self.param("embed", normal, (cfg.vocab_size, cfg.hidden_size), self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.param("lm_head", normal, (cfg.hidden_size, cfg.vocab_size), self.param_dtype)
        # "clip": an out-of-range pad id must not become a NaN row (the default "fill" mode)
        # that would leak into real positions through 0 * NaN in masked attention.
        x = jnp.take(embed, tokens, axis=0, mode="clip").astype(dt)
        cos, sin = rope_angles(cfg, positions, dt)

        layer_cls = DecoderLayer
        if self.remat:
            # Recompute each layer's activations in the backward pass; a policy name from
            # jax.checkpoint_policies (e.g. "dots_with_no_batch_dims_saveable") keeps some.
            policy = (getattr(jax.checkpoint_policies, self.remat)
                      if isinstance(self.remat, str) else None)
            layer_cls = nn.remat(DecoderLayer, prevent_cse=False, policy=policy)
        layers = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                         length=cfg.num_layers)(cfg, self.param_dtype, name="layers")
        carry = x if cache_kv is None else (x, cache_kv[0], cache_kv[1])
        carry, _ = layers(carry, jnp.arange(cfg.num_layers, dtype=jnp.int32), cos, sin, allowed,
                          write_index)
        x = carry if cache_kv is None else carry[0]
        final_scale = self.param("final_norm", nn.initializers.ones, (cfg.hidden_size,),
                                 self.param_dtype)
        hidden = rms_norm(x, final_scale, cfg.rms_norm_eps)
        return hidden if cache_kv is None else (hidden, (carry[1], carry[2]))


# ---------------------------------------------------------------------------------------------
# Public functional API.


def init_params(cfg: ModelConfig, rng, dtype=jnp.float32) -> dict:
    """Random parameters (normal(0.02) kernels and embeddings, unit norms, zero biases).

    Args:
      cfg: the model.
      rng: a PRNG key or an int seed.
      dtype: parameter storage dtype (float32 or bfloat16).
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    return _init_params_jit(cfg, jnp.dtype(dtype), rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params_jit(cfg, dtype, rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    allowed = jnp.ones((1, 1, 1), bool)
    return Decoder(cfg, dtype).init(rng, tokens, tokens, allowed)["params"]


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(lambda: _init_params_jit(cfg, jnp.dtype(dtype), jax.random.key(0)))


def default_positions(attention_mask: Array) -> Array:
    """Positions for a left-padded batch: ``cumsum(mask) − 1`` clipped at 0, int32 [B, T]."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def _check_tokens(tokens) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")


def apply_hidden(cfg: ModelConfig, params: dict, tokens: Array, attention_mask: Array | None = None,
                 positions: Array | None = None, *, segment_ids: Array | None = None,
                 remat: bool | str = False) -> Array:
    """Final-normed hidden states [B, T, D] in the compute dtype.

    Args:
      cfg, params: the model.
      tokens: [B, T] int token ids (pad positions may hold any id).
      attention_mask: [B, T], 1 on real tokens, 0 on padding (left or right); default all ones.
        A query sees key s iff s ≤ t and ``attention_mask[b, s]``.
      positions: [B, T] RoPE positions; default ``cumsum(mask) − 1`` clipped at 0, so that a
        left-padded row numbers its first real token 0.
      segment_ids: [B, T] int, for rows that hold several sequences one after another (sequence
        packing): a query sees key s iff s ≤ t and both carry the same id; 0 marks padding.
        Replaces ``attention_mask``; ``positions`` must then restart at 0 in every segment.
      remat: recompute each layer in the backward pass (activation checkpointing): True for
        full recomputation, or the name of a ``jax.checkpoint_policies`` policy.
    """
    _check_tokens(tokens)
    batch, length = tokens.shape
    causal = jnp.tril(jnp.ones((length, length), bool))
    if segment_ids is not None:
        if attention_mask is not None or positions is None:
            raise ValueError("segment_ids replaces attention_mask and needs explicit positions")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = causal[None, :, :] & same & (segment_ids > 0)[:, None, :]
        model = Decoder(cfg, remat=remat)
        return model.apply({"params": params}, tokens, positions, allowed)
    if attention_mask is None:
        attention_mask = jnp.ones((batch, length), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
        positions = default_positions(attention_mask)
    allowed = causal[None, :, :] & attention_mask[:, None, :]
    model = Decoder(cfg, remat=remat)
    return model.apply({"params": params}, tokens, positions, allowed)


def hidden_to_logits(cfg: ModelConfig, params: dict, hidden: Array) -> Array:
    """Output projection in float32: ``hidden @ W_out`` with ``W_out = embedᵀ`` when tied.

    Args:
      hidden: [..., D] final-normed hidden states.

    Returns: [..., V] float32 logits.
    """
    dt = jnp.dtype(cfg.dtype)
    lead = hidden.shape[:-1]
    hidden = hidden.astype(dt).reshape(-1, hidden.shape[-1])   # a 2-D matmul (see ``dense``)
    if cfg.tie_word_embeddings:
        logits = jnp.einsum("nd,vd->nv", hidden, params["embed"].astype(dt),
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("nd,dv->nv", hidden, params["lm_head"].astype(dt),
                            preferred_element_type=jnp.float32)
    return logits.reshape(lead + logits.shape[-1:])


def apply(cfg: ModelConfig, params: dict, tokens: Array, attention_mask: Array | None = None,
          positions: Array | None = None, *, remat: bool | str = False) -> Array:
    """Logits [B, T, V] float32 of a (possibly left-padded) batch; see ``apply_hidden``."""
    hidden = apply_hidden(cfg, params, tokens, attention_mask, positions, remat=remat)
    return hidden_to_logits(cfg, params, hidden)


def log_softmax(logits: Array) -> Array:
    """float32 log-softmax over the vocabulary."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


# ---------------------------------------------------------------------------------------------
# KV cache.


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens.

    Returns:
      ``{"k": [L, B, S, KV, hd], "v": [L, B, S, KV, hd]`` (``dtype``, default the compute dtype),
      ``"mask": [B, S] bool`` (all False), ``"index": int32 []`` (0)}.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "mask": jnp.zeros((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def apply_cached(cfg: ModelConfig, params: dict, tokens: Array, cache: dict,
                 positions: Array | None = None, token_mask: Array | None = None
                 ) -> tuple[Array, dict]:
    """Runs T new tokens against the cache: prefill (T = prompt length) or decode (T = 1).

    The tokens are written to slots ``[index, index + T)`` of every row; query t (slot
    ``index + t``) attends to every earlier-or-equal slot s with ``mask[b, s]`` (after the
    write). Left-padded prompts are prefilled with ``token_mask = 0`` on their pads, which keeps
    those slots invisible forever.

    The caller must keep ``index + T ≤ S``: past the end, ``dynamic_update_slice`` clamps the
    write position (it cannot raise under jit) and the cache would be corrupted.

    Args:
      cfg, params: the model.
      tokens: [B, T] int.
      cache: from ``init_cache`` or a previous call.
      positions: [B, T] RoPE positions; default continues each row's count of real tokens:
        ``Σ_s mask[b, s] + cumsum(token_mask) − 1`` (clipped at 0).
      token_mask: [B, T], 1 on real tokens; default all ones.

    Returns:
      (logits [B, T, V] float32, the updated cache with ``index + T``).
    """
    _check_tokens(tokens)
    batch, length = tokens.shape
    max_len = cache["mask"].shape[1]
    if cache["mask"].shape[0] != batch:
        raise ValueError(f"cache holds {cache['mask'].shape[0]} rows, tokens have {batch}")
    if length > max_len:
        raise ValueError(f"{length} new tokens do not fit a cache of {max_len} slots")
    if token_mask is None:
        token_mask = jnp.ones((batch, length), bool)
    token_mask = token_mask.astype(bool)
    index = cache["index"]
    if positions is None:
        seen = jnp.sum(cache["mask"], axis=1, dtype=jnp.int32)
        positions = jnp.maximum(
            seen[:, None] + jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1, 0)
    mask = lax.dynamic_update_slice(cache["mask"], token_mask, (0, index))
    query_slots = index + jnp.arange(length, dtype=jnp.int32)
    causal = jnp.arange(max_len, dtype=jnp.int32)[None, :] <= query_slots[:, None]
    allowed = causal[None, :, :] & mask[:, None, :]
    hidden, (k, v) = Decoder(cfg).apply({"params": params}, tokens, positions, allowed,
                                        (cache["k"], cache["v"]), index)
    logits = hidden_to_logits(cfg, params, hidden)
    return logits, {"k": k, "v": v, "mask": mask, "index": index + length}
