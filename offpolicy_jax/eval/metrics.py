"""Sampling-based evaluation metrics: unbiased pass@k and majority-vote accuracy (maj@k).

pass@k is the probability that at least one of k samples is correct. Drawing exactly k samples per
problem gives a high-variance estimate; instead we draw n >= k samples, count the c correct ones
and use the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained
on Code", https://arxiv.org/abs/2107.03374, Eq. (1):

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]

computed per problem in the numerically stable product form

    1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)     (1 when n - c < k)

which never forms the (huge) binomial coefficients. With k = 1 it is c / n, the mean accuracy of
the samples ("pass@1 averaged over n samples" in the RL papers).

maj@k (self-consistency, Wang et al. 2022, https://arxiv.org/abs/2203.11171) takes the answer
extracted most often among k samples and scores it against the gold answer.

distinct correct counts a problem's correct samples that differ from each other as text (up to
whitespace): n copies of one correct solution count 1. ROVER (arXiv 2509.24981) claims its
policies keep several ways to a right answer where GRPO collapses to one; pass@k for large k and
this count are the two views of that claim a verifier alone can measure.
"""

from collections.abc import Callable, Sequence

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem from ``num_correct`` of ``num_samples``.

    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, arXiv:2107.03374, Eq. 1), evaluated as
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``; exactly 1 when ``n - c < k`` (every k-subset then
    holds a correct sample) and exactly 0 when ``c = 0``.

    Args:
      num_samples: n, samples drawn for the problem.
      num_correct: c, how many of them are correct (0 <= c <= n).
      k: the budget, 1 <= k <= n.

    Returns:
      The estimate, a float in [0, 1].
    """
    n, c = int(num_samples), int(num_correct)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= num_correct <= num_samples, got num_correct={c}, "
                         f"num_samples={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= num_samples, got k={k}, num_samples={n}")
    if n - c < k:
        return 1.0
    # The factors are (i - k) / i for i = n - c + 1 .. n, each in (0, 1): no overflow, no
    # cancellation.
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def mean_pass_at_k(correct: np.ndarray, k: int) -> float:
    """pass@k averaged over problems.

    Args:
      correct: ``[P, n]`` booleans (or 0/1), whether sample j of problem p is correct.
      k: the budget, 1 <= k <= n.

    Returns:
      ``mean_p pass_at_k(n, sum_j correct[p, j], k)``.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] == 0 or correct.shape[1] == 0:
        raise ValueError(f"mean_pass_at_k: correct must be a non-empty [P, n] matrix, got shape "
                         f"{correct.shape}")
    num_samples = correct.shape[1]
    counts = correct.astype(bool).sum(axis=1)
    return float(np.mean([pass_at_k(num_samples, int(c), k) for c in counts]))


def _without_whitespace(text: str) -> str:
    return "".join(text.split())


def _same_text(a: str, b: str) -> bool:
    """Default answer identity for voting: equal after removing all whitespace."""
    return _without_whitespace(a) == _without_whitespace(b)


def majority_answer(answers: Sequence[str | None],
                    same_answer: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of the representative of the most frequent answer, or None if no answer was given.

    Answers are grouped greedily in order: each answer joins the first earlier group whose
    representative (its first member) it matches under ``same_answer``, else starts a new group.
    ``None`` (no extractable answer) never joins or forms a group, so it never wins.

    Tie rule: among groups of equal (largest) size, the group whose first member came earliest
    wins. This is deterministic and, for samples drawn i.i.d., unbiased between the tied answers.

    Args:
      answers: ``[n]`` extracted answers (strings or None).
      same_answer: ``(a, b) -> bool`` deciding that two answers are the same (e.g. a symbolic
        equivalence check); default: equal once whitespace is removed.

    Returns:
      The index (into ``answers``) of the winning group's first member, or None.
    """
    same_answer = same_answer or _same_text
    representatives: list[int] = []
    sizes: list[int] = []
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for group, representative in enumerate(representatives):
            if same_answer(answers[representative], answer):
                sizes[group] += 1
                break
        else:
            representatives.append(index)
            sizes.append(1)
    if not representatives:
        return None
    # max() returns the first maximal group, i.e. the earliest-formed one: the tie rule above.
    best = max(range(len(sizes)), key=lambda group: sizes[group])
    return representatives[best]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int, *,
             same_answer: Callable[[str, str], bool] | None = None) -> float:
    """maj@k for one problem: 1.0 if the majority answer of the first ``k`` samples is correct.

    The verdicts are computed beforehand (each sample's answer against the gold, by the
    verifier), so voting needs no gold: the majority group's representative (see
    ``majority_answer``, including its tie rule) carries its own verdict. A problem where none of
    the k samples has an answer scores 0.

    Args:
      answers: ``[n]`` extracted answers (None where nothing could be extracted), n >= k.
      correct: ``[n]`` verdicts, ``correct[j]`` says whether ``answers[j]`` matches the gold.
      k: how many samples vote (the first k), 1 <= k <= n.
      same_answer: answer identity for grouping; default: equal ignoring whitespace.

    Returns:
      1.0 or 0.0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} verdicts")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: need 1 <= k <= {len(answers)} samples, got k={k}")
    winner = majority_answer(list(answers[:k]), same_answer)
    return 0.0 if winner is None else float(bool(correct[winner]))


def mean_maj_at_k(answers: Sequence[Sequence[str | None]], correct: np.ndarray, k: int, *,
                  same_answer: Callable[[str, str], bool] | None = None) -> float:
    """maj@k averaged over problems.

    Args:
      answers: ``[P][n]`` extracted answers per problem.
      correct: ``[P, n]`` verdicts.
      k: voters per problem (the first k samples).
      same_answer: answer identity for grouping (see ``majority_answer``).
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] != len(answers) or correct.shape[0] == 0:
        raise ValueError(f"mean_maj_at_k: correct must be [P, n] with P = {len(answers)} "
                         f"problems, got shape {correct.shape}")
    return float(np.mean([maj_at_k(list(a), list(c), k, same_answer=same_answer)
                          for a, c in zip(answers, correct)]))


def distinct_correct(responses: Sequence[str], correct: Sequence[bool]) -> int:
    """How many different correct responses one problem's samples hold (texts compared with all
    whitespace removed, as ``_same_text`` compares answers).

    Args:
      responses: ``[n]`` sampled responses of the problem.
      correct: ``[n]`` their verdicts.
    """
    if len(responses) != len(correct):
        raise ValueError(f"distinct_correct: {len(responses)} responses but {len(correct)} "
                         f"verdicts")
    return len({_without_whitespace(r) for r, ok in zip(responses, correct) if ok})


def mean_distinct_correct(responses: Sequence[Sequence[str]], correct: np.ndarray) -> float:
    """``distinct_correct`` averaged over problems (unsolved problems count 0).

    Args:
      responses: ``[P][n]`` sampled responses per problem.
      correct: ``[P, n]`` verdicts.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2 or correct.shape[0] != len(responses) or correct.shape[0] == 0:
        raise ValueError(f"mean_distinct_correct: correct must be [P, n] with P = "
                         f"{len(responses)} problems, got shape {correct.shape}")
    return float(np.mean([distinct_correct(list(r), list(c))
                          for r, c in zip(responses, correct)]))
