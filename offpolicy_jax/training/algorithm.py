"""What an experiment file tells the trainer: the forward outputs its loss needs, its targets, its
loss, how a batch splits, and where its rollouts come from.

An :class:`Algorithm` is plain data plus pure functions, so an experiment file reads as its paper:

* ``forward`` declares the model outputs the loss needs, per policy. ``"current"`` is the policy
  being trained (computed inside the differentiated loss: ``logp``, ``vocab_mean``, ``values``,
  ``entropy``); ``"old"`` is the policy before this iteration's updates (``old_logp``, ...); any
  other key names a stored policy from ``policies`` (``ref_logp``, ``prev_logp``, ...). Outputs:
  ``logp`` [N, R] log-probs of the response tokens, ``vocab_mean`` [N, R] mean log-prob over the
  vocabulary (ROVER), ``values`` [N, R] the critic's V(s_t) (needs ``value_head``), ``entropy``
  [N, R] the per-token entropy.
* ``prepare(inputs, info) -> dict`` runs on the host once per rollout batch, after the old and
  stored policies' outputs are known, with the *whole* batch (group statistics are never cut by a
  minibatch). It returns per-row arrays (``[N]`` or ``[N, R]``) added to the loss inputs, e.g.
  ``advantages``. ``prepare_reads`` names the old policy's outputs it reads (GAE reads
  ``old_values``): when a batch makes a single update, the trainer otherwise takes the old
  policy's outputs from that update's own forward pass (before the update the old policy *is*
  the current one), under stop-gradient, instead of running a separate forward for them.
* ``loss(inputs, info) -> (loss, metrics)`` runs inside the jitted train step on a minibatch.
* ``minibatch_unit`` says which rows stay together when a batch is split: ``"row"``, ``"group"``
  (every response of a prompt: group statistics inside the loss) or ``"pair"`` (rows 2j and 2j+1:
  preference pairs).
* ``evaluate_after`` names iterations after which the held-out set is evaluated besides the
  run's own schedule (``--eval_every``...): the end of each of SPIN's iterations.
* ``stages``, ``reward_fn`` and ``selection`` configure the rollout pipeline
  (``training.stages``): replay or mixing stages in order, the reward of a response (default: the
  math verifier), and how prompts are chosen (default: ``--prompt_selection``, the shuffled
  prompt stream unless it names MoPPS, ``training.selection``).

The loss inputs (a dict of ``[B, ...]`` arrays; B rows of the minibatch): ``mask`` [B, R]
(1 on generated tokens up to and including EOS), the rollout rows' ``behaviour_logp``,
``rewards``, ``group_index``, ``policy_version`` (``training.batch``), the forward outputs above,
``prepare``'s arrays, and the model's inputs: ``tokens``, ``attention_mask``, ``positions``
([B, P + R], see ``rollout.pack_sequences``), or with ``--pack_sequences`` their packed form
(``rollout.pack_segments``), which a loss should not read. ``prepare`` always sees the padded
rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import numpy as np

OUTPUTS = ("logp", "vocab_mean", "values", "entropy")
MINIBATCH_UNITS = ("row", "group", "pair")


@flax.struct.dataclass
class StepInfo:
    """What a loss or a ``prepare`` function may know besides the batch.

    Attributes:
      iteration: the RL iteration, 1-based (a traced int32 scalar inside the jitted loss, so a
        schedule such as ReMix's λ(t) compiles once).
      rng: a PRNG key: per optimizer update inside the loss, per iteration in ``prepare``.
      group_size: responses per prompt (static).
      seed: the run's ``--seed`` (static).
      max_new_tokens: the response budget ``--max_new_tokens`` (static). A batch's ``[N, R]``
        arrays may be narrower (the trainer cuts the padding after the longest response), so a
        constant normaliser such as Dr.GRPO's L_max reads it here, not from a shape.
    """

    iteration: Any
    rng: Any
    group_size: int = flax.struct.field(pytree_node=False)
    seed: int = flax.struct.field(pytree_node=False, default=0)
    max_new_tokens: int | None = flax.struct.field(pytree_node=False, default=None)

    def host_rng(self, *salt: int) -> np.random.Generator:
        """A numpy generator determined by (seed, iteration, salt): the same after a resume."""
        return np.random.default_rng([self.seed, int(self.iteration), *salt])


@dataclasses.dataclass(frozen=True)
class ValueHead:
    """A critic on the policy's final hidden states (``offpolicy_jax.critic``).

    Attributes:
      init: ``(cfg, rng) -> dict`` of extra top-level parameter entries (e.g. ``{"value_head":
        ...}``), added to the policy's parameters, replicated, trained and checkpointed with them
        (the model and the sampler ignore unknown entries).
      apply: ``(params, hidden [N, R, D]) -> values [N, R]``.
    """

    init: Callable[[Any, Any], dict]
    apply: Callable[[dict, Any], Any]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One RL method as the trainer runs it (see the module docstring).

    Attributes:
      name: shown in logs and the summary.
      loss: ``(inputs, info) -> (scalar loss, metrics)``, jittable.
      forward: ``{policy: outputs}``: ``"current"``, ``"old"`` or a stored policy's name, each
        with a tuple from ``OUTPUTS``. ``logp`` under ``"current"`` is always computed.
      prepare: host function ``(inputs, info) -> dict`` of per-row arrays for the loss, or None.
      prepare_reads: the old policy's forward outputs ``prepare`` reads, as loss-input names
        (``("old_values",)``); they are always computed before the update.
      policies: stored policies (``training.policies``) the forward outputs refer to.
      value_head: the critic, needed for a ``values`` output.
      minibatch_unit: "row", "group" or "pair" (see the module docstring).
      needs_groups: the method compares responses within a group (``--group_size >= 2``).
      stages: replay / mixing stages of the rollout pipeline, applied in order.
      reward_fn: ``(records, responses, pool) -> rewards [n]`` (see ``stages.verifier_reward``);
        None: the math verifier.
      selection: the prompt-selection stage; None: the one ``--prompt_selection`` names.
      evaluate_after: iterations after which to evaluate besides ``--eval_every`` and the end.
      evaluation: an extra held-out evaluation run with every evaluation (e.g.
        ``verification.HeldOutVerification``): called as ``(session, params, result)`` with the
        held-out solving result (``eval.runner.EvalResult``), it returns metrics logged as
        ``eval/<key>``; its optional ``setup(session)`` runs once with the initial policy, and
        its ``summary_keys`` are reported before and after in the summary.
    """

    name: str
    loss: Callable[[dict, StepInfo], tuple]
    forward: dict = dataclasses.field(default_factory=dict)
    prepare: Callable[[dict, StepInfo], dict] | None = None
    prepare_reads: tuple = ()
    policies: tuple = ()
    value_head: ValueHead | None = None
    minibatch_unit: str = "row"
    needs_groups: bool = True
    stages: tuple = ()
    reward_fn: Callable | None = None
    selection: Any = None
    evaluate_after: tuple = ()
    evaluation: Any = None

    def __post_init__(self):
        known = {"current", "old", *(p.name for p in self.policies)}
        for policy, outputs in self.forward.items():
            if policy not in known:
                raise ValueError(f"{self.name}: forward outputs for {policy!r}, which is neither "
                                 f"'current', 'old' nor a declared stored policy "
                                 f"{sorted(known - {'current', 'old'})}")
            unknown = sorted(set(outputs) - set(OUTPUTS))
            if unknown:
                raise ValueError(f"{self.name}: unknown forward outputs {unknown} for {policy!r} "
                                 f"(choose from {OUTPUTS})")
            if "values" in outputs and self.value_head is None:
                raise ValueError(f"{self.name}: a 'values' output needs a value_head")
        declared = {input_name(policy, output) for policy, outputs in self.forward.items()
                    if policy != "current" for output in outputs}
        undeclared = sorted(set(self.prepare_reads) - declared)
        if undeclared:
            raise ValueError(f"{self.name}: prepare_reads {undeclared} are not forward outputs of "
                             f"the old or a stored policy (declared: {sorted(declared)})")
        if self.minibatch_unit not in MINIBATCH_UNITS:
            raise ValueError(f"{self.name}: minibatch_unit must be one of {MINIBATCH_UNITS}, "
                             f"got {self.minibatch_unit!r}")

    def outputs(self, policy: str) -> tuple[str, ...]:
        """The outputs declared for ``policy`` (``logp`` first when declared)."""
        declared = self.forward.get(policy, ())
        return tuple(o for o in OUTPUTS if o in declared)


def input_name(policy: str, output: str) -> str:
    """The loss-input key of a forward output: ``logp`` for the current policy, else
    ``<policy>_<output>`` (``old_logp``, ``ref_logp``, ``old_values``)."""
    return output if policy == "current" else f"{policy}_{output}"


def minibatches(num_rows: int, num_minibatches: int, unit: str, group_size: int,
                rng: np.random.Generator) -> list[np.ndarray]:
    """One pass's minibatches (row indices): a random permutation of the units ("row": one row;
    "group": ``group_size`` consecutive rows; "pair": 2), split into ``num_minibatches`` parts;
    the rows of a unit stay together and in order."""
    size = {"row": 1, "group": group_size, "pair": 2}[unit]
    if num_rows % size:
        raise ValueError(f"{num_rows} rows do not split into whole {unit}s of {size} rows")
    order = rng.permutation(num_rows // size)
    return [(part[:, None] * size + np.arange(size)[None, :]).reshape(-1)
            for part in np.array_split(order, num_minibatches)]
