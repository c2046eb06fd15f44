"""Per-token quantities computed from logits in one pass: sampled-token log-probs, ROVER's
vocabulary-mean log-prob, and the entropy (with its aggregated form as a loss-side term).

Memory: none of these materialises ``log_softmax(z)`` ([B, T, V]). Each needs one ``logsumexp``
over the vocabulary plus one more reduction (a gather, a mean, or Σ p·z), which XLA fuses with the
division by the temperature, so under ``jit`` peak memory is the logits themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common


def _check_logits(logits, tokens=None) -> None:
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {list(jnp.shape(logits))}")
    if tokens is not None and tuple(jnp.shape(tokens)) != tuple(jnp.shape(logits))[:2]:
        raise ValueError(f"tokens must be [B, T] = {list(jnp.shape(logits))[:2]} to match logits "
                         f"{list(jnp.shape(logits))}, got shape {list(jnp.shape(tokens))}")


def _scaled(logits, temperature: float) -> jax.Array:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = jnp.asarray(logits, jnp.float32)
    return logits if temperature == 1.0 else logits / temperature


def token_log_probs(logits, tokens, *, temperature: float = 1.0) -> jax.Array:
    """``log softmax(z / T)[y_t]`` of each sampled token. logits [B, T, V], tokens [B, T] -> [B, T].

    Divide by the sampling temperature so that the result matches the sampler's behaviour
    log-probs (otherwise importance ratios are biased).
    """
    _check_logits(logits, tokens)
    z = _scaled(logits, temperature)
    target = jnp.take_along_axis(z, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(z, axis=-1)


def token_log_probs_and_vocab_mean(logits, tokens, *, temperature: float = 1.0
                                  ) -> tuple[jax.Array, jax.Array]:
    """Sampled-token log-probs and the vocabulary-mean log-prob, sharing one ``logsumexp``.

        logp[b, t]       = z[b, t, y_t] / T − logsumexp(z[b, t] / T)
        vocab_mean[b, t] = (1/|V|) Σ_a log softmax(z[b, t] / T)_a
                         = mean(z[b, t] / T) − logsumexp(z[b, t] / T)

    ``vocab_mean`` is ROVER's M(s_t) (arXiv 2509.24981, the successor mean-Q
    Q̄(s) = ρ·(M_θ(s) − M_old(s))). |V| is the logits' last dimension, padded vocabulary rows
    included, as in the ROVER code.

    Args:
      logits: [B, T, V] logits; row t predicts token t.
      tokens: [B, T] int sampled tokens.
      temperature: sampling temperature T (> 0).

    Returns: ``(logp, vocab_mean)``, both [B, T] float32.
    """
    _check_logits(logits, tokens)
    z = _scaled(logits, temperature)
    log_normaliser = jax.nn.logsumexp(z, axis=-1)
    target = jnp.take_along_axis(z, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
    return target - log_normaliser, jnp.mean(z, axis=-1) - log_normaliser


def token_entropy(logits, *, temperature: float = 1.0) -> jax.Array:
    """Entropy of ``softmax(z / T)`` at every position: ``logsumexp(z) − Σ_a p_a z_a``.

    Vocabulary entries with logit −inf (masked-out tokens) have p = 0 and contribute 0.

    Args:
      logits: [B, T, V].
      temperature: T (> 0).

    Returns: [B, T] float32 (differentiable in the logits).
    """
    _check_logits(logits)
    z = _scaled(logits, temperature)
    log_normaliser = jax.nn.logsumexp(z, axis=-1)
    probs = jnp.exp(z - log_normaliser[..., None])
    finite_z = jnp.where(jnp.isfinite(z), z, 0.0)
    return log_normaliser - jnp.sum(probs * finite_z, axis=-1)


def entropy(logits, mask, *, temperature: float = 1.0, agg: str = "token-mean",
            max_len: int | None = None) -> tuple[jax.Array, dict]:
    """Aggregated policy entropy over the response tokens, H = agg_t H(softmax(z_t / T)).

    Returns the entropy itself (to be *maximised*): add an entropy bonus to a policy loss as
    ``loss − c · H`` (PPO, Schulman et al. 2017, https://arxiv.org/abs/1707.06347, Eq. 9).

    Args:
      logits: [B, T, V] logits of the response positions.
      mask: [B, T] response mask.
      temperature: T.
      agg, max_len: aggregation, see :func:`offpolicy_jax.losses.aggregate`.

    Returns: ``(entropy, {"entropy": entropy})``, scalar float32.
    """
    _check_logits(logits)
    common.check_token_arrays(mask=mask)
    if tuple(jnp.shape(mask)) != tuple(jnp.shape(logits))[:2]:
        raise ValueError(f"mask must be [B, T] = {list(jnp.shape(logits))[:2]} to match logits, "
                         f"got shape {list(jnp.shape(mask))}")
    value = common.aggregate(token_entropy(logits, temperature=temperature),
                             common.as_mask(mask), agg, max_len=max_len)
    return value, {"entropy": jax.lax.stop_gradient(value)}
