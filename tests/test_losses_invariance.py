"""Loss library, part 4: one padding-invariance check for every loss the other files do not pad
(DPO, SPIN, the GRPO family's metrics, value loss, NLL, KL-Convex, ReMix, entropy), TOPR's raw-ratio
metrics and full-IS bound, and the KL estimators under jax.jit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses
from test_losses_offpolicy import random_batch

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, *args, jit=False, **kwargs):
    bound = functools.partial(fn, **kwargs)
    return jax.jit(bound)(*args) if jit else bound(*args)


def pad_rows(x, rows, value):
    x = jnp.asarray(x)
    return jnp.concatenate([x, jnp.full((rows,) + x.shape[1:], value, x.dtype)])


def assert_same(padded, plain, rows):
    """(loss, metrics), grads of a padded call equal the plain ones; padding rows get 0 gradient."""
    (ploss, pmetrics), pgrads = padded
    (loss, metrics), grads = plain
    np.testing.assert_allclose(ploss, loss, rtol=1e-6)
    assert set(pmetrics) == set(metrics)
    for key in metrics:
        np.testing.assert_allclose(pmetrics[key], metrics[key], rtol=1e-6, err_msg=key)
    for pgrad, grad in zip(jax.tree.leaves(pgrads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(pgrad[:rows], grad, rtol=1e-6, atol=1e-8)
        np.testing.assert_array_equal(pgrad[rows:], 0.0)


# ---------------------------------------------------------------------------------------------
# Preference losses: a fully-masked pair used to add log 2 to the mean.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [losses.dpo, losses.spin], ids=["dpo", "spin"])
def test_preference_losses_padding_pairs_change_nothing(fn):
    chosen, ref_chosen, chosen_mask = random_batch(0, batch=3, length=4)
    rejected, ref_rejected, rejected_mask = random_batch(1, batch=3, length=6)

    def value_and_grad(c, r, rc, rr, cm, rm):
        return jax.value_and_grad(lambda c, r: fn(c, r, rc, rr, cm, rm), argnums=(0, 1),
                                  has_aux=True)(c, r)

    plain = value_and_grad(chosen, rejected, ref_chosen, ref_rejected, chosen_mask, rejected_mask)
    padded = value_and_grad(
        pad_rows(chosen, 2, jnp.nan), pad_rows(rejected, 2, 7.0), pad_rows(ref_chosen, 2, jnp.inf),
        pad_rows(ref_rejected, 2, -3.0), pad_rows(chosen_mask, 2, 0.0),
        pad_rows(rejected_mask, 2, 0.0))
    assert_same(padded, plain, rows=3)
    # An all-padding batch is 0, not NaN.
    loss, metrics = fn(chosen, rejected, ref_chosen, ref_rejected, jnp.zeros_like(chosen_mask),
                       jnp.zeros_like(rejected_mask))
    assert float(loss) == 0.0 and all(np.isfinite(v) for v in jax.tree.leaves(metrics))


# ---------------------------------------------------------------------------------------------
# GRPO / Dr. GRPO / DAPO: a whole padding group (loss, gradient and every metric unchanged).
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_group_compositions_padding_group_changes_nothing(name):
    logp, old, mask = random_batch(2)
    ref = old - 0.2
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0])
    std_normalize = name != "dr_grpo"

    def value_and_grad(lp, o, r, m, rf):
        # The advantages (and DAPO's informative rows) are statistics of whole groups.
        kwargs = {"ref_logp": rf} if name == "grpo" else {}
        if name == "dapo":
            kwargs["informative"] = losses.informative_groups(r, 2)
        advantages = losses.grpo_advantages(r, 2, std_normalize=std_normalize)
        return jax.value_and_grad(
            lambda lp: getattr(losses, name)(lp, o, advantages, m, **kwargs), has_aux=True)(lp)

    plain = value_and_grad(logp, old, rewards, mask, ref)
    # Two padding rows = one padding group, with informative (1, 0) rewards and garbage log-probs.
    padded = value_and_grad(pad_rows(logp, 2, jnp.nan), pad_rows(old, 2, -jnp.inf),
                            jnp.concatenate([rewards, jnp.array([1.0, 0.0])]),
                            pad_rows(mask, 2, 0.0), pad_rows(ref, 2, jnp.nan))
    assert_same(padded, plain, rows=4)


# ---------------------------------------------------------------------------------------------
# The remaining token-level losses.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("agg", losses.AGGREGATIONS)
def test_value_nll_kl_convex_remix_padding_rows_change_nothing(agg):
    logp, other, mask = random_batch(3)
    adv = jnp.array([1.0, -0.5, 0.3, -2.0])
    cases = {
        "value_loss": (lambda v, o, m: losses.value_loss(v, o, o + 1.0, m, agg=agg),
                       (logp, other, mask), (jnp.nan, 0.0, 0.0)),
        "nll": (lambda lp, w, m: losses.nll(lp, m, weights=w, agg=agg),
                (logp, adv, mask), (-jnp.inf, 5.0, 0.0)),
        "kl_convex": (lambda lp, b, m: losses.kl_convex(lp, b, b - 0.3, m, lam=0.7, agg=agg),
                      (logp, other, mask), (jnp.nan, jnp.inf, 0.0)),
        "remix": (lambda lp, o, a, m: losses.remix(
            lp, o, o - 0.1, a, m, base_logp=o - 0.5, prev_logp=o, step=61, kl_coef=0.01,
            entropy=-lp, entropy_coef=0.01, agg=agg),
                  (logp, other, adv, mask), (jnp.nan, 0.0, 3.0, 0.0)),
    }
    for name, (fn, args, pads) in cases.items():
        plain = jax.value_and_grad(fn, has_aux=True)(*args)
        padded = jax.value_and_grad(fn, has_aux=True)(
            *(pad_rows(a, 2, p) for a, p in zip(args, pads)))
        try:
            assert_same(padded, plain, rows=4)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


def test_entropy_padding_rows_change_nothing():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    for agg in losses.AGGREGATIONS:
        def fn(z, m, agg=agg):
            return losses.entropy(z, m, agg=agg)
        plain = jax.value_and_grad(fn, has_aux=True)(logits, mask)
        padded = jax.value_and_grad(fn, has_aux=True)(pad_rows(logits, 2, 3.0),
                                                      pad_rows(mask, 2, 0))
        assert_same(padded, plain, rows=3)


# ---------------------------------------------------------------------------------------------
# TOPR: raw-ratio metrics and the full-IS upper bound.
# ---------------------------------------------------------------------------------------------

# Same fixture as test_losses_offpolicy: row 0 (R = +1) has token ratios π/μ = .5/.125 = 4, so
# trajectory ratio 16 and geometric mean 4; row 1 (R = −1) token ratios .5, trajectory .25, geo .5.
TOPR_LOGP = jnp.log(jnp.array([[0.5, 0.5], [0.2, 0.1]]))
TOPR_BEHAVIOUR = jnp.log(jnp.array([[0.125, 0.125], [0.4, 0.2]]))
TOPR_REWARDS = jnp.array([1.0, -1.0])


@JIT
@pytest.mark.parametrize("ratio_level, mean, low, high", [
    ("sequence", (16 + 0.25) / 2, 0.25, 16.0),
    ("sequence_geo_mean", (4 + 0.5) / 2, 0.5, 4.0),
    ("token", (4 + 4 + 0.5 + 0.5) / 4, 0.5, 4.0),
])
def test_topr_raw_ratio_metrics(ratio_level, mean, low, high, jit):
    _, metrics = call(losses.topr, TOPR_LOGP, TOPR_BEHAVIOUR, TOPR_REWARDS, jnp.ones((2, 2)),
                      jit=jit, ratio_level=ratio_level)
    np.testing.assert_allclose(
        [metrics["ratio_mean"], metrics["ratio_min"], metrics["ratio_max"]], [mean, low, high],
        rtol=1e-5)
    # The applied weights are still the TOPR ones: 1 on the positive, the truncated ratio else.
    np.testing.assert_allclose(metrics["weight_max"], 1.0)


@pytest.mark.parametrize("ratio_level", losses.RATIO_LEVELS)
def test_topr_full_importance_sampling_stays_finite(ratio_level):
    # a = 0, b = inf on both sides (full IS): a log-ratio of +1000 would give an infinite weight.
    logp = jnp.array([[0.0, 0.0], [-1000.0, 0.0], [0.0, -2.0]])
    behaviour = jnp.array([[-500.0, -500.0], [0.0, 0.0], [-1.0, -1.0]])
    rewards = jnp.array([1.0, -1.0, -1.0])
    inf = float("inf")
    (loss, metrics), grad = jax.value_and_grad(
        lambda lp: losses.topr(lp, behaviour, rewards, jnp.ones((3, 2)), ratio_level=ratio_level,
                               positive_bounds=(0.0, inf), negative_bounds=(0.0, inf)),
        has_aux=True)(logp)
    for leaf in jax.tree.leaves((loss, metrics, grad)):
        assert np.all(np.isfinite(np.asarray(leaf)))
    # Below the cap the full-IS weight is exact: row 2's weight is e^{(0 + 1) + (−2 + 1)} = 1
    # at sequence level.
    if ratio_level == "sequence":
        np.testing.assert_allclose(metrics["negative_weight_max"], 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# KL estimators under jit.
# ---------------------------------------------------------------------------------------------

@JIT
def test_kl_estimators_hand_values_jit(jit):
    # u = ref − logp = log 2 and −log 2: k1 = −u, k2 = u²/2, k3 = e^u − u − 1.
    logp = jnp.log(jnp.array([[0.25, 0.5]]))
    ref = jnp.log(jnp.array([[0.5, 0.25]]))
    log2 = math.log(2.0)
    for name, expected in (("k1", [-log2, log2]), ("k2", [log2 ** 2 / 2] * 2),
                           ("k3", [1 - log2, 0.5 + log2 - 1])):
        value = call(losses.kl_estimate, logp, ref, jit=jit, estimator=name)
        np.testing.assert_allclose(value, [expected], rtol=1e-6, err_msg=name)
