"""Loss library, part 1: aggregation, masking, KL estimators, advantages, PPO clip, value loss and
the GRPO / Dr. GRPO / DAPO compositions. Hand-computed fixtures run with and without jax.jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, *args, jit=False, **kwargs):
    """fn(*args, **kwargs), optionally through jax.jit with the keyword options static."""
    bound = functools.partial(fn, **kwargs)
    return jax.jit(bound)(*args) if jit else bound(*args)


def assert_finite_tree(tree):
    for leaf in jax.tree.leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), tree


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

# Row 0 has 3 tokens with losses 1, 2, 3; row 1 one token with loss 4 (its padding holds garbage).
TOKEN_LOSSES = jnp.array([[1.0, 2.0, 3.0], [4.0, jnp.nan, jnp.inf]])
MASK = jnp.array([[1, 1, 1], [1, 0, 0]])


@JIT
@pytest.mark.parametrize("agg, max_len, expected", [
    ("token-mean", None, 2.5),                       # (1+2+3+4) / 4 tokens
    ("seq-mean-token-mean", None, 3.0),              # (6/3 + 4/1) / 2 sequences
    ("seq-mean-token-sum", None, 5.0),               # (6 + 4) / 2 sequences
    ("seq-mean-token-sum-norm", None, 10.0 / 6.0),   # 10 / (2 sequences * T=3)
    ("seq-mean-token-sum-norm", 5, 1.0),             # 10 / (2 sequences * L_max=5)
])
def test_aggregate_hand_values(agg, max_len, expected, jit):
    value = call(losses.aggregate, TOKEN_LOSSES, MASK, jit=jit, agg=agg, max_len=max_len)
    np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_aggregation_modes_differ_exactly_as_defined():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], np.float32)
    lengths = mask.sum(1)
    sums = (values * mask).sum(1)
    agg = {name: float(losses.aggregate(values, mask, name)) for name in losses.AGGREGATIONS}
    np.testing.assert_allclose(agg["token-mean"], sums.sum() / lengths.sum(), rtol=1e-6)
    np.testing.assert_allclose(agg["seq-mean-token-mean"], np.mean(sums / lengths), rtol=1e-6)
    np.testing.assert_allclose(agg["seq-mean-token-sum"], np.mean(sums), rtol=1e-6)
    # The Dr. GRPO normaliser is the per-sequence sum divided by the constant L_max.
    np.testing.assert_allclose(agg["seq-mean-token-sum-norm"] * 6, agg["seq-mean-token-sum"],
                               rtol=1e-6)
    # With equal lengths the token mean and the mean of per-sequence means coincide.
    full = np.ones_like(mask)
    np.testing.assert_allclose(losses.aggregate(values, full, "token-mean"),
                               losses.aggregate(values, full, "seq-mean-token-mean"), rtol=1e-6)


@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_aggregate_ignores_fully_masked_rows_and_empty_batch(agg):
    padded_losses = jnp.concatenate([TOKEN_LOSSES, jnp.full((2, 3), jnp.nan)])
    padded_mask = jnp.concatenate([MASK, jnp.zeros((2, 3), MASK.dtype)])
    np.testing.assert_allclose(losses.aggregate(padded_losses, padded_mask, agg),
                               losses.aggregate(TOKEN_LOSSES, MASK, agg), rtol=1e-6)
    assert float(losses.aggregate(TOKEN_LOSSES, jnp.zeros_like(MASK), agg)) == 0.0


def test_aggregate_rejects_unknown_mode_and_bad_shapes():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        losses.aggregate(TOKEN_LOSSES, MASK, "mean")
    with pytest.raises(ValueError, match=r"mask has shape \[2, 2\]"):
        losses.aggregate(TOKEN_LOSSES, MASK[:, :2], "token-mean")


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------

def test_kl_estimators_hand_values():
    # u = ref − logp = log 2: k1 = −log 2, k2 = (log 2)^2 / 2, k3 = 2 − log 2 − 1.
    logp = jnp.log(jnp.array([[0.25]]))
    ref = jnp.log(jnp.array([[0.5]]))
    log2 = math.log(2.0)
    np.testing.assert_allclose(losses.kl_k1(logp, ref), [[-log2]], rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k2(logp, ref), [[log2 ** 2 / 2]], rtol=1e-6)
    np.testing.assert_allclose(losses.kl_k3(logp, ref), [[1.0 - log2]], rtol=1e-6)
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k2"), [[log2 ** 2 / 2]], rtol=1e-6)
    # verl's low_var_kl clamp: u = 5 gives e^5 − 6 ≈ 142.4, clipped to 10.
    np.testing.assert_allclose(losses.kl_k3(jnp.zeros((1, 1)), jnp.full((1, 1), 5.0), clamp=10.0),
                               [[10.0]])
    with pytest.raises(ValueError, match="k4"):
        losses.kl_estimate(logp, ref, "k4")


def test_kl_estimators_finite_for_extreme_log_ratios():
    logp = jnp.array([[0.0, -1000.0, 0.0]])
    ref = jnp.array([[-1000.0, 0.0, 0.0]])
    for name in ("k1", "k2", "k3"):
        value, grad = jax.value_and_grad(lambda lp: losses.kl_estimate(lp, ref, name).sum())(logp)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), name


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

REWARDS = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])   # two groups of 4


@JIT
def test_group_advantages_hand_values(jit):
    # Group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.
    # Group 2: all equal -> advantage exactly 0 (zero variance must not give NaN).
    grpo = call(losses.grpo_advantages, REWARDS, jit=jit, group_size=4)
    np.testing.assert_allclose(grpo, [1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0], rtol=1e-5)
    dr = call(losses.grpo_advantages, REWARDS, jit=jit, group_size=4, std_normalize=False)
    np.testing.assert_allclose(dr, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], rtol=1e-6)
    # RLOO: r_i − mean of the other three.
    rloo = call(losses.rloo_advantages, REWARDS, jit=jit, group_size=4)
    np.testing.assert_allclose(rloo, [1, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(losses.informative_groups(REWARDS, 4), [True] * 4 + [False] * 4)


def test_group_advantages_validate_group_size():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        losses.grpo_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="at least 2"):
        losses.rloo_advantages(REWARDS, 1)


@JIT
def test_gae_hand_values(jit):
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.6, 0.7]])
    mask = jnp.ones((1, 3))
    # gamma = lam = 1: A_t = R − V_t, returns = 1.
    adv, ret = call(losses.gae, rewards, values, mask, jit=jit)
    np.testing.assert_allclose(adv, [[0.5, 0.4, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0]], rtol=1e-6)
    # gamma = 0.9, lam = 0.8: delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7] = [0.04, 0.03, 0.3];
    # A2 = 0.3, A1 = 0.03 + 0.72*0.3 = 0.246, A0 = 0.04 + 0.72*0.246 = 0.21712.
    adv, ret = call(losses.gae, rewards, values, mask, jit=jit, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv, [[0.21712, 0.246, 0.3]], rtol=1e-5)
    np.testing.assert_allclose(ret, [[0.71712, 0.846, 1.0]], rtol=1e-5)


def test_gae_skips_masked_tokens():
    # A masked token inside the response (e.g. a tool observation) is transparent.
    with_hole, _ = losses.gae(jnp.array([[0.0, 7.0, 1.0]]), jnp.array([[0.5, 99.0, 0.7]]),
                              jnp.array([[1, 0, 1]]), gamma=0.9, lam=0.8)
    without, _ = losses.gae(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.7]]), jnp.ones((1, 2)),
                            gamma=0.9, lam=0.8)
    np.testing.assert_allclose(with_hole[:, [0, 2]], without, rtol=1e-6)
    assert float(with_hole[0, 1]) == 0.0


def test_dapo_overlong_penalty_hand_values():
    # L_max = 20, L_cache = 4: no penalty up to 16, linear ramp to −1 at 20, −1 beyond.
    np.testing.assert_allclose(
        losses.dapo_overlong_penalty(jnp.array([10, 16, 18, 20, 21]), max_length=20,
                                     cache_length=4), [0, 0, -0.5, -1, -1])


def test_masked_whiten():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    white = losses.masked_whiten(x, mask)
    np.testing.assert_allclose(white, [[-math.sqrt(1.5), 0, math.sqrt(1.5), 0]], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# PPO clip
# ---------------------------------------------------------------------------------------------

# Ratios [1.5, 0.5, 1.1, 0.5, 3.0] with advantages [+1, +1, −1, −1, −1] and ε = 0.2:
#   t0: max(−1.5, −1.2) = −1.2 (clipped, high)   t1: max(−0.5, −0.8) = −0.5
#   t2: max(1.1, 1.1) = 1.1                      t3: max(0.5, 0.8) = 0.8 (clipped, low)
#   t4: max(3.0, 1.2) = 3.0 (dual clip c = 2 caps it at 2.0)
# token-mean: (−1.2 − 0.5 + 1.1 + 0.8 + 3.0) / 5 = 0.64; with dual clip 2.2 / 5 = 0.44.
RATIOS = jnp.array([[1.5, 0.5, 1.1, 0.5, 3.0]])
OLD_LOGP = jnp.array([[-1.0, -2.0, -0.5, -1.5, -3.0]])
PPO_LOGP = OLD_LOGP + jnp.log(RATIOS)
PPO_ADV = jnp.array([[1.0, 1.0, -1.0, -1.0, -1.0]])
PPO_MASK = jnp.ones((1, 5))


@JIT
def test_ppo_clip_hand_values(jit):
    loss, metrics = call(losses.ppo_clip, PPO_LOGP, OLD_LOGP, PPO_ADV, PPO_MASK, jit=jit)
    np.testing.assert_allclose(loss, 0.64, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], 0.4)
    np.testing.assert_allclose(metrics["clip_fraction_high"], 0.2)
    np.testing.assert_allclose(metrics["clip_fraction_low"], 0.2)
    np.testing.assert_allclose(metrics["ratio_max"], 3.0, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_min"], 0.5, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio_mean"], 6.6 / 5, rtol=1e-5)
    loss, metrics = call(losses.ppo_clip, PPO_LOGP, OLD_LOGP, PPO_ADV, PPO_MASK, jit=jit,
                         dual_clip=2.0)
    np.testing.assert_allclose(loss, 0.44, rtol=1e-5)
    np.testing.assert_allclose(metrics["dual_clip_fraction"], 0.2)


def test_ppo_clip_gradient_hand_values():
    # d loss / d logp_t = −A_t ρ_t / 5 on unclipped tokens, 0 on clipped ones.
    grad = jax.grad(lambda lp: losses.ppo_clip(lp, OLD_LOGP, PPO_ADV, PPO_MASK)[0])(PPO_LOGP)
    np.testing.assert_allclose(grad, [[0.0, -0.1, 0.22, 0.0, 0.6]], rtol=1e-5, atol=1e-7)
    grad = jax.grad(lambda lp: losses.ppo_clip(lp, OLD_LOGP, PPO_ADV, PPO_MASK,
                                               dual_clip=2.0)[0])(PPO_LOGP)
    np.testing.assert_allclose(grad, [[0.0, -0.1, 0.22, 0.0, 0.0]], rtol=1e-5, atol=1e-7)


def test_ppo_clip_asymmetric_clip_higher():
    # ε_high = 0.28 lets ratio 1.25 through for A > 0 (DAPO), ε_high = 0.2 clips it at 1.2.
    logp = jnp.log(jnp.array([[1.25]]))
    loss_sym, _ = losses.ppo_clip(logp, jnp.zeros((1, 1)), jnp.ones((1,)), jnp.ones((1, 1)))
    loss_dapo, _ = losses.ppo_clip(logp, jnp.zeros((1, 1)), jnp.ones((1,)), jnp.ones((1, 1)),
                                   eps_high=0.28)
    np.testing.assert_allclose([loss_sym, loss_dapo], [-1.2, -1.25], rtol=1e-6)


def test_dual_clip_bounds_loss_for_negative_advantages():
    old = jnp.zeros((3, 2))
    adv = jnp.array([-1.0, -2.0, -0.5])
    for log_ratio in (2.0, 10.0, 1000.0):       # ratios e^2 ≈ 7.4 and above, all > c = 3
        loss, _ = losses.ppo_clip(old + log_ratio, old, adv, jnp.ones((3, 2)), dual_clip=3.0,
                                  agg="seq-mean-token-mean")
        # Every token is capped at −c·A = 3·|A|; mean over sequences of 3|A| = 3·3.5/3 = 3.5.
        np.testing.assert_allclose(loss, 3.5, rtol=1e-6)
    unbounded, _ = losses.ppo_clip(old + 10.0, old, adv, jnp.ones((3, 2)))
    assert float(unbounded) > 1e3


def test_ppo_clip_extreme_inputs_are_finite():
    old = jnp.zeros((4, 3))
    logp = jnp.array([[1000.0, -1000.0, 0.0]] * 4)
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    for adv in (jnp.array([1.0, -1.0, 1.0, -1.0]), jnp.zeros(4)):
        for agg in losses.AGGREGATIONS:
            fn = lambda lp: losses.ppo_clip(lp, old, adv, mask, agg=agg)  # noqa: E731
            (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logp)
            assert_finite_tree((loss, metrics, grad))


def test_ppo_clip_padding_rows_change_nothing():
    rng = np.random.default_rng(1)
    logp = jnp.asarray(rng.normal(size=(3, 4)) - 2, jnp.float32)
    old = logp + jnp.asarray(rng.normal(scale=0.3, size=(3, 4)), jnp.float32)
    adv = jnp.array([1.0, -0.5, 2.0])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    garbage = jnp.full((2, 4), jnp.nan)
    for agg in losses.AGGREGATIONS:
        def fn(lp, o, a, m, agg=agg):
            return losses.ppo_clip(lp, o, a, m, agg=agg, dual_clip=3.0)
        (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(logp, old, adv, mask)
        (ploss, pmetrics), pgrad = jax.value_and_grad(fn, has_aux=True)(
            jnp.concatenate([logp, garbage]), jnp.concatenate([old, garbage]),
            jnp.concatenate([adv, jnp.array([5.0, -5.0])]),
            jnp.concatenate([mask, jnp.zeros((2, 4), mask.dtype)]))
        np.testing.assert_allclose(ploss, loss, rtol=1e-6)
        np.testing.assert_allclose(pgrad[:3], grad, rtol=1e-6)
        np.testing.assert_array_equal(pgrad[3:], 0.0)
        for key in metrics:
            np.testing.assert_allclose(pmetrics[key], metrics[key], rtol=1e-6, err_msg=key)


def test_ppo_clip_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"old_logp has shape \[1, 4\]"):
        losses.ppo_clip(PPO_LOGP, OLD_LOGP[:, :4], PPO_ADV, PPO_MASK)
    with pytest.raises(ValueError, match="advantages must be"):
        losses.ppo_clip(PPO_LOGP, OLD_LOGP, jnp.ones((3,)), PPO_MASK)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        losses.ppo_clip(PPO_LOGP, OLD_LOGP, PPO_ADV, PPO_MASK, dual_clip=0.5)


# ---------------------------------------------------------------------------------------------
# Value loss
# ---------------------------------------------------------------------------------------------

@JIT
def test_value_loss_hand_values(jit):
    # t0: V=1, V_old=0.5, R=2: V_clip = 0.5 + 0.2 = 0.7; ½ max((1−2)², (0.7−2)²) = ½·1.69 = 0.845.
    # t1: V=2, V_old=2, R=3: ½ max(1, 1) = 0.5 (not clipped). token-mean = 0.6725.
    values, old, returns = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, 2.0]]), jnp.array([[2.0, 3.0]])
    loss, metrics = call(losses.value_loss, values, old, returns, jnp.ones((1, 2)), jit=jit,
                         clip_eps=0.2)
    np.testing.assert_allclose(loss, 0.6725, rtol=1e-6)
    np.testing.assert_allclose(metrics["vf_clip_fraction"], 0.5)
    loss, _ = call(losses.value_loss, values, old, returns, jnp.ones((1, 2)), jit=jit,
                   clip_eps=None)
    np.testing.assert_allclose(loss, 0.5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# GRPO / Dr. GRPO / DAPO compositions against the papers' formulas written out directly.
# ---------------------------------------------------------------------------------------------

def _random_group_batch(seed=0, groups=2, group_size=4, length=5):
    rng = np.random.default_rng(seed)
    batch = groups * group_size
    logp = jnp.asarray(-rng.uniform(0.1, 3.0, size=(batch, length)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(scale=0.3, size=(batch, length)), jnp.float32)
    ref = logp + jnp.asarray(rng.normal(scale=0.3, size=(batch, length)), jnp.float32)
    lengths = rng.integers(1, length + 1, size=batch)
    mask = jnp.asarray(np.arange(length)[None, :] < lengths[:, None], jnp.float32)
    rewards = jnp.asarray(rng.integers(0, 2, size=batch), jnp.float32)
    return logp, old, ref, mask, rewards, lengths


def _paper_objective(logp, old, ref, rewards, lengths, *, group_size, std, eps_low, eps_high,
                     beta, normaliser):
    """loss = −Σ_i Σ_{t<L_i} w_i [min(ρ Â, clip(ρ) Â) − β k3] with the paper's weights w_i."""
    total = 0.0
    batch = logp.shape[0]
    for i in range(batch):
        group = rewards[(i // group_size) * group_size:(i // group_size + 1) * group_size]
        adv = rewards[i] - jnp.mean(group)
        if std:
            adv = adv / (jnp.std(group, ddof=1) + 1e-6)
        for t in range(int(lengths[i])):
            ratio = jnp.exp(logp[i, t] - old[i, t])
            surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
            k3 = jnp.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            total = total + normaliser(i) * (surrogate - beta * k3)
    return -total


def _check_against_paper(ours, seed, *, std, eps_high, beta, normaliser):
    logp, old, ref, mask, rewards, lengths = _random_group_batch(seed=seed)

    def paper(lp):
        return _paper_objective(lp, old, ref, rewards, lengths, group_size=4, std=std,
                                eps_low=0.2, eps_high=eps_high, beta=beta,
                                normaliser=lambda i: normaliser(logp.shape[0], lengths, i))

    def loss(lp):
        return ours(lp, old, rewards, mask, ref)[0]

    np.testing.assert_allclose(loss(logp), paper(logp), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(loss)(logp), paper(logp), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(logp), jax.grad(paper)(logp), rtol=1e-4, atol=1e-7)


def test_grpo_equals_deepseekmath_formula():
    # J = (1/G) Σ_i (1/|o_i|) Σ_t [...]: weight 1 / (B · |o_i|); β = 0.04, std-normalised.
    _check_against_paper(
        lambda lp, old, r, m, ref: losses.grpo(lp, old, losses.grpo_advantages(r, 4), m,
                                               ref_logp=ref),
        seed=0, std=True, eps_high=0.2, beta=0.04,
        normaliser=lambda batch, lengths, i: 1.0 / (batch * lengths[i]))


def test_dr_grpo_equals_paper_formula():
    # No std, constant normaliser 1 / (B · L_max) with L_max = 8, no KL.
    _check_against_paper(
        lambda lp, old, r, m, ref: losses.dr_grpo(
            lp, old, losses.grpo_advantages(r, 4, std_normalize=False), m, max_len=8),
        seed=1, std=False, eps_high=0.2, beta=0.0,
        normaliser=lambda batch, lengths, i: 1.0 / (batch * 8))


def test_dapo_equals_paper_formula():
    # Token-level: every token weighted 1 / Σ_i |o_i|; clip [1 − 0.2, 1 + 0.28]; no KL.
    _check_against_paper(
        lambda lp, old, r, m, ref: losses.dapo(lp, old, losses.grpo_advantages(r, 4), m),
        seed=2, std=True, eps_high=0.28, beta=0.0,
        normaliser=lambda batch, lengths, i: 1.0 / float(np.sum(lengths)))


def test_group_compositions_zero_variance_and_extremes_are_finite():
    logp = jnp.array([[1000.0, -1000.0], [0.0, 0.0], [-5.0, -1.0], [-1.0, -2.0]])
    old = jnp.zeros((4, 2))
    mask = jnp.array([[1, 1], [1, 0], [0, 0], [1, 1]])
    rewards = jnp.ones(4)                       # one group, all equal: advantages exactly 0
    advantages = losses.grpo_advantages(rewards, 4)
    np.testing.assert_array_equal(advantages, 0.0)
    for fn in (functools.partial(losses.grpo, ref_logp=-logp), losses.dr_grpo, losses.dapo,
               functools.partial(losses.dapo, informative=losses.informative_groups(rewards, 4))):
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp, fn=fn: fn(lp, old, advantages, mask), has_aux=True)(logp)
        assert_finite_tree((loss, metrics, grad))
        np.testing.assert_allclose(metrics["pg_loss"], 0.0, atol=1e-6)


def test_dapo_drops_uninformative_groups_from_the_token_mean():
    # Two groups of 2: group 0 all-equal rewards (uninformative), group 1 informative.
    rewards = jnp.array([1.0, 1.0, 0.0, 1.0])
    informative = losses.informative_groups(rewards, 2)
    np.testing.assert_array_equal(informative, [False, False, True, True])
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.2, 0.4, 0.5], [0.6, 0.5, 0.5]]))
    mask = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], jnp.float32)
    advantages = losses.grpo_advantages(rewards, 2)
    loss, _ = losses.dapo(logp, logp, advantages, mask, informative=informative)
    # On-policy: each token contributes −A_i; only group 1's 3 tokens count in the denominator.
    a = np.asarray(advantages)
    np.testing.assert_allclose(loss, -(2 * a[2] + a[3]) / 3.0, rtol=1e-6)
    every_row, _ = losses.dapo(logp, logp, advantages, mask)
    np.testing.assert_allclose(every_row, -(2 * a[2] + a[3]) / 9.0, rtol=1e-6)


def test_grpo_requires_reference_for_kl():
    logp, old, _, mask, rewards, _ = _random_group_batch()
    advantages = losses.grpo_advantages(rewards, 4)
    with pytest.raises(ValueError, match="needs ref_logp"):
        losses.grpo(logp, old, advantages, mask)
    loss, metrics = losses.grpo(logp, old, advantages, mask, kl_coef=0.0)
    assert "kl_ref" not in metrics and np.isfinite(loss)
