"""Prompt selection stages beyond the plain stream: MoPPS (Thompson-sampled prompt difficulty).

Qu et al., "Can Prompt Difficulty be Online Predicted for Accelerating RL Finetuning of Reasoning
Models?", https://arxiv.org/abs/2507.04632 (code: github.com/thu-rllab/MoPPS,
``recipe/ours/mopps.py``). Each training prompt τ has a Beta(α_τ, β_τ) posterior over its success
rate γ_τ under the current policy, updated from the rewards its own rollouts already got (no extra
rollouts). Each iteration draws a candidate pool of ``candidates × batch_size`` prompts from the
shuffled stream, Thompson-samples γ̂_τ ~ Beta(α_τ, β_τ) for each and keeps the ``batch_size``
prompts whose γ̂ is closest to the target γ* (0.5: the prompts most likely to give a group with
both right and wrong answers, i.e. a non-zero group-relative gradient). The others are skipped
for this pass of the stream, as in the official code.

Plug-in: ``--prompt_selection=mopps`` for every experiment file (``make_selection``), or
``Algorithm(selection=MoPPS(...))``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special

from offpolicy_jax.training.stages import PromptStream

SELECTIONS = ("stream", "mopps")


def update_posterior(alpha, beta, success_rate, num_samples: int, *, decay: float = 1.0,
                     prior: tuple[float, float] = (1.0, 1.0)):
    """MoPPS's posterior update from one group of rollouts (the paper's Eq.; code ``train``):

        α ← λ·α + (1 − λ)·α₀ + s·k,    β ← λ·β + (1 − λ)·β₀ + (1 − s)·k

    Args:
      alpha, beta: the prompts' current parameters (arrays or numbers).
      success_rate: s, the share of the group's k responses that succeeded.
      num_samples: k, responses per prompt (the official code replaces k by 8 when k = 1 through
        an operator-precedence slip; here k is always the group size).
      decay: λ ∈ [0, 1] (1: no forgetting, the paper's math setting; 0.5 countdown / geometry).
      prior: (α₀, β₀) = Beta(1, 1).

    Returns: ``(alpha, beta)`` after the update.
    """
    prior_alpha, prior_beta = prior
    new_alpha = decay * alpha + (1.0 - decay) * prior_alpha + success_rate * num_samples
    new_beta = decay * beta + (1.0 - decay) * prior_beta + (1.0 - success_rate) * num_samples
    return new_alpha, new_beta


def beta_entropy(alpha, beta):
    """Differential entropy of Beta(α, β) (nats): low for a confident posterior."""
    return (scipy.special.betaln(alpha, beta) - (alpha - 1) * scipy.special.digamma(alpha)
            - (beta - 1) * scipy.special.digamma(beta)
            + (alpha + beta - 2) * scipy.special.digamma(alpha + beta))


class MoPPS(PromptStream):
    """Thompson-sampled prompt selection around a target success rate (see the module docstring).

    Args:
      candidates: the pool is ``candidates × batch_size`` prompts (the paper's ``ts_ratio``: 16 for
        math, 8 for countdown / geometry), capped at the training pool's size.
      target: γ*, the success rate to select for (0.5).
      decay: λ of :func:`update_posterior` (math: 1.0).
      success_at: a response counts as a success when its reward is at least this (the official
        code: accuracy ≥ 1).
      target_range: (low, high) for the paper's threshold variant instead of top-k around the
        target (official 0.3, 0.7); None: top-k.

    Metrics (of the selected prompts, logged as ``mopps/<key>``): ``predicted`` (mean Thompson
    sample γ̂), ``realised`` (mean success rate s of their rollouts), ``correlation`` (Pearson of
    γ̂ and s over the prompts; the paper's prediction-quality plot; 0 when either is constant),
    ``posterior_entropy`` (mean, before the update), ``seen_fraction`` (prompts of the pool with
    at least one update).
    """

    name = "mopps"

    def __init__(self, candidates: int = 16, target: float = 0.5, decay: float = 1.0,
                 success_at: float = 1.0, target_range: tuple[float, float] | None = None):
        super().__init__()
        if candidates < 1 or not 0.0 <= target <= 1.0 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"MoPPS needs candidates >= 1, target and decay in [0, 1]; got "
                             f"{candidates}, {target}, {decay}")
        if target_range is not None and not 0.0 <= target_range[0] <= target_range[1] <= 1.0:
            raise ValueError(f"MoPPS target range must satisfy 0 <= low <= high <= 1, got "
                             f"{target_range}")
        self.candidates, self.target, self.decay = candidates, target, decay
        self.target_range = target_range
        self.success_at = success_at
        self.seed = 0
        self.index: dict[str, int] = {}
        self.alpha = self.beta = None
        self._iteration, self._draw = 0, 0
        self._sampled = np.zeros(0)
        self._metrics: dict = {}

    def bind(self, records: list[dict], config) -> None:
        """The candidate stream (batches of ``candidates × batch_size`` prompts) and a Beta(1, 1)
        posterior per training prompt, indexed by the record's id."""
        from offpolicy_jax.data import pipeline
        ids = [str(r["id"]) for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError("MoPPS keeps one posterior per prompt id; the training records' "
                             "ids are not unique")
        self.index = {record_id: position for position, record_id in enumerate(ids)}
        self.alpha = np.ones(len(records))
        self.beta = np.ones(len(records))
        self.seed = config.seed
        pool = min(self.candidates * config.batch_size, len(records))
        self.iterator = pipeline.PromptIterator(records, pool, seed=config.seed, shard_index=0,
                                                shard_count=1)

    def select(self, num_prompts: int, iteration: int) -> list[dict]:
        """The ``num_prompts`` candidates whose Thompson sample is closest to the target."""
        if num_prompts == 0:
            return []
        pool = next(self.iterator)
        if num_prompts > len(pool):
            raise ValueError(f"MoPPS: asked for {num_prompts} prompts from a pool of {len(pool)}")
        positions = np.array([self.index[str(r["id"])] for r in pool])
        # Several draws in one iteration (dynamic sampling's refills) get independent samples.
        self._draw = self._draw + 1 if iteration == self._iteration else 0
        self._iteration = iteration
        salt = [19] if self._draw == 0 else [19, self._draw]
        rng = np.random.default_rng([self.seed, iteration, *salt])
        sampled = rng.beta(self.alpha[positions], self.beta[positions])
        chosen = self._choose(sampled, num_prompts, rng)
        self._sampled = sampled[chosen]
        return [pool[i] for i in chosen]

    def _choose(self, sampled: np.ndarray, num_prompts: int, rng) -> np.ndarray:
        """Indices of the chosen candidates. Top-k (default): the ``num_prompts`` samples closest
        to γ*. Threshold range [low, high] (the paper's variant; official 0.3, 0.7): a random
        ``num_prompts`` of the samples inside it when there are enough, else the closest to it."""
        if self.target_range is None:
            return np.argsort((sampled - self.target) ** 2, kind="stable")[:num_prompts]
        low, high = self.target_range
        inside = np.nonzero((sampled >= low) & (sampled <= high))[0]
        if inside.size >= num_prompts:
            return rng.permutation(inside)[:num_prompts]
        outside = np.maximum(low - sampled, 0.0) + np.maximum(sampled - high, 0.0)
        return np.argsort(outside, kind="stable")[:num_prompts]

    def observe(self, records: list[dict], rollouts, iteration: int) -> None:
        """Updates the selected prompts' posteriors from their groups' rewards."""
        del iteration
        if rollouts is None or not records:
            return
        group_size = rollouts.num_rows // len(records)
        success = (rollouts.rewards >= self.success_at).reshape(-1, group_size).mean(axis=1)
        # Rows are prompt-major: group g answers records[group_index[g * G]].
        positions = np.array([self.index[str(records[int(i)]["id"])]
                              for i in rollouts.group_index[::group_size]])
        entropy = beta_entropy(self.alpha[positions], self.beta[positions])
        self.alpha[positions], self.beta[positions] = update_posterior(
            self.alpha[positions], self.beta[positions], success, group_size, decay=self.decay)
        self._metrics = {
            "predicted": float(np.mean(self._sampled)), "realised": float(np.mean(success)),
            "correlation": _pearson(self._sampled, success),
            "posterior_entropy": float(np.mean(entropy)),
            "seen_fraction": float(np.mean((self.alpha + self.beta) > 2.0)),
        }

    def metrics(self) -> dict:
        return dict(self._metrics)

    def state_dict(self) -> tuple[dict, dict]:
        return {"iterator": self.iterator.get_state()}, {"alpha": self.alpha, "beta": self.beta}

    def load_state_dict(self, meta: dict, arrays: dict) -> None:
        if np.shape(arrays["alpha"]) != self.alpha.shape:
            raise ValueError(f"MoPPS checkpoint holds {np.shape(arrays['alpha'])[0]} posteriors, "
                             f"the training pool has {self.alpha.shape[0]} prompts")
        self.iterator.set_state(meta["iterator"])
        self.alpha = np.asarray(arrays["alpha"], np.float64)
        self.beta = np.asarray(arrays["beta"], np.float64)


def _pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 2 or np.std(x) == 0 or np.std(y) == 0:
        return 0.0
    value = float(np.corrcoef(x, y)[0, 1])
    return value if math.isfinite(value) else 0.0


def make_selection(config) -> PromptStream:
    """The selection stage ``--prompt_selection`` names, with its flags."""
    if config.prompt_selection == "stream":
        return PromptStream()
    if config.prompt_selection == "mopps":
        target_range = None if config.mopps_range is None else tuple(
            float(x) for x in config.mopps_range.split(","))
        return MoPPS(candidates=config.mopps_candidates, target=config.mopps_target,
                     decay=config.mopps_decay, target_range=target_range)
    raise ValueError(f"--prompt_selection must be one of {SELECTIONS}, got "
                     f"{config.prompt_selection!r}")
