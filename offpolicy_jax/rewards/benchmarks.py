"""Gold-answer loaders for the six evaluation sets in ``shared/data`` (see ``PROVENANCE.md`` there).

Each loader returns a list of ``{"id", "question", "gold"}`` dicts, with the gold normalised so that
it is a plain answer string for :func:`offpolicy_jax.rewards.math.check`:

- GSM8K: the text after ``####``, thousands commas removed (``2,125`` -> ``2125``).
- MATH-500: the ``answer`` field as is (LaTeX).
- AIME 2024: ``answer`` without its zero padding (``"025"`` -> ``"25"``).
- AMC 2023: ``answer`` is a JSON float (``27.0``); all are integral and become ``"27"``.
- Minerva: the last ``\\boxed{}`` of ``solution``; Python e-notation golds (``4.5e33``) become
  ``4.5 \\times 10^{33}``, ``-1./3`` becomes ``-1/3``, ``np.arcsin`` becomes ``\\arcsin``, ``$`` and
  line breaks are removed.
- OlympiadBench: ``final_answer[0]`` with every ``$`` removed (multi-answer golds
  ``'$f(x)=-1$,$f(x)=x+1$'`` become ``f(x)=-1,f(x)=x+1``), a trailing period removed (id 1970), and
  the ``t(0,4]`` typo of id 2045 read as ``(0,4]``. ``context`` (when present) is prepended to
  the question.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from offpolicy_jax.rewards import math as rmath

BENCHMARKS = ("gsm8k_train", "gsm8k", "math500", "aime24", "amc23", "minerva", "olympiadbench")

_FILES = {
    "gsm8k_train": "gsm8k_train.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500_test.jsonl",
    "aime24": "aime24_test.jsonl",
    "amc23": "amc23_test.jsonl",
    "minerva": "minerva_math_test.jsonl",
    "olympiadbench": "olympiadbench_test.jsonl",
}
_DATA_ENV = "OFFPOLICY_JAX_DATA"


def default_data_dir() -> pathlib.Path | None:
    """``$OFFPOLICY_JAX_DATA``, else ``<repo>/../shared/data`` if it exists, else None."""
    env = os.environ.get(_DATA_ENV)
    if env:
        return pathlib.Path(env)
    repo = pathlib.Path(__file__).resolve().parents[2]
    candidate = repo.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _gsm8k_gold(answer: str) -> str:
    gold = answer.split("####")[-1].strip()
    return gold.replace(",", "")


_E_NOTATION_GOLD = re.compile(r"^([-+]?\d+(?:\.\d*)?)[eE]([-+]?\d+)$")


def normalize_minerva_gold(gold: str) -> str:
    """Minerva golds written as Python: e-notation, ``-1./3`` and ``np.`` functions."""
    gold = gold.replace("$", "").replace("\n", " ").strip()
    m = _E_NOTATION_GOLD.match(gold)
    if m:
        mantissa, exponent = m.group(1).rstrip("."), int(m.group(2))
        return f"{mantissa} \\times 10^{{{exponent}}}"
    gold = re.sub(r"(\d)\./", r"\1/", gold)  # -1./3 -> -1/3
    gold = re.sub(r"\bnp\.(arcsin|arccos|arctan|sin|cos|tan|exp|log|sqrt|pi)\b", r"\\\1", gold)
    return gold


def normalize_olympiad_gold(gold: str) -> str:
    """OlympiadBench: drop ``$`` delimiters, a trailing period, and the ``t(0,4]`` typo."""
    gold = gold.replace("$", "").strip()
    gold = gold.rstrip(".").strip()
    if re.fullmatch(r"t\s*[\(\[][^=]*[\)\]]", gold):
        gold = gold[1:].strip()
    return gold


def _rows(path: pathlib.Path):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from exc


def _load_rows(name: str, path: pathlib.Path) -> list[dict]:
    out = []
    for line_no, row in _rows(path):
        try:
            if name in ("gsm8k", "gsm8k_train"):
                item = dict(id=f"{name}-{line_no - 1}", question=row["question"],
                            gold=_gsm8k_gold(row["answer"]))
            elif name == "math500":
                item = dict(id=row["unique_id"], question=row["problem"], gold=row["answer"].strip())
            elif name == "aime24":
                gold = str(row["answer"]).strip()
                gold = str(int(gold)) if gold.isdigit() else gold
                item = dict(id=f"aime24-{row['id']}", question=row["problem"], gold=gold)
            elif name == "amc23":
                value = float(row["answer"])
                gold = str(int(value)) if value.is_integer() else repr(value)
                item = dict(id=f"amc23-{row['id']}", question=row["problem"], gold=gold)
            elif name == "minerva":
                boxed = rmath._last_boxed(row["solution"])
                if boxed is None:
                    raise ValueError("solution has no \\boxed{} answer")
                item = dict(id=f"minerva-{row['idx']}", question=row["problem"],
                            gold=normalize_minerva_gold(boxed))
            elif name == "olympiadbench":
                question = row["question"]
                if row.get("context"):
                    question = f"{row['context']}\n\n{question}"
                item = dict(id=f"olympiadbench-{row['id']}", question=question,
                            gold=normalize_olympiad_gold(row["final_answer"][0]))
            else:  # pragma: no cover - guarded by load_benchmark
                raise KeyError(name)
        except KeyError as exc:
            raise ValueError(f"{path}:{line_no}: missing field {exc} for benchmark {name!r}") from exc
        out.append(item)
    return out


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Loads one benchmark as ``[{"id": str, "question": str, "gold": str}, ...]``.

    Args:
      name: one of :data:`BENCHMARKS` (``gsm8k`` is the test split).
      data_dir: folder with the ``*.jsonl`` files; default ``$OFFPOLICY_JAX_DATA``, else
        ``<repo>/../shared/data``.
    """
    if name not in _FILES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    base = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    if base is None:
        raise FileNotFoundError(
            f"no data folder for benchmark {name!r}: pass data_dir or set ${_DATA_ENV}")
    path = base / _FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"benchmark {name!r}: file not found: {path}")
    return _load_rows(name, path)
