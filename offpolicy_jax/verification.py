r"""Self-verification: verification prompts, outcome ratings and the verification reward.

RISE (Liu et al., "Trust, But Verify: A Self-Verification Approach to Reinforcement Learning with
Verifiable Rewards", https://arxiv.org/abs/2505.13445; code: xyliu-cs/RISE on the xyliu-cs/verl
fork) trains one policy to solve problems and to verify its own solutions. TOPR's generative
verifier (Le Roux et al., https://arxiv.org/abs/2503.14286, §5) is the same verification task
trained offline. What both need, with the rules of the RISE code:

* **Outcome of a solution** (``reward_func.py``): *correct* (its extracted answer is equivalent to
  the gold), *wrong* (an answer, not equivalent) or *no answer* (none extracted); rewards 1 /
  −0.5 / −1 by default (:class:`OutcomeReward`). The answer is extracted with
  ``rewards.math.extract_answer`` (the last ``\boxed{}``, else ``####`` or "The answer is ...";
  the paper's code only reads ``\boxed{}``).
* **Verification prompt** (``critique_utils.update_data_for_critique``): the problem and the
  solution in a template (:data:`PAPER_TEMPLATE`, the code's ``CRITIQUE_PROMPT``), sent as the
  user message after the system prompt :data:`PAPER_SYSTEM_PROMPT` through the tokenizer's chat
  template; without a chat template, a plain rendering. The embedded model uses the compact
  format of ``data.arith`` (:data:`COMPACT`: the solving prompt, the solution, ``"\nC: "``).
* **Rating**: the solution's outcome on the paper's scale, ``"1"``, ``"-0.5"`` or ``"-1"``
  (:data:`RATINGS`); the verifier ends with its rating in ``\boxed{}``.
* **Verification reward** (the same ``reward_func`` with the rating as the gold): the
  verification's own outcome against that rating — 1 when the boxed rating equals the solution's,
  −0.5 for another rating, −1 for no rating. A verification is *accurate* when its outcome is
  correct.
* **Down-sampling** (``DataProto.downsampling``): the solutions to verify are spread evenly over
  the groups (:func:`spread_rows`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from offpolicy_jax.data import arith

OUTCOMES = ("correct", "wrong", "no_answer")
# The rating of a solution with each outcome: the paper's scale (also the embedded format's).
RATINGS = dict(arith.RATINGS)

PAPER, COMPACT = "paper", "compact"
TEMPLATES = (PAPER, COMPACT)

# The RISE code's system prompt and verification template (verl/utils/critique_templates.py,
# CRITIQUE_PROMPT, the default critique_prompt_idx=0), verbatim.
PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION_SLOT, RESPONSE_SLOT = "__special_original_question__", "__special_original_response__"
PAPER_TEMPLATE = """Below you are presented with a question and a tentative response. Your task is to evaluate and assign a rating to the response based on the following clear criteria:

Rating Criteria:

1. Missing final answer enclosed in \\boxed{} at the end: assign \\boxed{-1}.
2. Correct response with the final answer enclosed in \\boxed{} at the end: assign \\boxed{1}.
3. Incorrect response with the final answer enclosed in \\boxed{} at the end: assign \\boxed{-0.5}.

### Question Begin ###
__special_original_question__
### Question End ###

### Response Begin ###
__special_original_response__
### Response End ###

Briefly summarize your analysis, then clearly state your final rating value enclosed in \\boxed{} at the end.
"""


@dataclasses.dataclass(frozen=True)
class OutcomeReward:
    """The reward of each outcome (RISE: 1 / −0.5 / −1). The three values must differ: the
    outcome of a scored row is read back from its reward (:meth:`outcomes`)."""

    correct: float = 1.0
    wrong: float = -0.5
    no_answer: float = -1.0

    def __post_init__(self):
        if len({self.correct, self.wrong, self.no_answer}) != 3:
            raise ValueError(f"the rewards of a correct, a wrong and a missing answer must differ "
                             f"(the outcome is read back from the reward), got {self}")

    def values(self, outcomes) -> np.ndarray:
        """float32 rewards of a sequence of outcome names."""
        table = dataclasses.asdict(self)
        return np.asarray([table[o] for o in outcomes], np.float32)

    def outcomes(self, rewards) -> list[str]:
        """The outcome names of rewards given by :meth:`values`."""
        inverse = {value: name for name, value in dataclasses.asdict(self).items()}
        try:
            return [inverse[float(r)] for r in np.asarray(rewards, np.float32)]
        except KeyError as error:
            raise ValueError(f"reward {error.args[0]} is none of {self}") from None


def outcome_names(scored) -> list[str]:
    """Each scored response's outcome (``scored``: a ``rewards.BatchScore``)."""
    return ["correct" if equivalent else "no_answer" if extracted is None else "wrong"
            for equivalent, extracted in zip(scored.equivalent, scored.extracted)]


