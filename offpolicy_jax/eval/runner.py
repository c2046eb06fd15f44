"""Sample, verify, and score a set of prompts: the code behind both the evaluation harness
(``offpolicy_jax.eval.harness``) and the RL loop's periodic held-out evaluation, so the two always
report the same numbers for the same model, prompts, seed and sampling settings.

One call of :func:`evaluate_prompts`:

1. prompts that cannot fit ``max_new_tokens`` in the model's context are either an error (the
   default, what the RL loop wants) or, with ``skip_too_long``, not sampled and scored as wrong
   (what a benchmark report wants: the denominator stays the benchmark's size);
2. the remaining prompts are sampled in chunks of ``batch_size`` prompts (``num_samples`` rows
   each), so a large benchmark never becomes one giant batch;
3. every response is decoded and checked against its gold by the verifier
   (``rewards.score_batch``, in a killable process pool with a per-answer deadline);
4. the ``[P, n]`` verdict matrix gives pass@k (unbiased estimator, Chen et al. 2021,
   https://arxiv.org/abs/2107.03374) and maj@k (self-consistency, Wang et al. 2022,
   https://arxiv.org/abs/2203.11171); see :mod:`offpolicy_jax.eval.metrics`. For the vote, two
   extracted answers are the same when their :func:`vote_key` (the verifier's formatting-free
   ``canonical_text``) is: ``\\dfrac{1}{2}`` and ``\\frac{1}{2}``, or ``\\left(1, 2\\right)``
   and ``(1,2)``, vote together.

Randomness: with a single chunk the samples are exactly ``sampling.generate(..., seed=seed)``'s.
With several chunks, chunk 0 still uses ``seed`` (its rows are the ones an unchunked call would
draw for those prompts) and chunk ``c >= 1`` uses ``fold_in(fold_in(key(seed), 2**32 - 1), c)``,
a branch of the key tree that no row of chunk 0 uses. Samples are thus a deterministic function of
``(seed, batch_size)``.
"""

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from offpolicy_jax import rewards, sampling
from offpolicy_jax.eval import metrics as metrics_lib

# fold_in data that separates the chunk keys from the per-row keys ``fold_in(key, row)`` that
# ``sampling.generate`` derives for chunk 0 (rows never reach 2**32 - 1).
_CHUNK_STREAM = 2**32 - 1


@dataclasses.dataclass
class EvalResult:
    """Per-sample outputs and the aggregate metrics of one evaluation.

    All per-sample lists are prompt-major: row ``p * n + j`` is sample ``j`` of prompt ``p``.

    Attributes:
      metrics: ``pass@k`` for each k, ``maj@k`` for each voting k, ``mean_length``,
        ``no_answer_fraction``, ``truncated_fraction`` and the counts (see
        :func:`evaluate_prompts`).
      responses: ``[P * n]`` decoded responses (``""`` for prompts that were too long).
      extracted: ``[P * n]`` extracted answers (None when there is none).
      correct: ``[P, n]`` bool verdicts.
      reasons: ``[P * n]`` the verifier's reason for each verdict.
      lengths: ``[P * n]`` generated tokens (EOS included; 0 when not generated).
      truncated: ``[P * n]`` bool, the response used the whole ``max_new_tokens`` budget without
        producing an EOS token.
      too_long: ``[P]`` bool, the prompt was not sampled because it does not fit the context.
      token_ids: ``[P * n]`` generated token ids (EOS included; ``[]`` when not generated), for
        methods that continue from a response's tokens (LatentSeek) rather than its text.
    """

    metrics: dict
    responses: list[str]
    extracted: list
    correct: np.ndarray
    reasons: list[str]
    lengths: np.ndarray
    truncated: np.ndarray | None = None
    too_long: np.ndarray | None = None
    token_ids: list | None = None


def _chunk_seed(seed, chunk: int):
    """The sampling seed of prompt chunk ``chunk`` (see the module docstring)."""
    if chunk == 0:
        return seed
    key = jax.random.key(int(seed)) if isinstance(seed, (int, np.integer)) else seed
    return jax.random.fold_in(jax.random.fold_in(key, _CHUNK_STREAM), chunk)


