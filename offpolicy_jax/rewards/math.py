"""Math answer extraction and equivalence: the rules of the verifiable reward.

Imported as ``offpolicy_jax.rewards.math`` (this module shadows nothing: the package uses absolute
imports, and the standard library's ``math`` is imported here as ``_math``).

``extract_answer(text)`` finds the final answer in a model response. ``check(gold, pred)`` decides
whether a predicted answer equals the gold one and says why; ``is_equivalent`` is its boolean.
Both are pure, in-process functions with no deadline; the RL loop calls them through
:class:`offpolicy_jax.rewards.pool.VerifierPool`, which adds a hard per-check deadline.

Model text is parsed only by :mod:`offpolicy_jax.rewards.latex_parser` (a tokenizer and a
recursive-descent parser that build SymPy objects through constructors); nothing here calls
``eval``, ``exec``, ``sympify``, ``parse_expr`` or ``latex2sympy``.

Equivalence rules, applied in this order (each is documented on the function that implements it):

1. *Identical text* after removing formatting (spaces, ``\\left``/``\\right``, ``$``, ``\\!``,
   ``\\dfrac`` -> ``\\frac``, a trailing period): equal. (:func:`canonical_text`)
2. *Multiple choice*: a gold that is a letter A-E (``C``, ``(C)``, ``\\text{(C)}``) equals a
   prediction naming the same letter (``C``, ``(C)``, ``\\textbf{(C)} 12``). (:func:`choice_letter`)
3. *Text answers* (``\\text{Evelyn}``): equal when the words agree ignoring case, spacing and
   punctuation. (:func:`_words`)
4. *Mathematical values*: both sides are parsed and compared by :func:`values_equal`:

   - numbers are exact rationals: ``025`` = ``25``, ``0.5`` = ``\\frac12`` = ``1/2``,
     ``10,\\!080`` = ``10080`` (thousands separators), mixed numbers ``2\\frac{1}{2}`` = ``5/2``,
     scientific notation ``4.5e33`` = ``4.5\\times10^{33}`` (e-notation is never Euler's e),
     repeating decimals ``0.1\\overline{6}`` = ``0.1\\dot{6}`` = ``1/6``;
   - Python / NumPy spellings are read as math, never run: ``**`` is a power, ``np.arcsin`` /
     ``math.sqrt`` / ``np.pi`` lose their module prefix, ``theta_w`` is ``\\theta_w``;
   - a percentage ``x\\%`` equals both ``x`` and ``x/100``; a degree value ``x^\\circ`` equals both
     ``x`` and ``x\\pi/180`` (only ``x`` with ``check(..., angle_units="strict")``); units
     (``\\text{ cm}``, ``dollars``) are dropped, unless both sides name a unit of
     :data:`UNITS`: then one dimension converts (``45 \\text{ min}`` =
     ``0.75 \\text{ h}``, ``5.4 \\text{ cents}`` = ``\\$0.054``) and two dimensions differ
     (:func:`compare_quantities`);
   - other scalars are compared by :func:`scalars_equal`: exactly when both are rationals,
     otherwise numerically at 40 significant digits with relative tolerance :data:`REL_TOL`
     (1e-12). ``3.14`` is not ``\\pi``, ``1.414`` is not ``\\sqrt2``, ``1-1/e`` is not ``1+1/e``;
     expressions with variables are compared at 6 deterministic sample points (3 in (0.3, 2.3),
     3 in (2.5, 19.5));
   - ``x = 5`` and ``f(x) = 2x`` equal ``5`` / ``2x`` (labels are dropped); two equations are equal
     when ``lhs - rhs`` agree up to a non-zero constant factor; a labelled tuple
     ``(a, b) = (1, 2)`` is the tuple ``(1, 2)``; an assignment with different labels
     ``b = 2, a = 1`` is the tuple of its values in label order ``(1, 2)`` and equals another
     assignment only label by label (``f(n)=n, g(n)=1`` is not ``f(n)=1, g(n)=n``); repeated labels
     ``x = 1, x = 2`` are a list of solutions;
   - inequalities become intervals (``x \\le 3`` = ``(-\\infty, 3]``, ``3 \\ge x``; ``x<1`` or
     ``x>2`` = ``(-\\infty,1)\\cup(2,\\infty)``); endpoints must agree and so must open/closed ends;
   - ``\\{..\\}`` sets and bare lists ``1, 2`` are unordered (same multiset, no extra or missing
     element; ordered with ``check(..., ordered_lists=True)``); parenthesised tuples ``(a, b)``
     are ordered; a vector ``\\begin{pmatrix}..`` equals the tuple of its entries; matrices are
     compared entry by entry, and a scalar times a matrix or tuple is multiplied out
     (``\\frac{8}{49}\\begin{pmatrix} 2 \\\\ 6 \\end{pmatrix}``, ``-\\begin{pmatrix}..``);
   - complex numbers use ``i`` as the imaginary unit; ``a \\pm b`` is the set ``{a+b, a-b}``.
5. Anything that fails to parse is compared as text only (rule 1 or 3); a prediction that cannot
   be parsed is never equal to a mathematical gold.
"""

from __future__ import annotations

import dataclasses
import fractions
import itertools
import math as _math
import re

import sympy

from offpolicy_jax.rewards import latex_parser as lp

