"""LatentSeek (``eval.latentseek``) and the harness's test-time methods (``eval.test_time``).

The update is checked against its hand-derived gradient and Adam's first step, and on a toy
whose optimum is known; the loop against scripted rewards (threshold, step cap, K = 0) on a
tiny random checkpoint; the compute accounting of each method against counts by hand; and one
end-to-end harness run per reward.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import models, rewards, sampling
from offpolicy_jax.eval import harness, latentseek, runner, test_time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The two fields ``models.hidden_to_logits`` reads: an untied ``lm_head`` [D, V]."""
    dtype: str = "float32"
    tie_word_embeddings: bool = False


def _toy_params(w_out):
    return {"lm_head": jnp.asarray(w_out, jnp.float32)}


# ---------------------------------------------------------------------------------------------
# The update.


def test_gradient_is_minus_reward_times_score_function():
    """∇_{z_t} L = −R (W[:, x̂_t] − W softmax(Wᵀ z_t)) for the greedy token x̂_t, and zero on
    masked positions."""
    rng = np.random.default_rng(0)
    d, v = 5, 7
    w_out = rng.normal(size=(d, v)).astype(np.float32)
    z = rng.normal(size=(2, 3, d)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    reward = np.array([-0.75, -1.0], np.float32)
    cfg, params = ToyConfig(), _toy_params(w_out)

    def loss(latents):
        log_probs, _ = latentseek.greedy_latent_log_probs(cfg, params, latents)
        return latentseek.latent_policy_loss(log_probs, jnp.asarray(mask), jnp.asarray(reward))

    grad = np.asarray(jax.grad(loss)(jnp.asarray(z)))
    for b in range(2):
        for t in range(3):
            logits = z[b, t] @ w_out
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            x = int(np.argmax(logits))
            expected = -reward[b] * mask[b, t] * (w_out[:, x] - w_out @ probs)
            np.testing.assert_allclose(grad[b, t], expected, rtol=1e-4, atol=1e-6)
    assert np.all(grad[0, 2] == 0) and np.all(grad[1, 1:] == 0)


def test_first_step_is_adam_sign_step_and_stopped_problems_keep_their_latents():
    """Adam's first step moves each coordinate by lr·sign(g) (|g| ≫ ε); a stopped problem's
    latents are returned bit for bit, and a running problem's step does not depend on the
    other problems of the batch."""
    rng = np.random.default_rng(1)
    d, v, lr = 4, 6, 0.05
    w_out = rng.normal(size=(d, v)).astype(np.float32)
    cfg, params = ToyConfig(), _toy_params(w_out)
    z = rng.normal(size=(3, 2, d)).astype(np.float32)
    mask = np.ones((3, 2), np.float32)
    reward = np.array([-1.0, -0.5, -1.0], np.float32)
    running = np.array([True, True, False])

    def loss(latents):
        log_probs, _ = latentseek.greedy_latent_log_probs(cfg, params, latents)
        return latentseek.latent_policy_loss(log_probs, jnp.asarray(mask), jnp.asarray(reward))

    grad = np.asarray(jax.grad(loss)(jnp.asarray(z)))
    state = latentseek.adam(lr).init(jnp.asarray(z))
    new, _, tokens, _ = latentseek.latent_step(
        cfg, params, jnp.asarray(z), state, jnp.asarray(mask), jnp.asarray(reward),
        jnp.asarray(running), learning_rate=lr)
    new = np.asarray(new)
    np.testing.assert_allclose(new[:2], z[:2] - lr * np.sign(grad[:2]), atol=1e-6)
    np.testing.assert_array_equal(new[2], z[2])
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(new @ w_out, axis=-1))
    alone, _, _, _ = latentseek.latent_step(
        cfg, params, jnp.asarray(z[1:2]), latentseek.adam(lr).init(jnp.asarray(z[1:2])),
        jnp.asarray(mask[1:2]), jnp.asarray(reward[1:2]), jnp.asarray(running[1:2]),
        learning_rate=lr)
    np.testing.assert_allclose(np.asarray(alone)[0], new[1], atol=1e-7)


