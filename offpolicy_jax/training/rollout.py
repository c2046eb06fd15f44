"""From sampled responses to training arrays, and the training-side log-probs of those responses.

Layout of one packed batch (N rows = prompts x group size):

    tokens  [N, P + R]   left-padded prompt (P = prompt bucket) | response, right-padded (R)
    attention_mask       1 on real prompt tokens and on response tokens up to the response length
    positions            0, 1, ... from the first real token of each row (left padding skipped)
    response_mask [N, R] 1 on generated tokens up to and including EOS (the losses' ``mask``)

The log-prob of response token ``j`` (at column ``P + j``) comes from the hidden state at column
``P + j - 1``, so only the last ``R`` hidden states are projected to the vocabulary; the prompt's
logits are never materialised.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from offpolicy_jax import losses, models


# The training forward's default activation-recomputation policy: keep the matmul outputs, recompute
# the elementwise ops (norms, RoPE, softmax, SiLU) in the backward pass. Cheap to recompute, and it
# spares storing and re-reading every layer's elementwise intermediates: on the CPU the tiny-arith
# train step runs ~30% faster with it than with no recomputation (measured: 454 -> 320 ms for
# 64 x 64 tokens), and on accelerators it bounds activation memory.
DEFAULT_REMAT = "dots_with_no_batch_dims_saveable"


def bucket_length(length: int, minimum: int = 8) -> int:
    """Smallest power of two >= ``length`` (and >= ``minimum``): few distinct shapes, few compiles."""
    bucket = minimum
    while bucket < length:
        bucket *= 2
    return bucket


@dataclasses.dataclass
class PackedBatch:
    """Host-side (numpy) arrays of a rollout batch, ready to be fed to the train step."""

    tokens: np.ndarray           # [N, P + R] int32
    attention_mask: np.ndarray   # [N, P + R] int32
    positions: np.ndarray        # [N, P + R] int32
    response_mask: np.ndarray    # [N, R] float32
    prompt_length: int           # P (the bucket), static

    @property
    def num_response_tokens(self) -> int:
        return self.response_mask.shape[1]

    def model_inputs(self) -> dict:
        return {"tokens": self.tokens, "attention_mask": self.attention_mask,
                "positions": self.positions, "mask": self.response_mask}


def response_bucket(longest: int, budget: int, parts: int = 4) -> int:
    """The response width R' a batch is trained at: ``longest`` rounded up to a multiple of
    ``ceil(budget / parts)``, at most ``budget``.

    Rows are sampled into a ``budget``-wide buffer (``--max_new_tokens``), but every token after
    a batch's longest response is padding in every row, and the forward passes over it cost as
    much as real tokens. Cutting them keeps the results (causal attention: no position reads a
    later one) and, with at most ``parts`` widths, bounds the number of compiled shapes; the
    padding left is under ``budget / parts`` positions past the longest row plus what shorter
    rows leave. Four parts: the embedded task's batches (longest 42-48 of 48) stay at one shape,
    so its runs compile nothing new; the long-tailed workload of ``benchmarks/`` (longest ~110 of
    256) trains at 128.
    """
    if not 0 < longest <= budget:
        raise ValueError(f"the longest response has {longest} tokens; need 0 < longest <= the "
                         f"response budget {budget}")
    quantum = -(-budget // parts)
    return min(budget, -(-longest // quantum) * quantum)


def pack_sequences(prompt_tokens: list[list[int]], response_tokens: np.ndarray,
                   response_lengths: np.ndarray, *, pad_id: int,
                   prompt_bucket: int | None = None) -> PackedBatch:
    """Packs ragged prompts and right-padded responses into one left/right-padded batch.

    Args:
      prompt_tokens: N token-id lists (one per row; repeat a prompt for each sample of its group).
      response_tokens: [N, R] int, padded after each row's length.
      response_lengths: [N] number of generated tokens per row (EOS included).
      pad_id: token id used for padding (masked out everywhere).
      prompt_bucket: P; defaults to ``bucket_length`` of the longest prompt.
    """
    response_tokens = np.asarray(response_tokens, np.int32)
    response_lengths = np.asarray(response_lengths, np.int32)
    num_rows, num_response = response_tokens.shape
    if len(prompt_tokens) != num_rows or response_lengths.shape != (num_rows,):
        raise ValueError(
            f"pack_sequences: {len(prompt_tokens)} prompts, response_tokens {response_tokens.shape}"
            f" and response_lengths {response_lengths.shape} must agree on N")
    longest = max(len(p) for p in prompt_tokens)
    prompt_bucket = prompt_bucket or bucket_length(longest)
    if longest > prompt_bucket:
        raise ValueError(f"a prompt has {longest} tokens, more than prompt_bucket={prompt_bucket}")
    tokens = np.full((num_rows, prompt_bucket + num_response), pad_id, np.int32)
    attention_mask = np.zeros_like(tokens)
    for row, prompt in enumerate(prompt_tokens):
        tokens[row, prompt_bucket - len(prompt):prompt_bucket] = prompt
        attention_mask[row, prompt_bucket - len(prompt):prompt_bucket] = 1
    response_mask = (np.arange(num_response)[None, :] < response_lengths[:, None])
    tokens[:, prompt_bucket:] = np.where(response_mask, response_tokens, pad_id)
    attention_mask[:, prompt_bucket:] = response_mask
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
    return PackedBatch(tokens=tokens, attention_mask=attention_mask, positions=positions,
                       response_mask=response_mask.astype(np.float32),
                       prompt_length=prompt_bucket)


def response_log_probs(cfg, params, tokens, attention_mask, positions, *, num_response: int,
                       temperature: float = 1.0, with_vocab_mean: bool = False,
                       with_entropy: bool = False, with_hidden: bool = False,
                       remat: bool | str = False) -> dict:
    """Per-token log-probs of the response under ``params``: ``log softmax(z / T)[y_t]``.

    Args:
      cfg, params: the policy.
      tokens, attention_mask, positions: [N, P + R] packed batch (see ``pack_sequences``).
      num_response: R (static).
      temperature: the sampling temperature T the behaviour log-probs were computed with (the
        trainer must divide by the same T, or importance ratios are biased); 0 (greedy) means 1.
      with_vocab_mean: also return ``vocab_mean`` = mean_a log softmax(z/T)_a (ROVER's M(s)).
      with_entropy: also return the per-token entropy of softmax(z/T).
      with_hidden: also return ``hidden`` [N, R, D], the final-normed hidden states that predict
        each response token (the states s_t a critic scores).
      remat: activation recomputation in the backward pass (``models.apply_hidden``); only
        matters under ``jax.grad``.

    Returns: dict with ``logp`` [N, R] float32 (and ``vocab_mean`` / ``entropy`` [N, R],
    ``hidden`` [N, R, D]).
    """
    hidden = models.apply_hidden(cfg, params, tokens, attention_mask=attention_mask,
                                 positions=positions, remat=remat)
    total = tokens.shape[1]
    # Column P + j - 1 predicts response token j.
    predicting = hidden[:, total - num_response - 1:total - 1]
    logits = models.hidden_to_logits(cfg, params, predicting)
    targets = tokens[:, total - num_response:]
    # Greedy rollouts (T = 0) are scored at T = 1, as the sampler documents.
    temperature = temperature or 1.0
    out = {}
    if with_vocab_mean:
        out["logp"], out["vocab_mean"] = losses.token_log_probs_and_vocab_mean(
            logits, targets, temperature=temperature)
    else:
        out["logp"] = losses.token_log_probs(logits, targets, temperature=temperature)
    if with_entropy:
        out["entropy"] = losses.token_entropy(logits, temperature=temperature)
    if with_hidden:
        out["hidden"] = predicting
    return out
