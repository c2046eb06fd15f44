"""The embedded task ``arith``: procedurally generated multi-step integer arithmetic.

A problem is an expression over small positive integers with ``+``, ``-`` and ``*`` (optionally
with parentheses), e.g. ``12+7*3``. Its demonstration shows one operation per step, in the order
a person would evaluate it (innermost / higher precedence first, then left to right), and ends in
the boxed answer the verifier reads::

    prompt:    "Q: 12+7*3\\nA: "
    response:  "7*3=21, 12+21=33. \\boxed{33}"
    gold:      "33"

Everything is deterministic given a seed. The held-out split is fixed and disjoint from training
by construction: an expression belongs to the held-out split iff a hash of its text falls in the
first ``heldout_percent`` of 100 buckets, so no training seed can ever produce a held-out problem
(and the held-out set itself does not depend on the training seed).

Difficulty knobs (``ArithConfig``): the number of operands, their range, the operators, a bound
on every intermediate value (which keeps each step within the digits a tiny model can learn), and
parentheses. The defaults (2-4 operands in 1..9, ``+ - *``, ``|values| <= 99``) give prompts of at
most 14 characters and responses of at most about 50, a task a ~1-5 M-parameter character-level
transformer learns partially with a few minutes of supervised training on a CPU: enough for
sampled answers to be right often but not always (pass@1 well below pass@8), which leaves room
for RL.
"""

import collections
import dataclasses
import hashlib
import random
import re
from collections.abc import Iterator

SPLITS = ("train", "heldout")

# Operator precedence: higher binds tighter.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# The held-out set is one fixed sequence whatever the training seed, so that every run of every
# experiment measures the same problems (a larger --eval_size extends it, keeping the prefix).
HELDOUT_SEED = 0


