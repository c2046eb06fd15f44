"""From sampled responses to training arrays, and the training-side log-probs of those responses.

Layout of one packed batch (N rows = prompts x group size):

    tokens  [N, P + R]   left-padded prompt (P = prompt bucket) | response, right-padded (R)
    attention_mask       1 on real prompt tokens and on response tokens up to the response length
    positions            0, 1, ... from the first real token of each row (left padding skipped)
    response_mask [N, R] 1 on generated tokens up to and including EOS (the losses' ``mask``)

The log-prob of response token ``j`` (at column ``P + j``) comes from the hidden state at column
``P + j - 1``, so only the last ``R`` hidden states are projected to the vocabulary; the prompt's
logits are never materialised.

The trainer's forward passes take the same rows segment-packed (``pack_segments``, on by default:
``--pack_sequences``): the sequences laid end to end in fewer rows, with a ``token_index`` that
reads every response token's outputs back into the ``[N, R]`` layout above, so the losses never
see the difference (``policy_outputs`` takes either layout).
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
    targets = tokens[:, total - num_response:]
    return _token_outputs(cfg, params, predicting, targets, temperature=temperature,
                          with_vocab_mean=with_vocab_mean, with_entropy=with_entropy,
                          with_hidden=with_hidden)


def _token_outputs(cfg, params, predicting, targets, *, temperature, with_vocab_mean,
                   with_entropy, with_hidden) -> dict:
    """``response_log_probs``' outputs from the hidden states ``predicting`` [..., D] that
    predict ``targets`` [...]."""
    logits = models.hidden_to_logits(cfg, params, predicting)
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


# ---------------------------------------------------------------------------------------------
# Sequence packing: the training forward over real tokens only.

# The model inputs of the padded layout, which ``pack_segments``' arrays replace.
PADDED_KEYS = ("tokens", "attention_mask", "positions")


def pack_segments(tokens: np.ndarray, attention_mask: np.ndarray, num_response: int, *,
                  num_microbatches: int = 1, num_shards: int = 1, parts: int = 8) -> dict:
    """Lays the sequences of a padded batch end to end in as few rows as fit (sequence packing).

    A padded batch holds N rows of width W = P + R, but with long-tailed response lengths most
    of it is padding that every forward and backward pass computes as if it were real: on the
    long-tailed workload of ``benchmarks/`` (mean response 46 of a 128-256 width) about 70-80 %.
    Here each row's real tokens (its prompt, then its response) become one *segment*, and the
    segments are placed first-fit-decreasing into rows of the same width W, so every sequence
    fits in one row and a packed row holds several; attention stays inside a segment
    (``models.apply_hidden(segment_ids=...)``) and positions restart at 0 in each, so every
    token sees exactly what it sees in the padded layout.

    The train step splits a batch into microbatches (row m of every M) and shards rows over the
    mesh's batch axes in contiguous blocks; so that both splits cut the packed rows where they
    cut the original rows, the rows of each (microbatch, shard) group are packed on their own,
    every group into the same number of rows, and the groups are interleaved like the rows.
    That number is rounded up to a multiple of 1/``parts`` of the group's row count, which
    keeps the number of distinct shapes (compiles) at most ``parts`` per width.

    Args:
      tokens, attention_mask: [N, P + R] padded batch (``pack_sequences``).
      num_response: R; the last R columns are the response.
      num_microbatches: M of the train step this batch feeds (1 for a plain forward).
      num_shards: S, the batch's split over the mesh's batch axes.
      parts: see above.

    Returns: dict of numpy arrays: ``segment_tokens``, ``segment_positions``, ``segment_ids``
    [M * S * Pr, W] (segment ids count from 1 in each row; 0 is padding), and ``token_index``
    [N, R] int32: where, in its group's packed rows read as one flat sequence of Pr * W
    positions, the hidden state that predicts each response token sits; Pr * W (one past the
    end) where there is no response token.
    """
    tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask).astype(bool)
    num_rows, width = tokens.shape
    groups = num_microbatches * num_shards
    if num_rows % groups:
        raise ValueError(f"pack_segments: {num_rows} rows do not split into {num_microbatches} "
                         f"microbatches x {num_shards} shards")
    group_rows = num_rows // groups
    prompt_width = width - num_response
    prompt_lengths = attention_mask[:, :prompt_width].sum(axis=1)
    lengths = attention_mask.sum(axis=1)
    if np.any(prompt_lengths < 1):
        raise ValueError(f"pack_segments: rows {np.flatnonzero(prompt_lengths < 1).tolist()} "
                         "have an empty prompt (no token predicts their first response token)")
    # Row r belongs to microbatch r % M; within it, to shard (r // M) // group_rows.
    row_ids = np.arange(num_rows)
    group_of = ((row_ids % num_microbatches) * num_shards
                + (row_ids // num_microbatches) // group_rows)
    placements = {}          # row -> (packed row within its group, offset)
    bins_used = []
    for group in range(groups):
        members = row_ids[group_of == group]
        free: list[int] = []
        for row in members[np.argsort(-lengths[members], kind="stable")]:
            slot = next((b for b, room in enumerate(free) if room >= lengths[row]), None)
            if slot is None:
                slot = len(free)
                free.append(width)
            placements[row] = (slot, width - free[slot])
            free[slot] -= lengths[row]
        bins_used.append(len(free))
    quantum = -(-group_rows // parts)
    packed_rows = min(group_rows, -(-max(bins_used) // quantum) * quantum)
    total = groups * packed_rows
    segment_tokens = np.zeros((total, width), np.int32)
    segment_positions = np.zeros((total, width), np.int32)
    segment_ids = np.zeros((total, width), np.int32)
    token_index = np.full((num_rows, num_response), packed_rows * width, np.int32)
    segments_in_row = np.zeros(total, np.int32)
    for row in range(num_rows):
        slot, offset = placements[row]
        microbatch, shard = divmod(group_of[row], num_shards)
        # Microbatch m of the step takes packed rows m, m + M, ...; shard s a contiguous block.
        packed = (shard * packed_rows + slot) * num_microbatches + microbatch
        length = lengths[row]
        segment_tokens[packed, offset:offset + length] = tokens[row][attention_mask[row]]
        segment_positions[packed, offset:offset + length] = np.arange(length)
        segments_in_row[packed] += 1
        segment_ids[packed, offset:offset + length] = segments_in_row[packed]
        response_length = length - prompt_lengths[row]
        # The hidden state at the segment's position P_r + j - 1 predicts response token j.
        first = slot * width + offset + prompt_lengths[row] - 1
        token_index[row, :response_length] = first + np.arange(response_length)
    return {"segment_tokens": segment_tokens, "segment_positions": segment_positions,
            "segment_ids": segment_ids, "token_index": token_index}


def packed_response_log_probs(cfg, params, batch: dict, *, num_response: int, num_shards: int = 1,
                              temperature: float = 1.0, with_vocab_mean: bool = False,
                              with_entropy: bool = False, with_hidden: bool = False,
                              remat: bool | str = False) -> dict:
    """``response_log_probs`` of a segment-packed batch (``pack_segments``, one microbatch of
    it): the same outputs, in the same [N, R] layout, from a forward over the packed rows.

    The vocabulary projection runs on every packed position (prompt tokens included, padding
    only at row ends); each response token's outputs are then read at its ``token_index`` within
    its shard's rows, and positions without a response token read 0 (their mask is 0).
    """
    segment_tokens = batch["segment_tokens"]
    hidden = models.apply_hidden(cfg, params, segment_tokens, positions=batch["segment_positions"],
                                 segment_ids=batch["segment_ids"], remat=remat)
    # The target of position c is the token at c + 1 (read only where that is the same segment).
    targets = jnp.concatenate([segment_tokens[:, 1:], segment_tokens[:, :1]], axis=1)
    out = _token_outputs(cfg, params, hidden, targets, temperature=temperature,
                         with_vocab_mean=with_vocab_mean, with_entropy=with_entropy,
                         with_hidden=with_hidden)
    token_index = batch["token_index"]
    rows = token_index.shape[0]

    def to_rows(value):
        # [S * Pr, W, ...] -> per shard one flat sequence plus a zero slot, read at token_index.
        flat = value.reshape((num_shards, -1) + value.shape[2:])
        flat = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], axis=1)
        index = token_index.reshape(num_shards, rows // num_shards, num_response)
        picked = jax.vmap(lambda f, i: jnp.take(f, i, axis=0))(flat, index)
        return picked.reshape((rows, num_response) + value.shape[2:])

    return {name: to_rows(value) for name, value in out.items()}


def policy_outputs(cfg, params, batch: dict, *, num_response: int, num_shards: int = 1,
                   **options) -> dict:
    """``response_log_probs`` of a training batch in either layout: segment-packed when it holds
    ``segment_tokens`` (``pack_segments``), else padded."""
    if "segment_tokens" in batch:
        return packed_response_log_probs(cfg, params, batch, num_response=num_response,
                                         num_shards=num_shards, **options)
    return response_log_probs(cfg, params, batch["tokens"], batch["attention_mask"],
                              batch["positions"], num_response=num_response, **options)
