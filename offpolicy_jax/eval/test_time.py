r"""Test-time methods of the evaluation harness and their compute, under one accounting.

``--test_time_method`` picks how a problem's final answer is produced:

* ``sample`` (the default): the n samples, scored by pass@k / maj@k as always (no extra block);
* ``majority``: self-consistency, the most frequent answer of the n samples (Wang et al. 2022,
  https://arxiv.org/abs/2203.11171), i.e. ``maj@n``;
* ``best_of_n``: the sample a verifier rates highest (``verification.rerank_best_of_n``): the
  policy's own rule-free self-verification (RISE, https://arxiv.org/abs/2505.13445) or another
  checkpoint with ``--rerank_with``, or, with ``--test_time_reward=oracle``, the outcome
  verifier that compares with the gold (which makes it pass@n: an upper bound, not a method);
* ``latentseek``: LatentSeek (https://arxiv.org/abs/2505.13308, :mod:`.latentseek`) from the
  greedy answer, rewarded by the policy's self-verification, or by the gold with ``oracle``
  (the paper's PSRM).

Every method reports one ``test_time`` block in ``results.json``: ``accuracy`` with its standard
error over problems (``std(ddof=1) / sqrt(P)`` of the per-problem 0/1 outcomes), ``seconds``
(wall time of the method, the solving samples included), and ``per_problem``, the mean compute
per problem:

* ``solutions``: solving responses generated (n; LatentSeek: 1 + its updates),
* ``solution_tokens``: their generated tokens (LatentSeek: the initial answer and every
  continuation; the decoded prefix tokens come from the latents, not from a forward pass),
* ``verifications`` / ``verification_tokens``: verification responses generated and their tokens,
* ``oracle_checks``: answers compared with the gold to *choose* an answer (not to score it),
* ``latent_updates``: LatentSeek's backward passes, each through the output projection only
  (a ``[K, D] × [D, V]`` matmul and its transpose), and ``hidden_state_forwards``: its one
  teacher-forced forward per problem that reads the initial latents.

Generated tokens are the comparable unit of compute on the embedded task: each is one forward
pass of the model (prefills aside), while a latent update costs less than one token's forward.

Self-reward on a verification rating (our mapping, documented in ``rating_reward``): the code's
reward is ``−(weight of failed checks) / (total weight) ∈ [−1, 0]`` over four yes/no verifier
prompts. Our verifier gives one rating on RISE's scale (1 correct, −0.5 wrong, −1 no answer);
``R = (rating − 1) / 2`` maps it linearly onto [−1, 0]: 1 → 0, −0.5 → −0.75, −1 (or no readable
rating) → −1. With ``--rerank_samples`` = m ratings the reward is their mean, so τ = −0.2 passes
an answer when all m ratings say correct, or (m = 4) three say correct and one says wrong
(R = −0.1875), much as the code passes an answer with one light failed check (−1/6).
Verifications are sampled at ``--temperature`` / ``--top_p`` (as best-of-n's are; the code calls
``generate`` with the checkpoint's own generation config, which samples when that config says
so), so the self-reward of one answer is itself random.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from offpolicy_jax import rewards, verification
from offpolicy_jax.eval import latentseek, metrics as metrics_lib, runner

SAMPLE, MAJORITY, BEST_OF_N, LATENTSEEK = "sample", "majority", "best_of_n", "latentseek"
TEST_TIME_METHODS = (SAMPLE, MAJORITY, BEST_OF_N, LATENTSEEK)
VERIFIER, ORACLE = "verifier", "oracle"
TEST_TIME_REWARDS = (VERIFIER, ORACLE)
ORACLE_LABEL = "oracle: compares each answer with the gold (PSRM); not a gold-free method"
BUDGET_KEYS = ("solutions", "solution_tokens", "verifications", "verification_tokens",
               "oracle_checks", "latent_updates", "hidden_state_forwards")


def rating_reward(ratings) -> np.ndarray:
    """Verification ratings (RISE's scale: 1, −0.5, −1) to LatentSeek rewards in [−1, 0]:
    ``R = (rating − 1) / 2`` (see the module docstring)."""
    return (np.asarray(ratings, np.float64) - 1.0) / 2.0


def standard_error(outcomes) -> float:
    """Standard error of a mean over problems: ``std(ddof=1) / sqrt(P)`` (0 for one problem)."""
    outcomes = np.asarray(outcomes, np.float64)
    if outcomes.size < 2:
        return 0.0
    return float(np.std(outcomes, ddof=1) / np.sqrt(outcomes.size))


def budget(num_problems: int, **totals) -> dict:
    """Mean compute per problem from totals over all problems (:data:`BUDGET_KEYS`; missing
    ones are 0)."""
    unknown = set(totals) - set(BUDGET_KEYS)
    if unknown:
        raise ValueError(f"unknown budget entries {sorted(unknown)}; expected {BUDGET_KEYS}")
    return {key: float(totals.get(key, 0)) / num_problems for key in BUDGET_KEYS}


def method_block(method: str, outcomes, per_problem: dict, seconds: float, *, reward: str,
                 uses_gold: bool, **extra) -> dict:
    """The ``test_time`` block of one benchmark."""
    outcomes = np.asarray(outcomes, np.float64)
    return {"method": method, "reward": reward, "uses_gold": uses_gold,
            "accuracy": float(outcomes.mean()), "accuracy_stderr": standard_error(outcomes),
            "num_problems": int(outcomes.size), "per_problem": per_problem,
            "seconds": round(float(seconds), 2), **extra}


def _sampled_tokens(result) -> int:
    return int(np.asarray(result.lengths).sum())


def majority(result, seconds: float) -> dict:
    """``majority``: each problem's most frequent answer among its n samples (vote keys and tie
    rule as maj@n)."""
    correct = np.asarray(result.correct)
    num_problems, n = correct.shape
    keys = [runner.vote_key(e) for e in result.extracted]
    outcomes = [metrics_lib.maj_at_k(keys[p * n:(p + 1) * n], correct[p], n)
                for p in range(num_problems)]
    per_problem = budget(num_problems, solutions=num_problems * n - n * _too_long(result),
                         solution_tokens=_sampled_tokens(result))
    return method_block(MAJORITY, outcomes, per_problem, seconds, reward="none (vote)",
                        uses_gold=False)


def _too_long(result) -> int:
    return 0 if result.too_long is None else int(np.sum(result.too_long))


def best_of_n_oracle(result, seconds: float) -> dict:
    """``best_of_n`` with the oracle: a problem counts as solved when any sample is (pass@n)."""
    correct = np.asarray(result.correct)
    num_problems, n = correct.shape
    sampled = num_problems * n - n * _too_long(result)
    per_problem = budget(num_problems, solutions=sampled, solution_tokens=_sampled_tokens(result),
                         oracle_checks=sampled)
    return method_block(BEST_OF_N, correct.any(axis=1), per_problem, seconds,
                        reward=ORACLE_LABEL, uses_gold=True)


def best_of_n_verifier(result, scores, rated, seconds: float, *, verifier_name: str) -> dict:
    """``best_of_n`` with a generative verifier, from ``verification.rate_samples``' output."""
    correct = np.asarray(result.correct)
    num_problems, n = correct.shape
    chosen = verification.chosen_samples(scores)
    per_problem = budget(num_problems, solutions=num_problems * n - n * _too_long(result),
                         solution_tokens=_sampled_tokens(result),
                         verifications=int(np.asarray(rated.lengths).astype(bool).sum()),
                         verification_tokens=_sampled_tokens(rated))
    return method_block(BEST_OF_N, correct[np.arange(num_problems), chosen], per_problem,
                        seconds, reward=f"generative verifier: {verifier_name}", uses_gold=False)