@dataclasses.dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs of the ``arith`` task.

    Attributes:
      min_operands: fewest numbers in an expression (>= 2, so there is always a step).
      max_operands: most numbers in an expression.
      min_operand: smallest number drawn (uniformly, inclusive).
      max_operand: largest number drawn (uniformly, inclusive).
      operators: the operators drawn from (uniformly), a subset of ``"+-*"``.
      max_intermediate: every intermediate and final value satisfies ``|v| <= max_intermediate``;
        problems that break it are redrawn. This caps the digits any single step needs.
      parentheses: when True, expressions are random binary trees rendered with the parentheses
        they need (e.g. ``(3+4)*2``); when False, flat expressions evaluated by precedence.
      heldout_percent: percentage (0-100) of the expression space reserved for the held-out split.
    """

    min_operands: int = 2
    max_operands: int = 4
    min_operand: int = 1
    max_operand: int = 9
    operators: str = "+-*"
    max_intermediate: int = 99
    parentheses: bool = False
    heldout_percent: int = 10

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first inconsistent knob."""
        checks = [
            (2 <= self.min_operands <= self.max_operands,
             f"ArithConfig needs 2 <= min_operands <= max_operands, got min_operands="
             f"{self.min_operands}, max_operands={self.max_operands}"),
            (0 <= self.min_operand <= self.max_operand,
             f"ArithConfig needs 0 <= min_operand <= max_operand, got {self.min_operand}, "
             f"{self.max_operand}"),
            (bool(self.operators) and set(self.operators) <= set(_PRECEDENCE),
             f"ArithConfig.operators must be a non-empty subset of '+-*', got "
             f"{self.operators!r}"),
            (self.max_intermediate >= self.max_operand,
             f"ArithConfig.max_intermediate={self.max_intermediate} is below max_operand="
             f"{self.max_operand}: no problem could satisfy it"),
            (0 < self.heldout_percent < 100,
             f"ArithConfig.heldout_percent must be in (0, 100), got {self.heldout_percent}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One arithmetic problem with its worked solution.

    Attributes:
      expression: the expression text, e.g. ``"12+7*3"``.
      answer: its integer value.
      steps: one ``"a op b=c"`` string per operation, in evaluation order.
    """

    expression: str
    answer: int
    steps: tuple[str, ...]

    @property
    def prompt(self) -> str:
        return format_prompt(self.expression)

    @property
    def response(self) -> str:
        """The demonstration: the steps, then the boxed answer."""
        return ", ".join(self.steps) + f". \\boxed{{{self.answer}}}"

    @property
    def gold(self) -> str:
        return str(self.answer)


def format_prompt(expression: str) -> str:
    """The prompt for an expression: ``"Q: <expression>\\nA: "`` (the response follows)."""
    return f"Q: {expression}\nA: "


def expression_of(prompt: str) -> str:
    """The expression of a prompt made by :func:`format_prompt` (inverse of it).

    Raises:
      ValueError: when ``prompt`` is not an arith prompt.
    """
    if not (prompt.startswith("Q: ") and prompt.endswith("\nA: ")):
        raise ValueError(f"not an arith prompt ('Q: <expression>\\nA: '): {prompt!r}")
    return prompt[len("Q: "):-len("\nA: ")]


# ---------------------------------------------------------------------------------------------
# Checking a response's working, not only its answer.

_STEP = re.compile(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)")
_ANSWER = re.compile(r"\\boxed\{(-?\d+)\}")


@dataclasses.dataclass(frozen=True)
class WorkingCheck:
    """What :func:`check_working` found in a response.

    Attributes:
      well_formed: the response is ``"<step>, <step>, .... \\boxed{<int>}"`` with every step
        ``a op b=c`` (integers, op in ``+ - *``), the task's response format.
      steps_correct: every step's result is right (``a op b`` equals ``c``).
      grounded: every step's operands are numbers of the problem or results of earlier steps,
        each used once, and the working uses every number of the problem (nothing skipped,
        nothing invented).
      consistent: the boxed answer is the last step's result.
    """

    well_formed: bool
    steps_correct: bool = False
    grounded: bool = False
    consistent: bool = False

    @property
    def valid(self) -> bool:
        """A sound working: every check passes."""
        return self.well_formed and self.steps_correct and self.grounded and self.consistent


def check_working(expression: str, response: str) -> WorkingCheck:
    """Checks the working of a response to ``expression``, beyond its final answer.

    The process check of VerIPO's rollout-aware verifier on the embedded task: a response whose
    answer is right can still have a wrong step that a later slip cancels, skip a step, or box
    an answer its own working does not reach; one whose working is sound and whose answer is
    wrong computed the wrong expression. Evaluation order is free (any order the operands allow).

    Args:
      expression: the problem, e.g. ``"12+7*3"``.
      response: the model's response, e.g. ``"7*3=21, 12+21=33. \\boxed{33}"``.
    """
    working, separator, answer = response.strip().rpartition(". ")
    answer_match = _ANSWER.fullmatch(answer)
    pieces = working.split(", ")
    matches = [_STEP.fullmatch(piece) for piece in pieces]
    if not separator or answer_match is None or not all(matches):
        return WorkingCheck(well_formed=False)
    steps = [(int(m[1]), m[2], int(m[3]), int(m[4])) for m in matches]
    steps_correct = all(_APPLY[op](a, b) == c for a, op, b, c in steps)
    # The numbers available: the problem's literals, then each step's result; each used once.
    available = collections.Counter(int(n) for n in re.findall(r"\d+", expression))
    grounded = True
    for a, _, b, c in steps:
        for operand in (a, b):
            if available[operand] < 1:
                grounded = False
            available[operand] -= 1
        available[c] += 1
    grounded = grounded and +available == collections.Counter([steps[-1][3]])
    return WorkingCheck(well_formed=True, steps_correct=steps_correct, grounded=grounded,
                        consistent=int(answer_match[1]) == steps[-1][3])


def right_step_share(response: str) -> float:
    """The share of a response's working steps whose arithmetic is right (``a op b`` equals the
    written ``c``), in [0, 1]; 0 for a response not in the task's format (see
    :func:`check_working`). A process-style score of the embedded task: B-STaR's selection score
    uses a process reward model's step scores, and this is their exact, per-step counterpart.

    Example: ``"7*3=21, 12+21=34. \\boxed{34}"`` has one right step of two: 0.5.
    """
    working, separator, answer = response.strip().rpartition(". ")
    matches = [_STEP.fullmatch(piece) for piece in working.split(", ")]
    if not separator or _ANSWER.fullmatch(answer) is None or not all(matches):
        return 0.0
    right = sum(_APPLY[m[2]](int(m[1]), int(m[3])) == int(m[4]) for m in matches)
    return right / len(matches)


# ---------------------------------------------------------------------------------------------
# Expression trees. A tree is either an int (a leaf) or a tuple (op, left, right).


def _render(tree) -> str:
    """Text of a tree, with exactly the parentheses that make parsing it give back the same tree:
    a left child is bracketed when it binds looser than its parent, a right child when it binds
    no tighter (so ``a-(b-c)`` and ``a+(b+c)`` keep their structure and their step order)."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_text, right_text = _render(left), _render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}"


