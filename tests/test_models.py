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


# ---------------------------------------------------------------------------------------------
# KV cache.


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_cached_prefill_and_decode_match_full_forward(checkpoints, family):
    cfg, params = models.load_hf_checkpoint(checkpoints[family])
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 3, 1), seed=1)
    batch, prompt_len = tokens.shape
    decode_steps = 4
    continuation = np.random.default_rng(2).integers(2, cfg.vocab_size, (batch, decode_steps))
    full_tokens = np.concatenate([tokens, continuation], axis=1).astype(np.int32)
    full_mask = np.concatenate([mask, np.ones_like(continuation)], axis=1)
    expected = models.apply(cfg, params, full_tokens, full_mask)

    step = jax.jit(lambda p, t, c, m: models.apply_cached(cfg, p, t, c, token_mask=m))
    cache = models.init_cache(cfg, batch, prompt_len + decode_steps + 2)
    logits, cache = step(params, jnp.asarray(tokens), cache, jnp.asarray(mask))
    pieces = [logits]
    for t in range(decode_steps):
        logits, cache = step(params, jnp.asarray(continuation[:, t:t + 1]), cache,
                             jnp.ones((batch, 1), jnp.int32))
        pieces.append(logits)
    cached = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    assert int(cache["index"]) == prompt_len + decode_steps
    np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :full_mask.shape[1]],
                                  full_mask.astype(bool))
    assert max_abs_diff_on_real_tokens(cached, expected, full_mask) <= 1e-5
    assert step._cache_size() == 2  # one compile for prefill, one for decode


def test_cached_decode_with_explicit_positions_and_masked_step(checkpoints):
    """A row that is already finished (token_mask 0) does not disturb the others."""
    cfg, params = models.load_hf_checkpoint(checkpoints["qwen3"])
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(4, 2), seed=3)
    cache = models.init_cache(cfg, 2, 8)
    positions = models.default_positions(jnp.asarray(mask))
    _, cache = models.apply_cached(cfg, params, tokens, cache, positions, mask)
    next_token = np.array([[5], [7]], np.int32)
    step_mask = np.array([[1], [0]], np.int32)
    step_positions = np.array([[4], [2]], np.int32)
    logits, cache = models.apply_cached(cfg, params, next_token, cache, step_positions, step_mask)
    full = models.apply(cfg, params, np.concatenate([tokens[:1], next_token[:1]], axis=1))
    np.testing.assert_allclose(logits[0, 0], full[0, -1], atol=1e-5)
    assert not bool(cache["mask"][1, 4])
    with pytest.raises(ValueError, match="do not fit a cache of 8 slots"):
        models.apply_cached(cfg, params, np.zeros((2, 9), np.int32), models.init_cache(cfg, 2, 8))


# ---------------------------------------------------------------------------------------------
# Checkpoint round trips.


@pytest.mark.parametrize("family,max_shard_bytes", [("qwen2", None), ("llama", 40_000),
                                                    ("qwen3", None)])
def test_round_trip_through_save_hf_checkpoint(checkpoints, tmp_path, family, max_shard_bytes):
    """HF -> ours -> save_hf_checkpoint -> transformers gives the same logits (and our reload the
    same parameters); a small shard limit exercises the sharded layout with its index."""
    cfg, params = models.load_hf_checkpoint(checkpoints[family])
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    models.save_hf_checkpoint(tmp_path, cfg, params, **kwargs)
    if max_shard_bytes is not None:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (tmp_path / "model.safetensors").exists()
    tokens, mask = left_padded_batch(cfg.vocab_size)
    original = hf_tiny.torch_logits(checkpoints[family], tokens, mask)
    resaved = hf_tiny.torch_logits(tmp_path, tokens, mask)
    np.testing.assert_array_equal(resaved[mask.astype(bool)], original[mask.astype(bool)])
    cfg2, params2 = models.load_hf_checkpoint(tmp_path)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_parameters_round_trip(checkpoints, tmp_path):
    cfg, params = models.load_hf_checkpoint(checkpoints["qwen3"], dtype=jnp.bfloat16)
    assert cfg.dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    models.save_hf_checkpoint(tmp_path, cfg, params)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, reloaded = models.load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)
    tokens, mask = left_padded_batch(cfg.vocab_size)
    logits = models.apply(cfg, params, tokens, mask)
    assert logits.dtype == jnp.float32
    reference = hf_tiny.torch_logits(checkpoints["qwen3"], tokens, mask)
    # bfloat16 compute: a sanity bound, not parity.
    assert max_abs_diff_on_real_tokens(logits, reference, mask) < 0.25


