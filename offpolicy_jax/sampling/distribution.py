"""The next-token sampling distribution: temperature, top-k, top-p, and the two log-probs.

Given next-token logits ``z`` (one row per sequence, ``V`` entries) the sampler draws from

    p_T(v)   = softmax(z / T)(v)                                  (temperature T > 0)
    keep     = top-k set of z  ∩  top-p (nucleus) set of the top-k-renormalised p_T
    q(v)     = p_T(v) [v in keep] / sum_{u in keep} p_T(u)        (the truncated distribution)

and returns, for the sampled token ``v``, two log-probs:

* ``logprob = log p_T(v) = log_softmax(z / T)(v)`` -- what the trainer recomputes from the same
  sequence with ``models.apply`` (it has no notion of top-k / top-p). This is the behaviour
  log-prob the off-policy losses store. With truncation it is *not* the log-prob of the
  distribution the token was really drawn from.
* ``truncated_logprob = log q(v)`` -- the log-prob under the distribution actually sampled from
  (>= ``logprob``; equal when nothing is truncated). Use it when an importance ratio must be
  exact with respect to the sampling distribution.

Greedy decoding (``T = 0``) picks ``argmax z``; its ``logprob`` is ``log_softmax(z)(v)`` (i.e.
temperature 1, the model's own distribution) and its ``truncated_logprob`` is 0 (the sampling
distribution is a point mass).

The order of the filters follows Hugging Face ``generate``: temperature, then top-k, then top-p
on the distribution renormalised over the top-k set. Ties are kept together: every token whose
logit equals the k-th largest stays in the top-k set, and the nucleus is defined by a probability
threshold, so equal-probability tokens are either all kept or all dropped.

Top-p (nucleus sampling, Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration",
https://arxiv.org/abs/1904.09751): keep the smallest set of most-probable tokens whose mass
reaches ``top_p``. Written per token: keep ``v`` iff the mass of the tokens strictly more probable
than ``v`` is below ``top_p``. That set is ``{v : p(v) >= t*}`` for a threshold ``t*``, which
:func:`top_p_keep_mask` finds by bisection on the bit pattern of ``t*`` (positive float32 values
order like their int32 bit patterns), i.e. exactly, with 32 passes over the vocabulary instead of
a full sort (sorting ``[B, V]`` each decode step is slow on CPU).
"""

import dataclasses

import jax
import jax.numpy as jnp

# Bisection steps for a top-k or top-p threshold: positive float32 bit patterns lie in [0, 2**31), so
# 32 halvings of that integer interval pin the threshold down to a single float32 value.
_THRESHOLD_BISECTION_STEPS = 32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) description of the sampling distribution.

    Attributes:
      temperature: T >= 0; 0 means greedy (argmax).
      top_k: keep the k largest logits (ties at the k-th value included); None = no top-k.
      top_p: nucleus mass in (0, 1]; None or 1.0 = no top-p.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def truncates(self) -> bool:
        """Whether sampling uses a truncated distribution (top-k and/or top-p active)."""
        return not self.greedy and (self.top_k is not None or self.top_p is not None)


def validate_sampling_params(temperature, top_k, top_p, vocab_size: int) -> SamplingParams:
    """Checks the user's sampling arguments and returns the canonical :class:`SamplingParams`.

    ``top_k >= vocab_size`` and ``top_p == 1`` are dropped (they truncate nothing), so they do not
    cost a compile of their own.
    """
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}") from None
    if not temperature >= 0.0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_k >= vocab_size:
            top_k = None
    if top_p is not None:
        try:
            top_p = float(top_p)
        except (TypeError, ValueError):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}") from None
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (nucleus mass) or None, got {top_p}")
        if top_p == 1.0:
            top_p = None
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)

def _float_bits(values: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)


def _smallest_passing_threshold(predicate, upper_bits: jax.Array) -> jax.Array:
    """Smallest non-negative float32 ``t`` (per row) with ``predicate(t)`` True, by bisection.

    Non-negative float32 values (including +inf) order exactly like their int32 bit patterns, so
    bisecting the integer interval ``(-1, upper_bits]`` finds the exact float32 threshold in 32
    steps, each one elementwise pass over the row.

    Args:
      predicate: maps thresholds [B, 1] float32 to [B] bool; must be monotone (False below some
        threshold, True from it on) and True at ``upper_bits``.
      upper_bits: [B] int32 bit patterns of a threshold where the predicate holds.

    Returns:
      [B, 1] float32 thresholds.
    """
    def as_float(bits):
        return jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]

    def bisect(_, bounds):
        # Invariant: the predicate is False at `low` (or low = -1) and True at `high`.
        low, high = bounds
        middle = low + (high - low) // 2
        ok = predicate(as_float(middle))
        return jnp.where(ok, low, middle), jnp.where(ok, middle, high)

    low = jnp.full_like(upper_bits, -1)
    _, high = jax.lax.fori_loop(0, _THRESHOLD_BISECTION_STEPS, bisect, (low, upper_bits))
    return as_float(high)