def _flat_tree(operands: list[int], operators: list[str]):
    """The tree of a flat expression under the usual rules: ``*`` before ``+``/``-``, each level
    left-associative."""
    # Fold every run of products into one subtree, then fold the sums left to right.
    terms, term_ops = [operands[0]], []
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] = ("*", terms[-1], value)
        else:
            terms.append(value)
            term_ops.append(op)
    tree = terms[0]
    for op, term in zip(term_ops, terms[1:]):
        tree = (op, tree, term)
    return tree


def _random_tree(rng: random.Random, operands: list[int], operators: str):
    """A uniformly split random binary tree over ``operands`` (in order)."""
    if len(operands) == 1:
        return operands[0]
    split = rng.randint(1, len(operands) - 1)
    return (rng.choice(operators), _random_tree(rng, operands[:split], operators),
            _random_tree(rng, operands[split:], operators))


def _evaluate(tree, steps: list[str], slip=None) -> int:
    """Value of ``tree``; appends one ``"a op b=c"`` per operation in post-order (left first).

    ``slip``, if given, maps each step's true result to the result written down (and carried into
    the later steps), to make demonstrations with arithmetic slips (see ``demonstrations``).
    """
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a = _evaluate(left, steps, slip)
    b = _evaluate(right, steps, slip)
    value = _APPLY[op](a, b)
    if slip is not None:
        value = slip(value)
    steps.append(f"{a}{op}{b}={value}")
    return value


def _max_abs_value(tree) -> int:
    """Largest ``|value|`` over every leaf and every intermediate result of ``tree``."""
    if isinstance(tree, int):
        return abs(tree)
    _, left, right = tree
    return max(abs(_evaluate(tree, [])), _max_abs_value(left), _max_abs_value(right))


def problem_from_tree(tree) -> Problem:
    """The ``Problem`` (expression text, answer, worked steps) of an expression tree."""
    steps: list[str] = []
    answer = _evaluate(tree, steps)
    return Problem(expression=_render(tree), answer=answer, steps=tuple(steps))


def parse_expression(expression: str) -> Problem:
    """Parses an ``arith`` expression (non-negative integers, ``+ - *``, parentheses) into a
    ``Problem`` with its worked steps. Used to check the generator and to solve a given prompt.

    Raises:
      ValueError: naming the position of the first character that does not fit the grammar.
    """
    tree = parse_tree(expression)
    steps: list[str] = []
    answer = _evaluate(tree, steps)
    return Problem(expression=expression, answer=answer, steps=tuple(steps))


def parse_tree(expression: str):
    """The expression tree (an int, or ``(op, left, right)``) of an ``arith`` expression.

    Raises:
      ValueError: naming the position of the first character that does not fit the grammar.
    """
    position = 0

    def fail(what: str):
        raise ValueError(f"cannot parse arith expression {expression!r} at position "
                         f"{position}: {what}")

    def parse_sum():
        nonlocal position
        tree = parse_product()
        while position < len(expression) and expression[position] in "+-":
            op = expression[position]
            position += 1
            tree = (op, tree, parse_product())
        return tree

    def parse_product():
        nonlocal position
        tree = parse_atom()
        while position < len(expression) and expression[position] == "*":
            position += 1
            tree = ("*", tree, parse_atom())
        return tree

    def parse_atom():
        nonlocal position
        if position < len(expression) and expression[position] == "(":
            position += 1
            tree = parse_sum()
            if position >= len(expression) or expression[position] != ")":
                fail("expected ')'")
            position += 1
            return tree
        start = position
        while position < len(expression) and expression[position].isdigit():
            position += 1
        if start == position:
            fail("expected a number or '('")
        return int(expression[start:position])

    tree = parse_sum()
    if position != len(expression):
        fail("unexpected trailing text")
    return tree