class SelfVerificationReward:
    """LatentSeek's self-reward: the verifier rates an answer ``samples`` times through the
    verification prompt; the reward is :func:`rating_reward` of the mean rating. No gold is
    read (the verifications are scored against the constant rating "1" only to reuse the
    sampler-and-extractor path; the reward uses the extracted ratings alone).

    Counts, per problem, the verifications and their generated tokens.
    """

    uses_gold = False

    def __init__(self, verifier, records: list[dict], make_prompt, *, samples: int,
                 max_new_tokens: int, temperature: float, top_p, top_k, seed: int, pool, mesh,
                 batch_size: int, name: str):
        self.cfg, self.params, self.tokenizer, self.eos_ids, self.pad_id = verifier
        self.records, self.make_prompt, self.samples = records, make_prompt, samples
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, pool=pool, mesh=mesh,
                             batch_size=batch_size)
        self.seed = seed
        self.label = (f"self-verification: {name}, {samples} rating(s) per answer, "
                      f"R = (rating - 1) / 2")
        self.verifications = np.zeros(len(records), np.int64)
        self.verification_tokens = np.zeros(len(records), np.int64)

    def __call__(self, problems, texts: list[str], step: int, chunk: int = 0) -> np.ndarray:
        problems = np.asarray(problems, np.int64)
        prompts = [self.tokenizer.encode(self.make_prompt(self.records[p], text, self.tokenizer),
                                         add_special_tokens=False)
                   for p, text in zip(problems, texts)]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), chunk), step)
        rated = runner.evaluate_prompts(
            self.cfg, self.params, self.tokenizer, prompts, [verification.RATINGS["correct"]]
            * len(prompts), num_samples=self.samples, ks=(1,), seed=key,
            eos_token_ids=self.eos_ids, pad_token_id=self.pad_id, skip_too_long=True,
            **self.settings)
        ratings = np.array([verification.rating_value(x) for x in rated.extracted]).reshape(
            len(prompts), self.samples)
        lengths = np.asarray(rated.lengths).reshape(len(prompts), self.samples)
        np.add.at(self.verifications, problems, (lengths > 0).sum(axis=1))
        np.add.at(self.verification_tokens, problems, lengths.sum(axis=1))
        return rating_reward(ratings.mean(axis=1))


