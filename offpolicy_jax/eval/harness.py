"""The evaluation harness: pass@k, maj@k, length and no-answer statistics of one checkpoint on the
math benchmarks, from one command (``python -m offpolicy_jax.eval``, see ``__main__``).

For each benchmark the harness builds the prompts, samples ``num_samples`` responses per problem,
verifies every response against the gold answer and aggregates the metrics with
:func:`offpolicy_jax.eval.runner.evaluate_prompts` -- the same function the RL loop's periodic
held-out evaluation calls, so the harness and a training run report the same numbers for the
same model, prompts and settings.

Benchmarks (:data:`BENCHMARK_NAMES`): ``arith``, the embedded task's fixed held-out set (prompts in
the task's own ``"Q: 12+7*3\\nA: "`` format, the one ``tiny-arith`` is trained on; its first 64
problems are the RL loop's default held-out set), and every name of ``rewards.BENCHMARKS``
(``gsm8k`` is the GSM8K test split). Benchmark questions are formatted with
``data.prompts.format_question``: the checkpoint's chat template when it has one (unless
``use_chat_template`` is off), else ``"Question: ...\\n<instruction>\\nAnswer:"``, with an
instruction to put the final answer in ``\\boxed{}``.

Outputs, in ``out_dir``:

* ``results.md`` -- the markdown table also printed on stdout (values in percent);
* ``results.json`` -- ``{"model", "model_dir", "settings", "benchmarks": {name: {...}}}`` where each
  benchmark holds ``pass@k`` for every k, ``maj@k``, ``mean_length``, ``no_answer_fraction``,
  ``truncated_fraction``, the counts, ``prompt_format``, ``seconds`` and the ``settings`` used;
* ``samples.jsonl`` -- one line per sample: benchmark, problem id and index, sample index, prompt,
  response, extracted answer, gold, verdict (``correct``), the verifier's reason, length and
  whether the response was cut at ``max_new_tokens``;
* ``test_time.jsonl`` (``--test_time_method=latentseek`` only) -- one line per problem: the
  greedy answer, the final answer, both verdicts, the reward history and the updates taken.

``--test_time_method`` other than ``sample`` adds a ``test_time`` block to each benchmark of
``results.json`` (accuracy, its standard error, compute per problem, seconds; see
``eval.test_time``) and a column with the method's accuracy to the table; without it the outputs
are exactly as before.

Prompts that do not fit ``max_new_tokens`` in the model's context are not sampled; they count as
wrong in pass@k / maj@k (so the denominator is always the number of problems evaluated) and are
reported in ``num_too_long`` and the table's "too long" column.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from offpolicy_jax import models, rewards
from offpolicy_jax.data import prompts as prompts_lib
from offpolicy_jax.eval import latentseek, runner, test_time

ARITH = "arith"
BENCHMARK_NAMES = (ARITH,) + tuple(rewards.BENCHMARKS)
# Problems of the arith held-out set evaluated when no --limit is given.
ARITH_EVAL_SIZE = 500
# --max_new_tokens when unset: this, or half the model's context if that is smaller.
DEFAULT_MAX_NEW_TOKENS = 1024
# A checkpoint directory holds a tokenizer when it has at least one of these files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

RESULTS_JSON, RESULTS_MD, SAMPLES_JSONL = "results.json", "results.md", "samples.jsonl"
# LatentSeek's per-problem record (initial and final answer, reward history), when it runs.
TEST_TIME_JSONL = "test_time.jsonl"


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
    """What to evaluate and how (one field per command-line flag of ``python -m
    offpolicy_jax.eval``).

    Attributes:
      model: a Hugging Face checkpoint directory, an alias (``tiny-arith``), or a run directory
        (its ``--workdir``: the policy of its latest checkpoint).
      benchmarks: names from :data:`BENCHMARK_NAMES`.
      num_samples: n, responses per problem.
      ks: the k of ``pass@k`` (each in [1, n]); None: :func:`default_ks`.
      temperature, top_p, top_k: sampling (top_p / top_k None: no truncation).
      max_new_tokens: response budget; None: ``min(1024, context // 2)``.
      limit: evaluate only the first ``limit`` problems of each benchmark (None: all; ``arith``:
        :data:`ARITH_EVAL_SIZE`).
      seed: sampling seed, the same for every benchmark (a benchmark's samples do not depend on
        which other benchmarks are in the list).
      use_chat_template: format questions with the tokenizer's chat template when it has one.
      instruction: appended to every benchmark question (not to ``arith`` prompts).
      prompt_format: ``"chat"`` (the two settings above), ``"instruction"`` (the plain template
        with the instruction) or ``"raw"`` (the question as is); see
        ``data.prompts.format_question``. Evaluate with the format a policy was trained on.
      batch_size: prompts per generation chunk (each chunk is ``batch_size * n`` rows).
      mesh: device mesh ``"data,fsdp,tensor"`` (see ``models.make_mesh``).
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"``.
      data_dir: benchmark data folder (None: ``rewards.load_benchmark``'s default).
      rerank_with: a generative verifier reranks each problem's samples (best-of-n,
        ``verification.rerank_best_of_n``): ``"self"`` (the evaluated model rates its own
        samples, RISE's self-verification) or a checkpoint directory / alias (e.g. a TOPR
        verifier's export); None: no reranking. The verification prompt is the compact one on
        ``arith``, RISE's template elsewhere.
      rerank_samples: verifications per sample (their ratings are averaged); also LatentSeek's
        ratings per answer.
      test_time_method: how each problem's answer is produced (``eval.test_time``):
        ``"sample"`` (the n samples, pass@k / maj@k only: the harness's behaviour without the
        flag), ``"majority"``, ``"best_of_n"`` or ``"latentseek"``; the last three add a
        ``test_time`` block (accuracy, standard error, compute per problem, seconds).
      test_time_reward: what scores answers for ``best_of_n`` and ``latentseek``:
        ``"verifier"`` (the generative verifier of ``rerank_with``, the model itself when unset)
        or ``"oracle"`` (the gold answer: PSRM; labelled as using the gold).
      latentseek_steps, latentseek_lr, latentseek_fraction, latentseek_threshold: LatentSeek's
        most updates T, Adam learning rate η, share ρ of the answer's positions optimised and
        early-stop threshold τ (``eval.latentseek.LatentSeekConfig``; the official code's
        defaults).
    """

    model: str = "tiny-arith"
    benchmarks: tuple[str, ...] = (ARITH,)
    num_samples: int = 8
    ks: tuple[int, ...] | None = None
    temperature: float = 0.6
    top_p: float | None = 0.95
    top_k: int | None = None
    max_new_tokens: int | None = None
    limit: int | None = None
    seed: int = 0
    use_chat_template: bool = True
    instruction: str = prompts_lib.DEFAULT_INSTRUCTION
    prompt_format: str = "chat"
    batch_size: int = 32
    mesh: str = "1,-1,1"
    dtype: str = "float32"
    data_dir: str | None = None
    rerank_with: str | None = None
    rerank_samples: int = 1
    test_time_method: str = "sample"
    test_time_reward: str = "verifier"
    latentseek_steps: int = latentseek.LatentSeekConfig.steps
    latentseek_lr: float = latentseek.LatentSeekConfig.learning_rate
    latentseek_fraction: float = latentseek.LatentSeekConfig.fraction
    latentseek_threshold: float = latentseek.LatentSeekConfig.reward_threshold

    def latentseek_config(self) -> latentseek.LatentSeekConfig:
        """The ``--latentseek_*`` flags as a ``LatentSeekConfig`` (K's cap stays the code's 300)."""
        return latentseek.LatentSeekConfig(
            steps=self.latentseek_steps, learning_rate=self.latentseek_lr,
            fraction=self.latentseek_fraction, reward_threshold=self.latentseek_threshold)

    def validate(self) -> None:
        """Raises ``ValueError`` naming the flag of the first invalid setting."""
        parse_benchmarks(",".join(self.benchmarks))
        checks = [
            (self.num_samples >= 1, f"--num_samples must be >= 1, got {self.num_samples}"),
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (self.top_p is None or 0 < self.top_p <= 1,
             f"--top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k is None or self.top_k >= 1, f"--top_k must be >= 1, got {self.top_k}"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1,
             f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1 prompts, got {self.batch_size}"),
            (self.rerank_samples >= 1,
             f"--rerank_samples must be >= 1, got {self.rerank_samples}"),
            (self.dtype in ("float32", "bfloat16"),
             f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.test_time_method not in test_time.TEST_TIME_METHODS:
            raise ValueError(f"--test_time_method must be one of "
                             f"{', '.join(test_time.TEST_TIME_METHODS)}, got "
                             f"{self.test_time_method!r}")
        if self.test_time_reward not in test_time.TEST_TIME_REWARDS:
            raise ValueError(f"--test_time_reward must be one of "
                             f"{', '.join(test_time.TEST_TIME_REWARDS)}, got "
                             f"{self.test_time_reward!r}")
        if self.test_time_method == test_time.LATENTSEEK:
            if self.num_samples != 1:
                raise ValueError(f"--test_time_method=latentseek refines one greedy answer per "
                                 f"problem: set --num_samples=1 (got {self.num_samples})")
            self.latentseek_config().validate()
        if self.ks is not None:
            check_ks(self.ks, self.num_samples)


# ---------------------------------------------------------------------------------------------
# Flag parsing helpers (pure).


def default_ks(num_samples: int) -> tuple[int, ...]:
    """Every power of two up to ``num_samples``, and ``num_samples`` itself: 6 -> (1, 2, 4, 6)."""
    powers = [1 << i for i in range(num_samples.bit_length()) if 1 << i <= num_samples]
    return tuple(sorted(set(powers) | {num_samples}))


def check_ks(ks, num_samples: int) -> tuple[int, ...]:
    """``ks`` sorted and de-duplicated; raises naming ``--k`` if one is outside [1, n]."""
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad or not ks:
        raise ValueError(f"--k values must be in [1, --num_samples={num_samples}], got "
                         f"{list(ks) or 'none'}")
    return tuple(sorted(set(int(k) for k in ks)))


def parse_ks(text: str | None, num_samples: int) -> tuple[int, ...]:
    """``--k``: a comma list such as ``"1,4,16"``; empty or None gives :func:`default_ks`."""
    if not text or not text.strip():
        return default_ks(num_samples)
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--k must be a comma-separated list of integers, got {text!r}") from None
    return check_ks(ks, num_samples)


def majority_ks(ks: tuple[int, ...], num_samples: int) -> tuple[int, ...]:
    """The k of the reported maj@k: every pass@k budget of at least 2 voters, and always n
    (maj@1 is the first sample's accuracy, a noisier copy of pass@1, so it is left out unless
    n = 1)."""
    return tuple(sorted({k for k in ks if k >= 2} | {num_samples}))


def parse_benchmarks(text: str) -> tuple[str, ...]:
    """``--benchmarks``: a comma list of :data:`BENCHMARK_NAMES` (order kept, repeats dropped)."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise ValueError(f"--benchmarks is empty; choose from {', '.join(BENCHMARK_NAMES)}")
    unknown = [name for name in names if name not in BENCHMARK_NAMES]
    if unknown:
        raise ValueError(f"unknown benchmark {', '.join(map(repr, unknown))} in --benchmarks; "
                         f"valid names: {', '.join(BENCHMARK_NAMES)}")
    return tuple(names)


# ---------------------------------------------------------------------------------------------
# Model and prompts.


def resolve_checkpoint(model: str) -> str:
    """``--model`` (a directory or an alias) to a checkpoint directory that has a tokenizer.

    Raises:
      FileNotFoundError: the directory does not exist, has no ``config.json``, or has no
        tokenizer file (naming the directory and the files looked for).
    """
    from offpolicy_jax import tiny_arith   # builds the embedded model on first use only
    model_dir = tiny_arith.resolve_model(model)
    if not any(os.path.exists(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"--model={model!r}: the checkpoint directory {model_dir} has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the model it was "
            f"trained from into it")
    return model_dir


def load_tokenizer(model_dir: str):
    """``models.load_tokenizer`` with an error that names the directory."""
    try:
        return models.load_tokenizer(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"could not load the tokenizer of {model_dir}: {error}") from error


def stop_token_ids(tokenizer, cfg, model_dir: str | None = None) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, ``config.json``'s ``eos_token_id`` and
    ``generation_config.json``'s (chat checkpoints often end turns with a token other than the
    tokenizer's EOS, e.g. Qwen's ``<|im_end|>`` next to ``<|endoftext|>``)."""
    ids: set[int] = set()

    def add(value):
        if isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
        elif value is not None:
            ids.add(int(value))

    add(tokenizer.eos_token_id)
    add(cfg.eos_token_id)
    generation_config = os.path.join(model_dir or "", "generation_config.json")
    if model_dir and os.path.exists(generation_config):
        with open(generation_config) as f:
            add(json.load(f).get("eos_token_id"))
    ids = {i for i in ids if 0 <= i < cfg.vocab_size}
    if not ids:
        raise ValueError(f"the checkpoint {model_dir} declares no EOS token (tokenizer, "
                         f"config.json, generation_config.json); responses could never end")
    return tuple(sorted(ids))


def prompt_format(name: str, tokenizer, use_chat_template: bool, fmt: str = "chat") -> str:
    """How ``name``'s prompts are written: ``"arith"``, ``"raw"``, ``"chat template"`` or
    ``"plain"``, for ``--prompt_format=fmt``."""
    if name == ARITH:
        return "arith"
    if fmt == "raw":
        return "raw"
    if fmt == "chat" and use_chat_template and getattr(tokenizer, "chat_template", None):
        return "chat template"
    return "plain"


def load_questions(name: str, *, limit: int | None = None,
                   data_dir: str | None = None) -> list[dict] | None:
    """The first ``limit`` ``{"id", "question", "gold"}`` of benchmark ``name`` (None for
    ``arith``, which is generated, not read). Needs no tokenizer, so ``run`` calls it before the
    model is resolved (for ``tiny-arith``, possibly built) or loaded.

    Raises:
      ValueError: unknown name (listing the valid ones).
      FileNotFoundError: the benchmark's data file is missing (naming the path).
    """
    parse_benchmarks(name)
    if name == ARITH:
        return None
    questions = rewards.load_benchmark(name, data_dir=data_dir)
    return questions if limit is None else questions[:limit]


def benchmark_prompt_records(name: str, *, tokenizer=None, use_chat_template: bool = True,
                             instruction: str = prompts_lib.DEFAULT_INSTRUCTION,
                             limit: int | None = None, data_dir: str | None = None,
                             prompt_format: str = "chat") -> list[dict]:
    """The first ``limit`` problems of benchmark ``name`` as ``{"id", "prompt", "gold"}``.

    ``arith``: the fixed held-out set in the task's format (``limit`` or :data:`ARITH_EVAL_SIZE`
    problems). Others: ``rewards.load_benchmark`` (file order, normalised golds) formatted with
    ``data.prompts.format_question``.

    Raises:
      ValueError: unknown name (listing the valid ones).
      FileNotFoundError: the benchmark's data file is missing (naming the path).
    """
    questions = load_questions(name, limit=limit, data_dir=data_dir)
    if name == ARITH:
        return prompts_lib.arith_records("heldout", limit or ARITH_EVAL_SIZE)
    return prompts_lib.to_prompt_records(questions, tokenizer=tokenizer,
                                         use_chat_template=use_chat_template,
                                         instruction=instruction, prompt_format=prompt_format)


def effective_max_new_tokens(requested: int | None, context: int) -> int:
    """``--max_new_tokens``, or its default ``min(1024, context // 2)``; must leave the prompt
    at least one position of the model's context."""
    budget = requested if requested is not None else min(DEFAULT_MAX_NEW_TOKENS, context // 2)
    if budget >= context:
        raise ValueError(f"--max_new_tokens={budget} leaves no room for a prompt in the model's "
                         f"context of {context} tokens (max_position_embeddings)")
    return budget


# ---------------------------------------------------------------------------------------------
# Reporting.


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _with_error(block) -> str:
    if block is None:
        return "-"
    return f"{100 * block['accuracy']:.1f} ± {100 * block['accuracy_stderr']:.1f}"


def _number(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_table(benchmarks: dict) -> str:
    """A markdown table, one row per benchmark: pass@k and maj@k in percent, the different
    correct responses per problem, mean response length in tokens, the no-answer and too-long
    counts.

    Args:
      benchmarks: ``{name: metrics}`` as in ``results.json``'s ``"benchmarks"``.
    """
    def metric_keys(prefix):
        keys = {k for metrics in benchmarks.values() for k in metrics if k.startswith(prefix)}
        return sorted(keys, key=lambda k: int(k.split("@")[1]))

    score_keys = metric_keys("pass@") + metric_keys("maj@") + metric_keys("reranked@")
    # The --test_time_method's accuracy ± its standard error (absent by default).
    methods = sorted({m["test_time"]["method"] for m in benchmarks.values() if "test_time" in m})
    header = (["benchmark", "problems", "n"] + [f"{k} (%)" for k in score_keys]
              + [f"{'/'.join(methods)} (%)"] * bool(methods)
              + ["distinct correct", "mean length", "no answer (%)", "too long"])
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, metrics in benchmarks.items():
        length = metrics.get("mean_length")
        row = ([name, str(metrics["num_prompts"]), str(metrics["num_samples"])]
               + [_percent(metrics.get(k)) for k in score_keys]
               + ([_with_error(metrics.get("test_time"))] if methods else [])
               + [_number(metrics.get("distinct_correct")),
                  "-" if length is None else f"{length:.1f}",
                  _percent(metrics.get("no_answer_fraction")), str(metrics["num_too_long"])])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sample_rows(name: str, records: list[dict], result: runner.EvalResult) -> list[dict]:
    """One ``samples.jsonl`` row per sample of a benchmark, prompt-major."""
    n = result.correct.shape[1]
    rows = []
    for p, record in enumerate(records):
        for j in range(n):
            row = p * n + j
            rows.append({
                "benchmark": name, "id": record["id"], "problem_index": p, "sample_index": j,
                "prompt": record["prompt"], "response": result.responses[row],
                "extracted": result.extracted[row], "gold": record["gold"],
                "correct": bool(result.correct[p, j]), "reason": result.reasons[row],
                "length": int(result.lengths[row]), "truncated": bool(result.truncated[row]),
            })
    return rows


def verification_prompt_fn(name: str, config):
    """``(record, solution, tokenizer) -> verification prompt`` of benchmark ``name``: the
    compact format on ``arith``, RISE's template elsewhere."""
    from offpolicy_jax import verification
    template = verification.COMPACT if name == ARITH else verification.PAPER

    def make_prompt(record, solution, tokenizer):
        return verification.verification_prompt(
            record, solution, template=template, tokenizer=tokenizer,
            use_chat_template=config.use_chat_template and config.prompt_format == "chat")

    return make_prompt


def rerank(name: str, records: list[dict], result: runner.EvalResult, verifier, config,
           max_new_tokens: int, pool, mesh) -> tuple[dict, np.ndarray, runner.EvalResult]:
    """Best-of-n of ``result``'s samples by ``verifier`` = ``(cfg, params, tokenizer, eos ids,
    pad id)``: ``(metrics, scores, rated)``, the metrics being ``reranked@n`` and the verifier's
    accuracy (``verify_*``) on the samples, ``scores`` the ``[P, n]`` mean ratings and ``rated``
    the verifications (see ``verification.rate_samples``)."""
    from offpolicy_jax import verification
    cfg, params, tokenizer, eos_ids, pad_id = verifier
    scores, rated = verification.rate_samples(
        cfg, params, tokenizer, records, result, make_prompt=verification_prompt_fn(name, config),
        samples=config.rerank_samples, max_new_tokens=max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        seed=config.seed + 1, eos_token_ids=eos_ids, pad_token_id=pad_id, pool=pool, mesh=mesh,
        batch_size=config.batch_size)
    metrics = verification.rerank_metrics(result, scores, rated, config.rerank_samples)
    return {k: v for k, v in metrics.items() if not k.startswith("pass@")}, scores, rated


def run_latentseek(name, records, result, config, cfg, params, tokenizer, verifier,
                   verifier_name, max_new_tokens, eos_ids, pad_id, pool, mesh, start,
                   jsonl_path) -> dict:
    """LatentSeek on one benchmark's greedy answers (``eval.test_time.run_latentseek``); appends
    the per-problem rows to ``jsonl_path`` and returns the ``test_time`` block."""
    if config.test_time_reward == test_time.ORACLE:
        reward = test_time.OracleReward([r["gold"] for r in records], pool)
    else:
        reward = test_time.SelfVerificationReward(
            verifier, records, verification_prompt_fn(name, config),
            samples=config.rerank_samples, max_new_tokens=max_new_tokens,
            temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
            seed=config.seed + 3, pool=pool, mesh=mesh, batch_size=config.batch_size,
            name=verifier_name)
    prompts = [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in records]
    block, rows = test_time.run_latentseek(
        cfg, params, tokenizer, records, prompts, result, reward,
        config=config.latentseek_config(), max_new_tokens=max_new_tokens, eos_token_ids=eos_ids,
        pad_token_id=pad_id, pool=pool, mesh=mesh, batch_size=config.batch_size, started=start)
    with open(jsonl_path, "a") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": name, **row}) + "\n")
    return block


def write_results(out_dir: str, summary: dict) -> str:
    """Writes ``results.json`` and ``results.md``; returns the table."""
    table = results_table(summary["benchmarks"])
    settings = summary["settings"]
    heading = (f"# Evaluation of `{summary['model']}`\n\n"
               f"n={settings['num_samples']} samples per problem, temperature "
               f"{settings['temperature']}, top_p {settings['top_p']}, top_k {settings['top_k']}, "
               f"max_new_tokens {settings['max_new_tokens']}, seed {settings['seed']}. pass@k is "
               f"the unbiased estimator of Chen et al. (2021); maj@k votes over the first k "
               f"samples.\n\n")
    with open(os.path.join(out_dir, RESULTS_MD), "w") as f:
        f.write(heading + table + "\n")
    with open(os.path.join(out_dir, RESULTS_JSON), "w") as f:
        json.dump(summary, f, indent=1)
    return table


# ---------------------------------------------------------------------------------------------
# The run.


def run(config: HarnessConfig, out_dir: str, *, progress: bool = True, log=None) -> dict:
    """Evaluates ``config.model`` on every benchmark and writes the three output files.

    Everything that can fail fast does so before the weights are loaded: the settings, every
    benchmark name and data file (checked before ``--model`` is resolved, so a bad data folder
    never waits for ``tiny-arith`` to be built), the model directory and its tokenizer.

    Args:
      config: the settings.
      out_dir: created if needed; receives ``results.json``, ``results.md``, ``samples.jsonl``
        (``results.*`` are rewritten after every benchmark, so an interrupted run keeps the
        finished ones).
      progress: tqdm bars over benchmarks and over each benchmark's samples (on stderr).
      log: ``str -> None`` for status lines (default: print to stderr).

    Returns:
      The ``results.json`` content.
    """
    from tqdm.auto import tqdm

    log = log or (lambda message: print(message, file=sys.stderr))
    config.validate()
    benchmarks = parse_benchmarks(",".join(config.benchmarks))
    ks = default_ks(config.num_samples) if config.ks is None else check_ks(config.ks,
                                                                          config.num_samples)
    maj_ks = majority_ks(ks, config.num_samples)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out={out_dir} exists and is not a directory")

    # Data files first: they need no tokenizer, and resolving --model=tiny-arith may build it.
    for name in benchmarks:
        load_questions(name, limit=config.limit, data_dir=config.data_dir)
    from offpolicy_jax import export as export_lib
    run_dir = export_lib.is_run_dir(config.model)
    # A run directory: the policy of its latest checkpoint, with the starting model's tokenizer.
    model_dir = resolve_checkpoint(export_lib.base_model_dir(export_lib.read_run_config(
        config.model)) if run_dir else config.model)
    tokenizer = load_tokenizer(model_dir)
    records = {name: benchmark_prompt_records(
        name, tokenizer=tokenizer, use_chat_template=config.use_chat_template,
        instruction=config.instruction, limit=config.limit, data_dir=config.data_dir,
        prompt_format=config.prompt_format) for name in benchmarks}

    mesh = models.make_mesh(config.mesh)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    if run_dir:
        cfg, params, *_ = export_lib.load_run_policy(config.model, dtype=dtype)
        params = models.shard_params(params, mesh)
    else:
        cfg, params = models.load_hf_checkpoint(model_dir, dtype=dtype, mesh=mesh)
    max_new_tokens = effective_max_new_tokens(config.max_new_tokens, cfg.max_position_embeddings)
    eos_ids = stop_token_ids(tokenizer, cfg, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    pad_id = pad_id if 0 <= pad_id < cfg.vocab_size else eos_ids[0]

    method = config.test_time_method
    # best_of_n and LatentSeek need a verifier unless the oracle scores answers; the model
    # itself (self-verification) when --rerank_with is not given.
    verifier_name = config.rerank_with
    if method in (test_time.BEST_OF_N, test_time.LATENTSEEK) and \
            config.test_time_reward == test_time.VERIFIER and not verifier_name:
        verifier_name = "self"
    verifier = None
    if verifier_name == "self":
        verifier = (cfg, params, tokenizer, eos_ids, pad_id)
    elif verifier_name:
        verifier_dir = resolve_checkpoint(verifier_name)
        verifier_tokenizer = load_tokenizer(verifier_dir)
        verifier_cfg, verifier_params = models.load_hf_checkpoint(verifier_dir, dtype=dtype,
                                                                   mesh=mesh)
        verifier_eos = stop_token_ids(verifier_tokenizer, verifier_cfg, verifier_dir)
        verifier = (verifier_cfg, verifier_params, verifier_tokenizer, verifier_eos,
                    verifier_tokenizer.pad_token_id if verifier_tokenizer.pad_token_id is not None
                    else verifier_eos[0])

    settings = {
        "num_samples": config.num_samples, "ks": list(ks), "maj_ks": list(maj_ks),
        "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
        "max_new_tokens": max_new_tokens, "limit": config.limit, "seed": config.seed,
        "use_chat_template": config.use_chat_template, "instruction": config.instruction,
        "batch_size": config.batch_size, "mesh": config.mesh, "dtype": config.dtype,
        "eos_token_ids": list(eos_ids), "rerank_with": config.rerank_with,
        "rerank_samples": config.rerank_samples,
    }
    if method != test_time.SAMPLE:     # the default's settings stay as they were
        settings.update(test_time_method=method, test_time_reward=config.test_time_reward,
                        verifier=None if config.test_time_reward == test_time.ORACLE
                        else verifier_name)
        if method == test_time.LATENTSEEK:
            settings.update(solving_temperature=0.0,
                            latentseek=dataclasses.asdict(config.latentseek_config()))
    summary = {"model": config.model, "model_dir": model_dir, "settings": settings,
               "benchmarks": {}}
    os.makedirs(out_dir, exist_ok=True)
    samples_path = os.path.join(out_dir, SAMPLES_JSONL)
    open(samples_path, "w").close()
    test_time_path = os.path.join(out_dir, TEST_TIME_JSONL)
    if method == test_time.LATENTSEEK:
        open(test_time_path, "w").close()
    # LatentSeek starts from the greedy answer (its "CoT initialisation"); --temperature then
    # only applies to the verifications.
    solve_temperature = 0.0 if method == test_time.LATENTSEEK else config.temperature

    with rewards.VerifierPool() as pool:
        outer = tqdm(benchmarks, desc="benchmarks", unit="benchmark", disable=not progress,
                     position=0, dynamic_ncols=True)
        for name in outer:
            outer.set_postfix_str(name)
            bench_records = records[name]
            total = len(bench_records) * config.num_samples
            inner = tqdm(total=total, desc=name, unit="sample", disable=not progress,
                         position=1, leave=False, dynamic_ncols=True)
            start = time.time()
            result = runner.evaluate_prompts(
                cfg, params, tokenizer,
                [tokenizer.encode(r["prompt"], add_special_tokens=False) for r in bench_records],
                [r["gold"] for r in bench_records],
                num_samples=config.num_samples, ks=ks, maj_ks=maj_ks,
                max_new_tokens=max_new_tokens, temperature=solve_temperature,
                top_p=config.top_p, top_k=config.top_k, seed=config.seed,
                eos_token_ids=eos_ids, pad_token_id=pad_id, pool=pool, mesh=mesh,
                batch_size=config.batch_size, skip_too_long=True, on_samples=inner.update)
            inner.close()
            fmt = prompt_format(name, tokenizer, config.use_chat_template, config.prompt_format)
            reranked, block = {}, None
            if verifier is not None and method != test_time.LATENTSEEK:
                reranked, scores, rated = rerank(name, bench_records, result, verifier, config,
                                                 max_new_tokens, pool, mesh)
                if method == test_time.BEST_OF_N:
                    block = test_time.best_of_n_verifier(
                        result, scores, rated, time.time() - start, verifier_name=verifier_name)
            if method == test_time.MAJORITY:
                block = test_time.majority(result, time.time() - start)
            elif method == test_time.BEST_OF_N and config.test_time_reward == test_time.ORACLE:
                block = test_time.best_of_n_oracle(result, time.time() - start)
            elif method == test_time.LATENTSEEK:
                block = run_latentseek(name, bench_records, result, config, cfg, params,
                                       tokenizer, verifier, verifier_name, max_new_tokens,
                                       eos_ids, pad_id, pool, mesh, start, test_time_path)
            summary["benchmarks"][name] = {
                **result.metrics, **reranked, "prompt_format": fmt,
                "seconds": round(time.time() - start, 2),
                "settings": {**settings, "prompt_format": fmt},
            }
            if block is not None:
                summary["benchmarks"][name]["test_time"] = block
            if result.metrics["num_too_long"]:
                log(f"{name}: {result.metrics['num_too_long']} of {len(bench_records)} prompts "
                    f"do not fit max_new_tokens={max_new_tokens} in the model's context of "
                    f"{cfg.max_position_embeddings} tokens; they were not sampled and count as "
                    f"wrong")
            with open(samples_path, "a") as f:
                for row in sample_rows(name, bench_records, result):
                    f.write(json.dumps(row) + "\n")
            write_results(out_dir, summary)
        outer.close()
    return summary
