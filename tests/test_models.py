"""Model port: logit parity with transformers (PyTorch), checkpoint round trips, KV cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from offpolicy_jax import models

PARITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One tiny transformers-written checkpoint per family, with its reference logits."""
    out = {}
    for family in hf_tiny.FAMILIES:
        path = hf_tiny.make_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
        out[family] = path
    return out


def left_padded_batch(vocab_size, lengths=(9, 5, 1, 7), seed=0):
    """tokens, attention_mask [B, T] with rows of different lengths padded on the left."""
    rng = np.random.default_rng(seed)
    length = max(lengths)
    tokens = np.zeros((len(lengths), length), np.int32)
    mask = np.zeros((len(lengths), length), np.int32)
    for row, n in enumerate(lengths):
        tokens[row, length - n:] = rng.integers(2, vocab_size, n)
        mask[row, length - n:] = 1
    return tokens, mask


def max_abs_diff_on_real_tokens(a, b, mask):
    real = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(np.asarray(a)[real] - np.asarray(b)[real])))


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_logits_match_transformers_on_left_padded_batch(checkpoints, family):
    cfg, params = models.load_hf_checkpoint(checkpoints[family])
    tokens, mask = left_padded_batch(cfg.vocab_size)
    reference = hf_tiny.torch_logits(checkpoints[family], tokens, mask)
    ours = models.apply(cfg, params, jnp.asarray(tokens), jnp.asarray(mask))
    assert ours.dtype == jnp.float32 and ours.shape == reference.shape
    # The tiny models' logits are O(1), so this tolerance is a real check.
    assert np.abs(reference).max() > 0.5
    assert max_abs_diff_on_real_tokens(ours, reference, mask) <= PARITY_TOLERANCE


def test_llama3_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = hf_tiny.hf_config("llama", vocab_size=300)
    cfg = models.ModelConfig.from_hf_config(hf_config.to_dict())
    reference, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    ours = models.rope_inverse_frequencies(cfg)
    assert attention_factor == 1.0
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-6)
    # The tiny config puts frequencies in all three bands, so scaling visibly changes them.
    plain = models.rope_inverse_frequencies(
        models.ModelConfig(**{**cfg.__dict__, "rope_scaling": None}))
    assert np.sum(ours == plain) >= 1 and np.sum(ours != plain) >= 2


def test_apply_hidden_and_hidden_to_logits_compose_to_apply(checkpoints):
    cfg, params = models.load_hf_checkpoint(checkpoints["qwen3"])
    tokens, mask = left_padded_batch(cfg.vocab_size)
    hidden = models.apply_hidden(cfg, params, tokens, mask)
    assert hidden.shape == tokens.shape + (cfg.hidden_size,)
    np.testing.assert_allclose(models.hidden_to_logits(cfg, params, hidden),
                               models.apply(cfg, params, tokens, mask), rtol=1e-6, atol=1e-6)