def test_toy_with_known_optimum_is_reached_and_then_kept():
    """Two tokens, the reward is 0 when the read-out is token 1 at every position and −1
    otherwise, so the optimum is the set of latents whose argmax is 1 everywhere. Starting from
    latents that read out token 0 with a margin of 2, repeated steps lower token 0 until every
    position flips; once the reward is 0 the gradient vanishes and the read-out stays."""
    w_out = np.array([[1.0, -1.0], [0.5, 0.5]], np.float32)     # logits = (z0 + z1/2, −z0 + z1/2)
    cfg, params = ToyConfig(), _toy_params(w_out)
    z = jnp.asarray([[[1.0, 0.0], [1.0, 2.0], [0.8, -1.0]]], jnp.float32)
    mask = jnp.ones((1, 3), jnp.float32)
    state = latentseek.adam(0.1).init(z)
    rewards_seen = []
    for _ in range(40):
        _, tokens = latentseek.greedy_latent_log_probs(cfg, params, z)
        reward = 0.0 if bool(jnp.all(tokens == 1)) else -1.0
        rewards_seen.append(reward)
        z, state, _, _ = latentseek.latent_step(
            cfg, params, z, state, mask, jnp.asarray([reward], jnp.float32),
            jnp.asarray([True]), learning_rate=0.1)
    assert rewards_seen[0] == -1.0
    first = rewards_seen.index(0.0)
    assert 0 < first < 30
    assert all(r == 0.0 for r in rewards_seen[first:])
    _, tokens = latentseek.greedy_latent_log_probs(cfg, params, z)
    assert np.asarray(tokens).tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("lengths, fraction, cap, expected", [
    ([30, 9, 10, 5000], 0.1, 300, [3, 0, 1, 300]),
    ([7, 10], 0.2, 300, [1, 2]),
    ([4], 1.0, 2, [2]),
])
def test_optimised_positions(lengths, fraction, cap, expected):
    assert latentseek.optimised_positions(lengths, fraction, cap).tolist() == expected


def test_config_errors_name_the_flag():
    for field, value, flag in [("steps", -1, "--latentseek_steps"),
                               ("learning_rate", 0.0, "--latentseek_lr"),
                               ("fraction", 1.5, "--latentseek_fraction"),
                               ("reward_threshold", float("nan"), "--latentseek_threshold")]:
        with pytest.raises(ValueError, match=flag):
            dataclasses.replace(latentseek.LatentSeekConfig(), **{field: value}).validate()
    with pytest.raises(ValueError, match="--num_samples=1"):
        harness.HarnessConfig(test_time_method="latentseek").validate()
    with pytest.raises(ValueError, match="--test_time_method must be one of"):
        harness.HarnessConfig(test_time_method="beam").validate()
    with pytest.raises(ValueError, match="--test_time_reward must be one of"):
        harness.HarnessConfig(test_time_reward="gold").validate()
    with pytest.raises(ValueError, match="--latentseek_fraction"):
        harness.HarnessConfig(test_time_method="latentseek", num_samples=1,
                              latentseek_fraction=0.0).validate()


# ---------------------------------------------------------------------------------------------
# The loop on a tiny random checkpoint.


@pytest.fixture(scope="module")
def model(random_tiny_model):
    cfg, params = models.load_hf_checkpoint(random_tiny_model)
    return cfg, params, models.load_tokenizer(random_tiny_model)


def _greedy(cfg, params, prompts, max_new_tokens, eos):
    out = sampling.generate(cfg, params, prompts, max_new_tokens=max_new_tokens,
                            temperature=0.0, eos_token_ids=(eos,), seed=0)
    return [out.tokens[i, :out.lengths[i]].tolist() for i in range(len(prompts))]


