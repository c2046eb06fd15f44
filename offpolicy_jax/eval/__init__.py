"""Evaluation: sampling-based metrics (``metrics``: unbiased pass@k, maj@k), the code that
samples, verifies and scores prompt sets (``runner``), shared by the evaluation harness and the RL
loop's periodic held-out evaluation so both report the same numbers, and the harness itself
(``harness``; the command ``python -m offpolicy_jax.eval``, see ``__main__``).

Submodules are imported explicitly (``from offpolicy_jax.eval import metrics``) so that using the
metrics does not import JAX.
"""
