"""Batched autoregressive sampling over a KV cache, returning behaviour log-probs.

    out = generate(cfg, params, prompts, max_new_tokens=256, temperature=1.0,
                   eos_token_ids=(eos,), seed=0, num_samples=8)

How a call runs:

1. **Buckets.** The distinct prompts are left-padded to a power-of-two length ``P`` (>= 8) and
   their count to a power-of-two batch (a multiple of the mesh's data-parallel size); the
   response buffers to a power of two ``R >= max_new_tokens``. Shapes depend only on these
   buckets, so a training run compiles a handful of programs, not one per call.
2. **Prefill** (one jit): every prompt runs through the model once; the cache (``P + R`` slots)
   and the last-position logits are then repeated ``num_samples`` times along the batch
   (prompt-major rows: prompt 0 sample 0..n-1, prompt 1 ...), and the first token is drawn.
3. **Decode** (one jit, cache donated): a ``lax.while_loop`` of up to ``steps_per_dispatch``
   single-token steps -- forward the last token, draw the next -- that exits as soon as every row
   has finished (an EOS id, or the ``max_new_tokens`` budget). The host dispatches the next
   chunk before reading the previous chunk's "all finished" flag, so the device never waits on
   the host; a chunk dispatched after everything finished runs zero iterations.
4. **Compaction.** RL response lengths are long-tailed: most rows end early while a few run to
   the budget, and a static batch keeps computing the finished ones. When the rows still live
   after a chunk fit in half the batch (or less), the live rows -- their cache, state and PRNG
   keys -- are gathered into a power-of-two batch of that size (at least ``MIN_DECODE_ROWS``)
   and the finished rows' outputs are set aside, so decode work tracks the live rows. Each batch
   size compiles the decode loop once (the persistent compilation cache keeps it across runs).
   ``compact=False`` keeps the static batch; compaction is off on a mesh spanning processes.

Randomness: row ``r`` draws step ``t`` from ``fold_in(fold_in(key, r), t)``, so a row's sample
depends only on the seed, its row index and the step -- not on bucketing, padding or the mesh.
The two log-probs per token are defined in :mod:`offpolicy_jax.sampling.distribution`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from offpolicy_jax import distributed, models
from offpolicy_jax.sampling import decode, distribution

# Smallest prompt-length bucket: shorter prompts share one compiled prefill.
MIN_PROMPT_BUCKET = 8
# Smallest response-buffer bucket.
MIN_RESPONSE_BUCKET = 8
# Response slots of the first KV cache; it doubles (one copy) whenever the next dispatch could
# pass its end, up to the response bucket. Attention reads the whole cache every step, so this
# keeps early steps from reading slots that are still empty (about half of the attention traffic
# of a long generation) at the price of one extra compile per doubling.
FIRST_CACHE_WINDOW = 64
# Decode steps fused into one dispatch (one while_loop); the host checks for completion in
# between. Larger amortises dispatch and host round trips; the loop exits early once all rows
# are done, so a larger value wastes nothing but compile-time unrolling (none: it is a loop).
DEFAULT_STEPS_PER_DISPATCH = 16
# Smallest decode batch compaction goes down to: below it a step costs about the same (the
# weights are read once per step whatever the rows) while each new size is one more compile.
MIN_DECODE_ROWS = 8


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """What :func:`generate` returns; host numpy arrays, ``N = len(prompts) * num_samples``.

    Attributes:
      tokens: [N, max_new_tokens] int32 generated ids; after a row's end (``lengths``) they hold
        ``pad_token_id``.
      lengths: [N] int32 generated tokens per row, the EOS token included.
      logprobs: [N, max_new_tokens] float32, ``log_softmax(logits / T)`` of each sampled token
        (T = 1 when greedy) -- what the trainer's forward pass recomputes; 0 after the end.
      truncated_logprobs: [N, max_new_tokens] float32, the log-prob under the top-k / top-p
        renormalised distribution the token was actually drawn from (= ``logprobs`` without
        truncation, 0 for greedy); 0 after the end.
      prompt_index: [N] int32, which prompt each row continues (prompt-major order).
      num_decode_steps: single-token forward passes run after the prefill (the first token
        comes from the prefill logits, so a row of ``n`` tokens needs ``n - 1``).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    truncated_logprobs: np.ndarray
    prompt_index: np.ndarray
    num_decode_steps: int