REL_TOL = 1e-12  # relative tolerance of numeric comparison (at EVAL_DIGITS significant digits)
ABS_TOL = 1e-60  # absolute floor, for values that are exactly zero up to evaluation error.
# Zero-valued expressions evaluate below ~1e-140 (SymPy's evalf is adaptive); the floor must stay
# far below physical magnitudes (Minerva golds reach 1e-27), or pi*10^-26 would equal 3*10^-26.
EVAL_DIGITS = 40
MAX_ANSWER_CHARS = 1_000  # longer extracted answers are refused (longest benchmark gold: 204)
MAX_RESPONSE_CHARS = 200_000  # only the tail of longer responses is searched for an answer
MAX_ITEMS = 64  # largest list/set/tuple compared element by element
MAX_EXPANDED_TERMS = 1_000  # symbolic expansion of a difference is refused beyond this many terms
_SAMPLE_POINTS = 6
_MIN_VALID_POINTS = 3


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison: ``equivalent`` and a short human-readable ``reason``."""

    equivalent: bool
    reason: str


# ----------------------------------------------------------------------------------------------
# Extraction.

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced_content(text: str, open_index: int) -> str | None:
    """Content of the balanced ``{...}`` whose ``{`` is at ``open_index``; None if unbalanced."""
    depth = 0
    for k in range(open_index, len(text)):
        ch = text[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1:k]
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed)."""
    positions = sorted(
        (m.start(), m.end()) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd), text))
    for start, end in reversed(positions[-50:]):
        k = end
        while k < len(text) and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            content = _braced_content(text, k)
            if content is not None:
                return content
        elif end < len(text) and text[end] == " ":
            # "\boxed 5": the argument runs to the next space or math delimiter
            m = re.match(r"[^\s$]+", text[k:])
            if m:
                return m.group(0)
    return None


_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_BOLD_RE = re.compile(r"\*\*([^*\n]{1,100})\*\*")


def _clean_extracted(answer: str) -> str | None:
    answer = answer.strip()
    for _ in range(3):
        before = answer
        answer = answer.strip().strip("*").strip()
        if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
            answer = answer.strip("$").strip()
        answer = answer.rstrip(".").strip()
        if answer == before:
            break
    inner = _last_boxed(answer)
    if inner is not None:
        answer = inner.strip()
    return answer or None


def extract_answer(text: str) -> str | None:
    """Finds the final answer in a model response; ``None`` when there is none.

    Looked for, in this order (the first kind found wins, and within a kind the last occurrence):
    the last complete ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces are balanced); a GSM8K
    ``#### x`` line; "The answer is x" / "Final answer: x" (up to the end of the line or sentence);
    a bold answer ``**73**``. Only the last :data:`MAX_RESPONSE_CHARS` characters are searched.
    """
    if not isinstance(text, str) or not text:
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean_extracted(boxed)
    hash_pos = text.rfind("####")
    if hash_pos >= 0:
        line = text[hash_pos + 4:].split("\n", 1)[0]
        cleaned = _clean_extracted(line)
        if cleaned:
            return cleaned
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end():].split("\n", 1)[0]
        # end of sentence: ". " followed by a capital letter or end of text; keep decimals intact
        sentence = re.split(r"\.\s+(?=[A-Z])|\.$", rest, maxsplit=1)[0]
        cleaned = _clean_extracted(sentence)
        if cleaned:
            return cleaned
    bolds = _BOLD_RE.findall(text)
    if bolds:
        return _clean_extracted(bolds[-1])
    return None


# ----------------------------------------------------------------------------------------------
# Text normalization.

_FORMATTING_RE = re.compile(
    r"\\left|\\right|\\displaystyle|\\!|\\,|\\;|\\:|\\ |~|\$|\\quad|\\qquad|\s+")


def canonical_text(answer: str) -> str:
    """Rule 1: the answer with formatting removed, used for the identical-text shortcut.

    Removes spacing commands, ``\\left``/``\\right``, ``$``, whitespace (except between two digits,
    where it is kept as a mark), a trailing period, and
    spells ``\\dfrac``/``\\tfrac`` as ``\\frac`` and ``^{\\circ}`` as ``^\\circ``. Case is kept
    (``X`` and ``x`` are different symbols).
    """
    s = answer.strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    # Digits separated only by spaces are not one number ("4 8" is not "48"): keep a mark there.
    s = re.sub(r"(?<=\d)\s+(?=\d)", "\u2423", s)
    s = _FORMATTING_RE.sub("", s)
    s = s.replace("^{\\circ}", "^\\circ")
    s = re.sub(r"\\text\{\}", "", s)
    return s.rstrip(".")


_CHOICE_GOLD_RE = re.compile(r"^\(?([A-E])\)?$")
_CHOICE_PRED_RE = re.compile(r"^(?:\(([A-E])\)|([A-E])\)?)(?:$|[:.]?\s+(?![-+*/^=,]))")


def _strip_text_commands(answer: str) -> str:
    return re.sub(r"\\(?:text|textbf|mathrm|mbox|textit|mathbf)\s*\{([^{}]*)\}", r"\1", answer)


def choice_letter(answer: str, *, is_gold: bool) -> str | None:
    """Rule 2: the multiple-choice letter an answer names, or None.

    A gold must be exactly a letter A-E, optionally in parentheses or ``\\text{}``. A prediction
    may continue after the letter (``(C) 12``, ``C) twelve``) but must start with it, and what
    follows must not continue an expression (``(C) + 1`` names no choice).
    """
    s = _strip_text_commands(answer).replace("$", "").strip()
    if is_gold:
        m = _CHOICE_GOLD_RE.match(s)
        return m.group(1) if m else None
    m = _CHOICE_PRED_RE.match(s)
    return (m.group(1) or m.group(2)) if m else None


def _words(answer: str) -> str:
    """Rule 3: lower-case letters and digits of an answer, ``\\text{}`` wrappers removed."""
    return re.sub(r"[^a-z0-9]+", "", _strip_text_commands(answer).lower())


_PLAIN_TEXT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .,'\-]*$")


def _same_text(gold: str, pred: str) -> bool:
    """Rule 3: a word gold equals a prediction that is plain words with the same letters.

    The prediction must be words only (after removing ``\\text{}``-like wrappers and ``$``), so
    ``-(\\text{Evelyn})`` or ``Evelyn + 1`` do not pass as ``Evelyn``.
    """
    plain = _strip_text_commands(pred).replace("$", "").strip().rstrip(".")
    return bool(_PLAIN_TEXT_RE.match(plain)) and bool(_words(gold)) and _words(gold) == _words(pred)


@dataclasses.dataclass(frozen=True)
class PreparedAnswer:
    """An answer string ready for the parser, plus what was stripped from it."""

    text: str
    percent: bool
    degrees: bool


