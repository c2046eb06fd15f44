"""Shared pieces of every loss: shape checks, masking, aggregation, masked statistics, KL.

Conventions (see ``shared/DESIGN.md``): token arrays are ``[B, T]``, per-sequence arrays ``[B]``,
logits ``[B, T, V]``; ``mask`` is 1 on generated tokens (up to and including EOS) and 0 on padding.
Every ratio is formed in log space. Masked positions may hold anything (padding garbage, ``-inf``):
:func:`masked_zero` replaces them by 0 *before* any arithmetic, so neither the value nor the
gradient can be poisoned by them (``0 * inf`` is NaN, and ``jnp.where`` alone does not protect the
gradient of the branch it discards).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AGGREGATIONS = (
    "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# |log-ratio| bound applied before ``exp`` wherever a ratio multiplies an advantage or enters a
# statistic. exp(20) ~ 4.9e8: far outside any trust region, yet finite in float32 even when summed
# over millions of tokens. verl applies the same bound to PPO and low-variance-KL log-ratios.
LOG_RATIO_BOUND = 20.0


# ----------------------------------------------------------------------------------------------
# Shape checks. Shapes are static under jit, so these raise at trace time with a readable message.
# ----------------------------------------------------------------------------------------------

def _shape(x) -> tuple:
    return tuple(jnp.shape(x))


def check_token_arrays(**arrays) -> tuple[int, int]:
    """Checks that every named array is ``[B, T]`` with one common shape; returns ``(B, T)``.

    Raises:
      ValueError: naming the offending argument and all shapes, if one is not 2-D or the shapes
        differ.
    """
    if not arrays:
        raise ValueError("check_token_arrays needs at least one array")
    shapes = {name: _shape(x) for name, x in arrays.items()}
    described = ", ".join(f"{name}{list(s)}" for name, s in shapes.items())
    for name, s in shapes.items():
        if len(s) != 2:
            raise ValueError(f"{name} must be a [B, T] token array, got shape {list(s)} "
                             f"(all inputs: {described})")
    first_name, first = next(iter(shapes.items()))
    for name, s in shapes.items():
        if s != first:
            raise ValueError(f"{name} has shape {list(s)} but {first_name} has {list(first)}; "
                             f"token arrays must share one [B, T] shape (all inputs: {described})")
    return first


def check_sequence_array(name: str, x, batch: int) -> None:
    """Checks that ``x`` is a per-sequence ``[B]`` array with ``B == batch``."""
    s = _shape(x)
    if s != (batch,):
        raise ValueError(f"{name} must be a per-sequence array of shape [{batch}] (one value per "
                         f"row of the [B, T] inputs), got shape {list(s)}")


def per_token(name: str, x, shape: tuple[int, int]) -> jax.Array:
    """Returns ``x`` as a float32 ``[B, T]`` array, accepting a scalar, ``[B]`` or ``[B, T]``.

    A ``[B]`` value (e.g. an outcome advantage) is broadcast to every token of its sequence; the
    broadcast is explicit because the project runs with ``jax_numpy_rank_promotion="raise"``.
    """
    x = jnp.asarray(x, jnp.float32)
    batch, length = shape
    if x.ndim == 0:
        return jnp.broadcast_to(x, shape)
    if x.shape == (batch,):
        return jnp.broadcast_to(x[:, None], shape)
    if x.shape == (batch, length):
        return x
    raise ValueError(f"{name} must be a scalar, [B]=[{batch}] or [B, T]=[{batch}, {length}] "
                     f"array, got shape {list(x.shape)}")


def per_sequence(name: str, x, batch: int) -> jax.Array:
    """Returns ``x`` as a float32 ``[B]`` array, accepting a scalar or a ``[B]`` array."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (batch,))
    check_sequence_array(name, x, batch)
    return x


