"""Prompt datasets as plain records ``{"id": str, "prompt": str, "gold": str}`` (plus the raw
``question`` for every source but ``arith``).

Sources (the ``--dataset`` flag):

* ``arith`` — the embedded task (``data.arith``): prompts in the task's own format
  (``"Q: 12+7*3\\nA: "``), which is what the embedded ``tiny-arith`` model is trained on; no
  instruction and no chat template are added.
* ``gsm8k`` — training prompts from the GSM8K train split, held-out prompts from its test split
  (both via ``rewards.load_benchmark``, which also normalises the golds).
* ``math500`` and the other benchmark names — only a test split exists, so a fixed subset of
  ``eval_size`` problems is held out and the rest is used for training (for debugging and
  small-scale studies; do not report results on the training part).
* a path to a ``.jsonl`` file — one JSON object per line, question in ``prompt_field``, gold answer
  in ``answer_field``; held out as for ``math500``.

Questions (all sources but ``arith``) become prompts with ``format_question`` in one of
``PROMPT_FORMATS`` (the ``--prompt_format`` flag): ``chat`` (the default) renders the question and
an instruction to put the final answer in ``\\boxed{}`` through the tokenizer's chat template when
it has one, else through a plain template; ``instruction`` always uses the plain template;
``raw`` takes the question text as it is. The wrapping is what a chat model expects, but it costs:
on the benchmark workload of the speed issue a 4-6-token question became a 93-95-token prompt.

Held-out subsets never depend on the run's seed, so every run of an experiment measures the same
problems.
"""

import json
import os
import random

from offpolicy_jax.data import arith

# How a question becomes a prompt (see ``format_question``).
PROMPT_FORMATS = ("chat", "instruction", "raw")
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {question}\n{instruction}\nAnswer:"

# Training prompts generated for the arith task (the iterator cycles through them, reshuffling
# every epoch). The default knobs allow about 150k distinct training expressions (and 16k held-out
# ones); a third of the draws are 2-operand problems, of which there are only a few hundred.
ARITH_NUM_TRAIN = 20_000

# Seeds the fixed permutation that picks held-out records from single-split sources.
_HELDOUT_PERMUTATION_SEED = "offpolicy_jax/heldout"


