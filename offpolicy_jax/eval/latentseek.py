r"""LatentSeek: test-time, per-problem policy gradient on the latent states of an answer.

Li et al., "Seek in the Dark: Reasoning via Test-Time Instance-Level Policy Gradient in Latent
Space", https://arxiv.org/abs/2505.13308 (official code: bigai-nlco/LatentSeek). The model's
weights stay fixed. For each problem the final-layer hidden states z_t that produced the first K
tokens of the model's greedy answer (after the final norm, the input of the output projection)
become free parameters, and a few policy-gradient steps on them try to raise a self-generated
reward R(x) of the decoded answer x:

    objective   J(z) = E_{x ~ π(x | z)} R(x),    π(x_t | z_t) = softmax(W_out z_t)        (paper)
    gradient    ∇_{z_t} J = E[R(x) ∇_{z_t} log π(x_t | z_t)]     (latents read as independent)

What this module implements is what the official code does, not the expectation of the paper's
text (ALGORITHMS.md §7 item 11 records why we follow the code): the "sample" is the single greedy
token of every latent, so one step is

    x̂_t  = argmax_v (W_out z_t)_v,   t < K                                   (greedy read-out)
    L(z)  = −R(x) · Σ_{t<K} log softmax(W_out z_t)[x̂_t]                       (surrogate)
    z    ← Adam(z, ∇_z L)   (lr 0.03, β = (0.9, 0.999), ε = 1e-8, no gradient clipping)

then the answer is decoded again: the K prefix tokens are the new argmax of W_out z, the rest is
the frozen model's greedy continuation of prompt + those *tokens* (not of the latent vectors),
and the reward is recomputed. The loop stops as soon as a reward exceeds the threshold τ = −0.2
(strictly; the check comes before each update, so an answer that already passes is kept as is),
or after ``steps`` = 10 updates, returning the last decoded answer either way.

* Which positions: ``K = min(⌊ρ·L⌋, 300)`` from the start of the response (the code's
  "fractional sequence optimisation", ρ = ``--k`` = 0.1 by default, 0.2 in its example script),
  with L the length of the initial greedy answer, EOS included, fixed for the whole run. K = 0
  (answers shorter than 1/ρ tokens) means nothing is optimised and the initial answer stays.
* Rewards are ≤ 0 (the code's self-reward lies in [−1, 0]), so every step *lowers* the
  probability of the current greedy prefix in proportion to |R|; with R = 0 the step is zero.
  Gradients only pass through the output projection: W_out is a constant.
* Budget: the code lets the continuation run ``max_new_tokens`` + 1 tokens past the prefix; here
  the whole response (prefix + continuation) stays within the harness's ``max_new_tokens``, the
  budget of the initial answer. A prefix token that is an end-of-sequence id ends the answer
  there (the code would keep generating after a decoded EOS text).

Batched over problems: the latents of B problems are one ``[B, K_max, D]`` float32 array with a
``[B, K_max]`` mask, and one jitted step updates every problem still running; each problem's
gradient involves only its own rows (the loss is a sum of per-problem terms), Adam is
elementwise, and a problem that stopped keeps its latents (they are masked, not re-updated).
Problems only ever leave the running set, so every running problem has taken the same number of
Adam steps and one bias-correction count serves them all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from offpolicy_jax import models, sampling

# Adam's defaults in torch.optim.Adam, which the official code uses.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
# Smallest bucket of the optimised-positions axis and of the hidden-state forward's length (the
# jitted programs compile once per power-of-two bucket, not once per problem).
MIN_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class LatentSeekConfig:
    """The hyperparameters of one LatentSeek run (defaults: the official code's ``main.py``).

    Attributes:
      steps: T, the most latent updates per problem (``--max_num_steps`` = 10).
      learning_rate: η of Adam on the latents (``--lr`` = 0.03; the example script uses 0.05).
      fraction: ρ, the share of the initial answer's positions that are optimised (``--k`` = 0.1;
        the example script uses 0.2).
      max_positions: the cap on K (300 in the code).
      reward_threshold: τ; a problem stops once its reward is strictly above it
        (``--reward_threshold`` = −0.2).
    """

    steps: int = 10
    learning_rate: float = 0.03
    fraction: float = 0.1
    max_positions: int = 300
    reward_threshold: float = -0.2

    def validate(self, flag_prefix: str = "--latentseek_") -> None:
        """Raises ``ValueError`` naming the flag (``flag_prefix`` + field) of a bad value."""
        checks = [
            (self.steps >= 0, "steps", f"must be >= 0, got {self.steps}"),
            (self.learning_rate > 0, "lr", f"must be > 0, got {self.learning_rate}"),
            (0 < self.fraction <= 1, "fraction", f"must be in (0, 1], got {self.fraction}"),
            (self.max_positions >= 1, "max_positions", f"must be >= 1, got {self.max_positions}"),
            (np.isfinite(self.reward_threshold), "threshold",
             f"must be a finite number, got {self.reward_threshold}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{flag_prefix}{name} {message}")


def optimised_positions(lengths, fraction: float, max_positions: int) -> np.ndarray:
    """K per problem: ``min(⌊ρ·L⌋, max_positions)`` for initial answers of L tokens (EOS
    included), as int32 ``[P]``."""
    lengths = np.asarray(lengths, np.int64)
    return np.minimum(np.floor(fraction * lengths).astype(np.int64), max_positions).astype(
        np.int32)


def greedy_latent_log_probs(cfg, params, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The greedy read-out of latents: ``x̂ = argmax W_out z`` and ``log π(x̂ | z)``.

    Args:
      cfg, params: the model (only the output projection is used: ``models.hidden_to_logits``,
        the tied embedding when ``tie_word_embeddings``).
      latents: ``[B, K, D]`` final-normed hidden states.

    Returns:
      ``(log_probs [B, K] float32, tokens [B, K] int32)``.
    """
    logits = models.hidden_to_logits(cfg, params, latents)            # [B, K, V] float32
    tokens = jnp.argmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    return chosen, tokens.astype(jnp.int32)


