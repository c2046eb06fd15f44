"""The RL loop: rollouts -> targets -> updates -> metrics -> evaluation -> checkpoint.

``run(config, algorithm)`` is the whole engine and reads top to bottom; the parts live in
``training.trainer`` (setup, one iteration, evaluation, checkpoint, summary), the rollout pipeline
in ``training.stages`` and the algorithm protocol in ``training.algorithm``. A run killed at any
point and restarted with the same ``--workdir`` continues from its last checkpoint and ends with
the same parameters and the same logged metrics as a run that was never interrupted.
"""

import os

from offpolicy_jax import distributed
from offpolicy_jax.training import trainer
from offpolicy_jax.training.algorithm import Algorithm
from offpolicy_jax.training.config import RunConfig

__all__ = ["RunConfig", "run"]


def run(config: RunConfig, algorithm: Algorithm) -> dict:
    """Runs (or resumes) an RL experiment and returns the final summary.

    Args:
      config: the shared run settings.
      algorithm: forward outputs, targets, loss, minibatching and rollout stages (see
        ``training.algorithm``).
    """
    # Join the other processes of a multi-process launch before anything touches a device.
    distributed.maybe_initialize()
    config.validate(algorithm)
    session = trainer.Session(config, algorithm.name, selection=algorithm.selection,
                              reward_fn=algorithm.reward_fn, evaluation=algorithm.evaluation)
    learner = trainer.Learner(session, algorithm)
    meta = learner.restore_or_start()

    while not session.finished(meta):
        rollouts_before = meta["rollouts"]
        record = learner.iteration(meta["iteration"] + 1)
        meta.update(iteration=meta["iteration"] + 1, rollouts=record["rollouts"])
        if session.evaluation_due(meta, rollouts_before) or \
                meta["iteration"] in algorithm.evaluate_after:
            record.update(session.evaluate(learner.merged_policy()))
        session.log(record, meta)
        if session.checkpoint_due(meta):
            learner.save(meta)

    if config.export_final:
        learner.export(os.path.join(config.workdir, "export"))
    return session.finish(meta, skipped_steps=learner.skipped_steps)