def format_question(question: str, *, tokenizer=None, use_chat_template: bool = True,
                    instruction: str = DEFAULT_INSTRUCTION, prompt_format: str = "chat") -> str:
    """The prompt text for a question.

    ``prompt_format="raw"``: the question as it is, after the BOS token's text when the
    tokenizer prepends one itself (what encoding the question on its own would give);
    ``"instruction"``: the plain template below; ``"chat"`` (default): as follows.

    With ``use_chat_template`` and a tokenizer that has a chat template: one user message
    ``"{question}\\n{instruction}"`` rendered with ``add_generation_prompt=True`` (the text then
    contains the template's special-token strings; encode it with ``add_special_tokens=False``).
    Otherwise ``PLAIN_TEMPLATE``: ``"Question: {question}\\n{instruction}\\nAnswer:"``, after the
    BOS token's text when the tokenizer prepends one itself (``leading_special_text``).

    Args:
      question: the problem statement.
      tokenizer: a ``transformers`` tokenizer, or None for the plain template.
      use_chat_template: set False to force the plain template.
      instruction: appended after the question; ``""`` leaves it out.
      prompt_format: one of ``PROMPT_FORMATS``.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt_format={prompt_format!r}: expected one of {PROMPT_FORMATS}")
    if prompt_format == "raw":
        return leading_special_text(tokenizer) + question
    if prompt_format == "instruction":
        use_chat_template = False
    if use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        content = f"{question}\n{instruction}" if instruction else question
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    if not instruction:
        text = f"Question: {question}\nAnswer:"
    else:
        text = PLAIN_TEMPLATE.format(question=question, instruction=instruction)
    return leading_special_text(tokenizer) + text


def leading_special_text(tokenizer) -> str:
    """The BOS token's text if ``tokenizer`` puts one in front of every encoded text (Llama's
    ``<|begin_of_text|>``), else ``""``.

    Prompts are encoded with ``add_special_tokens=False`` everywhere (a chat template already
    writes its special tokens into the text), so a plain-template prompt carries the BOS in its
    text, as the model saw in pre-training.
    """
    if tokenizer is None or tokenizer.bos_token_id is None:
        return ""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if ids[:1] == [tokenizer.bos_token_id] else ""


def arith_records(split: str, num: int, seed: int = 0,
                  config: arith.ArithConfig = arith.ArithConfig()) -> list[dict]:
    """``num`` arith prompt records from ``split``: ``"train"`` draws with ``seed``; ``"heldout"``
    is the fixed held-out set (``seed`` is ignored, problems are distinct)."""
    if split == "heldout":
        problems = arith.heldout_problems(num, config)
    else:
        problems = arith.generate_problems(num, split, seed, config)
    return [{"id": f"arith-{split}-{index}", "prompt": problem.prompt, "gold": problem.gold}
            for index, problem in enumerate(problems)]


def gold_from_answer(answer) -> str:
    """The gold string of an answer field: numbers become their text; in text, whatever follows
    the last ``####`` (the GSM8K convention for the final answer after a worked solution) or else
    the whole text, stripped."""
    if isinstance(answer, bool):
        raise TypeError(f"a boolean is not an answer: {answer!r}")
    if isinstance(answer, (int, float)):
        return str(answer)
    if not isinstance(answer, str):
        raise TypeError(f"expected a string or a number, got {type(answer).__name__}")
    return answer.split("####")[-1].strip()


def read_jsonl_questions(path: str | os.PathLike, *, prompt_field: str = "question",
                         answer_field: str = "answer", id_field: str | None = None
                         ) -> list[dict]:
    """Reads ``{"id", "question", "gold"}`` from a JSONL file (one JSON object per line; blank
    lines are skipped).

    Args:
      path: the file.
      prompt_field: key of the question text.
      answer_field: key of the gold answer (see ``gold_from_answer``).
      id_field: key of a record id; default ``"<file name>:<line number>"``.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: naming the file, line and key, for a line that is not a JSON object or lacks
        (or has an empty or malformed) question or answer.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL dataset {path!r} does not exist")
    name = os.path.basename(path)
    questions = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got "
                                 f"{type(record).__name__}")
            for key in (prompt_field, answer_field) + ((id_field,) if id_field else ()):
                if key not in record:
                    raise ValueError(f"{where}: no key {key!r} (keys: {sorted(record)}); set "
                                     f"--prompt_field / --answer_field to the file's names")
            question = record[prompt_field]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: key {prompt_field!r} must be a non-empty string, got "
                                 f"{question!r}")
            try:
                gold = gold_from_answer(record[answer_field])
            except TypeError as error:
                raise ValueError(f"{where}: key {answer_field!r}: {error}") from None
            if not gold:
                raise ValueError(f"{where}: key {answer_field!r} holds an empty answer")
            record_id = str(record[id_field]) if id_field else f"{name}:{line_number}"
            questions.append({"id": record_id, "question": question, "gold": gold})
    if not questions:
        raise ValueError(f"JSONL dataset {path!r} has no records")
    return questions


def to_prompt_records(questions: list[dict], **format_kwargs) -> list[dict]:
    """``{"id", "question", "gold"}`` -> ``{"id", "prompt", "gold", "question"}`` with
    ``format_question`` (``format_kwargs``: ``tokenizer``, ``use_chat_template``,
    ``instruction``, ``prompt_format``); the question text is kept for prompts built from it
    later (a verification prompt quotes the problem)."""
    return [{"id": q["id"], "prompt": format_question(q["question"], **format_kwargs),
             "gold": q["gold"], "question": q["question"]} for q in questions]


def benchmark_records(name: str, *, data_dir: str | None = None, **format_kwargs) -> list[dict]:
    """Prompt records of a benchmark (``gsm8k``, ``math500``, ``aime24``, ...) loaded with
    ``rewards.load_benchmark``; ``format_kwargs`` as for ``format_question``."""
    from offpolicy_jax import rewards   # the verifier package; imported only when needed
    return to_prompt_records(rewards.load_benchmark(name, data_dir=data_dir), **format_kwargs)