# ---------------------------------------------------------------------------------------------
# Splits and generation.


def split_of(expression: str, heldout_percent: int = ArithConfig.heldout_percent) -> str:
    """``"heldout"`` or ``"train"``: a fixed function of the expression text (SHA-256 bucket), so
    the two splits are disjoint whatever the seeds used to draw from them."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode("utf-8")).digest()[:8], "big") % 100
    return "heldout" if bucket < heldout_percent else "train"


def random_problem(rng: random.Random, config: ArithConfig = ArithConfig(),
                   max_attempts: int = 10_000) -> Problem:
    """One problem drawn from ``config``'s distribution (either split), redrawing those with an
    intermediate value beyond ``config.max_intermediate``."""
    for _ in range(max_attempts):
        count = rng.randint(config.min_operands, config.max_operands)
        operands = [rng.randint(config.min_operand, config.max_operand) for _ in range(count)]
        if config.parentheses:
            tree = _random_tree(rng, operands, config.operators)
        else:
            tree = _flat_tree(operands, [rng.choice(config.operators) for _ in range(count - 1)])
        if _max_abs_value(tree) <= config.max_intermediate:
            return problem_from_tree(tree)
    raise ValueError(f"no problem within max_intermediate={config.max_intermediate} in "
                     f"{max_attempts} draws from {config}")


def iterate_problems(split: str, seed: int, config: ArithConfig = ArithConfig(), *,
                     unique: bool = False) -> Iterator[Problem]:
    """An endless deterministic stream of ``split`` problems (``"train"`` or ``"heldout"``).

    Args:
      split: which side of the fixed hash split to draw from.
      seed: any int; the stream depends only on ``(split, seed, config)``.
      config: difficulty knobs.
      unique: skip expressions already produced (the stream then ends with a ``ValueError`` when
        the split runs out of new expressions for a long stretch).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown arith split {split!r}; expected one of {SPLITS}")
    config.validate()
    # String seeding is stable across Python versions and processes (no hash randomisation).
    rng = random.Random(f"arith/{split}/{seed}")
    seen: set[str] = set()
    misses = 0
    while True:
        problem = random_problem(rng, config)
        if split_of(problem.expression, config.heldout_percent) != split or (
                unique and problem.expression in seen):
            misses += 1
            if misses > 100_000:
                raise ValueError(f"the arith {split!r} split of {config} ran out of new "
                                 f"problems after {len(seen)}; widen the knobs or ask for fewer")
            continue
        misses = 0
        seen.add(problem.expression)
        yield problem


def generate_problems(num: int, split: str, seed: int,
                      config: ArithConfig = ArithConfig(), *, unique: bool = False
                      ) -> list[Problem]:
    """The first ``num`` problems of ``iterate_problems(split, seed, config, unique=unique)``."""
    stream = iterate_problems(split, seed, config, unique=unique)
    return [next(stream) for _ in range(num)]


def heldout_problems(num: int, config: ArithConfig = ArithConfig()) -> list[Problem]:
    """The fixed held-out set: ``num`` distinct held-out problems, the same in every run (a larger
    ``num`` extends the list and keeps its prefix)."""
    return generate_problems(num, "heldout", HELDOUT_SEED, config, unique=True)


def slipped_response(problem: Problem, rng: random.Random, slip_probability: float) -> str:
    """A demonstration of ``problem`` in which each step's result is, with probability
    ``slip_probability``, off by 1 or 2 (either sign); the slip is carried into the later steps and
    the boxed answer, so the working stays self-consistent but the answer is wrong."""

    def slip(value: int) -> int:
        if rng.random() < slip_probability:
            return value + rng.choice((-2, -1, 1, 2))
        return value

    steps: list[str] = []
    answer = _evaluate(parse_tree(problem.expression), steps, slip)
    return ", ".join(steps) + f". \\boxed{{{answer}}}"