def top_k_keep_mask(shifted_logits: jax.Array, k: int) -> jax.Array:
    """Tokens whose logit is at least the k-th largest of their row (ties kept).

    ``jax.lax.top_k`` takes ~70 ms on a [32, 16384] array on CPU, so the k-th largest value is
    found by bisection instead: with ``d = -shifted_logits >= 0`` (distance below the row max),
    keep ``d <= t*`` for the smallest ``t*`` such that at least ``k`` tokens satisfy it.

    Args:
      shifted_logits: [B, V] float32 logits minus their row max (all <= 0; -inf allowed).
      k: 1 <= k <= V, static.

    Returns:
      [B, V] bool.
    """
    below_max = -shifted_logits
    threshold = _smallest_passing_threshold(
        lambda t: jnp.sum(below_max <= t, axis=-1, dtype=jnp.int32) >= k,
        _float_bits(jnp.max(below_max, axis=-1)))
    return below_max <= threshold


def top_p_keep_mask(weights: jax.Array, top_p: float) -> jax.Array:
    """The nucleus: keep ``v`` iff the mass of tokens strictly more probable than ``v`` < top_p.

    The kept set is ``{v : w[v] >= t*}`` with ``t*`` the smallest float32 for which
    ``sum_{u: w[u] > t*} w[u] < top_p * sum_u w[u]``; that predicate is monotone in ``t`` and true
    at the row maximum, so at least the most probable token is always kept.

    Args:
      weights: [B, V] non-negative float32 unnormalised probabilities (0 = already dropped,
        e.g. by top-k; the nucleus is then taken on the renormalised remainder).
      top_p: nucleus mass in (0, 1].

    Returns:
      [B, V] bool, False wherever ``weights`` is 0.
    """
    weights = weights.astype(jnp.float32)
    mass_limit = top_p * jnp.sum(weights, axis=-1)  # [B]
    threshold = _smallest_passing_threshold(
        lambda t: jnp.sum(jnp.where(weights > t, weights, 0.0), axis=-1) < mass_limit,
        _float_bits(jnp.max(weights, axis=-1)))
    return (weights >= threshold) & (weights > 0)


def _first_true(condition: jax.Array, fallback: jax.Array) -> jax.Array:
    """Index of the first True along the last axis of [B, n]; ``fallback`` [B] where none is.

    A min over ``where(condition, index, n)``: ``jnp.argmax`` lowers to a variadic reduce that is
    several times slower on CPU.
    """
    n = condition.shape[-1]
    index = jax.lax.broadcasted_iota(jnp.int32, condition.shape, condition.ndim - 1)
    first = jnp.min(jnp.where(condition, index, n), axis=-1)
    return jnp.where(first < n, first, fallback)


def _last_true(condition: jax.Array) -> jax.Array:
    """Index of the last True along the last axis of [B, n] (-1 where none is)."""
    index = jax.lax.broadcasted_iota(jnp.int32, condition.shape, condition.ndim - 1)
    return jnp.max(jnp.where(condition, index, -1), axis=-1)


def _inclusive_cumsum(values: jax.Array) -> jax.Array:
    """Cumulative sum along the last axis of [B, n] as one matmul with an upper-triangular 0/1
    matrix: deterministic, and much faster on CPU than XLA's generic scan for n of ~100-1000."""
    n = values.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), values.dtype))  # upper[i, j] = 1 iff i <= j
    return jnp.dot(values, upper, precision=jax.lax.Precision.HIGHEST)


def _pick_by_mass(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Inverse-CDF choice of one index per row of non-negative ``weights`` [B, n].

    Returns the first index ``j`` with ``weights[j] > 0`` and ``cumsum(weights)[j] > u * total``.
    Requiring ``weights[j] > 0`` means a zero-weight (truncated) entry is never chosen, even when
    float rounding pushes ``u * total`` past the last cumulative sum (then the last positive
    entry is returned).
    """
    cumulative = _inclusive_cumsum(weights)
    target = uniform[:, None] * cumulative[:, -1:]
    positive = weights > 0
    return _first_true(positive & (cumulative > target), _last_true(positive))


def sample_categorical(weights: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Exact categorical draw from non-negative unnormalised weights, two uniforms per row.

    The vocabulary is cut into ``n_blocks`` blocks of ``block`` entries (``block ~ sqrt(V)``): a
    block is drawn in proportion to its mass with ``uniforms[:, 0]``, then a token inside it in
    proportion to its weight with ``uniforms[:, 1]``. By the chain rule this is a draw from
    ``weights / sum(weights)``, using 2 random numbers per row instead of the ``V`` Gumbel
    variates of ``jax.random.categorical`` (generating those on CPU took about as long as the
    whole model step). Zero-weight entries are never drawn.

    Args:
      weights: [B, V] float32 >= 0, at least one positive entry per row.
      uniforms: [B, 2] float32 in [0, 1).

    Returns:
      [B] int32 token ids.
    """
    batch, vocab = weights.shape
    block = 1 << max(4, (max(vocab, 2) - 1).bit_length() // 2)  # a power of two near sqrt(V)
    n_blocks = -(-vocab // block)
    weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - vocab)))
    weights = weights.reshape(batch, n_blocks, block)
    chosen_block = _pick_by_mass(jnp.sum(weights, axis=-1), uniforms[:, 0])  # [B]
    block_weights = jnp.take_along_axis(weights, chosen_block[:, None, None], axis=1)[:, 0]
    within_block = _pick_by_mass(block_weights, uniforms[:, 1])  # [B]
    return chosen_block * block + within_block


