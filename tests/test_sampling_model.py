"""The sampler on real (tiny) models: parity with transformers and with the training-side forward,
reproducibility, grouping, early stopping, bucketing, meshes and input errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from offpolicy_jax import models, sampling
from offpolicy_jax.sampling import decode, sampler

LOGPROB_TOLERANCE = 1e-4
# Prompts of different lengths (left padding differs per row), ids clear of pad 0 / eos 1.
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 200, 201], [99], [3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {family: hf_tiny.make_tiny_checkpoint(family, tmp_path_factory.mktemp(family))
            for family in hf_tiny.FAMILIES}


@pytest.fixture(scope="module")
def qwen2(checkpoints):
    return models.load_hf_checkpoint(checkpoints["qwen2"], dtype=jnp.float32)


def transformers_greedy(path, prompts, max_new_tokens, eos_token_id):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path),
                                                              dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                             pad_token_id=0)
    return out[:, width:].numpy()


def training_logprobs(cfg, params, prompts, responses, temperature):
    """log_softmax(logits / T) of each response token from one left-padded forward pass over
    every prompt + response (what the trainer does); a list of [n_i] arrays."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(map(len, sequences))
    tokens = np.zeros((len(sequences), width), np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, sequence in enumerate(sequences):
        tokens[row, width - len(sequence):] = sequence
        mask[row, width - len(sequence):] = 1
    log_probs = np.asarray(jax.nn.log_softmax(
        models.apply(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)) / temperature, axis=-1))
    out = []
    for row, response in enumerate(responses):
        columns = width - len(response) + np.arange(len(response))  # response token columns
        out.append(log_probs[row, columns - 1, np.asarray(response, np.int64)])
    return out


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_greedy_matches_transformers_token_for_token(checkpoints, family):
    path = checkpoints[family]
    cfg, params = models.load_hf_checkpoint(path, dtype=jnp.float32)
    max_new = 16
    # eos_token_ids=() on both sides: every row runs the full budget, so every position is
    # compared; the EOS handling is compared separately below.
    ours = sampling.generate(cfg, params, PROMPTS, max_new_tokens=max_new, temperature=0.0,
                             eos_token_ids=(), seed=0)
    reference = transformers_greedy(path, PROMPTS, max_new, eos_token_id=None)
    np.testing.assert_array_equal(ours.tokens, reference)
    np.testing.assert_array_equal(ours.lengths, [max_new] * len(PROMPTS))

    # With EOS: use a token that the reference emits mid-sequence as the EOS id.
    eos = int(reference[0, max_new // 2])
    ours = sampling.generate(cfg, params, PROMPTS, max_new_tokens=max_new, temperature=0.0,
                             eos_token_ids=(eos,), seed=0)
    with_eos = transformers_greedy(path, PROMPTS, max_new, eos_token_id=eos)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(reference[row] == eos)
        length = int(hits[0]) + 1 if hits.size else max_new
        assert ours.lengths[row] == length
        np.testing.assert_array_equal(ours.tokens[row, :length], with_eos[row, :length])
        np.testing.assert_array_equal(ours.tokens[row, length:], 0)  # pad id after the end


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 20, 0.9)])
def test_logprobs_equal_training_forward(qwen2, temperature, top_k, top_p):
    cfg, params = qwen2
    out = sampling.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=temperature,
                            top_k=top_k, top_p=top_p, eos_token_ids=(1, 2, 3), seed=3,
                            num_samples=2)
    assert out.tokens.shape == (len(PROMPTS) * 2, 12)
    responses = [out.tokens[row, :n] for row, n in enumerate(out.lengths)]
    expected = training_logprobs(cfg, params, [PROMPTS[i] for i in out.prompt_index], responses,
                                 temperature)
    for row in range(out.tokens.shape[0]):
        n = int(out.lengths[row])
        np.testing.assert_allclose(out.logprobs[row, :n], expected[row], atol=LOGPROB_TOLERANCE)
        assert np.all(out.logprobs[row, n:] == 0) and np.all(out.truncated_logprobs[row, n:] == 0)
    valid = np.arange(12)[None, :] < out.lengths[:, None]
    if top_k is None and top_p is None:
        np.testing.assert_array_equal(out.truncated_logprobs, out.logprobs)
    else:
        # Renormalising over a subset can only raise a token's log-prob.
        assert np.all(out.truncated_logprobs[valid] >= out.logprobs[valid] - 1e-6)
        assert np.any(out.truncated_logprobs[valid] > out.logprobs[valid] + 1e-3)


