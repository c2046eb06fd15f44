"""Verifiable rewards: code-free math answer checking with hard deadlines, and benchmark golds.

``rewards.math.extract_answer`` / ``rewards.math.is_equivalent`` / ``rewards.math.check`` are the
rules (pure, in-process). ``rewards.score_batch`` runs them for a batch of responses in a
:class:`VerifierPool` of killable worker processes with a per-check deadline. ``load_benchmark``
reads the gold answers of the six evaluation sets.
"""

from offpolicy_jax.rewards import math
from offpolicy_jax.rewards.math import Verdict, check, extract_answer, is_equivalent

__all__ = ["math", "Verdict", "check", "extract_answer", "is_equivalent"]
