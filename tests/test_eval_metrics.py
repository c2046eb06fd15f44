"""pass@k (unbiased estimator) and maj@k against hand-computed values."""

import math

import numpy as np
import pytest

from offpolicy_jax.eval import metrics


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),                     # c / n
    (5, 2, 2, 0.7),                     # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 2, 3, 0.9),                     # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (5, 2, 4, 1.0),                     # n - c < k
    (5, 0, 3, 0.0),
    (5, 5, 1, 1.0),
    (10, 3, 5, 1 - 21 / 252),           # 1 - C(7,5)/C(10,5)
    (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_and_stays_finite_for_large_n():
    for n, c, k in [(20, 7, 3), (50, 1, 10), (16, 8, 8)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    # C(1000, 500) overflows a float; the product form does not.
    value = metrics.pass_at_k(1000, 3, 500)
    assert value == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        metrics.pass_at_k(n, c, k)


def test_mean_pass_at_k():
    correct = np.array([[1, 0, 0, 1, 0],     # c = 2
                        [0, 0, 0, 0, 0],     # c = 0
                        [1, 1, 1, 1, 1]],    # c = 5
                       bool)
    assert metrics.mean_pass_at_k(correct, 1) == pytest.approx((0.4 + 0 + 1) / 3)
    assert metrics.mean_pass_at_k(correct, 2) == pytest.approx((0.7 + 0 + 1) / 3)
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        metrics.mean_pass_at_k(np.ones(5, bool), 1)


def test_majority_vote_and_tie_rule():
    # "12" twice beats "7" once; None never counts.
    assert metrics.maj_at_k(["7", "12", None, "12"], [False, True, False, True], 4) == 1.0
    assert metrics.maj_at_k(["7", "12", None, "7"], [True, False, False, True], 4) == 1.0
    assert metrics.maj_at_k(["7", "12", "12", "7"], [True, False, False, True], 4) == 1.0  # tie:
    assert metrics.maj_at_k(["12", "7", "7", "12"], [False, True, True, False], 4) == 0.0  # first
    # Three None answers do not outvote one real answer.
    assert metrics.maj_at_k([None, None, None, "5"], [False, False, False, True], 4) == 1.0
    assert metrics.maj_at_k([None, None], [False, False], 2) == 0.0
    # Only the first k samples vote.
    assert metrics.maj_at_k(["1", "2", "2", "2"], [True, False, False, False], 1) == 1.0
    assert metrics.majority_answer(["a", "b", "b"]) == 1
    assert metrics.majority_answer([None]) is None


def test_majority_vote_groups_with_a_custom_equivalence():
    answers = ["0.5", "1/2", "3", "3"]
    correct = [True, True, False, False]
    # By text "3" wins (2 vs 1 vs 1); with numeric equivalence 0.5 == 1/2 forms a tie that it
    # wins by coming first.
    assert metrics.maj_at_k(answers, correct, 4) == 0.0
    same_value = lambda a, b: abs(eval_fraction(a) - eval_fraction(b)) < 1e-9  # noqa: E731
    assert metrics.maj_at_k(answers, correct, 4, same_answer=same_value) == 1.0
    assert metrics.maj_at_k([" 1 2", "12"], [True, False], 2) == 1.0   # whitespace ignored


def eval_fraction(text):
    numerator, _, denominator = text.partition("/")
    return float(numerator) / float(denominator or 1)


def test_mean_maj_at_k_and_errors():
    answers = [["1", "1", "2"], ["3", None, "4"]]
    correct = np.array([[True, True, False], [False, False, True]])
    assert metrics.mean_maj_at_k(answers, correct, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="verdicts"):
        metrics.maj_at_k(["1"], [True, False], 1)
    with pytest.raises(ValueError, match="k=3"):
        metrics.maj_at_k(["1", "2"], [True, False], 3)


def test_distinct_correct_counts_different_correct_texts_up_to_whitespace():
    responses = ["1+2=3 \\boxed{3}", "1+2 = 3 \\boxed{3}", "2+1=3 \\boxed{3}", "\\boxed{4}"]
    # The first two differ only in whitespace; the wrong one never counts.
    assert metrics.distinct_correct(responses, [True, True, True, False]) == 2
    assert metrics.distinct_correct(responses, [False, False, False, True]) == 1
    assert metrics.distinct_correct(responses, [False] * 4) == 0
    # Problem means: (2 + 0) / 2; a problem with n copies of one solution counts 1.
    assert metrics.mean_distinct_correct(
        [responses[:3] + ["x"], ["a"] * 4], [[True, True, True, False], [False] * 4]) == 1.0
    assert metrics.mean_distinct_correct([["a"] * 4], [[True] * 4]) == 1.0
    with pytest.raises(ValueError, match="2 responses but 1 verdicts"):
        metrics.distinct_correct(["a", "b"], [True])
    with pytest.raises(ValueError, match=r"\[P, n\] with P = 2"):
        metrics.mean_distinct_correct([["a"], ["b"]], [[True]])