def latent_policy_loss(log_probs: jax.Array, mask: jax.Array, rewards: jax.Array) -> jax.Array:
    """The surrogate whose gradient is the code's LatentSeek step, summed over problems:
    ``L = −Σ_b R_b Σ_t m_bt log π(x̂_bt | z_bt)``.

    A sum (not a mean) over problems, so each problem's gradient is exactly the one the code
    computes for it alone; a mean would scale every problem's step by 1/B (Adam would undo most
    of that, but not its ε).

    Args:
      log_probs: ``[B, K]`` log π(x̂_t | z_t) of the greedy read-out.
      mask: ``[B, K]`` 1 on optimised positions (t < K_b), 0 on padding.
      rewards: ``[B]`` the reward of each problem's current answer (a constant here).
    """
    if log_probs.shape != mask.shape or rewards.shape != log_probs.shape[:1]:
        raise ValueError(f"latent_policy_loss: log_probs {log_probs.shape}, mask {mask.shape} "
                         f"and rewards {rewards.shape} must be [B, K], [B, K] and [B]")
    return -jnp.sum(rewards[:, None] * mask * log_probs)


def adam(learning_rate: float) -> optax.GradientTransformation:
    """torch.optim.Adam's update (bias-corrected, ε outside the square root) at
    ``learning_rate``."""
    return optax.adam(learning_rate, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)


@functools.partial(jax.jit, static_argnames=("cfg", "learning_rate"))
def latent_step(cfg, params, latents, opt_state, mask, rewards, running, *,
                learning_rate: float):
    """One LatentSeek update of every running problem's latents; params are read, never written.

    Args:
      cfg, params: the frozen model.
      latents: ``[B, K, D]`` float32.
      opt_state: ``adam(learning_rate).init(latents)``'s state after the previous steps.
      mask: ``[B, K]`` optimised positions.
      rewards: ``[B]`` the reward of each problem's current answer.
      running: ``[B]`` bool; stopped problems keep their latents.
      learning_rate: η.

    Returns:
      ``(latents, opt_state, tokens [B, K], loss)``: the updated latents, Adam's state, the greedy
      read-out of the updated latents (the new answer prefix) and the surrogate loss before the
      step.
    """
    def loss_fn(z):
        log_probs, _ = greedy_latent_log_probs(cfg, params, z)
        return latent_policy_loss(log_probs, mask, rewards)

    loss, grad = jax.value_and_grad(loss_fn)(latents)
    updates, opt_state = adam(learning_rate).update(grad, opt_state, latents)
    moved = optax.apply_updates(latents, updates)
    latents = jnp.where(running[:, None, None], moved, latents)
    _, tokens = greedy_latent_log_probs(cfg, params, latents)
    return latents, opt_state, tokens, loss