_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\circ")
_TRIG_RE = re.compile(r"(?<![a-z])(?:sin|cos|tan|cot|sec|csc)(?![a-z])")
_PERCENT_RE = re.compile(r"\\%|%|\\text\{\s*percent\s*\}|\bpercent\b")
# A LaTeX separator may be followed by spaces (``11,\\! 111,\\! 100`` in MATH-500's golds), which
# the parser would otherwise read as an implicit product of the digit groups.
_THOUSANDS_LATEX_RE = re.compile(r"(\d)(?:,\\!|\{,\}|\\,)\s*(?=\d{3}(?!\d))")
_COUNTED_NOUN_RE = re.compile(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+([A-Za-z]{2,})(?: [A-Za-z]+)*$")
_PLAIN_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


# Repeating decimals: 0.1\overline{6} (the bar over the period) and 0.1\dot{6} /
# 0.\dot{1}4285\dot{7} (dots over the first and last digit of the period). The whole number part and the digits before
# the period may be empty (.\overline{3}); the period has at most MAX_PERIOD_DIGITS digits.
MAX_PERIOD_DIGITS = 100
_OVERLINE_RE = re.compile(
    r"(?<![\d.])(\d*)\.(\d*)\\overline\s*\{\s*(\d{1,%d})\s*\}" % MAX_PERIOD_DIGITS)
_DOTTED_RE = re.compile(
    r"(?<![\d.])(\d*)\.(\d*)\\dot\s*(?:\{\s*(\d)\s*\}|(\d))"
    r"(?:(\d{0,%d})\\dot\s*(?:\{\s*(\d)\s*\}|(\d)))?" % MAX_PERIOD_DIGITS)


def repeating_fraction(whole: str, fixed: str, period: str) -> fractions.Fraction:
    """The exact value of ``whole.fixed(period)(period)...``: ``("0", "1", "6")`` is 1/6."""
    shift = 10 ** len(fixed)
    value = fractions.Fraction(int(whole or "0")) + fractions.Fraction(int(fixed or "0"), shift)
    return value + fractions.Fraction(int(period), (10 ** len(period) - 1) * shift)


def _as_braced_fraction(value: fractions.Fraction) -> str:
    # braces keep it one atom: "2 0.\overline{3}" must not become the mixed number 2 1/3
    return f"{{\\frac{{{value.numerator}}}{{{value.denominator}}}}}"


def expand_repeating_decimals(s: str) -> str:
    """Rewrites repeating decimals (``\\overline``, ``\\dot``) as exact fractions of their digits.

    ``0.\\overline{9}`` is 1 and ``0.1\\overline{6}`` is 1/6 (the digits are never evaluated as
    code: the fraction is computed from the digit strings here).
    """
    s = _OVERLINE_RE.sub(lambda m: _as_braced_fraction(repeating_fraction(*m.groups())), s)

    def dotted(m: re.Match) -> str:
        whole, fixed, first_a, first_b, middle, last_a, last_b = m.groups()
        last = last_a or last_b
        period = (first_a or first_b) + ((middle or "") + last if last else "")
        return _as_braced_fraction(repeating_fraction(whole, fixed, period))

    return _DOTTED_RE.sub(dotted, s)


# Python / NumPy spellings (Minerva's golds, and code-minded model answers): "np.arcsin(10/13)",
# "math.sqrt(2)", "np.pi". The module prefix is dropped before a name the parser knows; "**" is
# already a power in the tokenizer. The text is still only tokenized, never run.
_PY_NAMES = sorted(set(lp.FUNCTION_NAMES) | {"pi", "e", "inf"}, key=len, reverse=True)
_PY_MODULE_RE = re.compile(r"(?<![A-Za-z0-9_.])(?:np|numpy|math|cmath|sympy|sp)\.(%s)(?![A-Za-z0-9_])"
                           % "|".join(_PY_NAMES))


def strip_module_prefixes(s: str) -> str:
    """``np.arcsin(x)`` -> ``arcsin(x)``, ``math.pi`` -> ``pi``, only before names the parser knows."""
    return _PY_MODULE_RE.sub(r"\1", s)


def prepare(answer: str) -> PreparedAnswer:
    """Normalizes an answer string for parsing (the number-format rules).

    - ``\\boxed{x}`` and ``$..$`` / ``\\(..\\)`` wrappers are removed;
    - thousands separators: ``10,\\!080``, ``10,\\! 080``, ``10{,}080``, ``10\\,080`` and a whole
      answer of the form
      ``1,234,567`` lose their separators (``1,2`` stays a list);
    - a degree sign (``^\\circ``, ``°``, ``\\text{ degrees}``) and a percent sign (``\\%``, ``%``)
      are removed and remembered (see :func:`alternatives`); but in an answer with a trigonometric
      function, degree signs are kept as ``^{\\circ}`` and the parser reads ``x^{\\circ}`` as
      ``x\\pi/180`` where it stands, so ``\\sin 60^\\circ`` is ``\\sqrt3/2`` (not ``\\sin 60`` or
      ``\\pi\\sin(60)/180``);
    - repeating decimals ``0.1\\overline{6}`` / ``0.1\\dot{6}`` become the exact fraction (1/6), see
      :func:`expand_repeating_decimals`;
    - Python module prefixes before known names are dropped (``np.arcsin`` -> ``arcsin``,
      ``math.pi`` -> ``pi``), see :func:`strip_module_prefixes`;
    - ``\\$`` and a trailing period are removed, and so are plain words after a plain number
      (``18 cookies`` -> ``18``).
    """
    s = answer.strip()
    boxed = _last_boxed(s)
    if boxed is not None and canonical_text(s).startswith(("\\boxed", "\\fbox")):
        s = boxed
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s.strip())
    s = _THOUSANDS_LATEX_RE.sub(r"\1", s)
    s = expand_repeating_decimals(s)
    s = strip_module_prefixes(s)
    if _TRIG_RE.search(s) and _DEGREE_RE.search(s):
        degrees = False  # read inline by the parser: sin(x degrees)
        s = _DEGREE_RE.sub(lambda _: "^{\\circ}", s)
    else:
        degrees = bool(_DEGREE_RE.search(s)) or bool(re.search(r"\bdegrees?\b", s))
        s = _DEGREE_RE.sub("", s)
    percent = bool(_PERCENT_RE.search(s))
    s = _PERCENT_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    counted = _COUNTED_NOUN_RE.match(s)
    if counted and not lp.is_math_word(counted.group(2)):  # "18 cookies", "$1,234.50 per week": a plain number followed by plain words
        s = counted.group(1)
    if _PLAIN_THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return PreparedAnswer(s, percent, degrees)


