"""What an experiment file tells the loop: how to turn rewards into training targets, and the loss.

An ``Algorithm`` is plain data plus two pure functions, so each experiment file reads as its paper:

* ``advantages(rewards, group_size) -> [N]`` runs on the host after the verifier;
* ``loss(inputs) -> (loss, metrics)`` runs inside the jitted train step. ``inputs`` holds ``logp``
  (with gradient) and the stored arrays: ``old_logp`` (policy before this update, recomputed),
  ``behaviour_logp`` (the sampler's), ``ref_logp`` (if ``needs_reference``), ``mask``,
  ``rewards``, ``advantages``, ``group_index`` and, for ROVER, ``vocab_mean``/``old_vocab_mean``.
"""

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One RL objective as the loop runs it.

    Attributes:
      name: shown in logs and the summary.
      loss: ``inputs -> (scalar loss, metrics)``, jittable.
      advantages: host function ``(rewards [N], group_size) -> advantages [N]``, or a dict of
        per-row ``[N]`` arrays holding ``"advantages"`` and any other inputs the loss needs
        (e.g. DAPO's informative-group mask); every entry is added to the loss inputs.
      needs_reference: compute ``ref_logp`` with the frozen initial policy (KL terms).
      needs_vocab_mean: compute ``vocab_mean`` (ROVER's successor mean-Q).
      needs_groups: advantages are group-relative, so ``group_size >= 2`` is required.
      updates_per_batch: passes over each rollout batch (PPO epochs / UTD ratio).
      num_minibatches: optimizer updates per pass (the rollout batch is split into this many).
    """

    name: str
    loss: Callable[[dict], tuple]
    advantages: Callable[[np.ndarray, int], np.ndarray]
    needs_reference: bool = False
    needs_vocab_mean: bool = False
    needs_groups: bool = True
    updates_per_batch: int = 1
    num_minibatches: int = 1


def raw_rewards(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Advantage = reward (TOPR, REINFORCE without baseline)."""
    del group_size
    return np.asarray(rewards, np.float32)