def row_uniforms(keys: jax.Array, step) -> jax.Array:
    """[B, 2] uniforms for decode step ``step`` from per-row typed keys [B].

    Each row uses ``fold_in(key_row, step)``, so a row's draws depend only on its own key and the
    step, not on the batch (bucket, padding, mesh) it happens to be decoded in.
    """
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, step), (2,)))(keys)


def _gather(values: jax.Array, tokens: jax.Array) -> jax.Array:
    """values[b, tokens[b]] for [B, V] values and [B] tokens."""
    return jnp.take_along_axis(values, tokens[:, None], axis=-1)[:, 0]


def _shifted_scaled_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """``s = z / T - max(z / T)`` in float32 (T = 1 when greedy); the row max of ``s`` is 0."""
    scaled = logits.astype(jnp.float32)
    if not params.greedy and params.temperature != 1.0:
        scaled = scaled / params.temperature
    return scaled - jnp.max(scaled, axis=-1, keepdims=True)


def _truncate(shifted: jax.Array, weights: jax.Array, params: SamplingParams) -> jax.Array:
    """Zeroes the weights of tokens outside the top-k set, then outside the nucleus."""
    if params.top_k is not None:
        weights = jnp.where(top_k_keep_mask(shifted, params.top_k), weights, 0.0)
    if params.top_p is not None:
        weights = jnp.where(top_p_keep_mask(weights, params.top_p), weights, 0.0)
    return weights


def sample_from_logits(logits: jax.Array, uniforms: jax.Array, params: SamplingParams):
    """Draws one token per row and returns its two log-probs.

    One ``exp`` pass serves both log-probs and the draw: with ``s = z / T - max(z / T)`` and
    ``w = exp(s)``, ``log p_T(v) = s[v] - log sum(w)`` and ``log q(v) = s[v] - log sum_keep(w)``.

    Args:
      logits: [B, V] next-token logits (any float dtype; computed in float32).
      uniforms: [B, 2] float32 in [0, 1) (see :func:`row_uniforms`); unused when greedy.
      params: the sampling distribution (static).

    Returns:
      tokens [B] int32; logprobs [B] float32 = log_softmax(logits / T)[token] (T = 1 when
      greedy); truncated_logprobs [B] float32 = log q(token) (0 when greedy).
    """
    shifted = _shifted_scaled_logits(logits, params)  # [B, V]
    weights = jnp.exp(shifted)
    log_normaliser = jnp.log(jnp.sum(weights, axis=-1))  # [B]
    if params.greedy:
        tokens = _first_true(shifted == 0.0, jnp.zeros(shifted.shape[:1], jnp.int32))
        logprobs = -log_normaliser  # s[argmax] = 0
        return tokens, logprobs, jnp.zeros_like(logprobs)
    weights = _truncate(shifted, weights, params)
    tokens = sample_categorical(weights, uniforms)
    chosen = _gather(shifted, tokens)
    logprobs = chosen - log_normaliser
    if params.truncates:
        truncated_logprobs = chosen - jnp.log(jnp.sum(weights, axis=-1))
    else:
        truncated_logprobs = logprobs
    return tokens, logprobs, truncated_logprobs


def sampling_log_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The whole sampling distribution ``log q`` as [B, V] float32 (-inf on dropped tokens).

    A reference for tests and analysis (the sampler never materialises it). Greedy gives a point
    mass on the first maximum.
    """
    shifted = _shifted_scaled_logits(logits, params)
    if params.greedy:
        first = _first_true(shifted == 0.0, jnp.zeros(shifted.shape[:1], jnp.int32))
        vocab_index = jax.lax.broadcasted_iota(jnp.int32, shifted.shape, 1)
        return jnp.where(vocab_index == first[:, None], 0.0, -jnp.inf)
    weights = _truncate(shifted, jnp.exp(shifted), params)
    return jnp.log(weights) - jnp.log(jnp.sum(weights, axis=-1, keepdims=True))
