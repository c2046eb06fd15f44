"""GSPO, CISPO, decoupled PPO and the rollout corrections: hand-computed values, their on-policy
reductions, jit = no-jit, and the gradient-scaling identity the trainer relies on."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses

# Two responses of lengths 2 and 3 (T = 3).
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
OLD = np.log(np.array([[0.5, 0.25, 0.9], [0.2, 0.1, 0.3]], np.float32))
ADV = np.array([1.0, -1.0], np.float32)


def _shifted(shift):
    """log-probs ``OLD + shift`` (per row or per token)."""
    return (OLD + np.asarray(shift, np.float32)).astype(np.float32)


def _grad(fn, logp):
    return np.asarray(jax.grad(lambda x: fn(x)[0])(jnp.asarray(logp)))


# -- GSPO ----------------------------------------------------------------------------------------


def test_gspo_matches_a_hand_computation_with_one_sequence_clipped():
    # Row 0 moves up by 1e-3 per token (s = e^0.001 ≈ 1.0010005 > 1 + 4e-4, A > 0: clipped);
    # row 1 down by 1e-4 (s ≈ 0.9999, inside [1 − 3e-4, 1 + 4e-4]).
    logp = _shifted([[1e-3], [-1e-4]])
    loss, metrics = losses.gspo(logp, OLD, ADV, MASK)
    s0, s1 = math.exp(1e-3), math.exp(-1e-4)
    want = (-1.0 * min(s0, 1 + 4e-4) + 1.0 * s1) / 2          # max(−A s, −A clip(s)) per row
    np.testing.assert_allclose(loss, want, atol=1e-7)         # a difference of two ~1 terms
    assert float(metrics["clip_fraction"]) == 0.5
    assert float(metrics["clip_fraction_high"]) == 0.5
    np.testing.assert_allclose(metrics["seq_ratio_max"], s0, rtol=1e-6)
    # The clipped row gets no gradient; the other gets −A·s/L_1 per token, over B' = 2 rows.
    grad = _grad(lambda x: losses.gspo(x, OLD, ADV, MASK), logp)
    np.testing.assert_allclose(grad[0], 0.0, atol=1e-7)
    np.testing.assert_allclose(grad[1], [s1 / 3 / 2] * 3, rtol=1e-5)


def test_gspo_on_policy_is_the_sequence_mean_of_token_mean_reinforce():
    got = _grad(lambda x: losses.gspo(x, OLD, ADV, MASK), OLD)
    want = _grad(lambda x: losses.reinforce(x, ADV, MASK, agg="seq-mean-token-mean"), OLD)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_gspo_token_level_equals_the_sequence_level_for_sequence_advantages():
    logp = _shifted([[2e-4, -1e-4, 0.0], [5e-4, 1e-3, -2e-4]])
    seq = losses.gspo(logp, OLD, ADV, MASK)
    tok = losses.gspo(logp, OLD, ADV, MASK, level="sequence_token")
    np.testing.assert_allclose(tok[0], seq[0], rtol=1e-6)
    assert float(tok[1]["clip_fraction"]) == float(seq[1]["clip_fraction"])
    np.testing.assert_allclose(
        _grad(lambda x: losses.gspo(x, OLD, ADV, MASK, level="sequence_token"), logp),
        _grad(lambda x: losses.gspo(x, OLD, ADV, MASK), logp), rtol=1e-5, atol=1e-8)


def test_gspo_ignores_empty_rows_and_refuses_bad_settings():
    mask = np.concatenate([MASK, np.zeros((1, 3), np.float32)])
    logp = np.concatenate([OLD, np.zeros((1, 3), np.float32)])
    loss, _ = losses.gspo(logp, logp, np.array([1.0, -1.0, 5.0], np.float32), mask)
    want, _ = losses.gspo(OLD, OLD, ADV, MASK)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    with pytest.raises(ValueError, match="level"):
        losses.gspo(OLD, OLD, ADV, MASK, level="token")
    with pytest.raises(ValueError, match="advantages"):
        losses.gspo(OLD, OLD, np.zeros((2, 3), np.float32), MASK)   # per-token needs GSPO-token


# -- CISPO ---------------------------------------------------------------------------------------


def test_cispo_matches_a_hand_computation_and_keeps_clipped_tokens_gradient():
    # Ratios e^{+2} (above 1 + 4: weight 5), e^{0.5}, e^{-1} on row 0's tokens (third masked).
    logp = _shifted([[2.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = losses.cispo(logp, OLD, ADV, MASK)
    weights = np.array([[5.0, math.exp(0.5), 0.0], [1.0, 1.0, 1.0]])
    want = -np.sum(weights * ADV[:, None] * logp * MASK) / MASK.sum()
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_fraction"], 1 / 5)
    grad = _grad(lambda x: losses.cispo(x, OLD, ADV, MASK), logp)
    np.testing.assert_allclose(grad, -weights * ADV[:, None] * MASK / MASK.sum(), rtol=1e-6)
    assert grad[0, 0] != 0.0      # the truncated token still learns (a PPO clip would zero it)


def test_cispo_on_policy_is_token_mean_reinforce():
    np.testing.assert_allclose(
        _grad(lambda x: losses.cispo(x, OLD, ADV, MASK), OLD),
        _grad(lambda x: losses.reinforce(x, ADV, MASK, agg="token-mean"), OLD), rtol=1e-6)


# -- decoupled PPO -------------------------------------------------------------------------------


def test_decoupled_ppo_with_the_proximal_as_behaviour_policy_is_ppo_clip():
    logp = _shifted([[0.3, -0.1, 0.0], [0.05, -0.4, 0.2]])
    got = losses.decoupled_ppo(logp, OLD, OLD, ADV, MASK)
    want = losses.ppo_clip(logp, OLD, ADV, MASK)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(
        _grad(lambda x: losses.decoupled_ppo(x, OLD, OLD, ADV, MASK), logp),
        _grad(lambda x: losses.ppo_clip(x, OLD, ADV, MASK), logp), rtol=1e-6)


def test_decoupled_ppo_weights_by_the_behaviour_ratio_and_masks_above_the_cap():
    # π_prox/π_beh: e^{0.5} on row 0, e^{2} (> 5: masked) on row 1's first token, 1 elsewhere.
    behaviour = _shifted([[-0.5, -0.5, 0.0], [-2.0, 0.0, 0.0]])
    logp = _shifted([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss, metrics = losses.decoupled_ppo(logp, OLD, behaviour, ADV, MASK)
    ratio = np.exp(logp - OLD)
    token = np.maximum(-ADV[:, None] * ratio, -ADV[:, None] * np.clip(ratio, 0.8, 1.2))
    weight = np.array([[math.exp(0.5)] * 2 + [1.0], [0.0, 1.0, 1.0]])
    want = np.sum(weight * token * MASK) / MASK.sum()              # original token count
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(metrics["behaviour_masked_fraction"], 1 / 5)
    uncapped, _ = losses.decoupled_ppo(logp, OLD, behaviour, ADV, MASK, behaviour_weight_cap=None)
    weight[1, 0] = math.exp(2.0)
    np.testing.assert_allclose(uncapped, np.sum(weight * token * MASK) / MASK.sum(), rtol=1e-6)


@pytest.mark.parametrize("name", ["gspo", "cispo", "decoupled_ppo"])
def test_new_objectives_give_the_same_loss_and_gradient_under_jit(name):
    logp = _shifted([[0.3, -0.2, 0.0], [1e-4, -3e-4, 2e-4]])
    behaviour = _shifted([[0.1, 0.0, 0.0], [-0.2, 0.1, 0.0]])
    fn = {
        "gspo": lambda x: losses.gspo(x, OLD, ADV, MASK),
        "cispo": lambda x: losses.cispo(x, OLD, ADV, MASK),
        "decoupled_ppo": lambda x: losses.decoupled_ppo(x, OLD, behaviour, ADV, MASK),
    }[name]
    eager, jitted = fn(logp), jax.jit(fn)(logp)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
    assert set(jitted[1]) == set(eager[1])
    np.testing.assert_allclose(_grad(jax.jit(fn), logp), _grad(fn, logp), rtol=1e-6, atol=1e-9)


# -- rollout corrections -------------------------------------------------------------------------

# δ = old − behaviour per token: row 0 (length 2) [ln 3, −ln 4]; row 1 (length 3) [0.1, 0.2, −0.1].
DELTA = np.array([[math.log(3.0), -math.log(4.0), 0.0], [0.1, 0.2, -0.1]], np.float32)
BEHAVIOUR = (OLD - DELTA).astype(np.float32)


def _weights(mode, **bounds):
    weights, metrics = losses.rollout_correction(OLD, BEHAVIOUR, MASK, mode, **bounds)
    return np.asarray(weights), metrics


def test_rollout_corrections_match_hand_computed_weights():
    r = np.exp(DELTA) * MASK                          # token ratios π_old/π_beh (0 when masked)
    seq = np.exp([math.log(3 / 4), 0.2])              # row products
    geo = np.exp([math.log(3 / 4) / 2, 0.2 / 3])
    rows = MASK * 1.0
    cases = {
        "tis": np.minimum(r, 2.0),
        "seq_tis": np.minimum(seq, 2.0)[:, None] * rows,
        "mis": np.where(r <= 2.0, r, 0.0),
        "seq_mis": np.where((seq >= 0.5) & (seq <= 2.0), seq, 0.0)[:, None] * rows,
        "geo_mask": ((geo >= 0.999) & (geo <= 1.001)).astype(float)[:, None] * rows,
        "icepop": np.where((r >= 0.5) & (r <= 5.0), r, 0.0),
    }
    for mode, want in cases.items():
        got, metrics = _weights(mode)
        np.testing.assert_allclose(got, want * MASK, rtol=1e-5, err_msg=mode)
        jitted = jax.jit(losses.rollout_correction, static_argnames="mode")(
            OLD, BEHAVIOUR, MASK, mode=mode)[0]
        np.testing.assert_allclose(jitted, got, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(metrics["masked_fraction"],
                                   np.sum((want == 0) * MASK) / MASK.sum(), err_msg=mode)
    # Row 0's 3 and 1/4 are outside the geometric band, row 1's mean 0.2/3 too: all masked.
    assert float(_weights("geo_mask")[1]["masked_fraction"]) == 1.0
    got, _ = _weights("icepop", low=0.2, high=2.5)
    np.testing.assert_allclose(got, np.where((r >= 0.2) & (r <= 2.5), r, 0.0), rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(losses.CORRECTIONS))
def test_rollout_corrections_are_the_identity_when_sampler_and_trainer_agree(mode):
    weights, metrics = losses.rollout_correction(OLD, OLD, MASK, mode)
    np.testing.assert_array_equal(np.asarray(weights), MASK)
    assert float(metrics["masked_fraction"]) == 0.0
    assert abs(float(metrics["mismatch_kl"])) < 1e-7


def test_rollout_correction_bounds_are_checked():
    with pytest.raises(ValueError, match="unknown rollout correction"):
        losses.correction_bounds("is")
    with pytest.raises(ValueError, match="low <= high"):
        losses.correction_bounds("icepop", 3.0, 2.0)
    with pytest.raises(ValueError, match="truncation"):
        losses.correction_bounds("tis", high=0.0)
    assert losses.correction_bounds("seq_mis") == (0.5, 2.0)


def test_scaling_logp_gradients_weights_each_tokens_clipped_term():
    """The trainer applies the weights through ``scale_gradient``: for PPO this must equal the
    gradient of Σ w_t ℓ_t / Σ m (verl's form), while the loss value is unchanged."""
    logp = _shifted([[0.3, -0.25, 0.0], [0.1, -0.1, 0.4]])
    weights, _ = _weights("icepop")

    def weighted_by_hand(x):
        ratio = jnp.exp(x - OLD)
        token = jnp.maximum(-ADV[:, None] * ratio, -ADV[:, None] * jnp.clip(ratio, 0.8, 1.2))
        return jnp.sum(weights * token * MASK) / MASK.sum()

    def scaled(x):
        return losses.ppo_clip(losses.scale_gradient(x, weights), OLD, ADV, MASK)[0]

    np.testing.assert_allclose(jax.grad(scaled)(logp), jax.grad(weighted_by_hand)(logp),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(scaled(logp), losses.ppo_clip(logp, OLD, ADV, MASK)[0])
    # GSPO: the weighted GSPO-token objective of verl.
    seq_logp = _shifted([[1e-4, 0.0, 0.0], [-1e-4, 2e-4, 0.0]])

    def gspo_token_weighted(x):
        s = jax.lax.stop_gradient(jnp.exp(jnp.sum((x - OLD) * MASK, -1) / MASK.sum(-1)))
        token_ratio = s[:, None] * jnp.exp(x - jax.lax.stop_gradient(x))
        token = jnp.maximum(-ADV[:, None] * token_ratio,
                            -ADV[:, None] * jnp.clip(token_ratio, 1 - 3e-4, 1 + 4e-4))
        return jnp.mean(jnp.sum(weights * token * MASK, -1) / MASK.sum(-1))

    np.testing.assert_allclose(
        jax.grad(lambda x: losses.gspo(losses.scale_gradient(x, weights), OLD, ADV, MASK)[0])(
            seq_logp), jax.grad(gspo_token_weighted)(seq_logp), rtol=1e-5, atol=1e-9)
