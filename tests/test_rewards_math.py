"""Rules of the math verifier: a table of real-gold cases, extraction, safety of the parser."""

import ast
import builtins
import json
import pathlib
import subprocess
import sys
import time

import pytest
import sympy.parsing.sympy_parser

from offpolicy_jax import rewards
from offpolicy_jax.rewards import latex_parser, math as rmath

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from rewards_cases import CASES  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CATEGORIES = {
    "integer", "thousands", "decimal", "fraction", "mixed", "percent", "scientific", "symbolic",
    "equation", "interval", "set", "tuple", "matrix", "complex", "units", "base", "text", "choice",
}


def test_table_covers_every_category_with_true_and_false_cases():
    assert len(CASES) >= 150
    for category in CATEGORIES:
        labels = {expected for _, _, expected, c in CASES if c == category}
        if category != "base":
            assert labels == {True, False}, f"category {category!r} lacks a true or a false case"
        else:
            assert labels, category
    assert {c for *_, c in CASES} <= CATEGORIES


@pytest.mark.parametrize("gold,pred,expected,category", CASES,
                         ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_table(gold, pred, expected, category):
    verdict = rmath.check(gold, pred)
    assert verdict.equivalent is expected, (gold, pred, verdict.reason)
    assert rmath.is_equivalent(gold, pred) is expected


def test_table_never_evaluates_text(monkeypatch):
    """With eval/exec and SymPy's string parser disabled, every case still gets the same verdict."""

    def refuse(*args, **kwargs):
        raise AssertionError("the verifier tried to evaluate text")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    monkeypatch.setattr(sympy.parsing.sympy_parser, "eval_expr", refuse)
    monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", refuse)
    for gold, pred, expected, _ in CASES:
        assert rmath.check(gold, pred).equivalent is expected, (gold, pred)


def test_source_has_no_eval_calls():
    forbidden = {"eval", "exec", "sympify", "parse_expr", "latex2sympy", "parse_latex", "S",
                 "lambdify", "__import__"}
    builtins_only = {"compile"}  # re.compile is fine, the builtin compile() is not
    for path in (ROOT / "offpolicy_jax" / "rewards").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                assert name not in forbidden, f"{path.name}:{node.lineno} calls {name}"
                if isinstance(func, ast.Name):
                    assert name not in builtins_only, f"{path.name}:{node.lineno} calls {name}"


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{\\frac{1}{\\sqrt{2}}}$.", "\\frac{1}{\\sqrt{2}}"),
    ("first \\boxed{1} then \\fbox{2}", "2"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\boxed{\\{1, 2\\}} and a truncated \\boxed{3", "\\{1, 2\\}"),
    ("work...\n#### 1,234", "1,234"),
    ("The answer is 42.", "42"),
    ("So the final answer is $3.5$. Done.", "3.5"),
    ("Final Answer: **73**", "73"),
    ("we conclude **73**", "73"),
    ("The answer is (C).", "(C)"),
    ("\\boxed 5 is it", "5"),
    ("no answer here", None),
    ("\\boxed{unclosed", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert rmath.extract_answer(text) == expected


def test_extract_answer_nested_braces_and_long_input():
    nested = "{" * 1000 + "1" + "}" * 1000
    assert rmath.extract_answer("\\boxed{" + nested + "}") == nested
    long_text = "x" * 100_000 + " The answer is \\boxed{7}"
    assert rmath.extract_answer(long_text) == "7"


def test_deep_and_huge_inputs_are_refused_quickly():
    nested_frac = "\\frac{1}{" * 100 + "2" + "}" * 100
    for text in ("9^9^9^9^9", "10**10**10", "(10^{100})!", "100000!", nested_frac,
                 "{" * 200 + "1" + "}" * 200, "\\sin(10^{100})", "2^{2^{2^{2^{2^{2}}}}}"):
        verdict = rmath.check("5", text)
        assert not verdict.equivalent
        assert "refused" in verdict.reason or "longer" in verdict.reason, (text, verdict.reason)
    assert "longer" in rmath.check("5", "1" * 100_000).reason


def test_symbolic_expansion_is_bounded():
    """A difference that only ``expand`` could decide is refused when its expansion is huge."""
    blowup = "(f(x)+g(x)+h(x)+f(y)+g(y)+h(y)+P(x)+Q(x))^{20}"  # 888,030 terms: minutes of expand
    start = time.monotonic()
    assert not rmath.check("f(x)", blowup).equivalent
    assert time.monotonic() - start < 5.0
    assert rmath.check("f(x)^2 + 2f(x) + 1", "(f(x)+1)^2").equivalent  # small ones still expand


def test_parser_builds_exact_values():
    assert latex_parser.parse("025") == 25
    assert latex_parser.parse("4.5e33") == sympy_rational(9, 2) * 10**33
    assert latex_parser.parse("2\\frac{1}{2}") == sympy_rational(5, 2)
    with pytest.raises(latex_parser.TooLarge):
        latex_parser.parse("9^{9^{9}}")


def sympy_rational(p, q):
    import sympy

    return sympy.Rational(p, q)


def test_api_names():
    assert rewards.math.extract_answer is rmath.extract_answer
    assert rewards.check("1", "1.0") == rmath.Verdict(True, "mathematically equal")
    assert rewards.is_equivalent("\\frac12", "0.5")


def _math_verify_labels():
    """Math-Verify's verdicts on the table, computed in a subprocess (its timeouts use signals)."""
    script = (
        "import json, sys\n"
        "from math_verify import parse, verify\n"
        "cases = json.load(sys.stdin)\n"
        "out = []\n"
        "for gold, pred in cases:\n"
        "    try:\n"
        "        out.append(bool(verify(parse('$' + gold + '$'), parse('$' + pred + '$'))))\n"
        "    except Exception:\n"
        "        out.append(False)\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps([c[:2] for c in CASES]),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_agrees_with_labels_at_least_as_often_as_math_verify():
    pytest.importorskip("math_verify")
    theirs = _math_verify_labels()
    ours = [rmath.check(g, p).equivalent for g, p, _, _ in CASES]
    labels = [c[2] for c in CASES]
    ours_right = sum(o == e for o, e in zip(ours, labels))
    theirs_right = sum(t == e for t, e in zip(theirs, labels))
    print(f"agreement with labels: ours {ours_right}/{len(CASES)}, "
          f"Math-Verify {theirs_right}/{len(CASES)}")
    assert ours_right >= theirs_right
