"""A small, code-free parser for LaTeX and plain-text math answers.

Model output is untrusted text. Public graders turn it into SymPy objects with ``sympify`` /
``parse_expr`` (both are ``eval`` underneath) or with ``latex2sympy`` grammars that call them.
This module never does: a hand-written tokenizer produces a flat list of tokens, a
recursive-descent parser consumes them, and every SymPy object is built by calling a
constructor (``sympy.Integer``, ``sympy.Symbol``, ``sympy.Add`` ...) with values the parser
has already checked. Nothing in the input can name a Python object or run code.

The parser returns an *answer value*:

* a SymPy expression (a scalar: number, symbolic expression, complex number);
* :class:`Items` — a bare comma list ``1, 2`` or ``x=1 or x=2`` (unordered answers);
* :class:`SetOf` — ``\\{1, 2\\}`` (unordered);
* :class:`Bracketed` — ``(a, b)``, ``[a, b)`` ... (an ordered tuple, or an interval when two
  items; which one is decided at comparison time);
* :class:`IntervalUnion` — intervals built from inequalities, ``\\cup`` or ``\\mathbb{R}``;
* :class:`MatrixOf` — ``\\begin{pmatrix} .. \\end{pmatrix}`` and friends;
* :class:`Relation` — ``x = 5``, ``y = 2x + 1``, ``1 < x \\le 3``;
* :class:`Text` — an answer that is words (``\\text{Evelyn}``).

Reading conventions (documented choices where LaTeX or plain text is ambiguous):

* ``e`` is Euler's number and ``i`` the imaginary unit, except inside e-notation: ``4.5e33`` is
  4.5·10^33 (the ``e`` must be followed by digits); ``4.5 e 33`` with spaces is 4.5·e·33;
* ``x^23`` is x^23 (plain-text style), while ``\\frac12`` / ``\\sqrt2`` take one character;
* an integer followed directly by ``\\frac{int}{int}`` is a mixed number (``2\\frac12`` = 5/2);
* ``52_8`` (digits with a numeric subscript) is the digit string 52 written in base 8;
* ``f(x)``, ``g(t)``, ``u(t)``... (letters ``f g h F G H P Q I u y``) are function applications,
  other letters before ``(`` multiply (``x(x+1)``); runs of up to 4 letters are products
  (``xy`` = x·y); ``\\sin^{-1}`` is ``\\arcsin``; ``\\sin 2x`` is sin(2x);
* a scalar times a matrix or a parenthesised tuple scales every entry (``-\\begin{pmatrix}..``,
  ``\\frac13(1, 2, 5)``, ``M/3``);
* ``a \\pm b`` is the two values a+b and a−b; ``\\text{or}`` / ``and`` / ``,`` separate answers.
* ``x^{\\circ}`` is x·π/180 where it stands (``math.prepare`` keeps degree signs only in answers
  with a trigonometric function, and strips them elsewhere).

Guards against expensive inputs (the process deadline in :mod:`offpolicy_jax.rewards.pool`
is only the backstop): nesting depth is capped at :data:`MAX_DEPTH`; integer powers whose
result would exceed :data:`MAX_RESULT_BITS` bits (``9^9^9^9^9``, ``10**10**10``) raise
:class:`TooLarge` before SymPy computes them; factorials and binomials of arguments above
:data:`MAX_FACTORIAL_ARG` are refused; ``\\pm`` expansions are capped at 16 values; matrices are
capped at :data:`MAX_MATRIX_ENTRIES` entries.
"""

from __future__ import annotations

import dataclasses
import fractions
import re

import sympy

MAX_DEPTH = 60  # nesting levels of groups / fractions / powers
MAX_RESULT_BITS = 20_000  # ~6,000 decimal digits: 2^2023 is fine, 9^(9^9) is not
MAX_FACTORIAL_ARG = 1_000
MAX_SYMBOLIC_EXPONENT = 10_000
MAX_PM_VALUES = 16
MAX_SCI_EXPONENT = 1_000  # |k| in 4.5e{k}
MAX_MATRIX_ENTRIES = 256  # a 16x16 matrix; every entry is compared, possibly at sample points


class ParseError(ValueError):
    """The text is not an answer this grammar understands."""


class TooLarge(ParseError):
    """The text denotes a computation too large to perform safely (huge power, factorial...)."""


# ----------------------------------------------------------------------------------------------
# Answer values other than plain SymPy expressions.


@dataclasses.dataclass(frozen=True)
class Items:
    """A bare list ``a, b, c`` (or values joined by ``or`` / ``and``): compared as a multiset."""

    values: tuple


@dataclasses.dataclass(frozen=True)
class SetOf:
    """``\\{a, b\\}``: compared as a multiset."""

    values: tuple


@dataclasses.dataclass(frozen=True)
class Bracketed:
    """``(a, b)``, ``[a, b]``, ``(a, b]`` ...: an ordered tuple, or an interval if it has two items."""

    values: tuple
    left: str  # "(" or "["
    right: str  # ")" or "]"


@dataclasses.dataclass(frozen=True)
class Interval:
    """One real interval; infinite endpoints are always open."""

    lo: object
    hi: object
    left_open: bool
    right_open: bool