# ---------------------------------------------------------------------------------------------
# Input checks and bucketing (host side).


def _power_of_two_at_least(value: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(value) - 1).bit_length())


def _check_prompts(prompts, vocab_size: int, context: int, max_new_tokens) -> list[list[int]]:
    """Validates the ragged prompts and the generation budget against the model."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) \
            and not isinstance(prompts, np.ndarray):
        raise ValueError("prompts must be a list of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate from")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompt {i} must be a flat list of integer token ids, got "
                             f"{type(prompt).__name__} of shape {ids.shape} dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if ids.min() < 0 or ids.max() >= vocab_size:
            bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
            raise ValueError(f"prompt {i} holds token id {bad}, outside the vocabulary "
                             f"[0, {vocab_size})")
        if ids.size > context:
            raise ValueError(f"prompt {i} has {ids.size} tokens, longer than the model's context "
                             f"of {context} (cfg.max_position_embeddings)")
        if ids.size + max_new_tokens > context:
            # The trainer re-runs prompt + response in one forward pass, so the whole sequence
            # must fit the context.
            raise ValueError(
                f"max_new_tokens={max_new_tokens} does not fit: prompt {i} has {ids.size} tokens "
                f"and the model's context is {context} (cfg.max_position_embeddings), so at most "
                f"{context - ids.size} new tokens fit")
        checked.append(ids.astype(np.int32).tolist())
    return checked


def _check_eos(eos_token_ids, vocab_size: int) -> tuple[int, ...]:
    if eos_token_ids is None:
        raise ValueError("eos_token_ids is required; pass () to always generate to the budget")
    if isinstance(eos_token_ids, (int, np.integer)):
        eos_token_ids = (eos_token_ids,)
    eos = tuple(sorted({int(e) for e in eos_token_ids}))
    bad = [e for e in eos if not 0 <= e < vocab_size]
    if bad:
        raise ValueError(f"eos_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
    return eos


def _base_key(seed) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key or a raw uint32[2] key."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        if seed.shape != ():
            raise ValueError(f"seed must be a single PRNG key, got key array of shape {seed.shape}")
        return seed
    raw = np.asarray(seed) if isinstance(seed, (jax.Array, np.ndarray)) else None
    if raw is not None and raw.dtype == np.uint32 and raw.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(raw))
    raise ValueError(f"seed must be an int or a JAX PRNG key, got {seed!r}")


def _left_pad(prompts: list[list[int]], batch: int, length: int):
    """[batch, length] tokens and bool mask; rows past ``len(prompts)`` are one-token dummies
    (a fully masked row would make attention's softmax undefined)."""
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = True
    mask[len(prompts):, -1] = True
    return tokens, mask


# ---------------------------------------------------------------------------------------------
# Sharding helpers.


def _batch_divisor(mesh) -> int:
    if mesh is None:
        return 1
    return math.prod(mesh.shape[axis] for axis in models.BATCH_AXES)


def _fit_spec(spec: P, shape, mesh) -> P:
    """Replicates dimensions that the named mesh axes do not divide (e.g. 2 KV heads, tensor=4)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fitted.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*fitted)


def _constrain(tree, specs, mesh):
    """``with_sharding_constraint`` of a pytree against a matching tree of specs (no-op without
    a mesh)."""
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda x, spec: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, _fit_spec(spec, x.shape, mesh))),
        tree, specs, is_leaf=lambda x: isinstance(x, P))


_BATCH = P(models.BATCH_AXES)


def _decode_cache_specs(cache) -> dict:
    """Per-layer cache (keys [B, KV, hd, S], values [B, KV, S, hd]): rows over data x fsdp, KV
    heads over tensor (as the attention weights' heads)."""
    layer_spec = P(models.BATCH_AXES, "tensor", None, None)
    return {"k": tuple(layer_spec for _ in cache["k"]), "v": tuple(layer_spec for _ in cache["v"]),
            "mask": _BATCH, "index": P()}


def _state_specs(state) -> dict:
    """Decode-state arrays are all batch-major except the scalars."""
    return {name: (_BATCH if value.ndim else P()) for name, value in state.items()}


# ---------------------------------------------------------------------------------------------
# Jitted prefill and decode.


def _record(state: dict, tokens, logprobs, truncated_logprobs, eos_ids: tuple[int, ...],
            pad_token_id: int) -> dict:
    """Writes one sampled column into the state and updates done-ness.

    A row that was already done writes ``pad_token_id`` and zero log-probs; a row finishes when
    it samples an EOS id or fills its budget (``max_new_tokens``).
    """
    active = ~state["done"]
    column = state["step"]
    tokens = jnp.where(active, tokens, pad_token_id)
    logprobs = jnp.where(active, logprobs, 0.0)
    truncated_logprobs = jnp.where(active, truncated_logprobs, 0.0)

    def write(buffer, values):
        return jax.lax.dynamic_update_slice(buffer, values[:, None].astype(buffer.dtype),
                                            (0, column))

    is_eos = jnp.zeros_like(active)
    for eos in eos_ids:
        is_eos = is_eos | (tokens == eos)
    done = state["done"] | (active & (is_eos | (column + 1 >= state["max_new_tokens"])))
    return {
        **state,
        "tokens": write(state["tokens"], tokens),
        "logprobs": write(state["logprobs"], logprobs),
        "truncated_logprobs": write(state["truncated_logprobs"], truncated_logprobs),
        "lengths": state["lengths"] + active.astype(jnp.int32),
        "done": done,
        "finished": jnp.all(done),
        "last_token": tokens,
        "step": column + 1,
    }


@functools.partial(jax.jit, static_argnames=(
    "cfg", "params_sampling", "num_samples", "response_bucket", "cache_window", "eos_ids",
    "pad_token_id", "mesh"))
def _prefill(cfg, split_params, prompt_tokens, prompt_mask, row_keys, row_valid,
             max_new_tokens, *, params_sampling, num_samples, response_bucket, cache_window,
             eos_ids, pad_token_id, mesh):
    """Prefills the distinct prompts, repeats the cache per sample, draws the first token.

    Args:
      split_params: ``decode.split_layer_params`` of the policy (shared with the decode steps).
      prompt_tokens, prompt_mask: [Bp, P] left-padded prompts (Bp = prompt batch bucket).
      row_keys: [Bp * num_samples] typed keys; row_valid: [Bp * num_samples] bool.
      max_new_tokens: int32 scalar (traced: the budget does not force a recompile).

    Returns:
      (cache with Bp * num_samples rows of P + cache_window slots, decode state with
      response buffers of response_bucket columns).
    """
    batch, prompt_len = prompt_tokens.shape
    last_logits, cache = decode.prefill(cfg, split_params, prompt_tokens, prompt_mask,
                                        prompt_len + cache_window)
    if num_samples > 1:
        cache = {"k": tuple(jnp.repeat(k, num_samples, axis=0) for k in cache["k"]),
                 "v": tuple(jnp.repeat(v, num_samples, axis=0) for v in cache["v"]),
                 "mask": jnp.repeat(cache["mask"], num_samples, axis=0),
                 "index": cache["index"]}
        last_logits = jnp.repeat(last_logits, num_samples, axis=0)
    cache = _constrain(cache, _decode_cache_specs(cache), mesh)
    rows = batch * num_samples
    prompt_lengths = jnp.repeat(jnp.sum(prompt_mask, axis=1, dtype=jnp.int32), num_samples)
    state = {
        "tokens": jnp.full((rows, response_bucket), pad_token_id, jnp.int32),
        "logprobs": jnp.zeros((rows, response_bucket), jnp.float32),
        "truncated_logprobs": jnp.zeros((rows, response_bucket), jnp.float32),
        "lengths": jnp.zeros((rows,), jnp.int32),
        "done": ~row_valid,
        "finished": jnp.zeros((), bool),
        "last_token": jnp.zeros((rows,), jnp.int32),
        "next_position": prompt_lengths,  # RoPE position of the first generated token
        "step": jnp.zeros((), jnp.int32),
        "num_forwards": jnp.zeros((), jnp.int32),
        "max_new_tokens": max_new_tokens,
        "keys": row_keys,
    }
    tokens, logprobs, truncated = distribution.sample_from_logits(
        last_logits, distribution.row_uniforms(row_keys, 0), params_sampling)
    state = _record(state, tokens, logprobs, truncated, eos_ids, pad_token_id)
    return cache, _constrain(state, _state_specs(state), mesh)


_split_layer_params = jax.jit(decode.split_layer_params, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("slots", "mesh"))
def _grow_cache(cache, *, slots, mesh):
    """Pads the per-layer cache to ``slots`` slots (new slots empty and masked).

    Not donated: the output is larger, so XLA could not reuse the input buffers anyway; the old
    cache is freed when the caller drops it."""
    extra = slots - cache["mask"].shape[1]
    pad_keys = ((0, 0), (0, 0), (0, 0), (0, extra))    # [B, KV, hd, S]
    pad_values = ((0, 0), (0, 0), (0, extra), (0, 0))  # [B, KV, S, hd]
    grown = {"k": tuple(jnp.pad(k, pad_keys) for k in cache["k"]),
             "v": tuple(jnp.pad(v, pad_values) for v in cache["v"]),
             "mask": jnp.pad(cache["mask"], ((0, 0), (0, extra))), "index": cache["index"]}
    return _constrain(grown, _decode_cache_specs(grown), mesh)


@functools.partial(jax.jit, donate_argnums=(2,), static_argnames=(
    "cfg", "params_sampling", "steps", "eos_ids", "pad_token_id", "mesh"))
def _decode(cfg, split_params, cache, state, *, params_sampling, steps, eos_ids, pad_token_id, mesh):
    """Up to ``steps`` single-token decode steps, stopping early once every row is done.

    Each step feeds the last sampled token at its row's next position, writes its key/value
    in place at ``cache["index"]`` and draws the next token from the new logits.
    """
    def keep_going(carry):
        _, state, taken = carry
        return (taken < steps) & ~state["finished"]

    rope = decode.rope_table(cfg, cache["mask"].shape[1])  # loop-invariant: computed once

    def step(carry):
        cache, state, taken = carry
        logits, cache = decode.decode_step(cfg, split_params, state["last_token"],
                                           state["next_position"], cache, rope)
        uniforms = distribution.row_uniforms(state["keys"], state["step"])
        tokens, logprobs, truncated = distribution.sample_from_logits(
            logits, uniforms, params_sampling)
        state = {**state, "next_position": state["next_position"] + 1,
                 "num_forwards": state["num_forwards"] + 1}
        state = _record(state, tokens, logprobs, truncated, eos_ids, pad_token_id)
        return cache, state, taken + 1

    cache, state, _ = jax.lax.while_loop(keep_going, step, (cache, state, jnp.zeros((), jnp.int32)))
    cache = _constrain(cache, _decode_cache_specs(cache), mesh)
    return cache, _constrain(state, _state_specs(state), mesh)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _compact(cache, state, keep, *, mesh):
    """The rows ``keep`` [B'] of the decode cache and state (B' < B): row-major arrays are
    gathered, scalars (index, step, counters, budget) kept."""
    def rows(x):
        return jnp.take(x, keep, axis=0) if x.ndim else x

    cache = {"k": tuple(rows(k) for k in cache["k"]), "v": tuple(rows(v) for v in cache["v"]),
             "mask": rows(cache["mask"]), "index": cache["index"]}
    state = {name: rows(value) for name, value in state.items()}
    return (_constrain(cache, _decode_cache_specs(cache), mesh),
            _constrain(state, _state_specs(state), mesh))


_OUTPUTS = ("tokens", "logprobs", "truncated_logprobs", "lengths")


def _compacted_rows(done: np.ndarray, divisor: int) -> int | None:
    """The decode batch for the rows not ``done`` [B]: the power of two (a multiple of the mesh's
    row divisor, at least ``MIN_DECODE_ROWS``) that holds them, or None when it would not be
    smaller than B."""
    live = int((~done).sum())
    rows = _power_of_two_at_least(live, MIN_DECODE_ROWS)
    rows = -(-rows // divisor) * divisor
    return rows if rows < done.shape[0] else None


# ---------------------------------------------------------------------------------------------
# Public entry point.


def generate(cfg: models.ModelConfig, params, prompts, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_ids, seed, num_samples: int = 1, mesh=None, progress: bool = False,
             pad_token_id: int = 0,
             steps_per_dispatch: int = DEFAULT_STEPS_PER_DISPATCH,
             compact: bool = True) -> SampleOutput:
    """Samples ``num_samples`` continuations of every prompt; returns tokens and log-probs.

    Args:
      cfg, params: the model (``models.load_hf_checkpoint`` / ``models.init_params``).
      prompts: ragged list of token-id lists (each non-empty, ids in ``[0, vocab_size)``).
      max_new_tokens: budget per row; ``len(prompt) + max_new_tokens`` must fit the context.
      temperature: T >= 0; 0 is greedy (argmax; ``logprobs`` then use T = 1).
      top_k: sample among the k most likely tokens (None: all).
      top_p: nucleus mass in (0, 1] (None: no nucleus truncation); applied after top-k.
      eos_token_ids: ids that end a row (the EOS token is kept and counted in ``lengths``);
        ``()`` generates exactly ``max_new_tokens`` per row.
      seed: int or JAX PRNG key (typed or raw uint32[2]); same seed, same samples.
      num_samples: continuations per prompt; rows are prompt-major and each prompt is
        prefilled once.
      mesh: optional ``("data", "fsdp", "tensor")`` mesh: rows are split over data x fsdp and
        the parameters placed per ``models.PARTITION_RULES``.
      progress: show a tqdm bar of decode steps (off by default: the RL loop stays quiet).
      pad_token_id: written into ``tokens`` after each row's end.
      steps_per_dispatch: decode steps fused into one jitted while-loop.
      compact: gather the live rows into a smaller decode batch once they fit in half of it
        (step 4 above); the samples are the same either way (a row's draws depend on its key
        and step only).

    Returns:
      A :class:`SampleOutput` of host (numpy) arrays.

    Raises:
      ValueError: naming the offending prompt or argument (empty prompt, prompt longer than the
        context, ``max_new_tokens`` that does not fit, EOS id outside the vocabulary, invalid
        temperature / top_k / top_p / num_samples).
    """
    vocab_size = cfg.vocab_size
    prompts = _check_prompts(prompts, vocab_size, cfg.max_position_embeddings, max_new_tokens)
    eos_ids = _check_eos(eos_token_ids, vocab_size)
    params_sampling = distribution.validate_sampling_params(temperature, top_k, top_p, vocab_size)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {vocab_size})")
    if steps_per_dispatch < 1:
        raise ValueError(f"steps_per_dispatch must be >= 1, got {steps_per_dispatch}")
    base_key = _base_key(seed)
    num_samples, max_new_tokens = int(num_samples), int(max_new_tokens)

    divisor = _batch_divisor(mesh)
    prompt_batch = _power_of_two_at_least(len(prompts))
    prompt_batch = -(-prompt_batch // divisor) * divisor
    prompt_bucket = _power_of_two_at_least(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
    response_bucket = _power_of_two_at_least(max_new_tokens, MIN_RESPONSE_BUCKET)
    rows = prompt_batch * num_samples
    num_rows_out = len(prompts) * num_samples

    prompt_tokens, prompt_mask = _left_pad(prompts, prompt_batch, prompt_bucket)
    row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, jnp.arange(rows))
    row_valid = np.arange(rows) < num_rows_out
    if mesh is not None:
        params = models.shard_params(params, mesh)
        batch_sharding = NamedSharding(mesh, _BATCH)
        # Not jax.device_put: on a mesh spanning processes each process must place only its
        # own devices' rows (every process passes the same prompts).
        prompt_tokens, prompt_mask, row_keys, row_valid = distributed.host_to_global(
            (prompt_tokens, prompt_mask, row_keys, row_valid), batch_sharding)

    statics = dict(params_sampling=params_sampling, eos_ids=eos_ids, pad_token_id=pad_token_id,
                   mesh=mesh)
    cache_window = min(response_bucket,
                       _power_of_two_at_least(max(FIRST_CACHE_WINDOW, steps_per_dispatch)))
    split_params = _split_layer_params(cfg, params)
    cache, state = _prefill(cfg, split_params, prompt_tokens, prompt_mask, row_keys, row_valid,
                            jnp.int32(max_new_tokens), num_samples=num_samples,
                            response_bucket=response_bucket, cache_window=cache_window,
                            **statics)
    # Every forward after the prefill yields one more token, so max_new_tokens - 1 at most.
    num_dispatches = -(-(max_new_tokens - 1) // steps_per_dispatch)
    bar = _progress_bar(max_new_tokens) if progress else None
    # Compaction reads every row's done flag on the host, which a mesh over several processes'
    # devices does not allow without a collective per chunk: there the batch stays static.
    compact = compact and (mesh is None or jax.process_count() == 1)
    row_ids = np.arange(rows)          # original row of each decode-batch row
    retired = []                       # (original rows, their final outputs) set aside
    previous = state
    for chunk in range(num_dispatches):
        # Forwards after this chunk <= (chunk + 1) * steps, each writing one response slot.
        needed = min((chunk + 1) * steps_per_dispatch, max_new_tokens - 1)
        if needed > cache_window:
            cache_window = min(response_bucket, _power_of_two_at_least(needed))
            cache = _grow_cache(cache, slots=prompt_bucket + cache_window, mesh=mesh)
        # Dispatch first, then wait on the previous chunk's flag: the device stays busy while
        # the host checks; once everything has finished, the chunk just queued runs 0 steps.
        cache, state = _decode(cfg, split_params, cache, state, steps=steps_per_dispatch,
                               **statics)
        previous_done = np.asarray(previous["done"]) if compact else None
        previous_finished = bool(previous["finished"])
        if bar is not None:
            bar.update(int(previous["step"]) - bar.n)
        if previous_finished:
            break
        previous = state
        smaller = _compacted_rows(previous_done, divisor) if compact else None
        if smaller is not None:
            # Rows done before the chunk just dispatched are done after it: live rows first
            # (in row order), then done rows up to the new batch; the rest retire with the
            # outputs the dispatched chunk leaves them (it writes nothing more into them).
            order = np.argsort(previous_done, kind="stable")
            keep, leave = order[:smaller], order[smaller:]
            retired.append((row_ids[leave], {name: state[name][leave] for name in _OUTPUTS}))
            cache, state = _compact(cache, state, jnp.asarray(keep), mesh=mesh)
            row_ids = row_ids[keep]
            previous = state
    # With a mesh over several processes' devices the rows are all-gathered: every process
    # receives every row (its callers, e.g. the RL loop, keep identical host data everywhere).
    host = distributed.to_host({name: state[name] for name in _OUTPUTS + ("num_forwards",)})
    if retired:
        host = _reassemble(host, row_ids, retired, rows)
    if bar is not None:
        bar.update(int(state["step"]) - bar.n)
        bar.close()
    return SampleOutput(
        tokens=np.asarray(host["tokens"][:num_rows_out, :max_new_tokens], np.int32),
        lengths=np.asarray(host["lengths"][:num_rows_out], np.int32),
        logprobs=np.asarray(host["logprobs"][:num_rows_out, :max_new_tokens], np.float32),
        truncated_logprobs=np.asarray(
            host["truncated_logprobs"][:num_rows_out, :max_new_tokens], np.float32),
        prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), num_samples),
        num_decode_steps=int(host["num_forwards"]),
    )


def _reassemble(host: dict, row_ids: np.ndarray, retired: list, rows: int) -> dict:
    """Outputs of all ``rows`` original rows in their order, from the last decode batch
    (``host``, rows ``row_ids``) and the rows set aside by each compaction."""
    full = {}
    for name in _OUTPUTS:
        values = np.asarray(host[name])
        full[name] = np.zeros((rows,) + values.shape[1:], values.dtype)
        full[name][row_ids] = values
        for ids, outputs in retired:
            full[name][ids] = np.asarray(jax.device_get(outputs[name]))
    full["num_forwards"] = host["num_forwards"]
    return full


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="decode", unit="tok")