def too_long_reason(prompt_length: int, max_new_tokens: int, context: int) -> str:
    """The verdict reason recorded for a prompt that was not sampled."""
    return (f"not sampled: prompt of {prompt_length} tokens + max_new_tokens={max_new_tokens} "
            f"exceeds the model's context of {context} tokens")


def vote_key(answer: str | None) -> str | None:
    """What maj@k groups extracted answers by: ``rewards.math.canonical_text`` (spacing,
    ``$``, ``\\left``/``\\right``, a trailing period removed; ``\\dfrac``/``\\tfrac`` read as
    ``\\frac``), so answers that differ only in formatting vote together. Cheap and purely
    textual (no SymPy, no deadline needed); None (no answer) stays None and never votes."""
    return None if answer is None else rewards.math.canonical_text(answer)


def _check_ks(ks, num_samples: int, name: str) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad or not ks:
        raise ValueError(f"every {name} value must be in [1, num_samples={num_samples}], got "
                         f"{list(ks) or 'none'}")
    return ks


def evaluate_prompts(cfg, params, tokenizer, prompt_tokens: list[list[int]], golds: list[str], *,
                     num_samples: int, ks: tuple[int, ...] = (1,), max_new_tokens: int,
                     temperature: float, top_p: float | None = None, top_k: int | None = None,
                     seed=0, eos_token_ids=(), pad_token_id: int = 0, pool=None,
                     mesh=None, progress: bool = False, maj_ks: tuple[int, ...] | None = None,
                     batch_size: int | None = None, skip_too_long: bool = False,
                     on_samples: Callable[[int], None] | None = None) -> EvalResult:
    """Samples ``num_samples`` responses per prompt, verifies them, and aggregates the metrics.

    pass@k is the mean over prompts of ``1 - C(n - c, k) / C(n, k)`` (c correct of n samples;
    Chen et al. 2021, arXiv:2107.03374, Eq. 1); with k = 1 it is the mean accuracy of all samples.
    maj@k votes over the first k samples' extracted answers, grouped by :func:`vote_key` (Wang et
    al. 2022, arXiv:2203.11171).

    Args:
      cfg, params: the model (``models.load_hf_checkpoint``).
      tokenizer: decodes the generated ids (special tokens skipped).
      prompt_tokens: ``P`` ragged token-id lists.
      golds: ``P`` gold answers.
      num_samples: n, responses per prompt.
      ks: the budgets k of the reported ``pass@k``, each in ``[1, n]``.
      max_new_tokens, temperature, top_p, top_k, eos_token_ids, pad_token_id, mesh: passed to
        ``sampling.generate``.
      seed: int or PRNG key (see the module docstring for chunked runs).
      pool: a ``rewards.VerifierPool`` to reuse (else one is started per chunk).
      progress: show ``sampling.generate``'s decode-step bar.
      maj_ks: the k of the reported ``maj@k``; default ``(num_samples,)``.
      batch_size: prompts per ``sampling.generate`` call; default all in one call.
      skip_too_long: score prompts with ``len(prompt) + max_new_tokens`` beyond
        ``cfg.max_position_embeddings`` as wrong (nothing sampled, reason says why) instead of
        raising.
      on_samples: called with the number of samples just finished (for a progress bar).

    Returns:
      An :class:`EvalResult`. ``metrics`` holds ``pass@{k}``, ``maj@{k}``, ``distinct_correct``
      (different correct responses per prompt, ``metrics.distinct_correct``), ``mean_length``
      (generated tokens per sampled response; None when nothing was sampled),
      ``no_answer_fraction`` and ``truncated_fraction`` (of the sampled responses),
      ``num_prompts``, ``num_samples`` (n), ``num_responses`` (sampled), ``num_correct``,
      ``num_no_answer``, ``num_truncated`` and ``num_too_long`` (prompts not sampled).
    """
    if not prompt_tokens:
        raise ValueError("evaluate_prompts: no prompts to evaluate")
    if len(prompt_tokens) != len(golds):
        raise ValueError(f"{len(prompt_tokens)} prompts but {len(golds)} golds")
    ks = _check_ks(ks, num_samples, "k")
    maj_ks = _check_ks((num_samples,) if maj_ks is None else maj_ks, num_samples, "maj k")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 prompts per generation chunk, got {batch_size}")
    num_prompts, n = len(prompt_tokens), num_samples
    context = cfg.max_position_embeddings
    too_long = np.array([skip_too_long and len(p) + max_new_tokens > context
                         for p in prompt_tokens], bool)

    responses = [""] * (num_prompts * n)
    extracted: list = [None] * (num_prompts * n)
    reasons = [""] * (num_prompts * n)
    correct = np.zeros((num_prompts, n), bool)
    lengths = np.zeros(num_prompts * n, np.int32)
    truncated = np.zeros(num_prompts * n, bool)
    token_ids: list = [[] for _ in range(num_prompts * n)]
    eos_set = set(int(e) for e in eos_token_ids)

    for p in np.flatnonzero(too_long):
        reason = too_long_reason(len(prompt_tokens[p]), max_new_tokens, context)
        reasons[p * n:(p + 1) * n] = [reason] * n

    to_sample = np.flatnonzero(~too_long).tolist()
    chunk_size = batch_size or max(len(to_sample), 1)
    for chunk_index, start in enumerate(range(0, len(to_sample), chunk_size)):
        chunk = to_sample[start:start + chunk_size]
        out = sampling.generate(cfg, params, [prompt_tokens[p] for p in chunk],
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, eos_token_ids=tuple(eos_token_ids),
                                seed=_chunk_seed(seed, chunk_index), num_samples=n, mesh=mesh,
                                progress=progress, pad_token_id=pad_token_id)
        tokens, chunk_lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        texts = [tokenizer.decode(tokens[i, :chunk_lengths[i]].tolist(), skip_special_tokens=True)
                 for i in range(tokens.shape[0])]
        chunk_prompts = [chunk[i] for i in np.asarray(out.prompt_index)]
        scored = rewards.score_batch(texts, [golds[p] for p in chunk_prompts], pool=pool)
        for i, p in enumerate(chunk_prompts):
            row = p * n + i % n          # generate's rows are prompt-major, n per prompt
            length = int(chunk_lengths[i])
            responses[row], extracted[row], reasons[row] = \
                texts[i], scored.extracted[i], scored.reasons[i]
            correct[p, i % n] = bool(scored.equivalent[i])
            lengths[row] = length
            token_ids[row] = tokens[i, :length].tolist()
            truncated[row] = length == max_new_tokens and int(tokens[i, length - 1]) not in eos_set
        if on_samples is not None:
            on_samples(len(texts))
    if on_samples is not None and too_long.any():
        on_samples(int(too_long.sum()) * n)

    results = {f"pass@{k}": metrics_lib.mean_pass_at_k(correct, k) for k in ks}
    keys = [vote_key(e) for e in extracted]
    per_prompt = [keys[p * n:(p + 1) * n] for p in range(num_prompts)]
    for k in maj_ks:
        results[f"maj@{k}"] = metrics_lib.mean_maj_at_k(per_prompt, correct, k)
    results["distinct_correct"] = metrics_lib.mean_distinct_correct(
        [responses[p * n:(p + 1) * n] for p in range(num_prompts)], correct)
    sampled = np.repeat(~too_long, n)
    num_sampled = int(sampled.sum())
    no_answer = np.array([e is None for e in extracted], bool) & sampled
    results["mean_length"] = float(lengths[sampled].mean()) if num_sampled else None
    results["no_answer_fraction"] = float(no_answer.sum() / num_sampled) if num_sampled else None
    results["truncated_fraction"] = (float(truncated[sampled].sum() / num_sampled)
                                     if num_sampled else None)
    results.update(num_prompts=num_prompts, num_samples=n, num_responses=num_sampled,
                   num_correct=int(correct.sum()), num_no_answer=int(no_answer.sum()),
                   num_truncated=int(truncated.sum()), num_too_long=int(too_long.sum()))
    return EvalResult(metrics=results, responses=responses, extracted=extracted, correct=correct,
                      reasons=reasons, lengths=lengths, truncated=truncated, too_long=too_long,
                      token_ids=token_ids)