def test_seed_reproducible_and_groups_prompt_major(qwen2):
    cfg, params = qwen2
    kwargs = dict(max_new_tokens=10, temperature=1.0, eos_token_ids=(), num_samples=3)
    a = sampling.generate(cfg, params, PROMPTS, seed=11, **kwargs)
    b = sampling.generate(cfg, params, PROMPTS, seed=jax.random.key(11), **kwargs)
    c = sampling.generate(cfg, params, PROMPTS, seed=12, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    np.testing.assert_array_equal(a.prompt_index, np.repeat(np.arange(len(PROMPTS)), 3))
    # Samples of one prompt differ from each other (a group, not copies).
    for p in range(len(PROMPTS)):
        group = a.tokens[3 * p:3 * p + 3]
        assert len({tuple(row) for row in group}) > 1
    # A row's sample does not depend on the other prompts in the call (buckets, padding):
    # prompt 0 alone gives the same rows 0..2.
    alone = sampling.generate(cfg, params, PROMPTS[:1], seed=11, **kwargs)
    np.testing.assert_array_equal(alone.tokens, a.tokens[:3])
    np.testing.assert_allclose(alone.logprobs, a.logprobs[:3], atol=1e-5)


def test_raw_uint32_key_is_accepted(qwen2):
    cfg, params = qwen2
    kwargs = dict(max_new_tokens=4, eos_token_ids=(), num_samples=1)
    raw = sampling.generate(cfg, params, PROMPTS, seed=jax.random.PRNGKey(5), **kwargs)
    typed = sampling.generate(cfg, params, PROMPTS, seed=jax.random.key(5), **kwargs)
    np.testing.assert_array_equal(raw.tokens, typed.tokens)


def test_decoding_stops_when_every_row_is_done(qwen2):
    cfg, params = qwen2
    budget = 40
    free = sampling.generate(cfg, params, PROMPTS, max_new_tokens=budget, temperature=0.0,
                             eos_token_ids=(), seed=0, steps_per_dispatch=4)
    assert free.num_decode_steps == budget - 1  # the first token comes from the prefill
    # EOS ids = the tokens every row emits at position 5: each row stops at its first of them.
    eos = sorted(set(free.tokens[:, 5].tolist()))
    first_hit = [int(np.flatnonzero(np.isin(row, eos))[0]) for row in free.tokens]
    out = sampling.generate(cfg, params, PROMPTS, max_new_tokens=budget, temperature=0.0,
                            eos_token_ids=eos, seed=0, steps_per_dispatch=4)
    np.testing.assert_array_equal(out.lengths, np.asarray(first_hit) + 1)
    # The last row to finish emitted token max(first_hit), which needed that many forwards;
    # no step ran after it even though 4 steps are fused per dispatch.
    assert out.num_decode_steps == max(first_hit) < budget - 1
    for row, n in enumerate(out.lengths):
        np.testing.assert_array_equal(out.tokens[row, :n], free.tokens[row, :n])


def test_a_run_compiles_once_per_bucket(qwen2):
    cfg, params = qwen2
    kwargs = dict(max_new_tokens=6, temperature=1.0, eos_token_ids=(1,))
    sampling.generate(cfg, params, PROMPTS, seed=0, **kwargs)
    prefill_compiles, decode_compiles = sampler._prefill._cache_size(), sampler._decode._cache_size()
    # Other prompts, other count and lengths, other budget and seed -- same buckets
    # (batch <= 4, prompt length <= 16, budget <= 8).
    sampling.generate(cfg, params, [[9, 9], [4] * 15, [8] * 9], seed=1,
                      **(kwargs | dict(max_new_tokens=8)))
    assert sampler._prefill._cache_size() == prefill_compiles
    assert sampler._decode._cache_size() == decode_compiles


def test_mesh_matches_single_device(qwen2):
    cfg, params = qwen2
    mesh = models.make_mesh("2,2,2")  # data, fsdp and tensor all > 1
    kwargs = dict(max_new_tokens=4, temperature=1.0, eos_token_ids=(1,), seed=4, num_samples=2)
    single = sampling.generate(cfg, params, PROMPTS, **kwargs)
    sharded = sampling.generate(cfg, params, PROMPTS, mesh=mesh, **kwargs)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


def test_decode_step_matches_apply_cached(checkpoints):
    """The sampler's decode layout computes the model's function (all three families)."""
    tokens, mask = sampler._left_pad(PROMPTS, 4, 16)
    step_tokens = jnp.asarray([3, 4, 5, 6], jnp.int32)
    positions = jnp.asarray([len(p) for p in PROMPTS], jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)
    def ours(cfg, params):
        split = decode.split_layer_params(cfg, params)
        logits, cache = decode.prefill(cfg, split, tokens, mask, 24)
        step_logits, _ = decode.decode_step(cfg, split, step_tokens, positions, cache)
        return logits, step_logits

    @functools.partial(jax.jit, static_argnums=0)
    def reference(cfg, params):
        logits, cache = models.apply_cached(cfg, params, tokens, models.init_cache(cfg, 4, 24),
                                            models.default_positions(mask), mask)
        step_logits, _ = models.apply_cached(cfg, params, step_tokens[:, None], cache,
                                             positions[:, None])
        return logits[:, -1], step_logits[:, 0]

    for family in hf_tiny.FAMILIES:
        cfg, params = models.load_hf_checkpoint(checkpoints[family], dtype=jnp.float32)
        for got, want in zip(ours(cfg, params), reference(cfg, params)):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=family)


