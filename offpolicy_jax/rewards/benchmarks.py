"""Gold-answer loaders for the evaluation sets shipped with the package.

The seven files (GSM8K train and test, MATH-500, AIME 2024, AMC 2023, Minerva, OlympiadBench) are
installed with the package as ``offpolicy_jax/data/benchmarks/*.jsonl.gz`` (sources, commits,
licences and checksums: ``PROVENANCE.md`` there). Where a benchmark is read from, in order:

1. ``data_dir`` (the ``--data_dir`` flag of ``python -m offpolicy_jax.eval``), else
   ``$OFFPOLICY_JAX_DATA``: a folder of the user's own copies, ``<file>.jsonl`` or
   ``<file>.jsonl.gz`` (for instance newer versions, or an export from Hugging Face ``datasets``;
   see ``PROVENANCE.md``). Not checksum-verified. A missing folder or file is an error, never a
   silent fall-back to the packaged copy.
2. the packaged copy, whose sha256 (of the uncompressed file) is checked against
   :data:`SHA256` the first time it is read in a process.

Nothing is downloaded.

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

import gzip
import hashlib
import importlib.resources
import json
import os
import pathlib
import re
import zlib

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

# sha256 of each packaged file once decompressed, i.e. of the file as published upstream (the same
# digests as the table in offpolicy_jax/data/benchmarks/PROVENANCE.md).
SHA256 = {
    "gsm8k_train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
    "gsm8k_test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "math500_test.jsonl": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "aime24_test.jsonl": "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "amc23_test.jsonl": "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4",
    "minerva_math_test.jsonl": "0e656b430d3a0a1dab6aa853f453ba3805e28e2cabe4fc72486a897cc09d8ba2",
    "olympiadbench_test.jsonl": "bb8c1e38a16ea9eacb77530315a674d883f267fbff79183effc53681b4fcc416",
}

# Packaged files whose checksum has been verified in this process (keys: their path as text).
_VERIFIED: set[str] = set()


class ChecksumError(ValueError):
    """A packaged benchmark file does not have the sha256 recorded in :data:`SHA256`."""


def packaged_data_dir():
    """The folder of the packaged ``*.jsonl.gz`` files (an ``importlib.resources`` traversable)."""
    return importlib.resources.files("offpolicy_jax.data") / "benchmarks"


def default_data_dir() -> pathlib.Path | None:
    """The user's data folder from ``$OFFPOLICY_JAX_DATA``, or None (use the packaged copies)."""
    env = os.environ.get(_DATA_ENV)
    return pathlib.Path(env) if env else None


def _packaged_text(name: str) -> str:
    """The packaged file of benchmark ``name``, decompressed, its checksum verified once."""
    file_name = _FILES[name]
    resource = packaged_data_dir() / f"{file_name}.gz"
    if not resource.is_file():
        raise FileNotFoundError(
            f"benchmark {name!r}: packaged file {resource} is missing from this installation "
            f"(reinstall the package, or pass --data_dir / set ${_DATA_ENV})")
    try:
        data = gzip.decompress(resource.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise ChecksumError(f"benchmark {name!r}: packaged file {resource} is not a valid gzip "
                            f"file ({exc}); reinstall the package") from exc
    key = str(resource)
    if key not in _VERIFIED:
        expected, got = SHA256[file_name], hashlib.sha256(data).hexdigest()
        if got != expected:
            raise ChecksumError(
                f"benchmark {name!r}: packaged file {resource} fails its checksum: expected "
                f"sha256 {expected} (uncompressed), got {got}; reinstall the package")
        _VERIFIED.add(key)
    return data.decode("utf-8")


def _user_text(name: str, base: pathlib.Path, origin: str) -> tuple[str, pathlib.Path]:
    """The file of benchmark ``name`` in the user's folder ``base`` (``.jsonl``, else
    ``.jsonl.gz``), with its path. Not checksum-verified: it may be a newer version."""
    if not base.is_dir():
        raise FileNotFoundError(
            f"benchmark {name!r}: data folder {base} (from {origin}) does not exist")
    path = base / _FILES[name]
    if path.is_file():
        return path.read_text(encoding="utf-8"), path
    gz_path = base / f"{_FILES[name]}.gz"
    if gz_path.is_file():
        return gzip.decompress(gz_path.read_bytes()).decode("utf-8"), gz_path
    raise FileNotFoundError(
        f"benchmark {name!r}: file not found: {path} (nor {gz_path.name}) in the data folder "
        f"from {origin}")


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


def _rows(text: str, path):
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from exc


def _load_rows(name: str, text: str, path) -> list[dict]:
    out = []
    for line_no, row in _rows(text, path):
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
      data_dir: a folder with the user's own ``*.jsonl`` (or ``*.jsonl.gz``) files; default
        ``$OFFPOLICY_JAX_DATA``, else the copies packaged with ``offpolicy_jax``.

    Raises:
      ValueError: an unknown benchmark name.
      FileNotFoundError: the user's folder, or the benchmark's file in it, does not exist.
      ChecksumError: a packaged file does not match :data:`SHA256`.
    """
    if name not in _FILES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if data_dir is not None:
        text, path = _user_text(name, pathlib.Path(data_dir), "--data_dir")
    elif default_data_dir() is not None:
        text, path = _user_text(name, default_data_dir(), f"${_DATA_ENV}")
    else:
        text, path = _packaged_text(name), packaged_data_dir() / f"{_FILES[name]}.gz"
    return _load_rows(name, text, path)