# ----------------------------------------------------------------------------------------------
# Value comparison.


def map_scalars(value, fn):
    """Applies ``fn`` to every scalar inside an answer value (lists, sets, tuples, matrices...)."""
    if isinstance(value, sympy.Basic):
        return fn(value)
    if isinstance(value, (lp.Items, lp.SetOf, lp.PlusMinus)):
        return type(value)(tuple(map_scalars(v, fn) for v in value.values))
    if isinstance(value, lp.Bracketed):
        return lp.Bracketed(tuple(map_scalars(v, fn) for v in value.values), value.left, value.right)
    if isinstance(value, lp.MatrixOf):
        return lp.MatrixOf(tuple(tuple(fn(v) for v in row) for row in value.rows))
    if isinstance(value, lp.Relation):
        return lp.Relation(tuple(map_scalars(v, fn) for v in value.operands), value.ops)
    if isinstance(value, lp.IntervalUnion):
        return lp.IntervalUnion(tuple(
            lp.Interval(fn(p.lo), fn(p.hi), p.left_open, p.right_open) for p in value.parts))
    return value


def alternatives(prepared: PreparedAnswer, value, angle_units: str = "convert") -> list:
    """The readings of a parsed answer: ``x%`` is ``x`` or ``x/100``; ``x°`` is ``x`` or
    ``x*pi/180`` (only ``x`` when ``angle_units="strict"``)."""
    out = [value]
    if prepared.percent:
        out.append(map_scalars(value, lambda v: v / 100))
    if prepared.degrees and angle_units == "convert":
        out.append(map_scalars(value, lambda v: v * sympy.pi / 180))
    return out


def _is_label(expr) -> bool:
    """A left-hand side that names the answer: ``x``, ``a_1``, ``f(x)``."""
    if isinstance(expr, sympy.Symbol):
        return True
    return isinstance(expr, sympy.core.function.AppliedUndef) and all(
        isinstance(a, sympy.Symbol) for a in expr.args)


def _is_label_tuple(expr) -> bool:
    """A parenthesised tuple of labels: the ``(a, b)`` of ``(a, b) = (1, 2)``."""
    return (isinstance(expr, lp.Bracketed) and (expr.left, expr.right) == ("(", ")")
            and all(_is_label(v) for v in expr.values))


def _labelled_value(value):
    """The right-hand side of ``label = value`` (or ``(a, b) = (1, 2)``), else None."""
    if not (isinstance(value, lp.Relation) and len(value.ops) == 1 and value.ops[0] in ("=", "in")):
        return None
    lhs, rhs = value.operands
    if _is_label(lhs):
        return rhs
    same_length = isinstance(rhs, lp.Bracketed) and len(rhs.values) == len(lhs.values)
    if _is_label_tuple(lhs) and same_length:
        return rhs
    return None