def test_scripted_rewards_stop_above_the_threshold_and_params_stay_unchanged(model):
    """Problem 0 earns −1, −0.5, −0.2 (= τ: continues), −0.1 (> τ: stops after 3 updates);
    problem 1 starts above τ (no update, answer kept); problem 2 never passes (all 4 steps);
    problem 3's answer is too short for any position (K = 0: kept)."""
    cfg, params, tokenizer = model
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.encode(f"Q: {q}\nA: ", add_special_tokens=False)
               for q in ("1+2", "3*4", "5-6", "7+8")]
    responses = _greedy(cfg, params, prompts, 16, eos)
    responses[3] = responses[3][:3]                       # floor(0.25 * 3) = 0 positions
    script = {0: [-0.5, -0.2, -0.1, -1.0], 2: [-1.0] * 4}
    calls = []

    def reward_fn(rows, answers, step):
        calls.append((step, rows.tolist()))
        return np.array([script[int(r)][step - 1] for r in rows])

    before = jax.tree_util.tree_map(np.array, params)
    config = latentseek.LatentSeekConfig(steps=4, learning_rate=0.5, fraction=0.25)
    out = latentseek.optimise(cfg, params, prompts, responses,
                              np.array([-1.0, -0.1, -1.0, -1.0]), reward_fn, config=config,
                              max_new_tokens=16, eos_token_ids=(eos,))
    assert out.iterations.tolist() == [3, 0, 4, 0]
    assert out.positions.tolist() == [4, 4, 4, 0]
    assert out.rewards[0] == pytest.approx([-1.0, -0.5, -0.2, -0.1])
    assert out.rewards[1] == pytest.approx([-0.1]) and out.rewards[2] == pytest.approx([-1.0] * 5)
    assert out.stopped.tolist() == [True, True, False, False]
    assert calls == [(1, [0, 2]), (2, [0, 2]), (3, [0, 2]), (4, [2])]
    assert out.responses[1] == responses[1] and out.responses[3] == responses[3]
    assert out.read_latents
    for b in (0, 2):
        assert 0 < len(out.responses[b]) <= 16
    jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                           jax.tree_util.tree_map(np.array, params))
    # Every answer already above the threshold: no forward, no update, no reward call.
    calls.clear()
    idle = latentseek.optimise(cfg, params, prompts, responses, np.zeros(4), reward_fn,
                               config=config, max_new_tokens=16, eos_token_ids=(eos,))
    assert idle.iterations.tolist() == [0] * 4 and not idle.read_latents and not calls
    assert idle.responses == responses


def test_answer_is_the_latent_prefix_then_the_frozen_greedy_continuation(model):
    """After one update the answer's first K tokens are the read-out of the updated latents and
    the rest is the model's greedy continuation of prompt + those tokens."""
    cfg, params, tokenizer = model
    eos = tokenizer.eos_token_id
    prompts = [tokenizer.encode("Q: 9*9\nA: ", add_special_tokens=False)]
    responses = _greedy(cfg, params, prompts, 16, eos)
    config = latentseek.LatentSeekConfig(steps=1, learning_rate=1.0, fraction=0.5)
    seen = []
    out = latentseek.optimise(cfg, params, prompts, responses, np.array([-1.0]),
                              lambda rows, answers, step: seen.append(answers) or np.zeros(1),
                              config=config, max_new_tokens=16, eos_token_ids=(eos,))
    k = int(out.positions[0])
    latents = latentseek.initial_latents(cfg, params, prompts, responses, out.positions)
    _, read_out = latentseek.greedy_latent_log_probs(cfg, params, jnp.asarray(latents))
    assert np.asarray(read_out)[0, :k].tolist() == responses[0][:k]   # the initial answer
    answer = out.responses[0]
    assert seen == [[answer]] and len(answer) <= 16
    prefix = answer[:k]
    assert eos not in prefix and len(answer) > k     # so the continuation below is checked
    assert answer[k:] == _greedy(cfg, params, [prompts[0] + prefix], 16 - k, eos)[0]


# ---------------------------------------------------------------------------------------------
# Compute accounting per method.


def _result(correct, extracted, lengths):
    correct = np.asarray(correct, bool)
    return runner.EvalResult(metrics={}, responses=[""] * correct.size, extracted=extracted,
                             correct=correct, reasons=[""] * correct.size,
                             lengths=np.asarray(lengths), too_long=np.zeros(len(correct), bool))


def test_budget_of_majority_best_of_n_and_oracle():
    # 2 problems x 3 samples. Votes: problem 0 "4" twice (correct), problem 1 "7" twice (wrong).
    result = _result([[True, False, True], [False, False, True]],
                     ["4", "5", "4", "7", "7", "9"], [10, 12, 14, 20, 22, 24])
    block = test_time.majority(result, seconds=1.0)
    assert block["accuracy"] == 0.5 and block["uses_gold"] is False
    assert block["accuracy_stderr"] == pytest.approx(np.std([1, 0], ddof=1) / np.sqrt(2))
    assert block["per_problem"]["solutions"] == 3 and block["per_problem"]["solution_tokens"] == 51
    assert block["per_problem"]["verifications"] == 0

    oracle = test_time.best_of_n_oracle(result, seconds=1.0)
    assert oracle["accuracy"] == 1.0 and oracle["uses_gold"] is True
    assert "gold" in oracle["reward"] and oracle["per_problem"]["oracle_checks"] == 3

    # Two verifications per sample, 5 tokens each; sample 2 of problem 0 and 0 of problem 1 win.
    scores = np.array([[0.0, 0.5, 1.0], [1.0, -1.0, 0.5]])
    rated = _result(np.zeros((6, 2), bool), [None] * 12, [5] * 12)
    block = test_time.best_of_n_verifier(result, scores, rated, 1.0, verifier_name="self")
    assert block["accuracy"] == 0.5
    assert block["per_problem"]["verifications"] == 6
    assert block["per_problem"]["verification_tokens"] == 30
    with pytest.raises(ValueError, match="unknown budget entries"):
        test_time.budget(2, samples=3)