@functools.partial(jax.jit, static_argnames=("cfg", "num_positions"))
def _gather_hidden(cfg, params, tokens, attention_mask, starts, *, num_positions: int):
    hidden = models.apply_hidden(cfg, params, tokens, attention_mask)          # [B, T, D]
    index = starts[:, None] + jnp.arange(num_positions)[None, :]
    index = jnp.minimum(index, tokens.shape[1] - 1)
    return jnp.take_along_axis(hidden, index[..., None], axis=1).astype(jnp.float32)


def _bucket(value: int) -> int:
    return max(MIN_BUCKET, 1 << max(0, int(value) - 1).bit_length())


def initial_latents(cfg, params, prompts: list[list[int]], responses: list[list[int]],
                    positions: np.ndarray) -> np.ndarray:
    """The final-layer hidden states that produced each response's first K tokens.

    One teacher-forced forward of ``prompt + response[:K]`` per problem (left-padded into one
    batch): the state at the prompt's last position produced response token 0, the one at
    response token t−1 produced token t. These are the states the greedy decode computed (up to
    float rounding between the cached and the full forward).

    Returns:
      ``[P, K_bucket, D]`` float32, rows beyond each problem's K hold unused states.
    """
    num = len(prompts)
    k_bucket = _bucket(int(np.max(positions, initial=1)))
    rows = [list(p) + list(r[:k]) for p, r, k in zip(prompts, responses, positions)]
    length = _bucket(max(len(r) for r in rows))
    batch = 1 << max(0, num - 1).bit_length()
    tokens = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), bool)
    starts = np.zeros(batch, np.int32)
    for b, (row, prompt) in enumerate(zip(rows, prompts)):
        pad = length - len(row)
        tokens[b, pad:] = row
        mask[b, pad:] = True
        starts[b] = pad + len(prompt) - 1
    mask[num:, -1] = True        # padding rows attend to one token (no empty softmax)
    hidden = _gather_hidden(cfg, params, jnp.asarray(tokens), jnp.asarray(mask),
                            jnp.asarray(starts), num_positions=k_bucket)
    return np.asarray(hidden)[:num]


@dataclasses.dataclass
class LatentSeekResult:
    """What :func:`optimise` returns, per problem (``P`` problems).

    Attributes:
      responses: final answer token ids (EOS included when the answer ended with one).
      rewards: the reward history, the initial answer's first (``1 + iterations`` values).
      iterations: ``[P]`` latent updates taken (= new answers decoded and rewarded).
      positions: ``[P]`` K, the optimised positions.
      continuation_tokens: ``[P]`` tokens the frozen model generated after the decoded prefixes,
        summed over iterations (each one a forward pass of the model).
      stopped: ``[P]`` bool, the last reward is above the threshold.
      read_latents: the teacher-forced forward that reads the initial latents ran (for every
        problem of the batch at once; skipped when no problem needed an update).
    """

    responses: list[list[int]]
    rewards: list[list[float]]
    iterations: np.ndarray
    positions: np.ndarray
    continuation_tokens: np.ndarray
    stopped: np.ndarray
    read_latents: bool = False


RewardFn = Callable[[np.ndarray, list[list[int]], int], np.ndarray]


def _cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1], True
    return tokens, False


