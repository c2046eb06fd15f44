"""Loss library, part 2: REINFORCE, TOPR, ReMix (Mix-PPG, KL-Convex) and ROVER with its one-pass
log-prob / vocabulary-mean helper. Hand-computed fixtures run with and without jax.jit; gradient
identities; padding invariance; extreme inputs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, *args, jit=False, **kwargs):
    bound = functools.partial(fn, **kwargs)
    return jax.jit(bound)(*args) if jit else bound(*args)


def grad_of(fn, *args, **kwargs):
    return jax.grad(lambda lp: fn(lp, *args, **kwargs)[0])


def assert_finite_tree(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), tree


def random_batch(seed, batch=4, length=5):
    rng = np.random.default_rng(seed)
    logp = jnp.asarray(-rng.uniform(0.1, 3.0, size=(batch, length)), jnp.float32)
    other = logp + jnp.asarray(rng.normal(scale=0.4, size=(batch, length)), jnp.float32)
    lengths = rng.integers(1, length + 1, size=batch)
    mask = jnp.asarray(np.arange(length)[None, :] < lengths[:, None], jnp.float32)
    return logp, other, mask


def pad_rows(x, rows, value):
    pad = jnp.full((rows,) + x.shape[1:], value, jnp.asarray(x).dtype)
    return jnp.concatenate([jnp.asarray(x), pad])


# ---------------------------------------------------------------------------------------------
# TOPR
# ---------------------------------------------------------------------------------------------

# Row 0: positive (R = +1), π = [.5, .5]; its behaviour ratio (4 per token) is ignored: weight 1.
# Row 1: negative (R = −1), π = [.2, .1], μ = [.4, .2]: token ratios [.5, .5], trajectory ratio .25.
#   ℓ0 = −1 · mean(log .5, log .5)                = 0.6931472
#   ℓ1 = −α · (−1) · mean(log .2, log .1) = α · (−1.9560115)
#   sequence:          α = .25 -> ℓ1 = −0.4890029, loss = (ℓ0 + ℓ1) / 2 =  0.1020722
#   sequence_geo_mean: α = .5  -> ℓ1 = −0.9780057, loss               = −0.1424293
#   token:             α_t = .5 on both tokens -> same as geo-mean    = −0.1424293
TOPR_LOGP = jnp.log(jnp.array([[0.5, 0.5], [0.2, 0.1]]))
TOPR_BEHAVIOUR = jnp.log(jnp.array([[0.125, 0.125], [0.4, 0.2]]))
TOPR_REWARDS = jnp.array([1.0, -1.0])
TOPR_MASK = jnp.ones((2, 2))


@JIT
@pytest.mark.parametrize("ratio_level, expected, negative_weight", [
    ("sequence", 0.1020722, 0.25),
    ("sequence_geo_mean", -0.1424293, 0.5),
    ("token", -0.1424293, 0.5),
])
def test_topr_hand_values(ratio_level, expected, negative_weight, jit):
    loss, metrics = call(losses.topr, TOPR_LOGP, TOPR_BEHAVIOUR, TOPR_REWARDS, TOPR_MASK, jit=jit,
                         ratio_level=ratio_level)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["negative_weight_mean"], negative_weight, rtol=1e-5)
    np.testing.assert_allclose(metrics["positive_fraction"], 0.5)
    np.testing.assert_allclose(metrics["weight_max"], 1.0)
    np.testing.assert_allclose(metrics["negative_truncated_fraction"], 0.0)


@JIT
def test_topr_baseline_and_gradient_hand_values(jit):
    # c = 0.5: ℓ0 = −(1 − .5) · mean log π0 = 0.3465736; ℓ1 = .25 · 1.5 · (−1.9560115) = −0.7335043.
    loss, _ = call(losses.topr, TOPR_LOGP, TOPR_BEHAVIOUR, TOPR_REWARDS, TOPR_MASK, jit=jit,
                   baseline=0.5)
    np.testing.assert_allclose(loss, (0.3465736 - 0.7335043) / 2, rtol=1e-5)
    # d loss / d logp: row 0 −1 / (2 seqs · 2 tokens) = −0.25; row 1 +.25 / 4 = 0.0625.
    grad = grad_of(losses.topr, TOPR_BEHAVIOUR, TOPR_REWARDS, TOPR_MASK)(TOPR_LOGP)
    np.testing.assert_allclose(grad, [[-0.25, -0.25], [0.0625, 0.0625]], rtol=1e-6)


def test_topr_ratio_above_one_is_truncated_for_negatives():
    # μ below π on the negative: trajectory ratio 4 is truncated to b⁻ = 1.
    loss, metrics = losses.topr(TOPR_LOGP, TOPR_LOGP - math.log(2.0), TOPR_REWARDS, TOPR_MASK)
    np.testing.assert_allclose(metrics["negative_weight_max"], 1.0)
    np.testing.assert_allclose(metrics["negative_truncated_fraction"], 1.0)
    del loss


def test_topr_positives_have_the_sft_gradient():
    logp, behaviour, mask = random_batch(0)
    rewards = jnp.ones(4)
    topr_grad = grad_of(losses.topr, behaviour, rewards, mask)(logp)
    nll_grad = grad_of(losses.nll, mask, agg="seq-mean-token-mean")(logp)
    np.testing.assert_allclose(topr_grad, nll_grad, rtol=1e-6)


@pytest.mark.parametrize("ratio_level", losses.RATIO_LEVELS)
def test_topr_on_policy_equals_reinforce(ratio_level):
    logp, _, mask = random_batch(1)
    rewards = jnp.array([1.0, -1.0, -1.0, 1.0])
    behaviour = logp  # π = μ: every weight is 1
    topr_loss, _ = losses.topr(logp, behaviour, rewards, mask, baseline=0.3,
                               ratio_level=ratio_level)
    reinforce_loss, _ = losses.reinforce(logp, rewards, mask, baseline=0.3)
    np.testing.assert_allclose(topr_loss, reinforce_loss, rtol=1e-6)
    np.testing.assert_allclose(
        grad_of(losses.topr, behaviour, rewards, mask, baseline=0.3, ratio_level=ratio_level)(logp),
        grad_of(losses.reinforce, rewards, mask, baseline=0.3)(logp), rtol=1e-6)


def test_topr_negative_weight_decays_as_pi_moves_away_from_mu():
    behaviour = jnp.log(jnp.full((1, 3), 0.3))
    mask = jnp.ones((1, 3))
    rewards = jnp.array([-1.0])
    norms = []
    for shift in (0.0, 0.5, 1.0, 2.0, 5.0):
        logp = behaviour - shift            # π(τ)/μ(τ) = exp(−3·shift)
        grad = grad_of(losses.topr, behaviour, rewards, mask)(logp)
        # Every token's gradient is α · R · (−1/L) = exp(−3·shift) / 3.
        np.testing.assert_allclose(grad, jnp.full((1, 3), math.exp(-3 * shift) / 3), rtol=1e-5)
        norms.append(float(jnp.abs(grad).sum()))
    assert all(a > b for a, b in zip(norms, norms[1:]))
    # Naive REINFORCE (a⁻ = b⁻ = 1) keeps full weight however far π has moved away.
    far = grad_of(losses.topr, behaviour, rewards, mask, negative_bounds=(1.0, 1.0))(behaviour - 5)
    np.testing.assert_allclose(far, jnp.full((1, 3), 1 / 3), rtol=1e-6)


def test_topr_generalised_bounds_tis_and_naive():
    # Positive row with μ = [1, 1]: trajectory ratio .25. TOPR gives it weight 1 (a⁺ = b⁺ = 1);
    # TIS (a⁺ = 0, b⁺ = 1) gives it .25: ℓ0 = .25 · 0.6931472 = 0.1732868, and the negative row is
    # unchanged (ℓ1 = −0.4890029), so loss = (0.1732868 − 0.4890029) / 2 = −0.1578581.
    behaviour = TOPR_BEHAVIOUR.at[0].set(0.0)
    loss_topr, _ = losses.topr(TOPR_LOGP, behaviour, TOPR_REWARDS, TOPR_MASK)
    loss_tis, metrics = losses.topr(TOPR_LOGP, behaviour, TOPR_REWARDS, TOPR_MASK,
                                    positive_bounds=(0.0, 1.0))
    np.testing.assert_allclose(loss_topr, 0.1020722, rtol=1e-5)
    np.testing.assert_allclose(loss_tis, -0.1578581, rtol=1e-5)
    np.testing.assert_allclose(metrics["weight_mean"], 0.25, rtol=1e-5)
    # Naive REINFORCE (a⁻ = b⁻ = 1): ℓ1 = −1.9560115 -> loss = (0.6931472 − 1.9560115) / 2.
    loss_naive, _ = losses.topr(TOPR_LOGP, behaviour, TOPR_REWARDS, TOPR_MASK,
                                negative_bounds=(1.0, 1.0))
    np.testing.assert_allclose(loss_naive, (0.6931472 - 1.9560115) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="negative_bounds"):
        losses.topr(TOPR_LOGP, TOPR_BEHAVIOUR, TOPR_REWARDS, TOPR_MASK, negative_bounds=(1.0, 0.5))


@pytest.mark.parametrize("ratio_level", losses.RATIO_LEVELS)
def test_topr_extreme_inputs_finite(ratio_level):
    logp = jnp.array([[0.0, -1000.0], [-1000.0, 0.0], [0.0, 0.0], [-3.0, -1.0]])
    behaviour = jnp.array([[-1000.0, 0.0], [0.0, -1000.0], [0.0, 0.0], [-1.0, -1.0]])
    mask = jnp.array([[1, 1], [1, 1], [0, 0], [1, 0]])
    rewards = jnp.array([-1.0, 1.0, -1.0, -1.0])
    (loss, metrics), grad = jax.value_and_grad(
        lambda lp: losses.topr(lp, behaviour, rewards, mask, ratio_level=ratio_level),
        has_aux=True)(logp)
    assert_finite_tree((loss, metrics, grad))


def test_topr_and_reinforce_padding_rows_change_nothing():
    logp, behaviour, mask = random_batch(2)
    rewards = jnp.array([1.0, -1.0, -1.0, 1.0])
    p_logp, p_beh = pad_rows(logp, 3, jnp.nan), pad_rows(behaviour, 3, -jnp.inf)
    p_rewards, p_mask = pad_rows(rewards, 3, -1.0), pad_rows(mask, 3, 0.0)
    for level in losses.RATIO_LEVELS:
        for agg in losses.AGGREGATIONS:
            fn = functools.partial(losses.topr, ratio_level=level, agg=agg, baseline=0.1)
            (loss, metrics), grad = jax.value_and_grad(
                lambda lp, fn=fn: fn(lp, behaviour, rewards, mask), has_aux=True)(logp)
            (ploss, pmetrics), pgrad = jax.value_and_grad(
                lambda lp, fn=fn: fn(lp, p_beh, p_rewards, p_mask), has_aux=True)(p_logp)
            np.testing.assert_allclose(ploss, loss, rtol=1e-6)
            np.testing.assert_allclose(pgrad[:4], grad, rtol=1e-6)
            np.testing.assert_array_equal(pgrad[4:], 0.0)
            for key in metrics:
                np.testing.assert_allclose(pmetrics[key], metrics[key], rtol=1e-6, err_msg=key)
    loss, _ = losses.reinforce(logp, rewards, mask)
    ploss, _ = losses.reinforce(p_logp, p_rewards, p_mask)
    np.testing.assert_allclose(ploss, loss, rtol=1e-6)


def test_topr_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"rewards must be a per-sequence array of shape \[2\]"):
        losses.topr(TOPR_LOGP, TOPR_BEHAVIOUR, jnp.ones((2, 2)), TOPR_MASK)
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        losses.topr(TOPR_LOGP, TOPR_BEHAVIOUR[:1], TOPR_REWARDS, TOPR_MASK)
    with pytest.raises(ValueError, match="ratio_level"):
        losses.topr(TOPR_LOGP, TOPR_BEHAVIOUR, TOPR_REWARDS, TOPR_MASK, ratio_level="seq")


@JIT
def test_reinforce_hand_values(jit):
    # ℓ_i = −(R_i − b) · mean_t logp: row 0 −(1 − .5)·log .5, row 1 −(−1 − .5)·mean(log .2, log .1).
    loss, metrics = call(losses.reinforce, TOPR_LOGP, TOPR_REWARDS, TOPR_MASK, jit=jit,
                         baseline=0.5)
    expected = (0.5 * math.log(2.0) + 1.5 * (-1.9560115)) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["advantage_mean"], -0.5)


# ---------------------------------------------------------------------------------------------
# ReMix
# ---------------------------------------------------------------------------------------------

@JIT
def test_mix_ppg_hand_values(jit):
    # Centre c = π_k / π_beh = 2 on both tokens; ε = 0.2 -> clip range [1.8, 2.2].
    #   t0: r = 2.5, A = +1: max(−2.5, −2.2) = −2.2 (clipped)
    #   t1: r = 1.5, A = −1: max(1.5, 1.8) = 1.8 (clipped)
    # token-mean: (−2.2 + 1.8) / 2 = −0.2.
    behaviour = jnp.log(jnp.array([[0.1, 0.2]]))
    old = behaviour + math.log(2.0)
    logp = behaviour + jnp.log(jnp.array([[2.5, 1.5]]))
    loss, metrics = call(losses.mix_ppg, logp, old, behaviour, jnp.array([[1.0, -1.0]]),
                         jnp.ones((1, 2)), jit=jit, replayed=jnp.array([True]))
    np.testing.assert_allclose(loss, -0.2, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], 1.0)
    np.testing.assert_allclose(metrics["behaviour_ratio_mean"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_max"], 2.5, rtol=1e-5)
    np.testing.assert_allclose(metrics["off_policy_fraction"], 1.0)
    # Inside the behaviour-centred region the gradient is −A·r / 2 per token: r = 2.1, A = 1.
    grad = grad_of(losses.mix_ppg, old, behaviour, jnp.ones((1,)), jnp.ones((1, 2)))(
        behaviour + math.log(2.1))
    np.testing.assert_allclose(grad, [[-1.05, -1.05]], rtol=1e-5)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_mix_ppg_on_policy_equals_ppo_clip(dual_clip, agg):
    logp, old, mask = random_batch(3)
    adv = jnp.array([1.0, -2.0, 0.5, -0.1])
    options = dict(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, agg=agg)
    mix_loss, mix_metrics = losses.mix_ppg(logp, old, old, adv, mask, **options)
    ppo_loss, ppo_metrics = losses.ppo_clip(logp, old, adv, mask, **options)
    np.testing.assert_allclose(mix_loss, ppo_loss, rtol=1e-6)
    np.testing.assert_allclose(grad_of(losses.mix_ppg, old, old, adv, mask, **options)(logp),
                               grad_of(losses.ppo_clip, old, adv, mask, **options)(logp),
                               rtol=1e-6)
    for key in ppo_metrics:
        np.testing.assert_allclose(mix_metrics[key], ppo_metrics[key], rtol=1e-6, err_msg=key)
    assert "off_policy_fraction" not in mix_metrics


def test_mix_ppg_off_policy_fraction_counts_replayed_rows_not_round_off():
    # Two fresh rows whose stored log-probs differ from the recomputed ones by sampler/trainer
    # round-off (c ≠ 1 by ~1e-6), and one replayed row: a third of the rows, half the tokens.
    old = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5], [0.3, 0.4]]))
    behaviour = old + jnp.array([[1e-6, -2e-6], [3e-7, 0.0], [0.2, -0.1]])
    mask = jnp.array([[1, 0], [1, 0], [1, 1]])
    _, metrics = losses.mix_ppg(old, old, behaviour, jnp.ones(3), mask,
                                replayed=jnp.array([False, False, True]))
    np.testing.assert_allclose(metrics["off_policy_fraction"], 0.5)
    _, fresh = losses.mix_ppg(old, old, behaviour, jnp.ones(3), mask, replayed=jnp.zeros(3))
    assert float(fresh["off_policy_fraction"]) == 0.0


def test_mix_ppg_extreme_and_padding():
    logp = jnp.array([[1000.0, -1000.0], [0.0, 0.0]])
    old = jnp.array([[-1000.0, 1000.0], [0.0, 0.0]])
    behaviour = jnp.array([[0.0, 0.0], [1000.0, -1000.0]])
    mask = jnp.array([[1, 1], [1, 0]])
    for adv in (jnp.array([1.0, -1.0]), jnp.array([-1.0, 1.0])):
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp, adv=adv: losses.mix_ppg(lp, old, behaviour, adv, mask, dual_clip=3.0),
            has_aux=True)(logp)
        assert_finite_tree((loss, metrics, grad))
    logp, old, mask = random_batch(4)
    behaviour = old - 0.3
    adv = jnp.array([1.0, -2.0, 0.5, -0.1])
    loss, _ = losses.mix_ppg(logp, old, behaviour, adv, mask)
    ploss, _ = losses.mix_ppg(pad_rows(logp, 2, jnp.nan), pad_rows(old, 2, jnp.inf),
                              pad_rows(behaviour, 2, 0.0), pad_rows(adv, 2, 3.0),
                              pad_rows(mask, 2, 0.0))
    np.testing.assert_allclose(ploss, loss, rtol=1e-6)


@JIT
def test_kl_convex_lambda_schedule(jit):
    steps = jnp.array([0, 50, 51, 60, 61, 70, 90, 91, 1000])
    # λ(t) = max(1 − 0.1·⌈max(t − 50, 0)/10⌉, 0.5)
    expected = [1.0, 1.0, 0.9, 0.9, 0.8, 0.8, 0.6, 0.5, 0.5]
    np.testing.assert_allclose(call(losses.kl_convex_lambda, steps, jit=jit), expected, rtol=1e-6)
    assert float(losses.kl_convex_lambda(75)) == pytest.approx(0.7)


@JIT
def test_kl_convex_reduces_to_ordinary_kl_and_mixes_linearly(jit):
    logp, base, mask = random_batch(5)
    prev = logp - 0.2
    kl_base = losses.aggregate(losses.kl_k3(logp, base), mask, "token-mean")
    kl_prev = losses.aggregate(losses.kl_k3(logp, prev), mask, "token-mean")
    loss, metrics = call(losses.kl_convex, logp, base, prev, mask, jit=jit, lam=1.0)
    np.testing.assert_allclose(loss, kl_base, rtol=1e-6)
    loss, _ = call(losses.kl_convex, logp, base, base, mask, jit=jit, lam=0.3)
    np.testing.assert_allclose(loss, kl_base, rtol=1e-6)
    loss, metrics = call(losses.kl_convex, logp, base, prev, mask, jit=jit, lam=0.3)
    np.testing.assert_allclose(loss, 0.3 * kl_base + 0.7 * kl_prev, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_prev"], kl_prev, rtol=1e-6)
    # Gradient with λ = 1 equals that of the plain k3 penalty.
    np.testing.assert_allclose(
        grad_of(losses.kl_convex, base, prev, mask, lam=1.0)(logp),
        jax.grad(lambda lp: losses.aggregate(losses.kl_k3(lp, base), mask))(logp), rtol=1e-6)
    # λ may be a traced schedule value.
    traced = jax.jit(lambda s: losses.kl_convex(logp, base, prev, mask,
                                                lam=losses.kl_convex_lambda(s))[0])
    np.testing.assert_allclose(traced(91), 0.5 * kl_base + 0.5 * kl_prev, rtol=1e-5)


def test_kl_convex_extreme_inputs_finite():
    logp = jnp.array([[1000.0, -1000.0, 0.0]])
    (loss, metrics), grad = jax.value_and_grad(
        lambda lp: losses.kl_convex(lp, -logp, jnp.zeros_like(logp), jnp.array([[1, 1, 0]]),
                                    lam=0.5), has_aux=True)(logp)
    assert_finite_tree((loss, metrics, grad))


def test_remix_composition_equals_its_parts():
    logp, old, mask = random_batch(6)
    behaviour, base, prev = old - 0.1, logp - 0.5, old
    adv = jnp.array([1.0, -1.0, 0.5, -0.5])
    entropy = jnp.full(logp.shape, 2.0)
    loss, metrics = losses.remix(logp, old, behaviour, adv, mask, base_logp=base, prev_logp=prev,
                                 step=61, kl_coef=0.01, entropy=entropy, entropy_coef=0.001)
    pg, _ = losses.mix_ppg(logp, old, behaviour, adv, mask)
    kl, _ = losses.kl_convex(logp, base, prev, mask, lam=0.8)
    np.testing.assert_allclose(loss, pg + 0.01 * kl - 0.001 * 2.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl_convex_lambda"], 0.8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# ROVER and the one-pass helper
# ---------------------------------------------------------------------------------------------

def test_token_log_probs_and_vocab_mean_equals_naive_log_softmax():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(2, 3, 11)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
    for temperature in (1.0, 0.6):
        logp, vocab_mean = jax.jit(functools.partial(
            losses.token_log_probs_and_vocab_mean, temperature=temperature))(logits, tokens)
        full = jax.nn.log_softmax(logits / temperature, axis=-1)
        np.testing.assert_allclose(logp, jnp.take_along_axis(full, tokens[..., None], -1)[..., 0],
                                   rtol=1e-5)
        np.testing.assert_allclose(vocab_mean, jnp.mean(full, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(losses.token_log_probs(logits, tokens, temperature=temperature),
                                   logp, rtol=1e-6)
    # bf16 logits are upcast; one logsumexp (one max-reduction) over the vocabulary in the graph.
    logp16, _ = losses.token_log_probs_and_vocab_mean(logits.astype(jnp.bfloat16), tokens)
    assert logp16.dtype == jnp.float32
    jaxpr = str(jax.make_jaxpr(losses.token_log_probs_and_vocab_mean)(logits, tokens))
    assert jaxpr.count("reduce_max") == 1, jaxpr
    with pytest.raises(ValueError, match="tokens must be"):
        losses.token_log_probs_and_vocab_mean(logits, tokens[:, :2])


@JIT
def test_rover_hand_values(jit):
    # log π/π_old = [.1, .2, (masked)], M_θ − M_old = [.3, .4, .5], r̃ = .5, ρ = β_Q = 1.
    #   Q = [.1, .2]; Q̂_0 = .5 + .4 = .9 (successor t = 1); Q̂_1 = .5 (t = 2 is masked: terminal)
    #   loss = ((.1 − .9)² + (.2 − .5)²) / 2 = (.64 + .09) / 2 = .365
    #   dL/dlogp = 2 (Q − Q̂) / 2 = [−.8, −.3]
    old = jnp.array([[-1.0, -2.0, -3.0]])
    logp = old + jnp.array([[0.1, 0.2, 7.0]])
    old_mean = jnp.array([[-5.0, -5.0, -5.0]])
    vocab_mean = old_mean + jnp.array([[0.3, 0.4, 0.5]])
    mask = jnp.array([[1, 1, 0]])
    rewards = jnp.array([0.5])
    loss, metrics = call(losses.rover, logp, old, vocab_mean, old_mean, rewards, mask, jit=jit)
    np.testing.assert_allclose(loss, 0.365, rtol=1e-5)
    np.testing.assert_allclose(metrics["q_mean"], 0.15, rtol=1e-5)
    np.testing.assert_allclose(metrics["target_mean"], 0.7, rtol=1e-5)
    grad_logp, grad_mean = jax.grad(
        lambda lp, vm: losses.rover(lp, old, vm, old_mean, rewards, mask)[0], argnums=(0, 1))(
            logp, vocab_mean)
    np.testing.assert_allclose(grad_logp, [[-0.8, -0.3, 0.0]], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_mean, 0.0)       # the target is under stop-gradient
    # ρ = 2: Q = [.2, .4], Q̂_0 = .5 + 2·.4 = 1.3 -> ((.2 − 1.3)² + (.4 − .5)²) / 2 = .61.
    loss, _ = call(losses.rover, logp, old, vocab_mean, old_mean, rewards, mask, jit=jit, rho=2.0)
    np.testing.assert_allclose(loss, 0.61, rtol=1e-5)
    # β_Q = 0: Q̂ = r̃ -> ((.1 − .5)² + (.2 − .5)²) / 2 = .125.
    loss, _ = call(losses.rover, logp, old, vocab_mean, old_mean, rewards, mask, jit=jit,
                   beta_q=0.0)
    np.testing.assert_allclose(loss, 0.125, rtol=1e-5)


def test_rover_rewards_paper_and_code_readings():
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(losses.rover_rewards(rewards, 4), [0.75, -0.25, -0.25, -0.25])
    np.testing.assert_allclose(losses.rover_rewards(rewards, 4, std_normalize=True),
                               [1.5, -0.5, -0.5, -0.5], rtol=1e-5)


def test_rover_end_to_end_from_logits_padding_and_extremes():
    rng = np.random.default_rng(8)
    logits = jnp.asarray(rng.normal(size=(3, 4, 7)), jnp.float32)
    old_logits = logits + jnp.asarray(rng.normal(scale=0.1, size=(3, 4, 7)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 7, size=(3, 4)))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    rewards = losses.rover_rewards(jnp.array([1.0, 0.0, 1.0]), 3)
    old_logp, old_mean = losses.token_log_probs_and_vocab_mean(old_logits, tokens)

    def loss_from_logits(z, t, o, om, r, m):
        logp, vocab_mean = losses.token_log_probs_and_vocab_mean(z, t)
        return losses.rover(logp, o, vocab_mean, om, r, m)[0]

    loss, grad = jax.value_and_grad(loss_from_logits)(logits, tokens, old_logp, old_mean,
                                                       rewards, mask)
    ploss, pgrad = jax.value_and_grad(loss_from_logits)(
        pad_rows(logits, 2, 0.0), pad_rows(tokens, 2, 0), pad_rows(old_logp, 2, jnp.nan),
        pad_rows(old_mean, 2, jnp.inf), pad_rows(rewards, 2, 1.0), pad_rows(mask, 2, 0))
    np.testing.assert_allclose(ploss, loss, rtol=1e-6)
    np.testing.assert_allclose(pgrad[:3], grad, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(pgrad[3:], 0.0)
    extreme = jnp.array([[1000.0, -1000.0, 0.0, 0.0]] * 3)
    (eloss, metrics), egrad = jax.value_and_grad(
        lambda lp: losses.rover(lp, -extreme, extreme, -extreme, rewards, mask), has_aux=True)(
            extreme)
    assert_finite_tree((eloss, metrics, egrad))


def test_rover_clip_is_one_sided_on_q_as_the_official_code():
    # Four one-token rows with old_logp = vocab means = 0, so the target Q̂ = r̃ and Q = ρ·logp.
    # ε = 0.2: h = log 1.2 = 0.182322, l = log 0.8 = −0.223144.
    logp = jnp.array([[0.5], [0.5], [-0.5], [0.1]])
    zeros, mask = jnp.zeros((4, 1)), jnp.ones((4, 1))
    rewards = jnp.array([0.0, 1.0, 0.0, 0.5])

    def loss(lp, rho=1.0):
        return losses.rover(lp, zeros, zeros, zeros, rewards, mask, rho=rho, clip_eps=0.2)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(logp)
    high = math.log(1.2)
    # Row 0: Q = 0.5 above the band but the target 0 pulls it back in: not clipped, full gradient.
    # Row 1: Q = 0.5 above the band and the target 1 pushes further out: Q -> h, gradient 0.
    # Row 2: Q = −0.5 below the band, target 0 pulls back in: not clipped. Row 3: inside the band.
    per_token = np.array([0.25, (high - 1.0) ** 2, 0.25, 0.16])
    np.testing.assert_allclose(value, per_token.mean(), rtol=1e-5)
    np.testing.assert_allclose(grad[:, 0], [0.25, 0.0, -0.25, -0.2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([metrics["clip_high_fraction"], metrics["clip_low_fraction"]],
                               [0.25, 0.0])
    # The bound applies to Q = ρ·log-ratio, not to the log-ratio: with ρ = 2 a log-ratio of 0.1
    # gives Q = 0.2 > h, and the target 1 clips it.
    one = (logp[3:], zeros[:1], zeros[:1], zeros[:1], jnp.array([1.0]), mask[:1])
    clipped, _ = losses.rover(*one, rho=2.0, clip_eps=0.2)
    np.testing.assert_allclose(clipped, (high - 1.0) ** 2, rtol=1e-5)
    unclipped, _ = losses.rover(*one, rho=2.0)
    np.testing.assert_allclose(unclipped, (0.2 - 1.0) ** 2, rtol=1e-5)