def demonstrations(num: int, seed: int, config: ArithConfig = ArithConfig(), *,
                   slip_probability: float = 0.0) -> list[tuple[str, str]]:
    """``num`` training ``(prompt, response)`` pairs for supervised warm-starting (train split).

    With ``slip_probability > 0`` each step of a demonstration is miscalculated with that
    probability (``slipped_response``). A model fitted to such data knows the procedure and, at
    its mode, the arithmetic, but samples slips at about that rate: an unreliable-but-capable
    policy, the regime in which reinforcement learning from a verifier has most to gain.
    """
    if not 0.0 <= slip_probability < 1.0:
        raise ValueError(f"slip_probability must be in [0, 1), got {slip_probability}")
    problems = generate_problems(num, "train", seed, config)
    if not slip_probability:
        return [(p.prompt, p.response) for p in problems]
    rng = random.Random(f"arith/slips/{seed}")
    return [(p.prompt, slipped_response(p, rng, slip_probability)) for p in problems]


# ---------------------------------------------------------------------------------------------
# Verification: the compact format the embedded model learns to check solutions in (RISE, TOPR's
# generative verifier). A verification prompt is the solving prompt, a solution, and a cue:
#
#     prompt:    "Q: 12+7*3\nA: 7*3=21, 12+21=34. \boxed{34}\nC: "
#     response:  "7*3=21 21 ok, 12+21=34 33 no. \boxed{-0.5}"
#
# The checker copies each step of the solution, writes its own result of that operation next to
# the one written, and marks the step "ok" (the two agree) or "no" (then it stops): the comparison
# is between two adjacent numbers, the work is recomputing each step. The rating in the box is
# the paper's scale
# (RISE, arXiv 2505.13445): 1 for a correct solution, -0.5 for a wrong one, -1 when the solution
# has no boxed answer ("no answer. \boxed{-1}").

VERIFY_CUE = "\nC: "
# Rating of a solution by its outcome, on the RISE paper's scale.
RATINGS = {"correct": "1", "wrong": "-0.5", "no_answer": "-1"}
NO_ANSWER_CHECK = "no answer"

# The boxed integer a solution ends with (steps are matched by ``_STEP``, as in check_working).
_FINAL_ANSWER = re.compile(r"\\boxed\{(-?\d+)\}\s*$")


def verification_prompt(prompt: str, solution: str) -> str:
    """The compact verification prompt: the solving prompt, the solution, then ``VERIFY_CUE``."""
    return f"{prompt}{solution}{VERIFY_CUE}"


def checked_response(solution: str, rng: random.Random | None = None,
                     check_slip_probability: float = 0.0) -> str:
    """The demonstration check of an arith ``solution`` (see the format above).

    Each ``a op b=c`` step is copied and followed by the checker's own result ``v`` of ``a op b``
    and "ok" (``v == c``) or "no"; with probability ``check_slip_probability`` the checker
    miscalculates ``v`` (off by 1 or 2), as the solving demonstrations slip, so an imperfect
    checker can call a right step wrong. The rating is 1 when every step is confirmed and the
    boxed answer is the last step's result, -0.5 at the first step (or box) that is not, and -1
    (no steps checked) when the solution ends without a boxed integer.
    """
    box = _FINAL_ANSWER.search(solution)
    if box is None:
        return f"{NO_ANSWER_CHECK}. \\boxed{{{RATINGS['no_answer']}}}"
    parts, rating = [], RATINGS["correct"]
    steps = _STEP.findall(solution[:box.start()])
    for a, op, b, written in steps:
        value = _APPLY[op](int(a), int(b))
        if check_slip_probability and rng.random() < check_slip_probability:
            value += rng.choice((-2, -1, 1, 2))
        ok = value == int(written)
        parts.append(f"{a}{op}{b}={written} {value} {'ok' if ok else 'no'}")
        if not ok:
            rating = RATINGS["wrong"]
            break
    else:
        if not steps or int(steps[-1][3]) != int(box.group(1)):
            parts.append(f"box {box.group(1)} no")
            rating = RATINGS["wrong"]
    return ", ".join(parts) + f". \\boxed{{{rating}}}"


