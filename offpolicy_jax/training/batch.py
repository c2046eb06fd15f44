"""The rollout batch: rows of sampled responses with their prompts, rewards and provenance.

Every stage of the rollout pipeline takes and returns a :class:`Rollouts`; replay buffers store
and return them; the trainer packs one into the model's layout (``rollout.pack_sequences``) and
adds the forward outputs and the algorithm's targets. The shapes, documented once:

    prompt_tokens  [N, P] int32    each row's prompt, left-aligned, padded after prompt_lengths
    prompt_lengths [N]    int32
    tokens         [N, R] int32    the response, padded after lengths (R = --max_new_tokens)
    lengths        [N]    int32    generated tokens, EOS included
    behaviour_logp [N, R] float32  log μ(y_t | ·) of the policy that sampled the row, at the
                                   sampling temperature (log softmax(z / T))
    rewards        [N]    float32  the reward function's score of the response
    group_index    [N]    int32    which prompt of the selection that produced the row it answers
    policy_version [N]    int32    the iteration whose starting policy sampled it: iteration k
                                   samples from version k − 1; 0 is the initial policy
    task           [N]    int32    which task the row is (TASKS: 0 solves a prompt, 1 verifies a
                                   solution, RISE's mixed batches); all 0 unless a stage adds
                                   rows of another task

Rows are grouped contiguously by prompt: rows ``[g·G, (g+1)·G)`` are the G = ``group_size``
responses to one prompt, and every operation here keeps groups whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np

FIELDS = ("prompt_tokens", "prompt_lengths", "tokens", "lengths", "behaviour_logp", "rewards",
          "group_index", "policy_version", "task")
# Row task ids (``Rollouts.task``) and their names in per-task metrics.
TASKS = ("solve", "verify")
SOLVE, VERIFY = 0, 1


@dataclasses.dataclass
class Rollouts:
    """One batch of rollout rows (numpy, host side, identical on every process); see the module
    docstring for the shapes."""

    prompt_tokens: np.ndarray
    prompt_lengths: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    behaviour_logp: np.ndarray
    rewards: np.ndarray
    group_index: np.ndarray
    policy_version: np.ndarray
    task: np.ndarray | None = None

    def __post_init__(self):
        rows = self.rewards.shape[0]
        if self.task is None:
            self.task = np.zeros(rows, np.int32)
        bad = {k: v.shape for k, v in self.as_dict().items() if v.shape[:1] != (rows,)}
        if bad:
            raise ValueError(f"Rollouts: arrays disagree on the number of rows {rows}: {bad}")
        if self.tokens.shape != self.behaviour_logp.shape:
            raise ValueError(f"Rollouts: tokens {self.tokens.shape} and behaviour_logp "
                             f"{self.behaviour_logp.shape} must have the same shape [N, R]")

    @property
    def num_rows(self) -> int:
        return self.rewards.shape[0]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, arrays: dict) -> Rollouts:
        # Checkpoints written before the task column existed hold solving rows only.
        missing = [k for k in FIELDS if k not in arrays and k != "task"]
        if missing:
            raise ValueError(f"rollout arrays lack {missing} (need {list(FIELDS)})")
        return cls(**{k: np.asarray(arrays[k]) for k in FIELDS if k in arrays})

    def num_groups(self, group_size: int) -> int:
        if self.num_rows % group_size:
            raise ValueError(f"{self.num_rows} rows do not form whole groups of "
                             f"group_size={group_size}")
        return self.num_rows // group_size

    def take(self, rows) -> Rollouts:
        """The given rows, in the given order."""
        rows = np.asarray(rows, np.int64)
        return Rollouts(**{k: v[rows] for k, v in self.as_dict().items()})

    def take_groups(self, groups, group_size: int) -> Rollouts:
        """Whole groups, in the given order."""
        self.num_groups(group_size)
        return self.take(group_rows(groups, group_size))

    def prompts(self) -> list[list[int]]:
        """Each row's prompt as a token list (padding removed)."""
        return [self.prompt_tokens[row, :self.prompt_lengths[row]].tolist()
                for row in range(self.num_rows)]


def group_rows(groups, group_size: int) -> np.ndarray:
    """Row indices of whole groups, in group order: ``[g0·G .. g0·G+G−1, g1·G, ...]``."""
    groups = np.asarray(groups, np.int64)
    return (groups[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)


def concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Row-wise concatenation, padding ``prompt_tokens`` to the widest part; empty parts are
    skipped."""
    parts = [p for p in parts if p.num_rows]
    if not parts:
        raise ValueError("concat needs at least one non-empty rollout batch")
    width = max(p.prompt_tokens.shape[1] for p in parts)
    merged = {}
    for name in FIELDS:
        arrays = [getattr(p, name) for p in parts]
        if name == "prompt_tokens":
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=pad_id)
                      for a in arrays]
        merged[name] = np.concatenate(arrays)
    return Rollouts(**merged)


def prompts_to_array(prompt_tokens: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_tokens [N, P], prompt_lengths [N])`` from ragged token lists."""
    lengths = np.array([len(p) for p in prompt_tokens], np.int32)
    array = np.full((len(prompt_tokens), int(lengths.max())), pad_id, np.int32)
    for row, prompt in enumerate(prompt_tokens):
        array[row, :len(prompt)] = prompt
    return array, lengths
