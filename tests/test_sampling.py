"""Sampling distribution: temperature, top-k, top-p, the draw itself and the two log-probs.

The statistical tests draw many independent rows from one fixed logit vector and compare the
token counts with the intended distribution by Pearson's chi-square. The seed is fixed, so each
test is deterministic; the threshold is the chi-square quantile at significance 1e-3 (a correct
sampler would exceed it for 1 seed in 1000). With 40 000 draws, an absolute error of 0.01 in a
bin of probability 0.1 adds n·δ²/p = 40 to the statistic, above every threshold used here
(< 30 for <= 10 bins), so real bias is caught.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from offpolicy_jax.sampling import distribution
from offpolicy_jax.sampling.distribution import SamplingParams

NUM_DRAWS = 40_000
SIGNIFICANCE = 1e-3


def row_keys(n, seed=0):
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(n))


# A 37-token vocabulary: not a multiple of the sampler's block size (16), so the padded last
# block is exercised; logits spread over ~6 nats, with a tie at the top.
TOY_LOGITS = np.concatenate([[2.0, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0],
                             np.linspace(-1.5, -4.0, 29)]).astype(np.float32)


def draw(params: SamplingParams, logits=TOY_LOGITS, n=NUM_DRAWS, seed=0):
    batch_logits = jnp.broadcast_to(jnp.asarray(logits), (n, logits.shape[-1]))
    uniforms = distribution.row_uniforms(row_keys(n, seed), 0)
    fn = jax.jit(distribution.sample_from_logits, static_argnums=2)
    return [np.asarray(x) for x in fn(batch_logits, uniforms, params)]


def chi_square_check(tokens, probs):
    """Pearson chi-square over the bins with positive expected mass (merging bins expected to
    hold < 5 draws into one, as the test's approximation requires)."""
    counts = np.bincount(tokens, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "drew a token outside the sampling distribution"
    expected = probs * tokens.size
    small = (expected < 5) & (probs > 0)
    big = expected >= 5
    obs = np.append(counts[big], counts[small].sum())
    exp = np.append(expected[big], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    statistic = float(np.sum((obs - exp) ** 2 / exp))
    threshold = stats.chi2.ppf(1 - SIGNIFICANCE, df=obs.size - 1)
    assert statistic < threshold, (statistic, threshold, obs, exp)


def reference_distribution(logits, temperature, top_k=None, top_p=None):
    """The intended q, written independently with a sort (float64)."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k is not None:
        kth = np.sort(z)[::-1][top_k - 1]
        keep &= z >= kth
    if top_p is not None:
        p_k = np.where(keep, p, 0.0)
        p_k /= p_k.sum()
        # mass strictly above each token, after top-k
        mass_above = np.array([p_k[p_k > p_k[i]].sum() for i in range(p.size)])
        keep &= (mass_above < top_p) & (p_k > 0)
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, None, None), (0.6, None, None), (1.7, None, None),
    (1.0, 5, None), (1.3, None, 0.7), (0.8, 6, 0.9),
])
def test_empirical_frequencies_match_intended_distribution(temperature, top_k, top_p):
    params = SamplingParams(temperature, top_k, top_p)
    tokens, logprobs, truncated = draw(params)
    q = reference_distribution(TOY_LOGITS, temperature, top_k, top_p)
    np.testing.assert_allclose(np.exp(np.asarray(distribution.sampling_log_probs(
        jnp.asarray(TOY_LOGITS)[None], params)))[0], q, atol=1e-6)
    chi_square_check(tokens, q)
    # logprobs: the untruncated temperature distribution; truncated: the renormalised q.
    full = jax.nn.log_softmax(jnp.asarray(TOY_LOGITS, jnp.float32) / temperature)
    np.testing.assert_allclose(logprobs, np.asarray(full)[tokens], atol=1e-5)
    np.testing.assert_allclose(truncated, np.log(q[tokens]), atol=1e-5)


def test_top_k_of_one_is_greedy_in_distribution_and_keeps_ties():
    tokens, _, truncated = draw(SamplingParams(1.0, 1, None), n=4000)
    # The two tied maxima (ids 0 and 1) share the mass equally.
    assert set(np.unique(tokens)) == {0, 1}
    chi_square_check(tokens, np.array([0.5, 0.5] + [0.0] * 35))
    np.testing.assert_allclose(truncated, np.log(0.5), atol=1e-6)


def test_greedy_is_first_argmax_with_temperature_one_logprob():
    logits = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 2.0, 4.9]])
    tokens, logprobs, truncated = distribution.sample_from_logits(
        logits, jnp.zeros((2, 2)), SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(tokens, [1, 0])
    expected = jax.nn.log_softmax(logits)[jnp.arange(2), tokens]
    np.testing.assert_allclose(logprobs, expected, atol=1e-6)
    np.testing.assert_array_equal(truncated, [0.0, 0.0])


def test_top_k_mask_hand_computed_with_ties():
    shifted = jnp.asarray([[3.0, 1.0, 3.0, 2.0, -jnp.inf]]) - 3.0
    expect = {1: [1, 0, 1, 0, 0], 2: [1, 0, 1, 0, 0], 3: [1, 0, 1, 1, 0], 4: [1, 1, 1, 1, 0],
              5: [1, 1, 1, 1, 1]}
    for k, keep in expect.items():
        np.testing.assert_array_equal(distribution.top_k_keep_mask(shifted, k)[0],
                                      np.asarray(keep, bool), err_msg=f"k={k}")


def test_top_p_mask_hand_computed():
    weights = jnp.asarray([[0.5, 0.3, 0.15, 0.05]]) * 2.0  # unnormalised on purpose
    expect = {0.3: [1, 0, 0, 0], 0.5: [1, 0, 0, 0], 0.51: [1, 1, 0, 0], 0.8: [1, 1, 0, 0],
              0.81: [1, 1, 1, 0], 0.96: [1, 1, 1, 1], 1.0: [1, 1, 1, 1]}
    for top_p, keep in expect.items():
        np.testing.assert_array_equal(distribution.top_p_keep_mask(weights, top_p)[0],
                                      np.asarray(keep, bool), err_msg=f"top_p={top_p}")
    # Ties are kept or dropped together; zero weights (dropped by top-k) are never kept.
    tied = jnp.asarray([[0.4, 0.4, 0.2, 0.0]])
    np.testing.assert_array_equal(distribution.top_p_keep_mask(tied, 0.3)[0], [1, 1, 0, 0])
    np.testing.assert_array_equal(distribution.top_p_keep_mask(tied, 1.0)[0], [1, 1, 1, 0])


def test_categorical_never_draws_zero_weight_and_handles_one_hot():
    weights = jnp.zeros((2000, 300)).at[:, 299].set(1.0).at[:1000, 17].set(1e-30)
    uniforms = jax.random.uniform(jax.random.key(3), (2000, 2))
    tokens = np.asarray(distribution.sample_categorical(weights, uniforms))
    assert set(np.unique(tokens)) <= {17, 299}
    # Uniforms at the edges of [0, 1) still land on positive-weight entries.
    edge = jnp.asarray([[0.0, 0.0], [0.99999994, 0.99999994]])
    sparse = jnp.zeros((2, 50)).at[:, 3].set(0.5).at[:, 40].set(0.5)
    assert set(np.asarray(distribution.sample_categorical(sparse, edge)).tolist()) == {3, 40}


def test_large_vocabulary_block_path_matches_distribution():
    # V = 1000: 32 blocks of 32; mass spread over many blocks and inside them.
    logits = np.asarray(jax.random.normal(jax.random.key(5), (1000,)) * 2.0, np.float32)
    tokens, _, _ = draw(SamplingParams(1.0), logits=logits, n=NUM_DRAWS, seed=1)
    chi_square_check(tokens, reference_distribution(logits, 1.0))


def test_draws_are_reproducible_and_depend_on_row_key_only():
    a = draw(SamplingParams(1.0, 8, 0.95), n=64, seed=7)[0]
    b = draw(SamplingParams(1.0, 8, 0.95), n=64, seed=7)[0]
    c = draw(SamplingParams(1.0, 8, 0.95), n=64, seed=8)[0]
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # Row r's draw is the same inside a batch of 64 and a batch of 16.
    np.testing.assert_array_equal(draw(SamplingParams(1.0, 8, 0.95), n=16, seed=7)[0], a[:16])


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p="x"), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(top_k=2.5), "top_k must be a positive int"),
    (dict(top_k=True), "top_k must be a positive int"),
])
def test_invalid_sampling_params_raise(kwargs, message):
    args = dict(temperature=1.0, top_k=None, top_p=None) | kwargs
    with pytest.raises(ValueError, match=message):
        distribution.validate_sampling_params(**args, vocab_size=100)


def test_noop_truncation_is_dropped():
    assert distribution.validate_sampling_params(1.0, 100, 1.0, vocab_size=100) == SamplingParams()
    assert not SamplingParams(0.0, 5, 0.5).truncates  # greedy ignores truncation