def verification_demonstrations(num: int, seed: int, config: ArithConfig = ArithConfig(), *,
                                solution_slip_probability: float,
                                check_slip_probability: float,
                                no_answer_fraction: float) -> list[tuple[str, str]]:
    """``num`` training ``(verification prompt, check)`` pairs (train split).

    The solutions slip at ``solution_slip_probability`` per step (``slipped_response``), so about
    half are wrong at 0.25; a ``no_answer_fraction`` of them is cut off before the boxed answer.
    The checks (``checked_response``) miscalculate at ``check_slip_probability`` per step.
    """
    for name, value in (("solution_slip_probability", solution_slip_probability),
                        ("check_slip_probability", check_slip_probability),
                        ("no_answer_fraction", no_answer_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    problems = generate_problems(num, "train", seed, config)
    rng = random.Random(f"arith/verify/{seed}")
    pairs = []
    for problem in problems:
        solution = slipped_response(problem, rng, solution_slip_probability)
        if rng.random() < no_answer_fraction:
            solution = solution[:rng.randint(1, solution.rindex(" \\boxed{"))]
        pairs.append((verification_prompt(problem.prompt, solution),
                      checked_response(solution, rng, check_slip_probability)))
    return pairs


# ---------------------------------------------------------------------------------------------
# "I don't know": the answer form of Auto-CEI (arXiv 2410.07627) on the embedded task. A model
# that gives up writes some working steps and then the fixed phrase instead of a boxed answer:
#
#     response:  "7*3=21, 12+21=33. I don't know."
#
# The verifier finds no boxed answer in it (reward 0, counted as wrong by the plain evaluation);
# Auto-CEI rewards it by the number of steps written before giving up.

IDK_PHRASE = "I don't know."


def idk_response(steps: list[str] | tuple[str, ...]) -> str:
    """The IDK answer after the working ``steps`` (none: the phrase alone)."""
    return ", ".join(steps) + ". " + IDK_PHRASE if steps else IDK_PHRASE


def is_idk(response: str) -> bool:
    """Whether ``response`` gives up: it contains the IDK phrase (case and the final full stop
    ignored; anywhere in the text, as the official Auto-CEI code matches its phrases)."""
    return IDK_PHRASE.rstrip(".").lower() in response.lower()


def reasoning_steps(response: str) -> int:
    """The number of ``a op b=c`` working steps of a response: before the IDK phrase for an IDK
    answer, before the boxed answer otherwise (Auto-CEI's reasoning length d)."""
    cut = response.lower().find(IDK_PHRASE.rstrip(".").lower())
    text = response if cut < 0 else response[:cut]
    return len(_STEP.findall(text.split("\\boxed")[0]))


def is_hard(problem: Problem, min_steps: int, min_value: int) -> bool:
    """Whether ``problem`` has at least ``min_steps`` steps and a value (an operand, an
    intermediate result or the answer) of at least ``min_value`` in absolute value: the part of
    the task the warm-started model rarely solves (see ``tiny_arith.TinyArithIdkRecipe``)."""
    values = [abs(int(n)) for n in re.findall(r"-?\d+", " ".join(problem.steps))]
    return len(problem.steps) >= min_steps and max(values) >= min_value


def idk_demonstrations(num: int, seed: int, config: ArithConfig = ArithConfig(), *,
                       slip_probability: float, idk_fraction: float, hard_min_steps: int,
                       hard_min_value: int) -> list[tuple[str, str]]:
    """``num`` training ``(prompt, response)`` pairs (train split) in which a hard problem
    (``is_hard``) is, with probability ``idk_fraction``, answered "I don't know" after a uniform
    number of its (slipped) working steps, from one to all of them; every other problem gets a
    solving demonstration slipping at ``slip_probability`` per step (``slipped_response``)."""
    if not 0.0 <= idk_fraction <= 1.0:
        raise ValueError(f"idk_fraction must be in [0, 1], got {idk_fraction}")
    if not 0.0 <= slip_probability < 1.0:
        raise ValueError(f"slip_probability must be in [0, 1), got {slip_probability}")
    rng = random.Random(f"arith/idk/{seed}")
    pairs = []
    for problem in generate_problems(num, "train", seed, config):
        solution = slipped_response(problem, rng, slip_probability)
        if is_hard(problem, hard_min_steps, hard_min_value) and rng.random() < idk_fraction:
            steps = solution.rpartition(". ")[0].split(", ")
            solution = idk_response(steps[:rng.randint(1, len(steps))])
        pairs.append((problem.prompt, solution))
    return pairs