@dataclasses.dataclass(frozen=True)
class IntervalUnion:
    """A union of intervals (a single point ``\\{a\\}`` is the closed interval ``[a, a]``)."""

    parts: tuple


@dataclasses.dataclass(frozen=True)
class MatrixOf:
    """A matrix; ``rows`` is a tuple of equal-length tuples of expressions."""

    rows: tuple


@dataclasses.dataclass(frozen=True)
class Relation:
    """A chain ``a op b op c``; ``ops`` holds canonical names: '=', '<', '<=', '>', '>=', '!=', 'in'."""

    operands: tuple
    ops: tuple


@dataclasses.dataclass(frozen=True)
class Text:
    """A word answer; ``words`` is lower-cased with punctuation and spacing removed."""

    words: str


@dataclasses.dataclass(frozen=True)
class PlusMinus:
    """The values of an expression that contains ``\\pm`` (``1 \\pm \\sqrt 5`` -> two values)."""

    values: tuple


# ----------------------------------------------------------------------------------------------
# Tokenizer.

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
    "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon",
    "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma",
    "Upsilon", "Phi", "Psi", "Omega", "ell", "hbar", "odot", "mho",
}

# name -> (sympy constructor, its inverse for f^{-1}).
_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec,
    "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
    "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan, "arccot": sympy.acot,
    "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "ln": sympy.log,
    "log": sympy.log, "exp": sympy.exp, "abs": sympy.Abs, "sqrt": sympy.sqrt,
}
FUNCTION_NAMES = tuple(_FUNCTIONS)  # public: math.prepare recognises these after "np." / "math."
_INVERSES = {
    "sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan, "cot": sympy.acot,
}
_TRIG = {"sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh"}

# Plain-text words with a mathematical meaning.
_WORD_CONSTANTS = {"pi": sympy.pi, "inf": sympy.oo, "infty": sympy.oo, "infinity": sympy.oo,
                   "oo": sympy.oo}
_SEPARATOR_WORDS = {"or", "and"}

# Units and filler words dropped when they follow a value ("18 dollars", "15 cm^2").
UNIT_WORDS = {
    "cm", "mm", "km", "m", "meter", "meters", "metre", "metres", "inch", "inches", "ft", "feet",
    "foot", "yard", "yards", "mile", "miles", "mph", "kg", "gram", "grams", "pound", "pounds",
    "lb", "lbs", "ounce", "ounces", "sec", "second", "seconds", "min", "minute", "minutes",
    "hr", "hrs", "hour", "hours", "day", "days", "week", "weeks", "month", "months", "year",
    "years", "dollar", "dollars", "cent", "cents", "unit", "units", "degree", "degrees", "deg",
    "square", "sq", "cubic", "percent", "liter", "liters", "litres", "ml", "people", "students",
    "times", "ways", "points", "items", "apples", "per", "each", "mi", "kmh", "radians", "rad",
}

def is_math_word(word: str) -> bool:
    """Whether a plain word means something mathematical (``pi``, ``sin``, ``or``), not a noun."""
    low = word.lower()
    return low in _FUNCTIONS or low in _WORD_CONSTANTS or low in _SEPARATOR_WORDS


_TEXT_COMMANDS = {"text", "textbf", "textit", "mathrm", "mbox", "textrm", "mathbf", "textsf",
                  "operatorname", "mathit", "textup", "boldsymbol", "bm", "rm", "bf"}
_DROP_COMMANDS = {"left", "right", "displaystyle", "bigl", "bigr", "Bigl", "Bigr", "big", "Big",
                  "biggl", "biggr", "quad", "qquad", "limits", "middle", "textstyle", "nonumber"}
_CMD_ALIASES = {
    "dfrac": "frac", "tfrac": "frac", "cfrac": "frac", "le": "leq", "ge": "geq", "leqslant": "leq",
    "geqslant": "geq", "neq": "ne", "lt": "<", "gt": ">", "lvert": "|", "rvert": "|", "vert": "|",
    "lbrace": "{", "rbrace": "}", "times": "*", "cdot": "*", "ast": "*", "div": "/",
    "varnothing": "emptyset", "dbinom": "binom", "tbinom": "binom", "infin": "infty",
    "lceil": "lceil", "to": "to", "cup": "cup", "colon": ":",
}

_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?")
_E_NOTATION_RE = re.compile(r"[eE][-+]?\d")


@dataclasses.dataclass
class Token:
    kind: str  # num, id, cmd, op, text, sep, word, env_begin, env_end, end
    value: str