def optimise(cfg, params, prompts: list[list[int]], responses: list[list[int]],
             initial_rewards, reward_fn: RewardFn, *, config: LatentSeekConfig = LatentSeekConfig(),
             max_new_tokens: int, eos_token_ids, pad_token_id: int = 0,
             mesh=None) -> LatentSeekResult:
    """Runs LatentSeek on a batch of problems (see the module docstring for the update).

    Args:
      cfg, params: the frozen model (never modified).
      prompts: ``P`` prompt token-id lists.
      responses: ``P`` initial answers (the greedy CoT), token ids with the EOS token if any.
      initial_rewards: ``[P]`` the reward of each initial answer.
      reward_fn: ``(problem_indices [M], answers: M token-id lists, step) -> [M] rewards`` of
        new answers (self-verification or the oracle); ``step`` counts from 1.
      config: steps, learning rate, ρ, the cap on K and the threshold τ.
      max_new_tokens: the response budget (prefix + continuation).
      eos_token_ids: ids that end an answer.
      pad_token_id, mesh: for ``sampling.generate``.

    Returns:
      A :class:`LatentSeekResult`.
    """
    num = len(prompts)
    if len(responses) != num or np.shape(initial_rewards) != (num,):
        raise ValueError(f"optimise: {num} prompts, {len(responses)} responses and rewards of "
                         f"shape {np.shape(initial_rewards)} must match")
    config.validate(flag_prefix="LatentSeekConfig.")
    eos = set(int(e) for e in eos_token_ids)
    lengths = np.array([len(r) for r in responses])
    positions = optimised_positions(lengths, config.fraction, config.max_positions)
    rewards = np.asarray(initial_rewards, np.float32).copy()
    history = [[float(r)] for r in rewards]
    current = [list(r) for r in responses]
    iterations = np.zeros(num, np.int32)
    continuation = np.zeros(num, np.int64)
    running = (positions > 0) & (rewards <= config.reward_threshold)
    if not running.any() or config.steps == 0:
        return LatentSeekResult(current, history, iterations, positions, continuation,
                                rewards > config.reward_threshold)

    latents = initial_latents(cfg, params, prompts, responses, positions)
    read_latents = True
    k_bucket = latents.shape[1]
    mask = (np.arange(k_bucket)[None, :] < positions[:, None]).astype(np.float32)
    optimizer_state = adam(config.learning_rate).init(jnp.asarray(latents))
    latents = jnp.asarray(latents)
    for step in range(1, config.steps + 1):
        if not running.any():
            break
        latents, optimizer_state, prefix_tokens, _ = latent_step(
            cfg, params, latents, optimizer_state, jnp.asarray(mask), jnp.asarray(rewards),
            jnp.asarray(running), learning_rate=config.learning_rate)
        prefix_tokens = np.asarray(prefix_tokens)
        rows = np.flatnonzero(running)
        answers: dict[int, list[int]] = {}
        to_continue = []
        for b in rows:
            prefix, ended = _cut_at_eos(prefix_tokens[b, :positions[b]].tolist(), eos)
            answers[b] = prefix
            if not ended and positions[b] < max_new_tokens:
                to_continue.append(b)
        if to_continue:
            budget = max_new_tokens - int(min(positions[b] for b in to_continue))
            out = sampling.generate(cfg, params, [prompts[b] + answers[b] for b in to_continue],
                                    max_new_tokens=budget, temperature=0.0,
                                    eos_token_ids=tuple(eos), seed=0, mesh=mesh,
                                    pad_token_id=pad_token_id)
            for i, b in enumerate(to_continue):
                own_budget = max_new_tokens - int(positions[b])
                tail = out.tokens[i, :min(int(out.lengths[i]), own_budget)].tolist()
                answers[b] = answers[b] + tail
                continuation[b] += len(tail)
        new = [answers[b] for b in rows]
        new_rewards = np.asarray(reward_fn(rows, new, step), np.float32)
        if new_rewards.shape != rows.shape:
            raise ValueError(f"reward_fn returned shape {new_rewards.shape} for {len(rows)} "
                             f"answers")
        for b, answer, reward in zip(rows, new, new_rewards):
            current[b] = answer
            rewards[b] = reward
            history[b].append(float(reward))
            iterations[b] += 1
        running &= rewards <= config.reward_threshold
    return LatentSeekResult(current, history, iterations, positions, continuation,
                            rewards > config.reward_threshold, read_latents)