def test_progress_bar_runs(qwen2, capsys):
    cfg, params = qwen2
    out = sampling.generate(cfg, params, PROMPTS[:2], max_new_tokens=5, eos_token_ids=(),
                            seed=0, progress=True)
    assert out.tokens.shape == (2, 5)
    assert "decode" in capsys.readouterr().err


@pytest.mark.parametrize("prompts,kwargs,message", [
    ([], {}, "prompts is empty"),
    ([[5, 6], []], {}, "prompt 1 is empty"),
    ([[5, 6], [4] * 129], {}, "prompt 1 has 129 tokens, longer than the model's context of 128"),
    ([[5] * 100], dict(max_new_tokens=29), "max_new_tokens=29 does not fit: prompt 0 has 100"),
    ([[5, 6]], dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    ([[5, 300]], {}, r"prompt 0 holds token id 300, outside the vocabulary \[0, 300\)"),
    ([[5, -1]], {}, "prompt 0 holds token id -1"),
    ([[5, 6]], dict(eos_token_ids=(1, 300)), r"eos_token_ids \[300\] are outside the vocab"),
    ([[5, 6]], dict(eos_token_ids=None), "eos_token_ids is required"),
    ([[5, 6]], dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[5, 6]], dict(top_k=0), "top_k must be a positive int"),
    ([[5, 6]], dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    ([[5, 6]], dict(num_samples=0), "num_samples must be a positive int"),
    ([[5, 6]], dict(seed="abc"), "seed must be an int or a JAX PRNG key"),
    ("hello", {}, "prompts must be a list of token-id lists"),
    ([[5.5, 6]], {}, "prompt 0 must be a flat list of integer token ids"),
])
def test_bad_input_raises_clear_error(qwen2, prompts, kwargs, message):
    cfg, params = qwen2
    assert cfg.vocab_size == 300 and cfg.max_position_embeddings == 128
    args = dict(max_new_tokens=4, eos_token_ids=(1,), seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        sampling.generate(cfg, params, prompts, **args)


def test_growing_cache_gives_the_same_samples(qwen2, monkeypatch):
    cfg, params = qwen2
    kwargs = dict(max_new_tokens=20, temperature=1.0, eos_token_ids=(), seed=2,
                  steps_per_dispatch=4)
    whole = sampling.generate(cfg, params, PROMPTS, **kwargs)  # one window: the 32-slot bucket
    monkeypatch.setattr(sampler, "FIRST_CACHE_WINDOW", 8)      # 8 -> 16 -> 32 slots
    grows_before = sampler._grow_cache._cache_size()
    grown = sampling.generate(cfg, params, PROMPTS, **kwargs)
    assert sampler._grow_cache._cache_size() == grows_before + 2
    np.testing.assert_array_equal(grown.tokens, whole.tokens)
    np.testing.assert_allclose(grown.logprobs, whole.logprobs, atol=1e-5)


def test_bfloat16_sampling_tracks_the_bfloat16_forward(checkpoints):
    # bfloat16 keeps 8 bits of mantissa (relative step 2**-8 ~ 0.4%): on logits of size ~1-5
    # each rounding moves a log-prob by up to ~0.02, and the two paths round in different places
    # (the sampler accumulates matmuls in float32). A broken cache write would give O(1) errors.
    cfg, params = models.load_hf_checkpoint(checkpoints["qwen2"], dtype=jnp.bfloat16)
    out = sampling.generate(cfg, params, PROMPTS, max_new_tokens=8, temperature=1.0,
                            eos_token_ids=(), seed=0)
    expected = training_logprobs(cfg, params, PROMPTS, list(out.tokens), 1.0)
    assert np.max(np.abs(out.logprobs - np.stack(expected))) < 0.1


def _long_tailed_setting(cfg, params):
    """Sampling arguments and EOS ids under which the 32 rows end far apart (long-tailed)."""
    kwargs = dict(max_new_tokens=40, temperature=1.0, seed=3, num_samples=8,
                  steps_per_dispatch=4)
    # EOS ids that the free-running samples emit at different times.
    free = sampling.generate(cfg, params, PROMPTS, eos_token_ids=(), compact=False, **kwargs)
    counts = np.bincount(free.tokens[:, :20].ravel(), minlength=cfg.vocab_size)
    return kwargs, tuple(int(t) for t in np.argsort(counts)[-3:])


def _count_compactions(monkeypatch) -> list[int]:
    """Wraps ``sampler._compact``; the returned list gets each compaction's new batch size."""
    sizes, compact = [], sampler._compact
    monkeypatch.setattr(sampler, "_compact", lambda cache, state, keep, **kw: (
        sizes.append(int(keep.shape[0])), compact(cache, state, keep, **kw))[1])
    return sizes


def test_compacting_finished_rows_keeps_every_sample(qwen2, monkeypatch):
    cfg, params = qwen2
    kwargs, eos = _long_tailed_setting(cfg, params)
    static = sampling.generate(cfg, params, PROMPTS, eos_token_ids=eos, compact=False, **kwargs)
    assert static.lengths.min() < 8 and static.lengths.max() > 16   # rows end far apart
    compactions = _count_compactions(monkeypatch)
    compacted = sampling.generate(cfg, params, PROMPTS, eos_token_ids=eos, **kwargs)
    # 32 rows; batches halve as rows finish (down to MIN_DECODE_ROWS).
    assert compactions and compactions == sorted(compactions, reverse=True)
    assert min(compactions) >= sampler.MIN_DECODE_ROWS
    np.testing.assert_array_equal(compacted.lengths, static.lengths)
    np.testing.assert_array_equal(compacted.tokens, static.tokens)
    np.testing.assert_allclose(compacted.logprobs, static.logprobs, atol=1e-5)
    np.testing.assert_allclose(compacted.truncated_logprobs, static.truncated_logprobs,
                               atol=1e-5)
    assert compacted.num_decode_steps == static.num_decode_steps


@pytest.mark.slow    # ~10 s of compiles; the single-device test above runs by default
def test_compacting_on_a_mesh_keeps_every_sample(qwen2, monkeypatch):
    cfg, params = qwen2
    kwargs, eos = _long_tailed_setting(cfg, params)
    static = sampling.generate(cfg, params, PROMPTS, eos_token_ids=eos, compact=False, **kwargs)
    compactions = _count_compactions(monkeypatch)
    meshed = sampling.generate(cfg, params, PROMPTS, eos_token_ids=eos,
                               mesh=models.make_mesh("2,2,2"), **kwargs)
    # The compacted batch stays a multiple of the rows' devices (data x fsdp = 4).
    assert compactions and all(rows % 4 == 0 for rows in compactions)
    np.testing.assert_array_equal(meshed.tokens, static.tokens)
    np.testing.assert_allclose(meshed.logprobs, static.logprobs, atol=1e-5)


def test_compacted_rows_bucket():
    done = np.array([True] * 13 + [False] * 3)
    assert sampler._compacted_rows(done, 1) == 8            # 3 live -> the minimum, 8 < 16
    assert sampler._compacted_rows(done[:8], 1) is None     # 8 rows already at the minimum
    assert sampler._compacted_rows(np.array([True] * 54 + [False] * 10), 1) == 16
    assert sampler._compacted_rows(np.array([True] * 30 + [False] * 34), 1) is None
    assert sampler._compacted_rows(np.array([True] * 60 + [False] * 4), 16) == 16