def make_outcome_reward(reward: OutcomeReward = OutcomeReward()):
    """A rollout ``reward_fn(records, responses, pool)``: each response's outcome against its
    record's ``gold`` (a solution against the answer, a verification against the rating),
    mapped to ``reward``'s values."""
    from offpolicy_jax import rewards

    def reward_fn(records: list[dict], responses: list[str], pool) -> np.ndarray:
        scored = rewards.score_batch(responses, [r["gold"] for r in records], pool=pool)
        return reward.values(outcome_names(scored))

    return reward_fn


def spread_rows(num_groups: int, group_size: int, total: int,
                rng: np.random.Generator) -> np.ndarray:
    """Rows of ``total`` solutions spread evenly over ``num_groups`` groups of ``group_size``
    consecutive rows: each group gives ``total // num_groups`` rows, the first
    ``total % num_groups`` groups one more, drawn without replacement and kept in row order
    (verl fork's ``DataProto.downsampling``)."""
    if not 0 <= total <= num_groups * group_size:
        raise ValueError(f"cannot pick {total} of {num_groups} groups x {group_size} solutions")
    base, extra = divmod(total, num_groups)
    rows = []
    for group in range(num_groups):
        keep = base + (group < extra)
        chosen = rng.choice(group_size, size=keep, replace=False)
        rows.extend(group * group_size + np.sort(chosen))
    return np.asarray(rows, np.int64)