def test_init_params_round_trip_to_transformers(tmp_path):
    """Our random init saved with save_hf_checkpoint is a valid transformers model."""
    cfg = models.ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=1, qkv_bias=True,
                             tie_word_embeddings=True)
    params = models.init_params(cfg, jax.random.key(0))
    assert params["layers"]["qkv"].shape == (2, 32, 1, 6, 8)
    assert "lm_head" not in params
    models.save_hf_checkpoint(tmp_path, cfg, params)
    tokens, mask = left_padded_batch(cfg.vocab_size)
    reference = hf_tiny.torch_logits(tmp_path, tokens, mask)
    assert max_abs_diff_on_real_tokens(models.apply(cfg, params, tokens, mask), reference,
                                       mask) <= PARITY_TOLERANCE


def test_tokenizer_loads_from_checkpoint_dir(checkpoints):
    tokenizer = models.load_tokenizer(checkpoints["qwen2"])
    text = "What is 12 + 35? The answer is \\boxed{47}."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None


# ---------------------------------------------------------------------------------------------
# Sharding.


def test_sharded_load_and_forward_match_single_device(checkpoints):
    assert jax.device_count() == 8
    mesh = models.make_mesh("1,4,2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    path = checkpoints["qwen2"]
    cfg, params = models.load_hf_checkpoint(path)
    _, sharded = models.load_hf_checkpoint(path, mesh=mesh)
    qkv_sharding = sharded["layers"]["qkv"].sharding
    assert qkv_sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None, None)
    assert len(qkv_sharding.device_set) == 8
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(9, 5, 1, 7))
    forward = jax.jit(models.apply, static_argnums=0)
    single = forward(cfg, params, tokens, mask)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    distributed = forward(cfg, sharded, jax.device_put(tokens, batch_sharding),
                          jax.device_put(mask, batch_sharding))
    np.testing.assert_allclose(distributed, single, atol=1e-5, rtol=1e-5)
    # shard_params places already-loaded parameters the same way.
    placed = models.shard_params(params, mesh)
    assert placed["layers"]["gate_up"].sharding.spec == sharded["layers"]["gate_up"].sharding.spec


def test_partition_specs_fail_on_unmatched_parameter_and_fit_the_mesh():
    with pytest.raises(ValueError, match=r"no partition rule matches parameter\(s\) \['extra/w'\]"):
        models.partition_specs({"embed": jnp.zeros((4, 4)), "extra": {"w": jnp.zeros(3)}})
    mesh = models.make_mesh("1,2,4")
    # 2 key/value heads cannot be split 4 ways: that dimension is replicated instead.
    specs = models.partition_specs({"layers": {"qkv": jax.ShapeDtypeStruct((2, 8, 2, 4, 4),
                                                                           jnp.float32)}}, mesh)
    assert specs["layers"]["qkv"] == jax.sharding.PartitionSpec(None, "fsdp", None, None, None)


@pytest.mark.parametrize("spec,message", [
    ("1,3,1", r"needs 3 devices \(1 x 3 x 1\) but 8 are available"),
    ("-1,-1,1", "a single -1"),
    ("1,2", "sizes for"),
    ("a,b,c", "three comma-separated integers"),
    ("3,-1,1", "8 devices are not divisible by 3"),
])
def test_make_mesh_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        models.make_mesh(spec)


def test_make_mesh_fills_in_minus_one():
    assert dict(models.make_mesh("2,-1,1").shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_remat_gives_the_same_gradients():
    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, qk_norm=True, head_dim=16)
    params = models.init_params(cfg, jax.random.key(1))
    tokens, mask = left_padded_batch(cfg.vocab_size, lengths=(6, 4))

    def loss(p, remat):
        logp = models.log_softmax(models.apply(cfg, p, tokens, mask, remat=remat))
        targets = jnp.asarray(tokens[:, 1:])
        picked = jnp.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)[..., 0]
        return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    plain = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
    for remat in (True, "dots_with_no_batch_dims_saveable"):
        recomputed = jax.jit(jax.grad(loss), static_argnums=1)(params, remat)
        for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(recomputed)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(plain))


def test_pad_token_ids_are_irrelevant_even_out_of_range(checkpoints):
    cfg, params = models.load_hf_checkpoint(checkpoints["llama"])
    tokens, mask = left_padded_batch(cfg.vocab_size)
    reference = models.apply(cfg, params, tokens, mask)
    for pad_id in (7, cfg.vocab_size + 5, -1):
        padded = np.where(mask.astype(bool), tokens, pad_id).astype(np.int32)
        logits = models.apply(cfg, params, padded, mask)
        assert np.all(np.isfinite(np.asarray(logits)))
        assert max_abs_diff_on_real_tokens(logits, reference, mask) <= 1e-6