class OracleReward:
    """PSRM, the paper's oracle reward: 0 when the answer is equivalent to the gold, else −1.
    Uses the gold answer; reported as such."""

    uses_gold = True
    label = ORACLE_LABEL

    def __init__(self, golds: list[str], pool):
        self.golds, self.pool = golds, pool
        self.checks = np.zeros(len(golds), np.int64)

    def __call__(self, problems, texts: list[str], step: int, chunk: int = 0) -> np.ndarray:
        problems = np.asarray(problems, np.int64)
        scored = rewards.score_batch(list(texts), [self.golds[p] for p in problems],
                                     pool=self.pool)
        np.add.at(self.checks, problems, 1)
        return np.where(np.asarray(scored.equivalent, bool), 0.0, -1.0)


def run_latentseek(cfg, params, tokenizer, records: list[dict], prompt_tokens: list[list[int]],
                   result, reward, *, config: latentseek.LatentSeekConfig, max_new_tokens: int,
                   eos_token_ids, pad_token_id: int, pool, mesh, batch_size: int,
                   started: float) -> tuple[dict, list[dict]]:
    """LatentSeek on every problem of a benchmark from its greedy answers.

    Args:
      result: the greedy solving evaluation (one sample per problem, ``token_ids`` set).
      reward: a :class:`SelfVerificationReward` or :class:`OracleReward`.
      started: ``time.time()`` before the greedy answers were sampled (wall time counts them).

    Returns:
      ``(block, rows)``: the ``test_time`` block (with ``greedy``: the initial answers' accuracy
      and compute) and one ``test_time.jsonl`` row per problem.
    """
    num_problems = len(records)
    correct0 = np.asarray(result.correct)[:, 0]
    sampled = np.flatnonzero(~np.asarray(result.too_long, bool))
    final_texts = list(result.responses)
    history = [[] for _ in range(num_problems)]
    iterations = np.zeros(num_problems, np.int64)
    positions = np.zeros(num_problems, np.int64)
    continuation = np.zeros(num_problems, np.int64)
    hidden_forwards = np.zeros(num_problems, np.int64)

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    for chunk, start in enumerate(range(0, len(sampled), batch_size)):
        problems = sampled[start:start + batch_size]
        initial = reward(problems, [result.responses[p] for p in problems], 0, chunk)

        def reward_fn(rows, answers, step, problems=problems, chunk=chunk):
            return reward(problems[rows], [decode(a) for a in answers], step, chunk)

        out = latentseek.optimise(
            cfg, params, [prompt_tokens[p] for p in problems],
            [result.token_ids[p] for p in problems], initial, reward_fn, config=config,
            max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            pad_token_id=pad_token_id, mesh=mesh)
        for i, p in enumerate(problems):
            final_texts[p] = decode(out.responses[i])
            history[p] = out.rewards[i]
            iterations[p] = out.iterations[i]
            positions[p] = out.positions[i]
            continuation[p] = out.continuation_tokens[i]
            hidden_forwards[p] = int(out.read_latents)
    # The gold scores the final answers (never chooses them, except with the oracle reward).
    scored = rewards.score_batch(final_texts, [r["gold"] for r in records], pool=pool)
    final_correct = np.asarray(scored.equivalent, bool)
    final_correct[~np.isin(np.arange(num_problems), sampled)] = False
    seconds = time.time() - started

    initial_tokens = _sampled_tokens(result)
    num_sampled = len(sampled)
    verify_counts = getattr(reward, "verifications", np.zeros(num_problems))
    verify_tokens = getattr(reward, "verification_tokens", np.zeros(num_problems))
    oracle_checks = getattr(reward, "checks", np.zeros(num_problems))
    per_problem = budget(num_problems, solutions=num_sampled + iterations.sum(),
                         solution_tokens=initial_tokens + continuation.sum(),
                         verifications=verify_counts.sum(),
                         verification_tokens=verify_tokens.sum(),
                         oracle_checks=oracle_checks.sum(), latent_updates=iterations.sum(),
                         hidden_state_forwards=hidden_forwards.sum())
    greedy = {"accuracy": float(correct0.mean()), "accuracy_stderr": standard_error(correct0),
              "per_problem": budget(num_problems, solutions=num_sampled,
                                    solution_tokens=initial_tokens)}
    block = method_block(
        LATENTSEEK, final_correct, per_problem, seconds, reward=reward.label,
        uses_gold=reward.uses_gold, greedy=greedy,
        config={"steps": config.steps, "learning_rate": config.learning_rate,
                "fraction": config.fraction, "max_positions": config.max_positions,
                "reward_threshold": config.reward_threshold},
        mean_iterations=float(iterations.mean()), mean_positions=float(positions.mean()),
        stopped_fraction=float(np.mean([len(h) > 0 and h[-1] > config.reward_threshold
                                        for h in history])),
        changed_fraction=float(np.mean([final_texts[p] != result.responses[p]
                                        for p in range(num_problems)])),
        fixed=int(np.sum(final_correct & ~correct0)), broken=int(np.sum(~final_correct & correct0)))
    rows = [{"id": record["id"], "problem_index": p, "gold": record["gold"],
             "initial_response": result.responses[p], "initial_correct": bool(correct0[p]),
             "response": final_texts[p], "extracted": scored.extracted[p],
             "correct": bool(final_correct[p]), "rewards": history[p],
             "iterations": int(iterations[p]), "positions": int(positions[p])}
            for p, record in enumerate(records)]
    return block, rows