def _read_braced(text: str, start: int) -> tuple[str, int]:
    """Returns the content of the balanced ``{...}`` opening at ``text[start]`` and the index after it."""
    if start >= len(text) or text[start] != "{":
        raise ParseError(f"expected '{{' at offset {start}")
    depth = 0
    for k in range(start, len(text)):
        ch = text[k]
        if ch == "\\":
            continue
        if ch == "{" and (k == 0 or text[k - 1] != "\\"):
            depth += 1
        elif ch == "}" and (k == 0 or text[k - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:k], k + 1
            if depth > MAX_DEPTH:
                raise ParseError("braces nested too deeply")
    raise ParseError("unbalanced braces")


def tokenize(text: str) -> list[Token]:
    """Splits ``text`` into tokens. Raises :class:`ParseError` on characters it does not know.

    Numbers: ``12``, ``0.5``, ``.5``, and scientific e-notation ``4.5e33`` / ``1e-5`` (the ``e``
    must be followed by digits; a lone ``e`` is Euler's number). Letter runs: known function and
    constant names (``sin``, ``sqrt``, ``pi``, ``inf``), unit words (see :data:`UNIT_WORDS`), the
    separators ``or`` / ``and``, runs of up to 4 letters (split into single-letter symbols, so
    ``xy`` is ``x*y``), and longer words (kept as ``word`` tokens, which only a text answer uses).
    """
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            m = _NUMBER_RE.match(text, i)
            tokens.append(Token("num", m.group(0)))
            i = m.end()
            continue
        if ch.isalpha() and ch.isascii():
            j = i
            while j < n and text[j].isascii() and text[j].isalpha():
                j += 1
            run = text[i:j]
            i = j
            if run in _FUNCTIONS or run in _WORD_CONSTANTS:
                tokens.append(Token("cmd", run))
            elif run in _GREEK and len(run) > 4:
                # Greek names typed without a backslash (Python-style "theta_w"); shorter ones
                # ("eta", "mu") stay products of letters, as before
                tokens.append(Token("cmd", run))
            elif run.lower() in _SEPARATOR_WORDS:
                tokens.append(Token("sep", run.lower()))
            elif run.lower() in UNIT_WORDS and len(run) > 1:
                tokens.append(Token("text", run.lower()))
            elif len(run) <= 4:
                tokens.extend(Token("id", c) for c in run)
            else:
                tokens.append(Token("word", run.lower()))
            continue
        if ch == "\\":
            if i + 1 >= n:
                raise ParseError("dangling backslash")
            nxt = text[i + 1]
            if nxt.isalpha():
                j = i + 1
                while j < n and text[j].isalpha():
                    j += 1
                name = text[i + 1:j]
                i = j
                name = _CMD_ALIASES.get(name, name)
                if name in _DROP_COMMANDS:
                    if name in ("left", "right", "middle") and i < n and text[i] == ".":
                        i += 1
                    continue
                if name in _TEXT_COMMANDS:
                    while i < n and text[i] == " ":
                        i += 1
                    if i < n and text[i] == "{":
                        content, i = _read_braced(text, i)
                    else:
                        content = ""
                    _emit_text(tokens, content, name)
                    continue
                if name in ("begin", "end"):
                    env, i = _read_braced(text, i)
                    tokens.append(Token("env_begin" if name == "begin" else "env_end", env.strip()))
                    continue
                if name in ("*", "/", "{", "}", "|", "<", ">", ":"):
                    tokens.append(Token("op", name))
                    continue
                tokens.append(Token("cmd", name))
                continue
            if nxt == "\\":
                tokens.append(Token("op", "\\\\"))
                i += 2
                continue
            if nxt in "{}":
                tokens.append(Token("op", "\\" + nxt))
                i += 2
                continue
            if nxt in ",;:! %$&_#":
                # spacing (\, \; \: \! and "\ "), and escaped characters
                if nxt == "%":
                    tokens.append(Token("op", "%"))
                i += 2
                continue
            if nxt in "()[]":  # \( \) \[ \] math delimiters
                i += 2
                continue
            if nxt == "|":
                tokens.append(Token("op", "|"))
                i += 2
                continue
            raise ParseError(f"unknown escape \\{nxt}")
        if ch == "*" and i + 1 < n and text[i + 1] == "*":
            tokens.append(Token("op", "^"))
            i += 2
            continue
        if ch in "<>!" and i + 1 < n and text[i + 1] == "=":
            tokens.append(Token("cmd", {"<": "leq", ">": "geq", "!": "ne"}[ch]))
            i += 2
            continue
        if ch == "=" and i + 1 < n and text[i + 1] == "=":
            tokens.append(Token("op", "="))
            i += 2
            continue
        if ch in "+-*/^_()[]{},=<>!|&';:%":
            tokens.append(Token("op", ch))
            i += 1
            continue
        if ch in "−–":
            tokens.append(Token("op", "-"))
            i += 1
            continue
        if ch == "×" or ch == "·":
            tokens.append(Token("op", "*"))
            i += 1
            continue
        if ch == "π":
            tokens.append(Token("cmd", "pi"))
            i += 1
            continue
        if ch == "∞":
            tokens.append(Token("cmd", "infty"))
            i += 1
            continue
        if ch in "≤≥≠":
            tokens.append(Token("cmd", {"≤": "leq", "≥": "geq", "≠": "ne"}[ch]))
            i += 1
            continue
        if ch in "$.~":  # math delimiters, trailing full stop, LaTeX non-breaking space
            if ch == "." and i + 1 < n and not text[i + 1].isspace():
                raise ParseError("stray '.'")
            i += 1
            continue
        raise ParseError(f"unexpected character {ch!r}")
    tokens.append(Token("end", ""))
    return tokens


def _emit_text(tokens: list[Token], content: str, command: str) -> None:
    """Turns ``\\text{...}``-like content into tokens: separators, units, words, or math."""
    stripped = content.strip()
    low = stripped.lower().strip(" ,.")
    if not stripped:
        return
    if low in _SEPARATOR_WORDS:
        tokens.append(Token("sep", low))
        return
    if command in ("mathrm", "mathbf", "operatorname", "boldsymbol", "bm", "mathit") and (
            re.fullmatch(r"[A-Za-z]", stripped) or stripped in _FUNCTIONS):
        tokens.append(Token("cmd", stripped) if stripped in _FUNCTIONS else Token("id", stripped))
        return
    if re.fullmatch(r"[\d.,\s+\-*/^()]+", stripped) and any(c.isdigit() for c in stripped):
        tokens.extend(tokenize(stripped)[:-1])  # digits typed inside \text{}
        return
    tokens.append(Token("text", low))


# ----------------------------------------------------------------------------------------------
# Guarded SymPy constructors.


def _bits(value: sympy.Rational) -> int:
    return max(int(abs(value.p)).bit_length(), int(abs(value.q)).bit_length())


def make_number(literal: str) -> sympy.Rational:
    """An exact rational from a decimal literal (``"025"`` -> 25, ``"4.5e33"``, ``".5"``)."""
    m = _E_NOTATION_RE.search(literal)
    if m is not None:
        exponent = int(literal[m.start() + 1:])
        if abs(exponent) > MAX_SCI_EXPONENT:
            raise TooLarge(f"scientific exponent {exponent} is out of range")
    frac = fractions.Fraction(literal)
    return sympy.Rational(frac.numerator, frac.denominator)


def guarded_pow(base, exponent):
    """``base ** exponent`` with a size check before SymPy evaluates exact integer powers."""
    if isinstance(exponent, sympy.Rational) and isinstance(base, sympy.Rational):
        if base not in (0, 1, -1) and exponent.p != 0:
            # |p/q| * log2|base| bounds the bit length of the result (numerator or denominator).
            bits = abs(int(exponent.p)) * max(_bits(base), 1) / max(int(exponent.q), 1)
            if bits > MAX_RESULT_BITS:
                raise TooLarge(f"power with about {bits:.3g} bits is too large")
    elif isinstance(exponent, sympy.Number) and exponent.is_finite:
        if abs(exponent) > MAX_SYMBOLIC_EXPONENT:
            raise TooLarge("exponent is too large")
    elif isinstance(base, sympy.Rational) and base not in (0, 1, -1):
        # Symbolic exponent on a number: fine (stays unevaluated) unless the exponent is itself
        # an enormous unevaluated power tower.
        pass
    return sympy.Pow(base, exponent)


def guarded_factorial(arg):
    if isinstance(arg, sympy.Number):
        if not (isinstance(arg, sympy.Integer) and 0 <= arg <= MAX_FACTORIAL_ARG):
            shown = str(arg) if len(str(arg)) <= 12 else f"a {len(str(arg))}-character number"
            raise TooLarge(f"factorial of {shown} refused (allowed: integers 0..{MAX_FACTORIAL_ARG})")
    return sympy.factorial(arg)


def guarded_binomial(n, k):
    for value in (n, k):
        if isinstance(value, sympy.Number) and abs(value) > MAX_FACTORIAL_ARG * 10:
            raise TooLarge("binomial argument too large")
    return sympy.binomial(n, k)


def guarded_function(name: str, fn, arg):
    """Applies a named function; refuses trig of huge numbers (argument reduction is costly)."""
    if name in _TRIG and isinstance(arg, sympy.Number) and arg.is_finite and abs(arg) > 10**6:
        raise TooLarge(f"{name} of a huge argument")
    return fn(arg)


def _scalar(value):
    """Checks that an answer value can take part in arithmetic (a SymPy expression)."""
    if isinstance(value, sympy.Basic):
        return value
    raise ParseError(f"cannot do arithmetic with {type(value).__name__}")


def _combine(a, b, fn):
    """Applies a binary operation, distributing over ``\\pm`` value lists."""
    avals = a.values if isinstance(a, PlusMinus) else (a,)
    bvals = b.values if isinstance(b, PlusMinus) else (b,)
    if len(avals) * len(bvals) > MAX_PM_VALUES:
        raise TooLarge("too many \\pm combinations")
    out = tuple(fn(_scalar(x), _scalar(y)) for x in avals for y in bvals)
    return out[0] if len(out) == 1 else PlusMinus(out)


def _is_vector(value) -> bool:
    """A matrix, or a parenthesised tuple of scalars (a vector written as ``(1, 2, 3)``)."""
    if isinstance(value, MatrixOf):
        return True
    return (isinstance(value, Bracketed) and (value.left, value.right) == ("(", ")")
            and all(isinstance(v, sympy.Basic) for v in value.values))


def _multiply(a, b):
    """``a * b``; a scalar times a matrix or vector scales every entry, as in
    ``\\frac{8}{49}\\begin{pmatrix} 2 \\\\ 6 \\end{pmatrix}`` or ``-\\begin{pmatrix}..``
    (answers often factor out a common denominator)."""
    for scalar, vector in ((a, b), (b, a)):
        if isinstance(scalar, sympy.Basic) and _is_vector(vector):
            if isinstance(vector, MatrixOf):
                return MatrixOf(tuple(tuple(scalar * x for x in row) for row in vector.rows))
            return Bracketed(tuple(scalar * x for x in vector.values), "(", ")")
    return _combine(a, b, lambda x, y: x * y)


def _unary(a, fn):
    if isinstance(a, PlusMinus):
        return PlusMinus(tuple(fn(_scalar(x)) for x in a.values))
    return fn(_scalar(a))


def _symbol(name: str):
    """Single letters and Greek names become symbols; ``e`` is Euler's number, ``i`` is sqrt(-1)."""
    if name == "e":
        return sympy.E
    if name == "i":
        return sympy.I
    return sympy.Symbol(name)


# ----------------------------------------------------------------------------------------------
# Parser.

_RELATIONS = {"=": "=", "<": "<", ">": ">", "leq": "<=", "geq": ">=", "ne": "!=", "in": "in",
              "approx": "=", "equiv": "=", "to": "to"}
_FUNCTION_LETTERS = set("fghFGHPQIuy")  # f(x), u(t): function application rather than product
_NON_ATOM_COMMANDS = {"cup", "pm", "mp", "cap", "rfloor", "rceil"}
_MATRIX_ENVS = {"pmatrix", "bmatrix", "matrix", "vmatrix", "Bmatrix", "smallmatrix", "array"}


class _Parser:
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    # -- helpers
    def peek(self, offset: int = 0) -> Token:
        return self.tokens[min(self.pos + offset, len(self.tokens) - 1)]

    def next(self) -> Token:
        tok = self.tokens[self.pos]
        if tok.kind != "end":
            self.pos += 1
        return tok

    def at(self, kind: str, value: str | None = None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (value is None or tok.value == value)

    def expect(self, kind: str, value: str) -> None:
        tok = self.next()
        if tok.kind != kind or tok.value != value:
            raise ParseError(f"expected {value!r}, found {tok.value!r}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise TooLarge(f"nesting deeper than {MAX_DEPTH} levels")

    def leave(self):
        self.depth -= 1

    # -- grammar
    def parse_answer(self):
        value = self.parse_items(closers=())
        if not self.at("end"):
            raise ParseError(f"unexpected {self.peek().value!r}")
        return value

    def parse_items(self, closers):
        """items := item ((',' | ';' | 'or' | 'and') item)*"""
        values = []
        while True:
            while self.at("sep") or self.at("op", ","):
                self.next()
            if self.at("end") or (self.peek().kind == "op" and self.peek().value in closers):
                break
            values.append(self.parse_item())
            if self.at("op", ",") or self.at("op", ";") or self.at("sep"):
                continue
            if self.at("end") or (self.peek().kind == "op" and self.peek().value in closers):
                break
            raise ParseError(f"unexpected {self.peek().value!r}")
        if not values:
            raise ParseError("empty answer")
        return values[0] if len(values) == 1 else Items(tuple(values))

    def parse_item(self):
        """item := text | union (relop union)*;  union := sum (\\cup sum)*"""
        # Leading words ("\text{the answer is} 5", "x \text{ is }") are dropped when math follows.
        words = []
        while self.at("text") or self.at("word"):
            words.append(self.next().value)
        if words and (self.at("end") or self.at("sep") or self.at("op", ",")):
            return Text(_normalize_words(" ".join(words)))
        operands = [self.parse_union()]
        ops = []
        while True:
            tok = self.peek()
            name = tok.value if tok.kind in ("cmd", "op") else None
            if name in _RELATIONS:
                self.next()
                ops.append(_RELATIONS[name])
                operands.append(self.parse_union())
            else:
                break
        if ops:
            return Relation(tuple(operands), tuple(ops))
        return operands[0]

    def parse_union(self):
        parts = [self.parse_sum()]
        while self.at("cmd", "cup") or self.at("op", "U"):
            self.next()
            parts.append(self.parse_sum())
        if len(parts) == 1:
            return parts[0]
        return IntervalUnion(tuple(_as_intervals(parts)))

    def parse_sum(self):
        """sum := [+|-|pm] term ((+|-|pm|mp) term)*"""
        sign = None
        if self.at("op", "+") or self.at("op", "-") or self.at("cmd", "pm") or self.at("cmd", "mp"):
            sign = self.next().value
        value = self.parse_term()
        if sign == "-":
            value = _multiply(sympy.Integer(-1), value) if _is_vector(value) else _unary(
                value, lambda x: -x)
        elif sign in ("pm", "mp"):
            value = _combine(value, PlusMinus((sympy.Integer(1), sympy.Integer(-1))),
                             lambda x, y: x * y)
        while True:
            if self.at("op", "+") or self.at("op", "-"):
                op = self.next().value
                rhs = self.parse_term()
                value = _combine(value, rhs, (lambda x, y: x + y) if op == "+" else (lambda x, y: x - y))
            elif self.at("cmd", "pm") or self.at("cmd", "mp"):
                self.next()
                rhs = self.parse_term()
                value = _combine(value, PlusMinus((rhs, -_scalar(rhs))), lambda x, y: x + y)
            else:
                return value

    def _starts_atom(self) -> bool:
        tok = self.peek()
        if tok.kind in ("num", "id"):
            return True
        if tok.kind == "cmd":
            return tok.value not in _RELATIONS and tok.value not in _NON_ATOM_COMMANDS
        if tok.kind == "env_begin":
            return True
        return tok.kind == "op" and tok.value in ("(", "[", "{", "\\{", "|")

    def parse_term(self):
        """term := factor (('*' | '/' | implicit) factor)*; integer + \\frac{int}{int} is a mixed number."""
        value, lit = self.parse_factor()
        while True:
            if self.at("op", "*") or self.at("op", "/"):
                op = self.next().value
                rhs, _ = self.parse_factor()
                if op == "*":
                    value = _multiply(value, rhs)
                elif _is_vector(value) and isinstance(rhs, sympy.Basic):
                    value = _multiply(value, _divide(sympy.Integer(1), rhs))  # M / 3
                else:
                    value = _combine(value, rhs, _divide)
                lit = None
            elif self.at("text") or self.at("word"):
                self.next()  # a unit after a value: "15\mbox{ cm}^2", "5 \text{ dollars}"
                if self.at("op", "^"):
                    self.next()
                    self.parse_exponent()
            elif self.at("op", "%"):
                self.next()
                value = _unary(value, lambda x: x / 100)
            elif self._starts_atom() and not (self.at("op", "|") and self._closing_bar()):
                rhs, rlit = self.parse_factor()
                if lit == "int" and rlit == "frac":
                    value = _combine(value, rhs, lambda x, y: x + y if x >= 0 else x - y)
                else:
                    value = _multiply(value, rhs)
                lit = None
            else:
                return value

    def _superscript_mark_follows(self, command: str) -> bool:
        """Consumes ``^\\command`` / ``^{\\command}`` if it is next (the parser stands on the
        ``^``): a derivative mark (``prime``) or a degree sign (``circ``)."""
        if self.peek(1).kind == "cmd" and self.peek(1).value == command:
            self.pos += 2
            return True
        if (self.peek(1).kind == "op" and self.peek(1).value == "{" and self.peek(2).kind == "cmd"
                and self.peek(2).value == command and self.peek(3).value == "}"):
            self.pos += 4
            return True
        return False

    def _closing_bar(self) -> bool:
        return getattr(self, "_bar_depth", 0) > 0

    def parse_factor(self):
        """factor := postfix ('^' exponent)?   (right-associative)"""
        self.enter()
        try:
            value, lit = self.parse_postfix()
            if self.at("op", "^") and self._superscript_mark_follows("prime"):
                value = _prime(value)
            elif self.at("op", "^") and self._superscript_mark_follows("circ"):
                # only reached inside trigonometric answers (see math.prepare): x degrees
                value = _unary(value, lambda x: x * sympy.pi / 180)
                lit = None
            elif self.at("op", "^"):
                self.next()
                exponent = self.parse_exponent()
                value = _combine(value, exponent, guarded_pow)
                lit = None
                while self.at("op", "!"):
                    self.next()
                    value = _unary(value, guarded_factorial)
            return value, lit
        finally:
            self.leave()

    def parse_exponent(self):
        """The exponent after '^': a {group}, a signed atom, or a whole number (plain-text style)."""
        self.enter()
        try:
            if self.at("op", "-") or self.at("op", "+"):
                sign = self.next().value
                value = self.parse_exponent()
                return _unary(value, lambda x: -x) if sign == "-" else value
            if self.at("cmd", "circ"):
                raise ParseError("degree sign in an unexpected place")
            if self.at("cmd", "prime"):
                raise ParseError("derivative primes are not supported")
            value, _ = self.parse_factor()
            return value
        finally:
            self.leave()

    def parse_postfix(self):
        value, lit = self.parse_atom()
        while True:
            if self.at("op", "!"):
                self.next()
                value = _unary(value, guarded_factorial)
                lit = None
            elif self.at("op", "_"):
                self.next()
                sub = self._subscript_text()
                if isinstance(value, sympy.Symbol):
                    value = sympy.Symbol(f"{value.name}_{sub}")
                elif lit == "int" and sub.isdigit():
                    pass  # 52_8: digits written in base 8; the digit string is the answer
                elif lit == "log":
                    pass
                else:
                    raise ParseError("subscript on a non-symbol")
            elif self.at("op", "'"):
                self.next()
                value = _prime(value)
            else:
                return value, lit

    def _subscript_text(self) -> str:
        """Reads a subscript and returns its raw token text (used for symbol names)."""
        if self.at("op", "{"):
            self.next()
            parts = []
            depth = 1
            while True:
                tok = self.next()
                if tok.kind == "end":
                    raise ParseError("unbalanced subscript")
                if tok.kind == "op" and tok.value == "{":
                    depth += 1
                elif tok.kind == "op" and tok.value == "}":
                    depth -= 1
                    if depth == 0:
                        break
                parts.append(tok.value)
                if len(parts) > 20:
                    raise ParseError("subscript too long")
            return "".join(parts)
        tok = self.next()
        if tok.kind == "num":
            if len(tok.value) > 1 and tok.value.isdigit():  # x_12 in plain text
                return tok.value
            return tok.value
        if tok.kind in ("id", "cmd", "text"):
            return tok.value
        raise ParseError("bad subscript")

    def parse_group_arg(self):
        """A LaTeX macro argument: ``{...}`` or a single token (``\\frac12`` is 1/2)."""
        tok = self.peek()
        if tok.kind == "op" and tok.value == "{":
            self.next()
            value = self.parse_items(closers=("}",))
            self.expect("op", "}")
            return _scalar_or_raise(value)
        if tok.kind == "num":
            self.next()
            if len(tok.value) > 1 and tok.value[0].isdigit() and tok.value.isdigit():
                # \frac12: the argument is the single character "1"; "2" stays in the stream
                self.tokens.insert(self.pos, Token("num", tok.value[1:]))
                return sympy.Integer(int(tok.value[0]))
            return make_number(tok.value)
        if tok.kind == "id":
            self.next()
            return _symbol(tok.value)
        if tok.kind == "cmd":
            value, _ = self.parse_atom()
            return _scalar(value)
        raise ParseError(f"bad macro argument {tok.value!r}")

    def parse_atom(self):
        """Returns ``(value, literal_kind)``; literal_kind marks integer / fraction literals."""
        tok = self.next()
        kind, val = tok.kind, tok.value
        if kind == "num":
            return make_number(val), ("int" if val.isdigit() else None)
        if kind == "id":
            if val in _FUNCTION_LETTERS and self.at("op", "("):
                return self._apply_undefined(val), None
            return _symbol(val), None
        if kind == "op":
            if val in ("(", "["):
                return self._parse_bracketed(val), None
            if val == "{":
                self.enter()
                try:
                    inner = self.parse_items(closers=("}",))
                    self.expect("op", "}")
                finally:
                    self.leave()
                return inner, None
            if val == "\\{":
                self.enter()
                try:
                    if self.at("op", "\\}"):
                        self.next()
                        return SetOf(()), None
                    inner = self.parse_items(closers=("\\}",))
                    self.expect("op", "\\}")
                finally:
                    self.leave()
                values = inner.values if isinstance(inner, Items) else (inner,)
                return SetOf(tuple(values)), None
            if val == "|":
                self.enter()
                self._bar_depth = getattr(self, "_bar_depth", 0) + 1
                try:
                    inner = self.parse_sum()
                    self.expect("op", "|")
                finally:
                    self._bar_depth -= 1
                    self.leave()
                return _unary(inner, sympy.Abs), None
            raise ParseError(f"unexpected {val!r}")
        if kind == "env_begin":
            return self._parse_environment(val), None
        if kind == "cmd":
            return self._parse_command(val)
        raise ParseError(f"unexpected {val!r}")

    def _apply_undefined(self, name: str):
        self.next()  # "("
        self.enter()
        try:
            args = self.parse_items(closers=(")",))
            self.expect("op", ")")
        finally:
            self.leave()
        values = args.values if isinstance(args, Items) else (args,)
        if len(values) > 8:
            raise ParseError("too many function arguments")
        return sympy.Function(name)(*[_scalar(v) for v in values])

    def _parse_bracketed(self, opener: str):
        self.enter()
        try:
            inner = self.parse_items(closers=(")", "]"))
            closer = self.next()
            if closer.kind != "op" or closer.value not in (")", "]"):
                raise ParseError("unclosed bracket")
        finally:
            self.leave()
        if isinstance(inner, Items):
            return Bracketed(inner.values, opener, closer.value)
        if opener == "(" and closer.value != ")" or opener == "[" and closer.value != "]":
            raise ParseError("mismatched brackets around a single value")
        return inner

    def _parse_environment(self, env: str):
        name = env.rstrip("*")
        if name not in _MATRIX_ENVS:
            raise ParseError(f"unsupported environment {env!r}")
        if name == "array" and self.at("op", "{"):
            self._subscript_text()  # column spec, e.g. {cc}
        rows, row = [], []
        entries = 0
        self.enter()
        try:
            while True:
                if self.at("env_end"):
                    self.next()
                    break
                if self.at("end"):
                    raise ParseError("unterminated matrix")
                entries += 1
                if entries > MAX_MATRIX_ENTRIES:
                    raise TooLarge(f"matrix with more than {MAX_MATRIX_ENTRIES} entries")
                row.append(_scalar_or_raise(self.parse_sum()))
                if self.at("op", "&"):
                    self.next()
                elif self.at("op", "\\\\"):
                    self.next()
                    rows.append(tuple(row))
                    row = []
                elif not self.at("env_end"):
                    raise ParseError(f"unexpected {self.peek().value!r} in matrix")
            if row:
                rows.append(tuple(row))
        finally:
            self.leave()
        if not rows or len({len(r) for r in rows}) != 1:
            raise ParseError("ragged or empty matrix")
        return MatrixOf(tuple(rows))

    def _parse_command(self, name: str):
        if name == "frac":
            self.enter()
            try:
                num = self.parse_group_arg()
                den = self.parse_group_arg()
            finally:
                self.leave()
            lit = "frac" if all(isinstance(v, sympy.Integer) for v in (num, den)) else None
            return _divide(num, den), lit
        if name == "sqrt":
            self.enter()
            try:
                index = None
                if self.at("op", "["):
                    self.next()
                    index = _scalar_or_raise(self.parse_sum())
                    self.expect("op", "]")
                if self.at("op", "("):  # plain text sqrt(2)
                    arg = _scalar_or_raise(self.parse_atom()[0])
                else:
                    arg = self.parse_group_arg()
            finally:
                self.leave()
            if index is None:
                return _unary(arg, sympy.sqrt), None
            return _unary(arg, lambda x: _nth_root(x, index)), None
        if name == "binom":
            n = self.parse_group_arg()
            k = self.parse_group_arg()
            return guarded_binomial(n, k), None
        if name in ("pi", "varpi"):
            return sympy.pi, None
        if name in ("infty", "inf", "infinity", "oo"):
            return sympy.oo, None
        if name == "emptyset":
            return SetOf(()), None
        if name == "mathbb":
            letter = self._subscript_text()
            if letter == "R":
                return IntervalUnion((Interval(-sympy.oo, sympy.oo, True, True),)), None
            raise ParseError(f"unsupported set \\mathbb{{{letter}}}")
        if name in ("lfloor", "lceil"):
            self.enter()
            try:
                inner = self.parse_sum()
                self.expect("cmd", "rfloor" if name == "lfloor" else "rceil")
            finally:
                self.leave()
            fn = sympy.floor if name == "lfloor" else sympy.ceiling
            return _unary(inner, fn), None
        if name in _GREEK:
            return sympy.Symbol(name), None
        if name in ("circ", "degree"):
            raise ParseError("stray degree sign")
        if name in _FUNCTIONS:
            return self._parse_function(name), None
        if name in ("hat", "bar", "vec", "dot", "ddot", "tilde", "overline", "mathcal"):
            inner = self._subscript_text()
            return sympy.Symbol(f"{name}({inner})"), None
        raise ParseError(f"unsupported command \\{name}")

    def _parse_function(self, name: str):
        fn = _FUNCTIONS[name]
        base = None
        power = None
        self.enter()
        try:
            if name == "log" and self.at("op", "_"):
                self.next()
                base = self.parse_group_arg()
            if self.at("op", "^"):
                self.next()
                power = self.parse_exponent()
            if self.at("op", "(") or self.at("op", "{"):
                opener = self.next().value
                inner = self.parse_items(closers=(")",) if opener == "(" else ("}",))
                self.expect("op", ")" if opener == "(" else "}")
                arg = inner
            else:
                # \sin 2x: the argument is the following product of atoms (no + or -)
                arg, _ = self.parse_factor()
                while self._starts_atom() and not self.at("cmd") and not self.at("op", "|"):
                    rhs, _ = self.parse_factor()
                    arg = _combine(arg, rhs, lambda x, y: x * y)
        finally:
            self.leave()
        if isinstance(arg, Items):
            if name == "log" and len(arg.values) == 2 and base is None:  # log(x, b) in plain text
                return _scalar(sympy.log(_scalar(arg.values[0]), _scalar(arg.values[1])))
            raise ParseError(f"{name} takes one argument")
        if power is not None and power == -1 and name in _INVERSES:
            return _unary(arg, _INVERSES[name])
        if name == "log" and base is not None:
            value = _unary(arg, lambda x: sympy.log(x, base))
        else:
            value = _unary(arg, lambda x: guarded_function(name, fn, x))
        if power is not None:
            value = _combine(value, power, guarded_pow)
        return value


def _nth_root(value, index):
    """``\\sqrt[n]{x}``; an odd root of a negative number is the real root (``\\sqrt[3]{-8} = -2``)."""
    if (isinstance(index, sympy.Integer) and index % 2 == 1 and isinstance(value, sympy.Number)
            and value < 0):
        return -guarded_pow(-value, _divide(sympy.Integer(1), index))
    return guarded_pow(value, _divide(sympy.Integer(1), index))


def _prime(value):
    """``y'``: the derivative of a named quantity, kept as the symbol ``y'``."""
    if isinstance(value, sympy.Symbol):
        return sympy.Symbol(value.name + "'")
    raise ParseError("prime on something that is not a symbol")


def _divide(x, y):
    x, y = _scalar(x), _scalar(y)
    if y == 0:
        raise ParseError("division by zero")
    return sympy.Mul(x, guarded_pow(y, sympy.Integer(-1)))


def _scalar_or_raise(value):
    if isinstance(value, PlusMinus):
        return value
    return _scalar(value)


def _normalize_words(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def _as_intervals(parts) -> list[Interval]:
    """Converts the operands of ``\\cup`` into intervals (``(a,b]``, ``\\{a\\}``, unions)."""
    out: list[Interval] = []
    for part in parts:
        if isinstance(part, IntervalUnion):
            out.extend(part.parts)
        elif isinstance(part, Bracketed) and len(part.values) == 2:
            out.append(make_interval(part.values[0], part.values[1], part.left == "(",
                                     part.right == ")"))
        elif isinstance(part, SetOf):
            for v in part.values:
                out.append(make_interval(v, v, False, False))
        else:
            raise ParseError("\\cup of something that is not an interval or a set")
    return out


def make_interval(lo, hi, left_open: bool, right_open: bool) -> Interval:
    lo, hi = _scalar(lo), _scalar(hi)
    # An infinite endpoint is never included: [-oo, 3] means (-oo, 3].
    left_open = left_open or lo in (sympy.oo, -sympy.oo)
    right_open = right_open or hi in (sympy.oo, -sympy.oo)
    return Interval(lo, hi, left_open, right_open)


def parse(text: str):
    """Parses one (already normalized) answer string into an answer value; see module docstring."""
    return _Parser(tokenize(text)).parse_answer()