def check_aggregation(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation agg={agg!r}; expected one of {AGGREGATIONS}")


# ----------------------------------------------------------------------------------------------
# Masking and masked statistics (all jittable: no Python branching on values).
# ----------------------------------------------------------------------------------------------

def as_mask(mask) -> jax.Array:
    """Float32 0/1 mask from a bool, int or float mask (any nonzero entry counts as 1)."""
    return (jnp.asarray(mask) != 0).astype(jnp.float32)


def masked_zero(x, mask) -> jax.Array:
    """``x`` as float32 with masked-out entries replaced by 0 (value *and* gradient safe)."""
    return jnp.where(mask > 0, jnp.asarray(x, jnp.float32), 0.0)


def fixed(x, mask) -> jax.Array:
    """``x`` held fixed: under stop-gradient, float32, masked-out entries 0.

    For everything a loss reads but must not differentiate: the log-probs of a stored or
    behaviour policy, old values, the vocabulary means of a target."""
    return masked_zero(jax.lax.stop_gradient(x), mask)


def token_advantages(advantages, mask, shape: tuple[int, int]) -> jax.Array:
    """Advantages as fixed per-token weights: a scalar, ``[B]`` or ``[B, T]`` input broadcast to
    ``shape`` (see :func:`per_token`), under stop-gradient, 0 on padding."""
    return fixed(per_token("advantages", advantages, shape), mask)


def safe_divide(numerator, denominator) -> jax.Array:
    """``numerator / denominator``, and 0 where the denominator is 0 (empty selections)."""
    denominator = jnp.asarray(denominator, jnp.float32)
    safe = jnp.where(denominator == 0, 1.0, denominator)
    return jnp.where(denominator == 0, 0.0, numerator / safe)


def masked_sum(x, mask, axis=None) -> jax.Array:
    return jnp.sum(masked_zero(x, mask), axis=axis)


def masked_mean(x, mask, axis=None) -> jax.Array:
    """Mean of ``x`` over entries where ``mask`` is 1; 0 for an empty selection."""
    mask = jnp.asarray(mask, jnp.float32)
    return safe_divide(masked_sum(x, mask, axis=axis), jnp.sum(mask, axis=axis))


def masked_max(x, mask) -> jax.Array:
    """Max of ``x`` over masked-in entries; 0 for an empty selection."""
    x = jnp.asarray(x, jnp.float32)
    best = jnp.max(jnp.where(mask > 0, x, -jnp.inf))
    return jnp.where(jnp.any(mask > 0), best, 0.0)


def masked_min(x, mask) -> jax.Array:
    """Min of ``x`` over masked-in entries; 0 for an empty selection."""
    return -masked_max(-jnp.asarray(x, jnp.float32), mask)


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Normalises ``x`` to zero mean (optional) and unit variance over the masked entries.

    Used for PPO's batch-whitened GAE advantages. The variance is the biased (population) one;
    masked-out entries come back as 0.

    Args:
      x: [B, T] (or any shape matching ``mask``).
      mask: same shape, 1 where the entry counts.
      shift_mean: if False the mean is added back (whitening of the scale only).
      eps: added to the variance before the square root.
    """
    mask = as_mask(mask)
    mean = masked_mean(x, mask)
    variance = masked_mean(jnp.square(masked_zero(x, mask) - mean), mask)
    whitened = (masked_zero(x, mask) - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return masked_zero(whitened, mask)


def bounded_exp(log_ratio, bound: float | None = LOG_RATIO_BOUND) -> jax.Array:
    """``exp(clip(log_ratio, -bound, bound))``; ``bound=None`` means no clipping."""
    if bound is None:
        return jnp.exp(log_ratio)
    return jnp.exp(jnp.clip(log_ratio, -bound, bound))


def ratio_stats(prefix: str, log_ratio, mask) -> dict:
    """Masked mean/min/max of ``exp(log_ratio)`` as metrics ``{prefix}_mean`` etc.

    The exponent is bounded by :data:`LOG_RATIO_BOUND` so the statistics stay finite; a reported
    max of ~4.85e8 therefore means "at least that".
    """
    ratio = bounded_exp(masked_zero(log_ratio, mask))
    return {
        f"{prefix}_mean": masked_mean(ratio, mask),
        f"{prefix}_min": masked_min(ratio, mask),
        f"{prefix}_max": masked_max(ratio, mask),
    }


# ----------------------------------------------------------------------------------------------
# Aggregation.
# ----------------------------------------------------------------------------------------------

def aggregate(token_losses, mask, agg: str = "token-mean", *, max_len: int | None = None
              ) -> jax.Array:
    """Reduces a per-token loss matrix to a scalar with one of the four named modes.

    With ``m`` the mask, ``ℓ`` the per-token loss, ``L_i = Σ_t m[i,t]`` and ``B'`` the number of
    sequences with at least one unmasked token:

    - ``token-mean``:              ``Σ_{i,t} m ℓ / Σ_{i,t} m``          (DAPO; every token equal)
    - ``seq-mean-token-mean``:     ``(1/B') Σ_i (1/L_i) Σ_t m ℓ``      (original GRPO, TOPR)
    - ``seq-mean-token-sum``:      ``(1/B') Σ_i Σ_t m ℓ``
    - ``seq-mean-token-sum-norm``: ``Σ_{i,t} m ℓ / (B' · max_len)``    (Dr. GRPO's constant)

    Rows with no unmasked token are not counted in ``B'``, so padding a batch with fully-masked
    rows leaves every mode unchanged. An all-masked batch gives 0.

    Args:
      token_losses: [B, T] per-token losses (masked entries are ignored, whatever their value).
      mask: [B, T] response mask.
      agg: one of :data:`AGGREGATIONS`.
      max_len: the constant ``L_max`` of ``seq-mean-token-sum-norm`` (Dr. GRPO, arXiv 2503.20783,
        uses the generation budget); defaults to ``T``. Ignored by the other modes.

    Returns: scalar float32.
    """
    check_aggregation(agg)
    check_token_arrays(token_losses=token_losses, mask=mask)
    mask = as_mask(mask)
    per_row_sum = masked_sum(token_losses, mask, axis=-1)          # [B]
    tokens_per_row = jnp.sum(mask, axis=-1)                        # [B]
    non_empty = (tokens_per_row > 0).astype(jnp.float32)           # [B]
    num_sequences = jnp.sum(non_empty)
    if agg == "token-mean":
        return safe_divide(jnp.sum(per_row_sum), jnp.sum(tokens_per_row))
    if agg == "seq-mean-token-mean":
        return safe_divide(jnp.sum(safe_divide(per_row_sum, tokens_per_row)), num_sequences)
    if agg == "seq-mean-token-sum":
        return safe_divide(jnp.sum(per_row_sum), num_sequences)
    length = token_losses.shape[-1] if max_len is None else max_len
    if length <= 0:
        raise ValueError(f"max_len must be positive for seq-mean-token-sum-norm, got {max_len}")
    return safe_divide(jnp.sum(per_row_sum), num_sequences * float(length))


def sequence_sum(token_values, mask) -> jax.Array:
    """``Σ_t m[i,t] x[i,t]`` per sequence, e.g. the sequence log-prob log π(y|x). [B, T] -> [B]."""
    return masked_sum(token_values, as_mask(mask), axis=-1)


# ----------------------------------------------------------------------------------------------
# KL estimators (J. Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html).
# With samples a ~ π_θ and u = log π_ref(a) − log π_θ(a), each is a per-token estimate of
# KL(π_θ ‖ π_ref).
# ----------------------------------------------------------------------------------------------

def kl_k1(logp, ref_logp) -> jax.Array:
    """k1 = −u = log π_θ − log π_ref: unbiased, high variance, can be negative. [B, T] -> [B, T]."""
    return jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)


def kl_k2(logp, ref_logp) -> jax.Array:
    """k2 = u²/2: biased, low variance, always ≥ 0. [B, T] -> [B, T]."""
    return 0.5 * jnp.square(kl_k1(logp, ref_logp))


def kl_k3(logp, ref_logp, *, clamp: float | None = None,
          log_ratio_bound: float | None = LOG_RATIO_BOUND) -> jax.Array:
    """k3 = exp(u) − u − 1 = π_ref/π_θ − log(π_ref/π_θ) − 1: unbiased, low variance, ≥ 0.

    This is the per-token KL penalty of GRPO (DeepSeekMath, arXiv 2402.03300, Eq. 4) and verl's
    ``low_var_kl``.

    Args:
      logp, ref_logp: [B, T] log-probs of the sampled tokens under π_θ and π_ref.
      clamp: if set, the estimate is clipped to ``[-clamp, clamp]`` — verl's ``low_var_kl`` uses 10.
        Default None (the paper's unclamped estimator).
      log_ratio_bound: ``u`` is clipped to ``[-bound, bound]`` before the exponential so the value
        stays finite for extreme log-ratios (verl uses 20); None disables it. Exact for
        |u| ≤ bound.
    """
    u = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    if log_ratio_bound is not None:
        u = jnp.clip(u, -log_ratio_bound, log_ratio_bound)
    # expm1 keeps precision for small |u|, where exp(u) − 1 ≈ u and the estimate is ~u²/2.
    estimate = jnp.expm1(u) - u
    if clamp is not None:
        estimate = jnp.clip(estimate, -clamp, clamp)
    return estimate


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp, ref_logp, estimator: str = "k3", *, clamp: float | None = None) -> jax.Array:
    """Per-token KL(π_θ ‖ π_ref) estimate with the named estimator ("k1", "k2" or "k3").

    ``clamp`` (only for k3) clips the estimate to ``[-clamp, clamp]`` like verl's ``low_var_kl``.
    Returns [B, T].
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of "
                         f"{sorted(KL_ESTIMATORS)}")
    if estimator == "k3":
        return kl_k3(logp, ref_logp, clamp=clamp)
    if clamp is not None:
        raise ValueError(f"clamp is only defined for the k3 estimator, got estimator={estimator!r}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)