def split_heldout(records: list[dict], eval_size: int, *, source: str = "dataset"
                  ) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)``: ``eval_size`` records picked by a fixed permutation (independent of
    any run seed; a larger ``eval_size`` keeps the smaller one's records), the rest for training,
    in their original order."""
    if not 0 < eval_size < len(records):
        raise ValueError(f"{source} has {len(records)} records; --eval_size={eval_size} must be "
                         f"at least 1 and leave at least one record for training")
    order = list(range(len(records)))
    random.Random(_HELDOUT_PERMUTATION_SEED).shuffle(order)
    heldout_indices = set(order[:eval_size])
    heldout = [records[i] for i in order[:eval_size]]
    train = [r for i, r in enumerate(records) if i not in heldout_indices]
    return train, heldout


def distinct_prompts(records: list[dict]) -> list[dict]:
    """The records with a prompt not seen before, in order: identical problems (arith's generator
    repeats about half of its draws) appear once in a training pool."""
    seen, distinct = set(), []
    for record in records:
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            distinct.append(record)
    return distinct


def training_pool(records: list[dict], train_size: int, *, source: str) -> list[dict]:
    """The distinct training records, the first ``train_size`` of them when it is > 0: a finite
    pool the prompt stream revisits epoch after epoch, so prompts recur within a run (ARPO's
    replay, MoPPS's posteriors)."""
    distinct = distinct_prompts(records)
    if train_size < 0 or train_size > len(distinct):
        raise ValueError(f"--train_size={train_size}: {source} has {len(distinct)} distinct "
                         f"training prompts (0 takes them all)")
    return distinct[:train_size] if train_size else distinct


def load_train_and_eval(dataset: str, *, prompt_field: str = "question",
                        answer_field: str = "answer", eval_size: int = 64, seed: int = 0,
                        tokenizer=None, use_chat_template: bool = True,
                        instruction: str = DEFAULT_INSTRUCTION, prompt_format: str = "chat",
                        data_dir: str | None = None,
                        arith_config: arith.ArithConfig = arith.ArithConfig(),
                        num_arith_train: int = ARITH_NUM_TRAIN, train_size: int = 0
                        ) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompt records for ``--dataset``.

    Args:
      dataset: ``"arith"``, ``"gsm8k"``, another benchmark name (``"math500"``, ...), or a path
        ending in ``.jsonl``.
      prompt_field, answer_field: JSONL field names (ignored for the named datasets).
      eval_size: held-out prompts.
      seed: draws the arith training problems (held-out sets never depend on it).
      tokenizer, use_chat_template, instruction, prompt_format: prompt formatting (see
        ``format_question``); not used for ``arith``, whose prompts are the task's own format.
      data_dir: benchmark data directory (default: ``rewards.load_benchmark``'s).
      arith_config: the arith task's difficulty knobs.
      num_arith_train: arith training prompts to generate (before removing repeats).
      train_size: the training pool's size (0: every distinct training prompt); see
        :func:`training_pool`.

    Returns:
      ``(train_records, eval_records)``, each a list of ``{"id", "prompt", "gold"}``; the
      training records have distinct prompts.
    """
    train, heldout = _train_and_eval(dataset, prompt_field, answer_field, eval_size, seed,
                                     tokenizer, use_chat_template, instruction, prompt_format,
                                     data_dir, arith_config, num_arith_train)
    return training_pool(train, train_size, source=f"--dataset={dataset}"), heldout


def _train_and_eval(dataset, prompt_field, answer_field, eval_size, seed, tokenizer,
                    use_chat_template, instruction, prompt_format, data_dir, arith_config,
                    num_arith_train):
    if eval_size < 1:
        raise ValueError(f"--eval_size must be >= 1, got {eval_size}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt_format={prompt_format!r}: expected one of {PROMPT_FORMATS}")
    format_kwargs = {"tokenizer": tokenizer, "use_chat_template": use_chat_template,
                     "instruction": instruction, "prompt_format": prompt_format}
    if dataset == "arith":
        return (arith_records("train", num_arith_train, seed, arith_config),
                arith_records("heldout", eval_size, config=arith_config))
    if dataset.endswith(".jsonl") or os.path.sep in dataset:
        questions = read_jsonl_questions(dataset, prompt_field=prompt_field,
                                         answer_field=answer_field)
        return split_heldout(to_prompt_records(questions, **format_kwargs), eval_size,
                             source=dataset)
    if dataset == "gsm8k":
        train = benchmark_records("gsm8k_train", data_dir=data_dir, **format_kwargs)
        test = benchmark_records("gsm8k", data_dir=data_dir, **format_kwargs)
        # The whole test split when eval_size covers it, else a fixed subset of it.
        heldout = test if eval_size >= len(test) else split_heldout(
            test, eval_size, source="gsm8k test")[1]
        return train, heldout
    return split_heldout(benchmark_records(dataset, data_dir=data_dir, **format_kwargs),
                         eval_size, source=dataset)
