"""The RL engine: train state and optimizers, the sharded train step, checkpoints, logging, the
rollout pipeline, stored policies, the algorithm protocol, the trainer and the loop.

Read in this order: ``optim`` (optimizers and schedules), ``state`` (the train state), ``step`` (one
jitted update with gradient accumulation and the non-finite guard), ``checkpoint`` (orbax save and
exact resume), ``logger`` (metrics.jsonl, TensorBoard), ``config`` and ``flags`` (the shared run
settings), ``batch`` (the rollout rows), ``stages`` (selection -> generation and reward -> replay),
``policies`` (stored copies of the policy), ``algorithm`` (what a method declares), ``trainer``
(setup, one iteration, evaluation, checkpoint, summary) and ``loop`` (``run``, top to bottom).
"""

from offpolicy_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule
from offpolicy_jax.training.state import TrainState, create_train_state
from offpolicy_jax.training.step import make_train_step, NonFiniteError, NonFiniteGuard

__all__ = [
    "OptimizerConfig",
    "make_optimizer",
    "make_schedule",
    "TrainState",
    "create_train_state",
    "make_train_step",
    "NonFiniteError",
    "NonFiniteGuard",
]