def _natural_key(name: str) -> tuple:
    """Sort key that puts ``x_2`` before ``x_10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.split(r"(\d+)", name) if part)


def assignment_tuple(values: tuple) -> lp.Bracketed | None:
    """``x = 1, y = 2`` (two or more *different* labels) as the tuple of values in label order.

    An assignment names each value, so its order is the order of the names (a, b, c; x, y, z;
    f before g), whatever order the answer lists them in; it then compares with a bare tuple
    ``(1, 2)`` or list ``1, 2`` in that order, and with another assignment label by label.
    Repeated labels (``x = 1, x = 2``: the solutions of one unknown) are not an assignment.
    """
    if len(values) < 2 or not all(_labelled_value(v) is not None for v in values):
        return None
    if not all(_is_label(v.operands[0]) for v in values):
        return None
    names = [str(v.operands[0]) for v in values]
    if len(set(names)) != len(names):
        return None
    ordered = sorted(zip(names, values), key=lambda nv: _natural_key(nv[0]))
    return lp.Bracketed(tuple(v.operands[1] for _, v in ordered), "(", ")")


def strip_labels(value):
    """Drops the names of an answer: ``x = 5`` -> ``5``, ``f(x) = 2x`` -> ``2x``,
    ``x \\in [1,2]`` -> ``[1,2]``, ``(a, b) = (1, 2)`` -> ``(1, 2)``, inside lists too;
    ``b = 2, a = 1`` -> the ordered tuple ``(1, 2)`` (see :func:`assignment_tuple`)."""
    inner = _labelled_value(value)
    if inner is not None:
        return inner
    if isinstance(value, lp.Items):
        assignment = assignment_tuple(value.values)
        if assignment is not None:
            return assignment
    if isinstance(value, (lp.Items, lp.SetOf)):
        return type(value)(tuple(strip_labels(v) for v in value.values))
    return value


_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}


def relation_to_intervals(rel: lp.Relation):
    """An inequality in one variable as an :class:`IntervalUnion`, or None.

    Handles ``x > a``, ``a < x``, ``a < x \\le b`` and ``b > x \\ge a`` (the variable is the bare
    symbol that does not occur on the other sides); ``x \\ne a`` is ``(-oo,a) U (a,oo)``.
    """
    ops, operands = rel.ops, rel.operands
    if any(op not in ("<", "<=", ">", ">=", "!=") for op in ops):
        return None
    if not all(isinstance(v, sympy.Basic) for v in operands):
        return None
    if len(ops) == 1:
        lhs, rhs = operands
        op = ops[0]
        if isinstance(rhs, sympy.Symbol) and not isinstance(lhs, sympy.Symbol):
            lhs, rhs, op = rhs, lhs, _FLIP.get(op, op)
        if not isinstance(lhs, sympy.Symbol) or lhs in rhs.free_symbols:
            return None
        if op == "!=":
            return lp.IntervalUnion((lp.make_interval(-sympy.oo, rhs, True, True),
                                     lp.make_interval(rhs, sympy.oo, True, True)))
        if op in ("<", "<="):
            return lp.IntervalUnion((lp.make_interval(-sympy.oo, rhs, True, op == "<"),))
        return lp.IntervalUnion((lp.make_interval(rhs, sympy.oo, op == ">", True),))
    if len(ops) == 2:
        a, x, b = operands
        if not isinstance(x, sympy.Symbol) or x in a.free_symbols | b.free_symbols:
            return None
        if ops[0] in ("<", "<=") and ops[1] in ("<", "<="):
            return lp.IntervalUnion((lp.make_interval(a, b, ops[0] == "<", ops[1] == "<"),))
        if ops[0] in (">", ">=") and ops[1] in (">", ">="):
            return lp.IntervalUnion((lp.make_interval(b, a, ops[1] == ">", ops[0] == ">"),))
    return None


def _flatten_pm(values) -> tuple:
    """``1 \\pm \\sqrt 2, 3`` is the three values ``1+sqrt2, 1-sqrt2, 3``."""
    out = []
    for v in values:
        out.extend(v.values if isinstance(v, lp.PlusMinus) else (v,))
    return tuple(canonicalize(v) for v in out)


def canonicalize(value):
    """Inequalities -> intervals; a list whose items are all intervals -> their union."""
    if isinstance(value, lp.Relation):
        intervals = relation_to_intervals(value)
        return intervals if intervals is not None else value
    if isinstance(value, lp.PlusMinus):
        return lp.SetOf(value.values)
    if isinstance(value, lp.Items):
        items = _flatten_pm(value.values)
        if all(isinstance(v, lp.IntervalUnion) for v in items):
            return lp.IntervalUnion(tuple(p for v in items for p in v.parts))
        return lp.Items(items)
    if isinstance(value, lp.SetOf):
        return lp.SetOf(_flatten_pm(value.values))
    return value


def _evalf(expr, subs=None):
    """``expr`` evaluated to EVAL_DIGITS digits as (re, im) SymPy Floats, or None if not a number."""
    try:
        value = expr.evalf(EVAL_DIGITS, subs=subs) if subs else expr.evalf(EVAL_DIGITS)
    except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
        return None
    if not value.is_number or value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        return None
    re_part, im_part = value.as_real_imag()
    if not (isinstance(re_part, (sympy.Float, sympy.Integer, sympy.Rational))
            and isinstance(im_part, (sympy.Float, sympy.Integer, sympy.Rational))):
        return None
    return sympy.Float(re_part, EVAL_DIGITS), sympy.Float(im_part, EVAL_DIGITS)


def _close(va, vb) -> bool:
    dr, di = va[0] - vb[0], va[1] - vb[1]
    diff = sympy.sqrt(dr * dr + di * di)
    scale = max(sympy.sqrt(va[0] ** 2 + va[1] ** 2), sympy.sqrt(vb[0] ** 2 + vb[1] ** 2))
    return bool(diff <= ABS_TOL or diff <= REL_TOL * scale)


def _infinite(expr) -> bool:
    return expr in (sympy.oo, -sympy.oo, sympy.zoo)


def _sample_points(symbols):
    """Deterministic, irrational-looking sample values for each free symbol (one dict per point)."""
    points = []
    for k in range(_SAMPLE_POINTS):
        point = {}
        for j, sym in enumerate(symbols):
            # distinct values, different for every symbol and point: half of the points in
            # (0.3, 2.3), half in (2.5, 19.5) so that integer-valued parts (floor) vary too
            frac = ((k + 1) * 0.6180339887498949 + (j + 1) * 0.4142135623730951) % 1.0
            low, width = (0.3, 2.0) if k % 2 == 0 else (2.5, 17.0)
            point[sym] = sympy.Float(low + width * frac, EVAL_DIGITS)
        points.append(point)
    return points


def _max_integer_exponent(expr) -> int:
    exps = [abs(int(p.exp)) for p in expr.atoms(sympy.Pow) if p.exp.is_Integer]
    return max(exps, default=0)


def scalars_equal(a, b) -> bool:
    """Rule 4 for scalars (numbers and expressions).

    - structurally identical SymPy objects are equal; infinities equal only themselves;
    - two exact rationals are compared exactly;
    - other constants are evaluated to :data:`EVAL_DIGITS` digits and equal when
      ``|a - b| <= REL_TOL * max(|a|, |b|)`` (or ``<= ABS_TOL``); complex values compare both parts;
    - with free symbols, both are evaluated at 6 deterministic points; equal when at least 3 points
      evaluate and all evaluated points agree. Expressions that cannot be evaluated (undefined
      functions) are equal when ``expand(a - b)`` is zero (only for small integer powers).
    """
    if a == b:
        return True
    if _infinite(a) or _infinite(b):
        return False
    if isinstance(a, sympy.Rational) and isinstance(b, sympy.Rational):
        return False
    symbols = sorted(a.free_symbols | b.free_symbols, key=lambda s: s.name)
    if not symbols:
        va, vb = _evalf(a), _evalf(b)
        if va is not None and vb is not None:
            return _close(va, vb)
        return _expand_equal(a, b)
    valid = 0
    for point in _sample_points(symbols):
        va, vb = _evalf(a, point), _evalf(b, point)
        if va is None or vb is None:
            continue
        if not _close(va, vb):
            return False
        valid += 1
    if valid >= _MIN_VALID_POINTS:
        return True
    return _expand_equal(a, b)


def _expanded_terms(expr, limit: int = MAX_EXPANDED_TERMS) -> int:
    """An upper bound on the number of terms of ``expand(expr)`` (capped just above ``limit``)."""
    if expr.is_Add:
        return min(limit + 1, sum(_expanded_terms(a, limit) for a in expr.args))
    if expr.is_Mul:
        total = 1
        for a in expr.args:
            total = min(limit + 1, total * _expanded_terms(a, limit))
        return total
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 1:
        n, k = _expanded_terms(expr.base, limit), int(expr.exp)
        return limit + 1 if k > limit else min(limit + 1, _math.comb(n + k - 1, k))
    return 1


def _expand_equal(a, b) -> bool:
    """``expand(a - b) == 0``, only for small integer powers and expansions of at most
    :data:`MAX_EXPANDED_TERMS` terms (``(f(x)+g(x)+...)^{20}`` would take minutes)."""
    diff = a - b
    if _max_integer_exponent(diff) > 20 or sympy.count_ops(diff) > 200:
        return False
    if _expanded_terms(diff) > MAX_EXPANDED_TERMS:
        return False
    return sympy.expand(diff) == 0


def _equations_equal(a: lp.Relation, b: lp.Relation) -> bool:
    """Two equations are equal when ``lhs - rhs`` agree up to a non-zero constant factor."""
    if not all(isinstance(v, sympy.Basic) for v in a.operands + b.operands):
        return False
    da = a.operands[0] - a.operands[1]
    db = b.operands[0] - b.operands[1]
    if scalars_equal(da, db) or scalars_equal(da, -db):
        return True
    symbols = sorted(da.free_symbols | db.free_symbols, key=lambda s: s.name)
    if not symbols:
        return False
    ratios = []
    for point in _sample_points(symbols):
        va, vb = _evalf(da, point), _evalf(db, point)
        if va is None or vb is None:
            continue
        if _close(vb, (sympy.Float(0), sympy.Float(0))):
            if not _close(va, vb):
                return False
            continue
        denom = vb[0] ** 2 + vb[1] ** 2
        ratio = ((va[0] * vb[0] + va[1] * vb[1]) / denom, (va[1] * vb[0] - va[0] * vb[1]) / denom)
        ratios.append(ratio)
    if len(ratios) < _MIN_VALID_POINTS:
        return False
    if _close(ratios[0], (sympy.Float(0), sympy.Float(0))):
        return False
    return all(_close(r, ratios[0]) for r in ratios[1:])


def _relations_equal(a: lp.Relation, b: lp.Relation) -> bool:
    if a.ops == ("=",) and b.ops == ("=",):
        return _equations_equal(a, b)
    if len(a.ops) != len(b.ops):
        return False
    if a.ops == b.ops:
        return all(values_equal(x, y) for x, y in zip(a.operands, b.operands))
    flipped = tuple(_FLIP.get(op, op) for op in reversed(b.ops))
    return a.ops == flipped and all(
        values_equal(x, y) for x, y in zip(a.operands, reversed(b.operands)))


def _sort_key(interval: lp.Interval):
    if interval.lo == -sympy.oo:
        return float("-inf")
    value = _evalf(interval.lo)
    return float(value[0]) if value is not None else float("inf")


def intervals_equal(a: lp.IntervalUnion, b: lp.IntervalUnion) -> bool:
    """Unions of intervals: same pieces (sorted by left end), endpoints equal, same open/closed ends."""
    if len(a.parts) != len(b.parts):
        return False
    for x, y in zip(sorted(a.parts, key=_sort_key), sorted(b.parts, key=_sort_key)):
        if x.left_open != y.left_open or x.right_open != y.right_open:
            return False
        if not (scalars_equal(x.lo, y.lo) and scalars_equal(x.hi, y.hi)):
            return False
    return True


def _bracketed_as_intervals(value: lp.Bracketed) -> lp.IntervalUnion | None:
    if len(value.values) != 2 or not all(isinstance(v, sympy.Basic) for v in value.values):
        return None
    return lp.IntervalUnion((lp.make_interval(value.values[0], value.values[1], value.left == "(",
                                              value.right == ")"),))


def multisets_equal(a: tuple, b: tuple) -> bool:
    """Unordered comparison: every item is matched to a distinct equal item on the other side."""
    if len(a) != len(b) or len(a) > MAX_ITEMS:
        return False
    unused = list(b)
    for x in a:
        for k, y in enumerate(unused):
            if values_equal(x, y):
                del unused[k]
                break
        else:
            return False
    return True


def _ordered_equal(a, b) -> bool:
    return len(a) == len(b) and len(a) <= MAX_ITEMS and all(
        values_equal(x, y) for x, y in zip(a, b))


def _vector_entries(matrix: lp.MatrixOf):
    if len(matrix.rows) == 1:
        return matrix.rows[0]
    if all(len(r) == 1 for r in matrix.rows):
        return tuple(r[0] for r in matrix.rows)
    return None


def values_equal(gold, pred) -> bool:
    """Rule 4: compares two parsed answer values (see the module docstring for the rules)."""
    gold, pred = canonicalize(gold), canonicalize(pred)
    if isinstance(gold, sympy.Basic) and isinstance(pred, sympy.Basic):
        return scalars_equal(gold, pred)
    if isinstance(gold, lp.Text) or isinstance(pred, lp.Text):
        return isinstance(gold, lp.Text) and isinstance(pred, lp.Text) and gold.words == pred.words
    if isinstance(gold, lp.IntervalUnion) or isinstance(pred, lp.IntervalUnion):
        a, b = (_to_intervals(v) for v in (gold, pred))
        return a is not None and b is not None and intervals_equal(a, b)
    if isinstance(gold, lp.Bracketed) and isinstance(pred, lp.Bracketed):
        if len(gold.values) == 2 and (gold.left, gold.right) != (pred.left, pred.right):
            return False
        return _ordered_equal(gold.values, pred.values)
    unordered = (lp.Items, lp.SetOf)
    if isinstance(gold, unordered) and isinstance(pred, unordered):
        return multisets_equal(gold.values, pred.values)
    if isinstance(gold, lp.Bracketed) and isinstance(pred, lp.Items) or (
            isinstance(gold, lp.Items) and isinstance(pred, lp.Bracketed)):
        # a bare list against a parenthesised tuple: compared in order
        tup = gold if isinstance(gold, lp.Bracketed) else pred
        if tup.left != "(" or tup.right != ")":
            return False
        return _ordered_equal(gold.values, pred.values)
    if isinstance(gold, lp.MatrixOf) and isinstance(pred, lp.MatrixOf):
        return (len(gold.rows) == len(pred.rows) and len(gold.rows[0]) == len(pred.rows[0])
                and all(scalars_equal(x, y) for rg, rp in zip(gold.rows, pred.rows)
                        for x, y in zip(rg, rp)))
    if isinstance(gold, lp.MatrixOf) or isinstance(pred, lp.MatrixOf):
        matrix, other = (gold, pred) if isinstance(gold, lp.MatrixOf) else (pred, gold)
        entries = _vector_entries(matrix)
        if entries is None or not isinstance(other, lp.Bracketed) or other.left != "(":
            return False
        return _ordered_equal(entries, other.values)
    if isinstance(gold, lp.Relation) and isinstance(pred, lp.Relation):
        return _relations_equal(gold, pred)
    if isinstance(gold, sympy.Basic) and isinstance(pred, lp.SetOf) and len(pred.values) == 1:
        return values_equal(gold, pred.values[0])
    if isinstance(pred, sympy.Basic) and isinstance(gold, lp.SetOf) and len(gold.values) == 1:
        return values_equal(gold.values[0], pred)
    return False


def _to_intervals(value) -> lp.IntervalUnion | None:
    if isinstance(value, lp.IntervalUnion):
        return value
    if isinstance(value, lp.Bracketed):
        return _bracketed_as_intervals(value)
    if isinstance(value, lp.SetOf) and all(isinstance(v, sympy.Basic) for v in value.values):
        return lp.IntervalUnion(tuple(lp.make_interval(v, v, False, False) for v in value.values))
    return None


# ----------------------------------------------------------------------------------------------
# Quantities with units.

# name -> (dimension, size in the dimension's base unit). Only units whose size is a fixed
# definition (no months, no years); names of one or two letters that are also ordinary symbols
# ("m", "s", "g", "h", "in", "mi") count as units only inside \\text{} / \\mathrm{}.
_UNIT_TABLE = (
    (("s", "sec", "secs", "second", "seconds"), "time", sympy.Integer(1)),
    (("min", "mins", "minute", "minutes"), "time", sympy.Integer(60)),
    (("h", "hr", "hrs", "hour", "hours"), "time", sympy.Integer(3600)),
    (("day", "days"), "time", sympy.Integer(86400)),
    (("week", "weeks"), "time", sympy.Integer(604800)),
    (("mm", "millimeter", "millimeters", "millimetre", "millimetres"), "length",
     sympy.Rational(1, 1000)),
    (("cm", "centimeter", "centimeters", "centimetre", "centimetres"), "length",
     sympy.Rational(1, 100)),
    (("m", "meter", "meters", "metre", "metres"), "length", sympy.Integer(1)),
    (("km", "kilometer", "kilometers", "kilometre", "kilometres"), "length", sympy.Integer(1000)),
    (("in", "inch", "inches"), "length", sympy.Rational(254, 10000)),
    (("ft", "foot", "feet"), "length", sympy.Rational(3048, 10000)),
    (("yd", "yard", "yards"), "length", sympy.Rational(9144, 10000)),
    (("mi", "mile", "miles"), "length", sympy.Rational(1609344, 1000)),
    (("mg", "milligram", "milligrams"), "mass", sympy.Rational(1, 1000)),
    (("g", "gram", "grams"), "mass", sympy.Integer(1)),
    (("kg", "kilogram", "kilograms"), "mass", sympy.Integer(1000)),
    (("cent", "cents"), "money", sympy.Rational(1, 100)),
    (("dollar", "dollars"), "money", sympy.Integer(1)),
)
UNITS = {name: (dim, size) for names, dim, size in _UNIT_TABLE for name in names}
_BARE_UNIT_MIN_LETTERS = 2
_AMBIGUOUS_BARE_UNITS = {"in", "mi"}
_UNIT_SUFFIX_RE = re.compile(
    r"^(?P<num>.+?)\s*(?:\\(?:text|mathrm|mbox|textrm|rm)\s*"
    r"\{(?:\s|~|\\[,;:! ])*(?P<braced>[A-Za-z]+)\s*\}"
    r"|(?<![A-Za-z\\])(?P<bare>[A-Za-z]+))\s*\.?\s*$", re.DOTALL)
_DOLLAR_PREFIX_RE = re.compile(r"^\\\$\s*(?P<num>[^$]+)$")


@dataclasses.dataclass(frozen=True)
class Quantity:
    """A number with a unit of :data:`UNITS`: ``45 \\text{ minutes}``, ``\\$0.05``."""

    value: object  # a SymPy number
    dimension: str
    size: object  # the unit's size in the dimension's base unit


def _unit_of(match: re.Match) -> tuple | None:
    braced, bare = match.group("braced"), match.group("bare")
    name = (braced or bare).lower()
    if bare and (len(name) < _BARE_UNIT_MIN_LETTERS or name in _AMBIGUOUS_BARE_UNITS):
        return None
    return UNITS.get(name)


def _plain_number(text: str):
    """The SymPy number ``text`` denotes (no free symbols, no lists), or None."""
    try:
        value = lp.parse(prepare(text).text)
    except (lp.ParseError, RecursionError, TypeError, ValueError, ArithmeticError):
        return None
    if isinstance(value, sympy.Basic) and value.is_number and not _infinite(value):
        return value
    return None


def quantity(answer: str) -> Quantity | None:
    """``answer`` as a number with a known unit (a trailing unit name, or a leading ``\\$``)."""
    s = answer.strip().replace("$", "\x00").replace("\\\x00", "\\$").replace("\x00", "").strip()
    dollar = _DOLLAR_PREFIX_RE.match(s)
    if dollar is not None:
        number, unit = dollar.group("num"), UNITS["dollar"]
    else:
        m = _UNIT_SUFFIX_RE.match(s)
        if m is None or (unit := _unit_of(m)) is None:
            return None
        number = m.group("num")
    value = _plain_number(number)
    return None if value is None else Quantity(value, *unit)


def compare_quantities(gold: str, pred: str) -> Verdict | None:
    """Both answers name units of :data:`UNITS`: a verdict in common units; else None.

    Same unit (or only one side with a unit): None, and the rules below drop the unit (a bare
    number is read in the unit the question asks for). Units of one dimension: the values are
    converted (``45 minutes`` = ``0.75 hours``, ``5.4 cents`` = ``\\$0.054``). Different
    dimensions: not equal.
    """
    g = quantity(gold)
    p = None if g is None else quantity(pred)
    if g is None or p is None or (g.dimension == p.dimension and g.size == p.size):
        return None
    if g.dimension != p.dimension:
        return Verdict(False, f"units differ ({p.dimension} vs {g.dimension})")
    same = scalars_equal(g.value * g.size, p.value * p.size)
    return Verdict(same, "same quantity in other units" if same else "quantities differ")


def as_ordered(value):
    """A bare list ``1, 2`` as the ordered tuple ``(1, 2)`` (``ordered_lists=True``); lists of
    inequalities or intervals stay unions."""
    if isinstance(value, lp.Items) and not any(
            isinstance(v, (lp.Relation, lp.IntervalUnion, lp.Text)) for v in value.values):
        return lp.Bracketed(value.values, "(", ")")
    return value


def _readings(answer: str, ordered_lists: bool = False, angle_units: str = "convert"):
    """Parses an answer into its readings (with and without labels, percent and degree forms)."""
    prepared = prepare(answer)
    try:
        value = lp.parse(prepared.text)
    except (TypeError, ValueError, ArithmeticError, AttributeError, NotImplementedError) as exc:
        if isinstance(exc, lp.ParseError):
            raise
        raise lp.ParseError(f"{type(exc).__name__} while building the expression") from exc
    readings = alternatives(prepared, value, angle_units)
    stripped = [strip_labels(v) for v in readings]
    readings += [s for s, r in zip(stripped, readings) if s is not r]
    return [as_ordered(v) for v in readings] if ordered_lists else readings


ANGLE_UNITS = ("convert", "strict")


def check(gold: str, pred: str | None, *, ordered_lists: bool = False,
          angle_units: str = "convert") -> Verdict:
    """Decides whether ``pred`` is equivalent to ``gold``; pure and in-process (no deadline).

    Applies the rules of the module docstring in order. Errors never escape: an answer that is
    too long, too deeply nested, or too expensive to build is "not equivalent" with the reason.

    Two conventions on which careful graders differ are options (the defaults are the lenient
    reading, since the verifier does not see the question):

    Args:
      ordered_lists: compare bare lists ``1, 2`` in order, as tuples. Default False: a bare list
        is a set of solutions (``-2, 1`` = ``1, -2``). Pass True when the question fixes the order
        ("determine a and b"). Parenthesised tuples and assignments are always ordered.
      angle_units: ``"convert"`` (default): an angle with a degree sign equals the same angle in
        radians (``90^\\circ`` = ``\\frac{\\pi}{2}``). ``"strict"``: the degree sign is dropped
        and no conversion is made, so an answer in radians to a question in degrees is wrong. A bare
        number is always read in the question's unit (``90^\\circ`` = ``90`` in both modes).
    """
    if angle_units not in ANGLE_UNITS:
        raise ValueError(f"angle_units must be one of {ANGLE_UNITS}, got {angle_units!r}")
    if pred is None:
        return Verdict(False, "no answer extracted")
    if not isinstance(gold, str) or not isinstance(pred, str):
        return Verdict(False, "gold and prediction must be strings")
    if len(pred) > MAX_ANSWER_CHARS:
        return Verdict(False, f"prediction longer than {MAX_ANSWER_CHARS} characters")
    if len(gold) > MAX_ANSWER_CHARS:
        return Verdict(False, f"gold longer than {MAX_ANSWER_CHARS} characters")
    if canonical_text(gold) == canonical_text(pred):
        return Verdict(True, "identical after normalization")
    gold_letter = choice_letter(gold, is_gold=True)
    if gold_letter is not None:
        pred_letter = choice_letter(pred, is_gold=False)
        if pred_letter is not None:
            same = pred_letter == gold_letter
            return Verdict(same, f"choice {pred_letter} vs gold {gold_letter}")
    try:
        in_units = compare_quantities(gold, pred)
    except (lp.ParseError, RecursionError, TypeError, ValueError, ArithmeticError) as exc:
        in_units = Verdict(False, f"units not comparable ({type(exc).__name__})")
    if in_units is not None:
        return in_units
    try:
        gold_readings = _readings(gold, ordered_lists, angle_units)
    except (RecursionError, lp.ParseError):
        gold_readings = None
    if gold_readings is None:
        # A gold the parser does not understand: only the same text (ignoring case) matches.
        same = canonical_text(gold).casefold() == canonical_text(pred).casefold()
        return Verdict(same, "same text" if same else "gold not parseable; text differs")
    if all(isinstance(g, lp.Text) for g in gold_readings):
        same = _same_text(gold, pred)
        return Verdict(same, "same text" if same else "text differs")
    try:
        pred_readings = _readings(pred, ordered_lists, angle_units)
    except lp.TooLarge as exc:
        return Verdict(False, f"prediction refused: {exc}")
    except RecursionError:
        return Verdict(False, "prediction nested too deeply")
    except lp.ParseError as exc:
        return Verdict(False, f"prediction not parseable ({exc})")
    try:
        for g, p in itertools.product(gold_readings, pred_readings):
            if values_equal(g, p):
                return Verdict(True, "mathematically equal")
    except RecursionError:
        return Verdict(False, "comparison recursed too deeply")
    except lp.TooLarge as exc:
        return Verdict(False, f"comparison refused: {exc}")
    except (TypeError, ValueError, ArithmeticError, AttributeError, NotImplementedError) as exc:
        return Verdict(False, f"comparison failed ({type(exc).__name__})")
    return Verdict(False, "values differ")


def is_equivalent(gold: str, pred: str | None, **options) -> bool:
    """``check(gold, pred, **options).equivalent``: pure, in-process, no deadline (see
    :func:`check`)."""
    return check(gold, pred, **options).equivalent