def test_rating_reward_maps_the_scale_onto_minus_one_zero():
    assert test_time.rating_reward([1.0, -0.5, -1.0]).tolist() == [0.0, -0.75, -1.0]
    # Four ratings, three "correct" and one "wrong": above the code's threshold of -0.2.
    assert test_time.rating_reward(np.mean([1, 1, 1, -0.5])) > -0.2
    assert test_time.rating_reward(np.mean([1, 1, -0.5, -0.5])) <= -0.2


# ---------------------------------------------------------------------------------------------
# The harness end to end.


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _run_cli(*flags):
    """The command in a subprocess on one CPU device, like a laptop run (the 8 fake devices of
    this test session would make every program compile for a sharded mesh)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "offpolicy_jax.eval", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


# The oracle run (20 s) is left to `-m slow`; its reward is unit-tested above.
@pytest.mark.parametrize("reward", ["verifier", pytest.param("oracle", marks=pytest.mark.slow)])
def test_harness_runs_latentseek_and_accounts_its_compute(random_tiny_model, tmp_path, reward):
    out = str(tmp_path / "out")
    result = _run_cli(f"--model={random_tiny_model}", "--benchmarks=arith", "--limit=3",
                      "--num_samples=1", "--max_new_tokens=12", "--temperature=1.0",
                      "--batch_size=2", "--rerank_samples=2", "--test_time_method=latentseek",
                      f"--test_time_reward={reward}", "--latentseek_steps=2",
                      "--latentseek_fraction=0.25", "--latentseek_lr=0.5", f"--out={out}",
                      "--progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "samples.jsonl",
                                       "test_time.jsonl"]
    bench = summary["benchmarks"]["arith"]
    block = bench["test_time"]
    rows = _read_jsonl(os.path.join(out, "test_time.jsonl"))
    samples = _read_jsonl(os.path.join(out, "samples.jsonl"))
    assert len(rows) == 3 and len(samples) == 3
    assert [r["initial_response"] for r in rows] == [s["response"] for s in samples]
    assert block["greedy"]["accuracy"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    assert block["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    for row in rows:
        assert len(row["rewards"]) == row["iterations"] + 1 <= 3
        assert all(-1.0 <= r <= 0.0 for r in row["rewards"])
        if row["extracted"] is None:
            assert not row["correct"]
        else:
            assert rewards.check(row["gold"], row["extracted"]).equivalent == row["correct"]
    iterations = np.array([r["iterations"] for r in rows])
    per_problem = block["per_problem"]
    assert per_problem["solutions"] == pytest.approx(1 + iterations.mean())
    assert per_problem["latent_updates"] == pytest.approx(iterations.mean())
    assert per_problem["solution_tokens"] >= np.mean([s["length"] for s in samples])
    if reward == "oracle":
        assert block["uses_gold"] is True and "gold" in block["reward"]
        assert per_problem["oracle_checks"] == pytest.approx(1 + iterations.mean())
        assert per_problem["verifications"] == 0
        # PSRM: 0 exactly when the answer is right.
        assert all((r["rewards"][-1] == 0.0) == r["correct"] for r in rows)
    else:
        assert block["uses_gold"] is False and block["reward"].startswith("self-verification")
        assert per_problem["verifications"] == pytest.approx(2 * (1 + iterations.mean()))
        assert per_problem["oracle_checks"] == 0
    assert bench["settings"]["test_time_method"] == "latentseek"
    assert bench["settings"]["solving_temperature"] == 0.0
    assert block["seconds"] > 0
    assert "latentseek (%)" in result.stdout and harness.results_table(
        summary["benchmarks"]) in result.stdout