def balanced_rows(outcomes, total: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``total`` solutions, half of them correct and half not as far as the batch has
    them (the rest from the other kind), each kind drawn uniformly; in row order. Not the
    paper's rule (``spread_rows``): an option against a verifier that learns the base rate (most
    of a weak policy's solutions are wrong, and "wrong" is then a good guess)."""
    outcomes = np.asarray(outcomes)
    if not 0 <= total <= len(outcomes):
        raise ValueError(f"cannot pick {total} of {len(outcomes)} solutions")
    right = np.flatnonzero(outcomes == "correct")
    other = np.flatnonzero(outcomes != "correct")
    take_right = min(len(right), max(total // 2, total - len(other)))
    rows = np.concatenate([rng.choice(right, take_right, replace=False),
                           rng.choice(other, total - take_right, replace=False)])
    return np.sort(rows).astype(np.int64)


def chat_or_plain(tokenizer, system: str, user: str, *, use_chat_template: bool = True) -> str:
    """The prompt text of one system + user turn: the tokenizer's chat template with the
    generation prompt when it has one and ``use_chat_template`` (a template that refuses the
    system role gets it in front of the user message), else ``"<system>\\n\\n<user>\\nAnswer:"``
    after the BOS text the tokenizer prepends itself (``data.prompts.leading_special_text``)."""
    from offpolicy_jax.data import prompts as prompts_lib
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception:   # noqa: BLE001 -- templates raise their own kinds for a system turn
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{system}\n\n{user}"}], tokenize=False,
                add_generation_prompt=True)
    return f"{prompts_lib.leading_special_text(tokenizer)}{system}\n\n{user}\nAnswer:"


def verification_prompt(record: dict, solution: str, *, template: str = PAPER,
                        tokenizer=None, use_chat_template: bool = True) -> str:
    """The prompt asking the model to rate ``solution`` to the problem of ``record``.

    Args:
      record: the prompt record the solution answers: ``question`` (the problem statement; the
        ``prompt`` text when absent) and ``prompt`` (its solving prompt).
      solution: the solution text (special tokens removed).
      template: ``"paper"`` (RISE's template, through the chat template when the tokenizer has
        one) or ``"compact"`` (the embedded model's: ``data.arith.verification_prompt``).
      tokenizer: the policy's tokenizer (paper template only).
      use_chat_template: False renders the paper's template plainly even when the tokenizer has
        a chat template (``--prompt_format`` other than ``chat``).
    """
    if template == COMPACT:
        return arith.verification_prompt(record["prompt"], solution)
    if template != PAPER:
        raise ValueError(f"unknown verification template {template!r}; expected one of "
                         f"{TEMPLATES}")
    question = record.get("question", record["prompt"])
    user = PAPER_TEMPLATE.replace(QUESTION_SLOT, question).replace(RESPONSE_SLOT, solution)
    return chat_or_plain(tokenizer, PAPER_SYSTEM_PROMPT, user,
                         use_chat_template=use_chat_template)


def verification_metrics(solution_outcomes, accurate, said_correct=None) -> dict:
    """Accuracy of verifications overall and by the outcome of the solution they rate.

    Args:
      solution_outcomes: [n] outcome name of the rated solution, per verification.
      accurate: [n] bool, the verification's rating was the solution's.
      said_correct: [n] bool, the verification rated the solution correct (optional).

    Returns ``accuracy``, ``accuracy_correct`` / ``accuracy_wrong`` / ``accuracy_no_answer`` (None
    when no verification rated such a solution), ``balanced_accuracy`` (mean of the correct and
    wrong accuracies, when both exist), ``solutions_correct`` (share of rated solutions that are
    correct), and with ``said_correct`` its mean.
    """
    outcomes = np.asarray(solution_outcomes)
    accurate = np.asarray(accurate, bool)
    out = {"accuracy": float(accurate.mean()) if accurate.size else None}
    for name in OUTCOMES:
        rows = outcomes == name
        out[f"accuracy_{name}"] = float(accurate[rows].mean()) if rows.any() else None
    pair = [out["accuracy_correct"], out["accuracy_wrong"]]
    out["balanced_accuracy"] = None if None in pair else float(np.mean(pair))
    out["solutions_correct"] = float(np.mean(outcomes == "correct")) if outcomes.size else None
    if said_correct is not None:
        said_correct = np.asarray(said_correct, bool)
        out["said_correct"] = float(said_correct.mean()) if said_correct.size else None
    return out


def solution_outcomes(result) -> list[str]:
    """The outcome of every sample of a solving evaluation (``eval.runner.EvalResult``),
    prompt-major."""
    correct = np.asarray(result.correct).reshape(-1)
    return ["correct" if ok else "no_answer" if extracted is None else "wrong"
            for ok, extracted in zip(correct, result.extracted)]


class HeldOutVerification:
    """Verification accuracy on held-out problems, run with every evaluation of a training run
    (``Algorithm.evaluation``); logged as ``eval/verify_<metric>`` (``verification_metrics``:
    ``accuracy``, ``accuracy_correct``, ``accuracy_wrong``, ``balanced_accuracy``,
    ``said_correct``, ...).

    Which solutions are rated:

    * ``"own"`` — the policy's own held-out samples of this evaluation (every sample of every
      held-out prompt): RISE's self-verification accuracy;
    * ``"initial"`` — one fixed set, the initial policy's held-out samples (drawn in ``setup``,
      again identically on a resume): a verifier's accuracy before → after training on the same
      (problem, solution) pairs, as TOPR's generative verifier is measured.

    Each solution gets ``samples`` verifications at the evaluation temperature (seed
    ``--seed + 2``); a verification is accurate when its extracted rating is equivalent to the
    solution's (``RATINGS``).
    """

    summary_keys = ("verify_accuracy", "verify_balanced_accuracy")

    def __init__(self, make_prompt, *, solutions: str = "own", samples: int = 1):
        if solutions not in ("own", "initial"):
            raise ValueError(f"solutions must be 'own' or 'initial', got {solutions!r}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.make_prompt = make_prompt
        self.solutions = solutions
        self.samples = samples
        self.fixed = None

    def setup(self, session) -> None:
        if self.solutions == "initial":
            result = self._solve(session, session.params)
            self.fixed = (list(result.responses), solution_outcomes(result))

    @staticmethod
    def _solve(session, params):
        """The held-out solving samples, exactly as ``Session.evaluate`` draws them."""
        from offpolicy_jax.eval import runner
        config = session.config
        return runner.evaluate_prompts(
            session.cfg, params, session.tokenizer, session.eval_prompts, session.eval_golds,
            num_samples=config.eval_samples, ks=(1,), max_new_tokens=config.max_new_tokens,
            temperature=config.eval_temperature, seed=config.seed + 1,
            eos_token_ids=session.sampler.eos_ids, pad_token_id=session.sampler.pad_id,
            pool=session.pool, mesh=session.mesh)

    def __call__(self, session, params, result) -> dict:
        from offpolicy_jax.eval import runner
        config = session.config
        responses, outcomes = self.fixed if self.solutions == "initial" else (
            list(result.responses), solution_outcomes(result))
        per_prompt = len(responses) // len(session.eval_records)
        prompts = [session.sampler.encode(self.make_prompt(
            session.eval_records[i // per_prompt], text, session.tokenizer))
            for i, text in enumerate(responses)]
        rated = runner.evaluate_prompts(
            session.cfg, params, session.tokenizer, prompts, [RATINGS[o] for o in outcomes],
            num_samples=self.samples, ks=(1,), max_new_tokens=config.max_new_tokens,
            temperature=config.eval_temperature, seed=config.seed + 2,
            eos_token_ids=session.sampler.eos_ids, pad_token_id=session.sampler.pad_id,
            pool=session.pool, mesh=session.mesh, skip_too_long=True)
        said_correct = [runner.vote_key(x) == RATINGS["correct"] for x in rated.extracted]
        metrics = verification_metrics(np.repeat(outcomes, self.samples),
                                       np.asarray(rated.correct).reshape(-1), said_correct)
        metrics["no_rating"] = float(np.mean([x is None for x in rated.extracted]))
        return {f"verify_{k}": v for k, v in metrics.items()}


def rating_value(extracted) -> float:
    """A verification's rating as a number: its boxed value when it is one of the paper's ratings
    (1, -0.5, -1), else -1 (no rating, or not a rating), the score of a missing answer."""
    try:
        value = float(extracted)
    except (TypeError, ValueError):
        return -1.0
    return value if value in (1.0, -0.5, -1.0) else -1.0


def rate_samples(cfg, params, tokenizer, records: list[dict], result, *, make_prompt,
                 samples: int = 1, max_new_tokens: int, temperature: float, seed=0, top_p=None,
                 top_k=None, eos_token_ids=(), pad_token_id: int = 0, pool=None, mesh=None,
                 batch_size: int | None = None):
    """The verifier's mean rating of each sample of a solving evaluation.

    Each of ``result``'s ``[P, n]`` samples is rated ``samples`` times by the verifier
    ``(cfg, params, tokenizer)`` (:func:`rating_value` of each boxed rating). The golds handed to
    ``evaluate_prompts`` are the samples' true ratings, used only for the verifier's accuracy
    (``rated.correct``), never for the scores.

    Returns:
      ``(scores [P, n] float, rated)``: the mean ratings and the verifications' ``EvalResult``
      (``P * n`` prompts, ``samples`` each, prompt-major).
    """
    from offpolicy_jax.eval import runner
    num_problems, n = np.asarray(result.correct).shape
    outcomes = solution_outcomes(result)
    prompts = [tokenizer.encode(make_prompt(records[i // n], text, tokenizer),
                                add_special_tokens=False)
               for i, text in enumerate(result.responses)]
    rated = runner.evaluate_prompts(
        cfg, params, tokenizer, prompts, [RATINGS[o] for o in outcomes], num_samples=samples,
        ks=(1,), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=seed, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
        pool=pool, mesh=mesh, batch_size=batch_size, skip_too_long=True)
    scores = np.array([rating_value(x) for x in rated.extracted]).reshape(
        num_problems, n, samples).mean(axis=2)
    return scores, rated


def rerank_best_of_n(cfg, params, tokenizer, records: list[dict], result, *, make_prompt,
                     samples: int = 1, max_new_tokens: int, temperature: float, seed=0,
                     top_p=None, top_k=None, eos_token_ids=(), pad_token_id: int = 0, pool=None,
                     mesh=None, batch_size: int | None = None) -> dict:
    """Best-of-n with a generative verifier: each of a solving evaluation's n samples per
    problem is rated ``samples`` times by the verifier ``(cfg, params, tokenizer)``; the sample
    with the highest mean rating (:func:`rating_value`; ties to the earlier sample) is the
    problem's answer.

    Args:
      records: the problems (``prompt``, ``gold``, optional ``question``), one per row of
        ``result.correct``.
      result: the solving evaluation (``eval.runner.EvalResult``, n samples per problem).
      make_prompt: ``(record, solution, tokenizer) -> verification prompt``.
      samples: verifications per solution.
      the rest: sampling settings of the verifications (``eval.runner.evaluate_prompts``).

    Returns ``reranked@n`` (share of problems whose chosen sample is correct), ``pass@1`` and
    ``pass@n`` of the samples for reference, and the verifier's accuracy on them
    (``verification_metrics``, prefixed ``verify_``).
    """
    scores, rated = rate_samples(
        cfg, params, tokenizer, records, result, make_prompt=make_prompt, samples=samples,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, top_p=top_p,
        top_k=top_k, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, pool=pool,
        mesh=mesh, batch_size=batch_size)
    return rerank_metrics(result, scores, rated, samples)


def chosen_samples(scores) -> np.ndarray:
    """Best-of-n's pick per problem: the sample with the highest mean rating, the earlier one
    of equal ratings (``[P]`` indices into ``scores``' ``[P, n]``)."""
    return np.argmax(np.asarray(scores), axis=1)


def rerank_metrics(result, scores, rated, samples: int) -> dict:
    """:func:`rerank_best_of_n`'s metrics from :func:`rate_samples`' ``(scores, rated)``."""
    correct = np.asarray(result.correct)
    num_problems, n = correct.shape
    outcomes = solution_outcomes(result)
    chosen = chosen_samples(scores)
    metrics = verification_metrics(np.repeat(outcomes, samples),
                                   np.asarray(rated.correct).reshape(-1),
                                   [rating_value(x) == 1.0 for x in rated.extracted])
    return {f"reranked@{n}": float(np.mean(correct[np.arange(num_problems), chosen])),
            "pass@1": float(correct.mean()), f"pass@{n}": float(np.mean(correct.any(axis=1))),
            **{f"verify_{k}": v for k, v in metrics.items()}}
