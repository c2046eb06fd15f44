"""Sample, verify, and score a set of prompts: the code behind both the evaluation harness and the
RL loop's periodic held-out evaluation (so the two always report the same numbers)."""

import dataclasses

import numpy as np

from offpolicy_jax import rewards, sampling
from offpolicy_jax.eval import metrics as metrics_lib


@dataclasses.dataclass
class EvalResult:
    """Per-sample outputs and the aggregate metrics of one evaluation."""

    metrics: dict            # pass@k for each k, maj@k, mean_length, no_answer_fraction, counts
    responses: list[str]     # [P * n], prompt-major
    extracted: list          # extracted answers (None when there is none)
    correct: np.ndarray      # [P, n] bool
    reasons: list[str]
    lengths: np.ndarray      # [P * n] generated tokens


def evaluate_prompts(cfg, params, tokenizer, prompt_tokens: list[list[int]], golds: list[str], *,
                     num_samples: int, ks: tuple[int, ...] = (1,), max_new_tokens: int,
                     temperature: float, top_p: float | None = None, top_k: int | None = None,
                     seed: int = 0, eos_token_ids=(), pad_token_id: int = 0, pool=None,
                     mesh=None, progress: bool = False) -> EvalResult:
    """Samples ``num_samples`` responses per prompt, verifies them against ``golds``, and reports
    pass@k (unbiased estimator, Chen et al. 2021) for each ``k <= num_samples`` in ``ks``, maj@n
    over the extracted answers, the mean response length and the fraction with no answer."""
    if not prompt_tokens:
        raise ValueError("evaluate_prompts: no prompts to evaluate")
    if len(prompt_tokens) != len(golds):
        raise ValueError(f"{len(prompt_tokens)} prompts but {len(golds)} golds")
    bad_ks = [k for k in ks if not 1 <= k <= num_samples]
    if bad_ks:
        raise ValueError(f"every k must be in [1, num_samples={num_samples}], got {bad_ks}")
    out = sampling.generate(cfg, params, prompt_tokens, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_token_ids=tuple(eos_token_ids), seed=seed,
                            num_samples=num_samples, mesh=mesh, progress=progress,
                            pad_token_id=pad_token_id)
    tokens = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths)
    responses = [tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                 for i in range(tokens.shape[0])]
    row_golds = [golds[i] for i in np.asarray(out.prompt_index)]
    scored = rewards.score_batch(responses, row_golds, pool=pool)
    correct = np.asarray(scored.equivalent, bool).reshape(len(prompt_tokens), num_samples)
    results = {f"pass@{k}": metrics_lib.mean_pass_at_k(correct, k) for k in ks}
    extracted = list(scored.extracted)
    per_prompt = [extracted[p * num_samples:(p + 1) * num_samples]
                  for p in range(len(prompt_tokens))]
    results[f"maj@{num_samples}"] = metrics_lib.mean_maj_at_k(per_prompt, correct, num_samples)
    results["mean_length"] = float(lengths.mean())
    results["no_answer_fraction"] = float(np.mean([e is None for e in extracted]))
    results["num_prompts"] = len(prompt_tokens)
    results["num_samples"] = num_samples
    return EvalResult(metrics=results, responses=responses, extracted=extracted, correct=correct,
                      reasons=list(scored.reasons), lengths=lengths)
