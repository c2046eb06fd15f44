r"""Process values of step prefixes from outcome checks alone (ReST-MCTS*-style trace selection).

ReST-MCTS* (Zhang et al., NeurIPS 2024, https://arxiv.org/abs/2406.03816; code THUDM/ReST-MCTS)
infers a value for every partial solution from final-answer correctness only: roughly, how likely
the step prefix is to lead on to a correct answer. It uses the values twice: to pick the traces a
policy is fine-tuned on, and as regression targets for a value model (a process reward model).

This module estimates the value the direct way, by Monte Carlo: for a step prefix ``y_{≤k}`` of a
sampled response,

    v(x, y_{≤k}) = (1/M) Σ_{j=1..M} 1[continuation j of x ∘ y_{≤k} reaches the gold answer]

with the continuations sampled from the policy that sampled the response (M = ``rollouts``). The
prefix tokens are the response's own tokens, so a continuation extends exactly that prefix.

Pieces (the experiment wiring is ``experiments/expert_iteration.py --trace_selection``):

* ``step_ends`` / ``step_prefixes``: where a response's working steps end (the embedded task's
  ``"a op b=c, a op b=c. \boxed{n}"``: steps split at ``", "``, the working ends at the last
  ``". "``).
* ``monte_carlo_values``: the estimate above for a batch of prefixes, through any continuation
  function (the policy's sampler in a run, a toy with known success probabilities in the tests);
  ``sampled_continuations`` is the policy's.
* ``trace_scores`` and ``select_by_value``: a trace's score is the **minimum** of its prefix values
  (a trace is as good as its weakest step: one wrong intermediate result drives the value of every
  prefix that contains it towards 0, even when a second slip later cancels it); the selection keeps,
  per problem, the outcome-correct traces whose score is at least a threshold (the repo's policy
  data filter, ``filter_policy_examples_by_value.py``, keeps value ≥ 0.2), best first, at most
  ``cap``. ``select_by_outcome`` is the outcome-only baseline (ReST-EM's keep rule).
* ``tree_value_targets``: the ReST-MCTS* code's value targets on the tree of sampled traces
  (``MCTS/base.py``; ALGORITHMS.md §9.6), kept for comparison with the Monte-Carlo estimate.
* A value model (``init_value_model``, ``train_value_model``, ``predict_values``): the policy's
  trunk with a scalar head on the last prefix token's hidden state, trained by MSE towards the
  Monte-Carlo values, predictions clipped to [0, 1] (the repo's value model is an LM backbone plus a
  linear head, MSE, clipped; it reads the last position's logits, this one the hidden state, as
  ``offpolicy_jax.critic`` does).
* ``ValueModelStore``: the value model's parameters saved per iteration, so a resumed run continues
  with the same head.
* ``ProcessValueSelector``: all of it for one E-step pool, as ``expert_iteration.py`` runs it, with
  the paired metrics (both keep rules on the same pool; how many kept traces have fully correct
  working, ``data.arith.check_working``; the value model's error on prefixes it has not seen).

Measured on the embedded task (README "Process values"): the value rule raises the share of kept
traces with fully correct working (0.819 -> 0.890 on the base policy's samples, 0.873 -> 0.925 on
the next iterate's; four seeds). A Monte-Carlo value says how often the policy reaches the answer
from the prefix, not whether its steps are right, and this policy often recovers after a wrong
step, so about half of the flawed traces pass.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from offpolicy_jax import critic, models, sampling
from offpolicy_jax.training import optim, state as state_lib, step as step_lib

STEP_SEPARATOR = ", "
WORKING_END = ". "
_BOX = re.compile(r"\\boxed\{")


# ---------------------------------------------------------------------------------------------
# Step prefixes.


def step_ends(response: str) -> list[int]:
    """Character offsets just past each working step of ``response``.

    The working is the text before the last ``". "`` that precedes a ``\boxed{`` (the whole text
    when there is none); its steps are the pieces between ``", "`` separators. Empty pieces yield
    no step. Example: ``"7*3=21, 12+21=33. \boxed{33}"`` -> ``[6, 16]``.
    """
    box = _BOX.search(response)
    end = len(response)
    if box is not None:
        cut = response.rfind(WORKING_END, 0, box.start())
        end = cut if cut >= 0 else box.start()
    working = response[:end]
    ends, start = [], 0
    while start <= len(working):
        cut = working.find(STEP_SEPARATOR, start)
        piece_end = len(working) if cut < 0 else cut
        if working[start:piece_end].strip():
            ends.append(piece_end)
        if cut < 0:
            break
        start = cut + len(STEP_SEPARATOR)
    return ends


def step_prefixes(response: str) -> list[str]:
    """The response cut after each working step: ``["7*3=21", "7*3=21, 12+21=33"]``."""
    return [response[:end] for end in step_ends(response)]


def prefix_token_counts(tokens, tokenizer, ends: list[int]) -> list[int | None]:
    """For each character offset of ``ends``, the fewest of the response's tokens whose decoded
    text is exactly the response's first ``end`` characters (None when a token straddles the
    offset: no token prefix spells that text prefix, and the step is not valued)."""
    tokens = [int(t) for t in tokens]
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    by_length: dict[int, int] = {}
    for count in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:count], skip_special_tokens=True)
        if full.startswith(text):
            by_length.setdefault(len(text), count)
    return [by_length.get(end) for end in ends]


# ---------------------------------------------------------------------------------------------
# Monte-Carlo prefix values.


def monte_carlo_values(continue_fn, queries: list, rollouts: int) -> np.ndarray:
    """[len(queries)] estimated values: the fraction of ``rollouts`` continuations per query that
    reach the correct answer.

    Args:
      continue_fn: ``(queries, rollouts) -> [len(queries), rollouts]`` 0/1 successes (or
        rewards in [0, 1]) of ``rollouts`` continuations of each query.
      queries: whatever ``continue_fn`` takes (a prefix with its problem).
      rollouts: M, continuations per prefix (>= 1).
    """
    if rollouts < 1:
        raise ValueError(f"rollouts must be >= 1, got {rollouts}")
    if not queries:
        return np.zeros((0,), np.float64)
    successes = np.asarray(continue_fn(queries, rollouts), np.float64)
    if successes.shape != (len(queries), rollouts):
        raise ValueError(f"continue_fn returned shape {successes.shape}, expected "
                         f"{(len(queries), rollouts)}")
    return successes.mean(axis=1)


def sampled_continuations(sampler, params, records: list[dict], prompt_tokens: list[list[int]],
                          rollouts: int, *, seed_index: int, chunk: int = 64) -> np.ndarray:
    """``[len(prompt_tokens), rollouts]`` rewards of continuations sampled from ``params`` with the
    run's sampling settings (``sampler``: ``training.stages.RolloutSampler``), scored by the
    sampler's reward function against ``records`` (one per prompt).

    ``prompt_tokens`` are the prompts' tokens followed by the prefix's own response tokens, so a
    continuation extends exactly the sampled prefix. Sampled in chunks of ``chunk`` prefixes (one
    compiled shape); chunk ``c`` uses the key ``fold_in(PRNGKey(seed), seed_index + c)``. The
    continuations do not count towards ``sampler.generated`` (the run's E-step rollouts).
    """
    config = sampler.config
    out = np.zeros((len(prompt_tokens), rollouts), np.float32)
    for number, start in enumerate(range(0, len(prompt_tokens), chunk)):
        rows = range(start, min(start + chunk, len(prompt_tokens)))
        budget = config.max_new_tokens
        generated = sampling.generate(
            sampler.cfg, params, [prompt_tokens[i] for i in rows], max_new_tokens=budget,
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
            eos_token_ids=sampler.eos_ids,
            seed=jax.random.fold_in(jax.random.PRNGKey(config.seed), seed_index + number),
            num_samples=rollouts, mesh=sampler.mesh, pad_token_id=sampler.pad_id)
        texts = [sampler.tokenizer.decode(generated.tokens[i, :generated.lengths[i]].tolist(),
                                          skip_special_tokens=True)
                 for i in range(generated.tokens.shape[0])]
        row_records = [records[rows[i]] for i in generated.prompt_index]
        scores = np.asarray(sampler.reward_fn(row_records, texts, sampler.pool), np.float32)
        out[start:start + len(rows)] = scores.reshape(len(rows), rollouts)
    return out


# ---------------------------------------------------------------------------------------------
# Trace scores and selection.


def trace_scores(prefix_values: list[np.ndarray], how: str = "min") -> np.ndarray:
    """One score per trace from its prefix values: their ``"min"`` (default) or ``"mean"``, or
    the ``"last"`` prefix's; a trace without a valued prefix scores 0."""
    reduce = {"min": np.min, "mean": np.mean, "last": lambda v: v[-1]}[how]
    return np.array([float(reduce(v)) if len(v) else 0.0 for v in prefix_values], np.float64)


def select_by_outcome(problem: np.ndarray, correct: np.ndarray, cap: int) -> list[int]:
    """ReST-EM's keep rule: the outcome-correct traces in sampling order, at most ``cap`` per
    problem (indices into the pool)."""
    kept, count = [], {}
    for index in np.nonzero(np.asarray(correct) > 0)[0]:
        p = int(problem[index])
        if count.get(p, 0) < cap:
            count[p] = count.get(p, 0) + 1
            kept.append(int(index))
    return kept


def select_by_value(problem: np.ndarray, correct: np.ndarray, scores: np.ndarray, cap: int,
                    threshold: float) -> list[int]:
    """The process-value keep rule: per problem, the outcome-correct traces whose score is at
    least ``threshold``, highest score first (ties: sampling order), at most ``cap``; returned in
    pool order."""
    problem, correct, scores = np.asarray(problem), np.asarray(correct), np.asarray(scores)
    kept = []
    for p in np.unique(problem):
        candidates = [int(i) for i in np.nonzero((problem == p) & (correct > 0))[0]
                      if scores[i] >= threshold]
        candidates.sort(key=lambda i: (-scores[i], i))
        kept += candidates[:cap]
    return sorted(kept)


# ---------------------------------------------------------------------------------------------
# The ReST-MCTS* code's value targets on a tree of traces (for comparison).


def tree_value_targets(traces: list[list[str]], correct: list[bool]) -> list[list[float | None]]:
    """The ReST-MCTS* code's per-step value targets (``MCTS/base.py``, ALGORITHMS.md §9.6) on the
    prefix tree of one problem's traces (each a list of steps; ``correct``: its final answer).

    A node is a step prefix. ``d`` is the distance to the nearest correct leaf (1 at a correct
    leaf, 1 + the minimum over children otherwise) and ``c = 1`` on nodes with a correct leaf
    below; a node without one, hanging below a node ``A`` that has one, takes ``d(A)`` (that of
    its nearest such ancestor) and ``c = 0``. Values: ``v(root) = 0``,
    ``v(n) = max(0, v(parent) + (2c − 1)(1 − v(parent)) / d(n))``: ``k/K`` along a shortest correct
    path of K steps. Subtrees without a correct leaf below any ancestor emit no target (None).
    """
    children: dict[tuple, set] = {}
    correct_leaf: set[tuple] = set()
    for steps, ok in zip(traces, correct):
        for k in range(len(steps)):
            children.setdefault(tuple(steps[:k]), set()).add(tuple(steps[:k + 1]))
        if ok and steps:
            correct_leaf.add(tuple(steps))
    distance: dict[tuple, float] = {}

    def to_correct(node: tuple) -> float:
        if node not in distance:
            below = [to_correct(child) for child in children.get(node, ())]
            best = min(below, default=np.inf)
            distance[node] = 1.0 if node in correct_leaf else 1.0 + best
        return distance[node]

    value: dict[tuple, float | None] = {(): 0.0}

    def fill(node: tuple, anchor_d: float | None) -> None:
        for child in sorted(children.get(node, ())):
            d = to_correct(child)
            parent = value[node]
            if parent is None:
                value[child] = None
            elif np.isfinite(d):
                value[child] = max(0.0, parent + (1.0 - parent) / d)
            elif anchor_d is not None:
                value[child] = max(0.0, parent - (1.0 - parent) / anchor_d)
            else:
                value[child] = None
            fill(child, d if np.isfinite(d) else anchor_d)

    fill((), None if not np.isfinite(to_correct(())) else to_correct(()))
    return [[value[tuple(steps[:k + 1])] for k in range(len(steps))] for steps in traces]


# ---------------------------------------------------------------------------------------------
# The value model: the policy's trunk and a scalar head on the last prefix token.


def init_value_model(cfg, base_params) -> dict:
    """The base policy's parameters plus a zero-initialised ``value_head`` (V ≡ 0 at first)."""
    return {**base_params, **critic.init_value_head(cfg, None)}


def _pack_texts(tokenizer, texts: list[str], pad_id: int, bucket: int) -> dict:
    tokens = np.full((len(texts), bucket), pad_id, np.int32)
    mask = np.zeros((len(texts), bucket), np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False)[-bucket:]
        tokens[row, bucket - len(ids):] = ids    # left-padded: the last column is the last token
        mask[row, bucket - len(ids):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"tokens": tokens, "attention_mask": mask, "positions": positions}


def _bucket(tokenizer, texts: list[str]) -> int:
    longest = max(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return -(-longest // 16) * 16


def _raw_values(cfg, params, batch) -> jax.Array:
    """[B] unclipped head outputs at each row's last (left-padded: last column) token."""
    hidden = models.apply_hidden(cfg, params, batch["tokens"],
                                 attention_mask=batch["attention_mask"],
                                 positions=batch["positions"])
    return critic.values_from_hidden(params, hidden[:, -1:, :])[:, 0]


_forward = jax.jit(_raw_values, static_argnums=0)


def predict_values(cfg, value_params, tokenizer, texts: list[str], *, pad_id: int,
                   batch_size: int = 64) -> np.ndarray:
    """[len(texts)] value predictions, clipped to [0, 1], for ``prompt + prefix`` texts."""
    if not texts:
        return np.zeros((0,), np.float64)
    bucket = _bucket(tokenizer, texts)
    out = []
    for start in range(0, len(texts), batch_size):
        rows = texts[start:start + batch_size]
        padded = rows + [rows[0]] * (batch_size - len(rows))
        out.append(np.asarray(_forward(cfg, value_params, _pack_texts(
            tokenizer, padded, pad_id, bucket)))[:len(rows)])
    return np.clip(np.concatenate(out).astype(np.float64), 0.0, 1.0)


def train_value_model(cfg, value_params, tokenizer, texts: list[str], targets, *, epochs: float,
                      batch_size: int, learning_rate: float, seed: int, pad_id: int
                      ) -> tuple[dict, list[float]]:
    """Fits the value model to ``targets`` (MSE of the unclipped head output) on ``prompt +
    prefix`` texts for ``epochs`` passes (at least one step) with AdamW, 10 % warm-up and a cosine
    schedule; returns ``(params, per-step losses)``."""
    if not texts:
        return value_params, []
    targets = np.asarray(targets, np.float32)
    batch_size = min(batch_size, len(texts))
    steps = max(1, int(np.ceil(epochs * len(texts) / batch_size)))
    bucket = _bucket(tokenizer, texts)

    def loss_fn(params, batch, rng):
        del rng
        error = _raw_values(cfg, params, batch) - batch["targets"]
        mse = jnp.mean(jnp.square(error))
        return mse, {"mse": mse}

    optimizer = optim.make_optimizer(optim.OptimizerConfig(
        name="adamw", learning_rate=learning_rate, schedule="cosine", warmup_steps=steps // 10,
        total_steps=steps, end_lr_fraction=0.1, weight_decay=0.0))
    # A copy: the train step donates its state, and the caller keeps ``value_params``.
    start = jax.tree.map(lambda x: jnp.array(x, copy=True), value_params)
    state = state_lib.create_train_state(start, optimizer, rng=seed)
    train_step = step_lib.make_train_step(loss_fn, optimizer)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        rows = rng.choice(len(texts), size=batch_size, replace=False)
        batch = _pack_texts(tokenizer, [texts[i] for i in rows], pad_id, bucket)
        batch["targets"] = targets[rows]
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses


@dataclasses.dataclass
class ValueModelStore:
    """The value model's parameters saved after every iteration (``<directory>/<iteration>.npz``),
    so a run resumed from its iteration-``i`` checkpoint continues with iteration ``i``'s head."""

    directory: str

    def path(self, iteration: int) -> str:
        return os.path.join(self.directory, f"{iteration}.npz")

    def save(self, iteration: int, params) -> None:
        os.makedirs(self.directory, exist_ok=True)
        leaves = jax.tree.leaves(jax.device_get(params))
        temporary = self.path(iteration) + ".tmp.npz"
        np.savez(temporary, *[np.asarray(leaf) for leaf in leaves])
        os.replace(temporary, self.path(iteration))

    def load(self, iteration: int, like):
        """The parameters saved at ``iteration`` in the structure of ``like``; None if absent."""
        if not os.path.exists(self.path(iteration)):
            return None
        with np.load(self.path(iteration)) as data:
            leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
        structure = jax.tree.structure(like)
        if structure.num_leaves != len(leaves):
            raise ValueError(f"{self.path(iteration)} holds {len(leaves)} arrays, the value model "
                             f"has {structure.num_leaves}")
        return jax.tree.unflatten(structure, leaves)


# ---------------------------------------------------------------------------------------------
# A sampled pool and its prefix values (what an expert-iteration E-step uses).


@dataclasses.dataclass
class Trace:
    """One sampled response of an E-step pool.

    Attributes:
      problem: the problem's index in the pool (each selected record is one problem).
      record: its prompt record (``prompt``, ``gold``).
      prompt_tokens: the prompt's tokens as the sampler encoded them.
      tokens: the response's tokens (EOS included).
      text: the response text (special tokens removed).
      correct: the verifier's outcome (final answer right).
    """

    problem: int
    record: dict
    prompt_tokens: list
    tokens: np.ndarray
    text: str
    correct: bool


def traces_of(rollouts, records: list[dict], tokenizer, sampler, problem_offset: int = 0
              ) -> list[Trace]:
    """The traces of one sampled batch (``rollouts.group_index`` indexes ``records``); problems
    are numbered from ``problem_offset``."""
    traces = []
    for row in range(rollouts.tokens.shape[0]):
        index = int(rollouts.group_index[row])
        tokens = rollouts.tokens[row, :int(rollouts.lengths[row])]
        traces.append(Trace(
            problem=problem_offset + index, record=records[index],
            prompt_tokens=sampler.encode(records[index]["prompt"]), tokens=tokens,
            text=tokenizer.decode(tokens.tolist(), skip_special_tokens=True),
            correct=bool(rollouts.rewards[row] > 0)))
    return traces


@dataclasses.dataclass
class PoolValues:
    """Monte-Carlo prefix values of a pool's outcome-correct traces.

    Attributes:
      per_trace: one array of prefix values per trace of the pool (empty for the traces not
        valued: outcome-wrong ones, and those without a step).
      texts: ``prompt + prefix`` text of every distinct valued prefix (the value model's input).
      prefixes: the prefix text alone, for each of ``texts``.
      values: [len(texts)] their Monte-Carlo values.
      continuations: continuations sampled (distinct prefixes × rollouts).
    """

    per_trace: list
    texts: list
    prefixes: list
    values: np.ndarray
    continuations: int


def value_pool(continue_fn, traces: list[Trace], tokenizer, rollouts: int) -> PoolValues:
    """Values every step prefix of the pool's outcome-correct traces with ``rollouts``
    continuations each. A prefix shared by several traces of one problem (same tokens) is valued
    once. ``continue_fn(records, prompt_tokens, rollouts) -> [n, rollouts]`` rewards."""
    index: dict[tuple, int] = {}
    queries, per_trace_queries = [], []
    for trace in traces:
        mine = []
        if trace.correct:
            ends = step_ends(trace.text)
            for count in prefix_token_counts(trace.tokens, tokenizer, ends):
                if count is None:
                    continue
                key = (trace.problem, tuple(int(t) for t in trace.tokens[:count]))
                if key not in index:
                    index[key] = len(queries)
                    queries.append((trace, count))
                mine.append(index[key])
        per_trace_queries.append(mine)

    def run(batch, m):
        records = [trace.record for trace, _ in batch]
        prompts = [list(trace.prompt_tokens) + [int(t) for t in trace.tokens[:count]]
                   for trace, count in batch]
        return continue_fn(records, prompts, m)

    values = monte_carlo_values(run, queries, rollouts)
    prefixes = [tokenizer.decode([int(t) for t in trace.tokens[:count]], skip_special_tokens=True)
                for trace, count in queries]
    texts = [trace.record["prompt"] + prefix for (trace, _), prefix in zip(queries, prefixes)]
    return PoolValues(per_trace=[values[q] for q in per_trace_queries], texts=texts,
                      prefixes=prefixes, values=values, continuations=len(queries) * rollouts)


def prefix_arithmetic_right(prefix: str) -> bool:
    """Whether every step of an arith step prefix is well formed and computes right (``a op b``
    equals the written ``c``; ``data.arith.right_step_share`` of the prefix)."""
    from offpolicy_jax.data import arith
    return arith.right_step_share(prefix + ". \\boxed{0}") == 1.0


def working_valid(trace: Trace) -> bool | None:
    """Whether the embedded task's checker finds every step of the trace right
    (``data.arith.check_working``); None when the prompt is not an arith prompt."""
    from offpolicy_jax.data import arith
    try:
        expression = arith.expression_of(trace.record["prompt"])
    except ValueError:
        return None
    return arith.check_working(expression, trace.text).valid


def selection_quality(traces: list[Trace], kept: list[int]) -> dict:
    """``{"kept", "valid", "valid_fraction"}`` of a selection: how many kept traces have fully
    correct working (``working_valid``); empty when the task cannot check working."""
    checks = [working_valid(traces[i]) for i in kept]
    if any(check is None for check in checks):
        return {"kept": len(kept)}
    valid = sum(bool(check) for check in checks)
    return {"kept": len(kept), "valid": valid,
            "valid_fraction": valid / len(kept) if kept else 0.0}


# ---------------------------------------------------------------------------------------------
# The E-step's process-value selection, with its value model, as expert iteration runs it.

# Sampling keys of the continuations: fold_in(PRNGKey(seed), offset + iteration * stride + chunk),
# apart from the E-step's keys (iteration * batches + part) and B-STaR's dev keys.
CONTINUATION_SEED_OFFSET = 2_000_000
CONTINUATION_SEED_STRIDE = 10_000


@dataclasses.dataclass
class SelectorSettings:
    """The process-value options of an expert-iteration run (flags of expert_iteration.py)."""

    rollouts: int = 4          # M continuations per prefix
    threshold: float = 0.2     # keep traces scoring at least this (repo filter: value >= 0.2)
    score: str = "min"         # how a trace's prefix values make its score
    cap: int = 10              # kept traces per problem (ReST-EM's --max_per_prompt)
    value_epochs: float = 4.0  # value-model fit per iteration: epochs over the new prefixes
    value_batch_size: int = 32
    value_learning_rate: float = 1e-3
    use: str = "process_value"   # the keep rule whose traces are returned


class ProcessValueSelector:
    """Per iteration: values the outcome-correct traces' prefixes by Monte Carlo, keeps traces by
    both rules (the paired comparison), measures the value model on the new prefixes before it
    learns them (held-out error), fits it, and saves it (``<workdir>/value_model``)."""

    def __init__(self, session, base_params, settings: SelectorSettings):
        self.session = session
        self.settings = settings
        self.initial = init_value_model(session.cfg, base_params)
        self.store = ValueModelStore(os.path.join(session.config.workdir, "value_model"))
        self.value_params, self.trained = self.initial, False

    def restore(self, iteration: int) -> None:
        """The value model as saved after ``iteration`` (the initial one when none was)."""
        loaded = self.store.load(iteration, self.initial) if iteration > 0 else None
        self.value_params = self.initial if loaded is None else loaded
        self.trained = loaded is not None

    def select(self, params, traces: list[Trace], iteration: int) -> tuple[list, dict]:
        """``(kept (prompt, response) examples, process/... metrics)`` for one E-step pool."""
        session, settings = self.session, self.settings
        sampler = session.sampler
        seed_index = CONTINUATION_SEED_OFFSET + iteration * CONTINUATION_SEED_STRIDE

        def continue_fn(records, prompts, m):
            return sampled_continuations(sampler, params, records, prompts, m,
                                         seed_index=seed_index)

        pool = value_pool(continue_fn, traces, session.tokenizer, settings.rollouts)
        problem = np.array([t.problem for t in traces])
        correct = np.array([t.correct for t in traces], np.float32)
        scores = trace_scores(pool.per_trace, settings.score)
        rules = {"outcome": select_by_outcome(problem, correct, settings.cap),
                 "process_value": select_by_value(problem, correct, scores, settings.cap,
                                                  settings.threshold)}
        metrics = {"process/pool": len(traces), "process/prefixes": len(pool.texts),
                   "process/continuations": pool.continuations,
                   "process/prefix_value_mean": float(np.mean(pool.values)) if pool.texts
                   else 0.0}
        if traces and working_valid(traces[0]) is not None:
            # How well the values tell a step that just went wrong from sound prefixes (arith
            # only): 'right' prefixes have every step right, 'wrong_last' ones a wrong last step
            # (prefixes whose error lies further back are in neither).
            right = np.array([prefix_arithmetic_right(p) for p in pool.prefixes], bool)
            wrong_last = np.array([not prefix_arithmetic_right(p.rpartition(STEP_SEPARATOR)[2])
                                   for p in pool.prefixes], bool)
            for name, rows in (("right", right), ("wrong_last", wrong_last)):
                metrics[f"process/{name}_prefixes"] = int(rows.sum())
                metrics[f"process/{name}_prefix_value_mean"] = (
                    float(pool.values[rows].mean()) if rows.any() else 0.0)
        correct_rows = [i for i in range(len(traces)) if traces[i].correct]
        metrics.update({f"process/correct_{k}": v
                        for k, v in selection_quality(traces, correct_rows).items()})

        # The value model on prefixes it has not seen yet, then fitted to them.
        if pool.texts:
            predicted = predict_values(session.cfg, self.value_params, session.tokenizer,
                                       pool.texts, pad_id=sampler.pad_id)
            metrics["process/value_heldout_mse"] = float(np.mean((predicted - pool.values) ** 2))
            if self.trained:
                lookup = dict(zip(pool.texts, predicted))
                head_values = [np.array([lookup[t] for t in texts_of(trace, session.tokenizer)
                                         if t in lookup]) if trace.correct else np.zeros(0)
                               for trace in traces]
                rules["value_head"] = select_by_value(
                    problem, correct, trace_scores(head_values, settings.score), settings.cap,
                    settings.threshold)
            self.value_params, losses = train_value_model(
                session.cfg, self.value_params, session.tokenizer, pool.texts, pool.values,
                epochs=settings.value_epochs, batch_size=settings.value_batch_size,
                learning_rate=settings.value_learning_rate, seed=session.config.seed + iteration,
                pad_id=sampler.pad_id)
            self.trained = True
            # The last epoch's mean loss (MSE of the unclipped head).
            last_epoch = max(1, round(len(losses) / max(settings.value_epochs, 1.0)))
            metrics["process/value_train_mse"] = float(np.mean(losses[-last_epoch:]))
        self.store.save(iteration, self.value_params)

        for rule, kept in rules.items():
            metrics.update({f"process/{rule}_{k}": v
                            for k, v in selection_quality(traces, kept).items()})
        kept = rules[settings.use]
        examples = [(traces[i].record["prompt"], traces[i].text) for i in kept]
        return examples, metrics


def texts_of(trace: Trace, tokenizer) -> list[str]:
    """``prompt + prefix`` texts of a trace's valued step prefixes (as ``value_pool`` forms
    them)."""
    counts = prefix_token_counts(trace.tokens, tokenizer, step_ends(trace.text))
    return [trace.record["prompt"] + tokenizer.decode([int(t) for t in trace.tokens[:count]],
                                                      skip_special_tokens=True)
            for count in counts if count is not None]
