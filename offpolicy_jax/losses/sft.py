"""Negative log-likelihood on selected samples: SFT, rejection-sampling fine-tuning, expert
iteration (ReST-EM, B-STaR, BFS-Prover), TOPR's positives."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offpolicy_jax.losses import common


def nll(logp, mask, *, weights=None, agg: str = "token-mean", max_len: int | None = None
        ) -> tuple[jax.Array, dict]:
    """(Weighted) negative log-likelihood of the response tokens.

        loss = agg_{i,t} −w_i · logp_θ[i,t]

    With binary weights this is ReST-EM's M-step, ``max E_{(x,y)∈D}[r(x, y) log p_θ(y|x)]``
    (Singh et al. 2024, https://arxiv.org/abs/2312.06585); with ``w = 1`` plain SFT.

    Args:
      logp: [B, T] log-probs of the target tokens (differentiated).
      mask: [B, T] 1 on the tokens to learn (the response, not the prompt).
      weights: optional [B] or [B, T] per-sample weights w (e.g. rewards), constant.
      agg, max_len: aggregation, see :func:`offpolicy_jax.losses.aggregate` (default token-mean).

    Returns: ``(loss, metrics)`` with ``nll``, ``perplexity`` (exp of the token-mean NLL, bounded to
    stay finite) and ``num_tokens``.
    """
    shape = common.check_token_arrays(logp=logp, mask=mask)
    mask = common.as_mask(mask)
    logp = common.masked_zero(logp, mask)
    token_nll = -logp
    if weights is not None:
        token_nll = token_nll * jax.lax.stop_gradient(common.per_token("weights", weights, shape))
    loss = common.aggregate(token_nll, mask, agg, max_len=max_len)
    token_mean_nll = common.masked_mean(-logp, mask)
    metrics = {
        "nll": loss,
        "perplexity": common.bounded_exp(token_mean_nll),
        "num_tokens": jnp.sum(mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
