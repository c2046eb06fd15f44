"""What an experiment file tells the loop: how to turn rewards into training targets, and the loss.

An ``Algorithm`` is plain data plus two pure functions, so each experiment file reads as its paper:

* ``advantages(rewards, group_size) -> [N]`` runs on the host after the verifier;
* ``loss(inputs) -> (loss, metrics)`` runs inside the jitted train step. ``inputs`` holds ``logp``
  (with gradient) and the stored arrays: ``old_logp`` (policy before this update, recomputed),
  ``behaviour_logp`` (the sampler's), ``ref_logp`` (if ``needs_reference``), ``mask``,
  ``rewards``, ``advantages``, ``group_index`` and, for ROVER, ``vocab_mean``/``old_vocab_mean``.

Optional hooks (all off by default, which leaves the loop exactly as above) serve the methods that
need more than log-probs: a critic on the policy's last hidden state (PPO: ``extra_params``,
``value_fn``, which add ``values``/``old_values``), per-token targets computed once the batch's
log-probs are known (GAE: ``batch_targets``), the previous iteration's policy (ReMix's KL-Convex:
``needs_previous_policy`` adds ``prev_logp``) and a KL anchor that moves to the current policy at a
given iteration (ReMix's policy reincarnation: ``reset_reference_after``).
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
      extra_params: ``(cfg, rng) -> dict`` of extra trainable top-level parameter entries (e.g.
        ``{"value_head": ...}``), added to the policy's parameters, replicated on the mesh, trained
        and checkpointed with them (the model and the sampler ignore unknown entries).
      value_fn: ``(params, hidden [N, R, D]) -> values [N, R]``: a critic on the final hidden
        states that predict each response token. Adds ``values`` (with gradient) to the loss
        inputs and ``old_values`` (no gradient, before this batch's updates) to the batch.
      batch_targets: host function ``(batch, iteration) -> dict`` of per-row arrays added to (or
        replacing entries of) the batch after ``old_logp``/``ref_logp``/``prev_logp``/
        ``old_values`` are known (e.g. GAE advantages and returns). ``advantages`` may then be
        None.
      needs_previous_policy: compute ``prev_logp`` = log π_{k−1}, the policy at the start of the
        previous iteration (the initial policy at iteration 1); the loop keeps one extra copy of
        the parameters and checkpoints it.
      reset_reference_after: after this iteration's updates the reference policy (``ref_logp``)
        becomes the current policy (ReMix's policy reincarnation); None keeps the initial policy.
    """

    name: str
    loss: Callable[[dict], tuple]
    advantages: Callable[[np.ndarray, int], np.ndarray] | None
    needs_reference: bool = False
    needs_vocab_mean: bool = False
    needs_groups: bool = True
    updates_per_batch: int = 1
    num_minibatches: int = 1
    extra_params: Callable[[object, object], dict] | None = None
    value_fn: Callable[[dict, object], object] | None = None
    batch_targets: Callable[[dict, int], dict] | None = None
    needs_previous_policy: bool = False
    reset_reference_after: int | None = None


def raw_rewards(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """Advantage = reward (TOPR, REINFORCE without baseline)."""
    del group_size
    return np.asarray(rewards, np.float32)
