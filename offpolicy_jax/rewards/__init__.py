"""Verifiable rewards: code-free math answer checking with hard deadlines, and benchmark golds.

``rewards.math.extract_answer`` / ``rewards.math.is_equivalent`` / ``rewards.math.check`` are the
rules (pure, in-process, no deadline). ``rewards.score_batch`` applies them to a batch of
responses inside a :class:`VerifierPool` of killable worker processes with a per-check deadline.
``load_benchmark`` reads the gold answers of the evaluation sets named in :data:`BENCHMARKS`.
"""

from offpolicy_jax.rewards import math
from offpolicy_jax.rewards.benchmarks import BENCHMARKS, load_benchmark
from offpolicy_jax.rewards.math import Verdict, check, extract_answer, is_equivalent
from offpolicy_jax.rewards.pool import BatchScore, VerifierPool, score_batch

__all__ = [
    "BENCHMARKS", "BatchScore", "Verdict", "VerifierPool", "check", "extract_answer",
    "is_equivalent", "load_benchmark", "math", "score_batch",
]
