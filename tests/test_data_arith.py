"""The embedded arith task: determinism, the fixed held-out split, demonstrations, knobs."""

import re

import pytest

from offpolicy_jax.data import arith

BOXED = re.compile(r"\\boxed\{(-?\d+)\}$")
STEP = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")


def test_generation_is_deterministic_and_seed_dependent():
    a = arith.generate_problems(200, "train", seed=3)
    b = arith.generate_problems(200, "train", seed=3)
    c = arith.generate_problems(200, "train", seed=4)
    assert a == b
    assert [p.expression for p in a] != [p.expression for p in c]


def test_known_problem_and_format():
    problem = arith.parse_expression("12+7*3")
    assert problem.prompt == "Q: 12+7*3\nA: "
    assert problem.response == "7*3=21, 12+21=33. \\boxed{33}"
    assert problem.gold == "33"
    assert arith.parse_expression("9-(8-3)*5").response == "8-3=5, 5*5=25, 9-25=-16. \\boxed{-16}"
    assert arith.parse_expression("8-3-2").answer == 3           # left-associative
    assert arith.parse_expression("2*3+4*5").steps == ("2*3=6", "4*5=20", "6+20=26")


@pytest.mark.parametrize("bad", ["", "1+", "(1+2", "1+2)", "1/2", "a"])
def test_parse_errors_name_the_position(bad):
    with pytest.raises(ValueError, match="position"):
        arith.parse_expression(bad)


def test_heldout_split_is_disjoint_and_fixed():
    train = {p.expression for seed in range(3)
             for p in arith.generate_problems(3000, "train", seed=seed)}
    heldout = arith.heldout_problems(300)
    heldout_expressions = {p.expression for p in heldout}
    assert len(heldout_expressions) == 300                       # distinct
    assert not train & heldout_expressions
    assert all(arith.split_of(e) == "heldout" for e in heldout_expressions)
    assert all(arith.split_of(e) == "train" for e in train)
    assert arith.heldout_problems(100) == heldout[:100]          # a prefix: size-independent


@pytest.mark.parametrize("config", [arith.ArithConfig(),
                                    arith.ArithConfig(parentheses=True, max_operands=5),
                                    arith.ArithConfig(operators="-", max_operand=20,
                                                      max_intermediate=50)])
def test_demonstrations_are_correct_and_short(config):
    problems = arith.generate_problems(500, "train", seed=0, config=config)
    for problem in problems:
        boxed = BOXED.search(problem.response)
        assert boxed and boxed.group(1) == problem.gold
        # Every step is one correct operation whose result is within the bound.
        for step in problem.steps:
            a, op, b, result = STEP.match(step).groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b),
                    "*": int(a) * int(b)}[op] == int(result)
            assert abs(int(result)) <= config.max_intermediate
        assert len(problem.steps) == problem.expression.count("+") + \
            problem.expression.count("-") + problem.expression.count("*")
        # The worked answer is the true value of the expression as written.
        assert arith.parse_expression(problem.expression).answer == problem.answer
        assert set(problem.expression) <= set("0123456789" + config.operators + "()")
    counts = {len(p.steps) + 1 for p in problems}
    assert counts == set(range(config.min_operands, config.max_operands + 1))
    if config == arith.ArithConfig():
        assert max(len(p.prompt) + len(p.response) for p in problems) <= 64


def test_demonstrations_pairs():
    pairs = arith.demonstrations(5, seed=1)
    problems = arith.generate_problems(5, "train", seed=1)
    assert pairs == [(p.prompt, p.response) for p in problems]


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="min_operands"):
        arith.generate_problems(1, "train", 0, arith.ArithConfig(min_operands=1))
    with pytest.raises(ValueError, match="operators"):
        arith.generate_problems(1, "train", 0, arith.ArithConfig(operators="/"))
    with pytest.raises(ValueError, match="split"):
        arith.generate_problems(1, "test", 0)


def test_exhausted_unique_split_raises():
    tiny = arith.ArithConfig(max_operands=2, max_operand=2, operators="+")   # 4 expressions
    with pytest.raises(ValueError, match="ran out"):
        arith.generate_problems(10, "train", 0, tiny, unique=True)


def test_demonstrations_pass_the_verifier():
    from offpolicy_jax import rewards
    for problem in arith.generate_problems(100, "train", seed=2,
                                           config=arith.ArithConfig(parentheses=True)):
        assert rewards.extract_answer(problem.response) == problem.gold
        assert rewards.is_equivalent(problem.gold, rewards.extract_answer(problem.response))
        wrong = problem.response.replace(f"\\boxed{{{problem.gold}}}",
                                         f"\\boxed{{{problem.answer + 1}}}")
        assert not rewards.is_equivalent(problem.gold, rewards.extract_answer(wrong))
