"""Sampler throughput: ``offpolicy_jax.sampling.generate`` against transformers ``generate``.

    python benchmarks/sampler.py                 # the issue's setting (about 2-4 min on 2 cores)
    python benchmarks/sampler.py --repeats 5 --vocab 32768

Both sides run the *same* random-initialised Qwen2-shaped checkpoint (hidden 512, 8 layers,
8 query / 2 key-value heads, SwiGLU 1408, tied 16k vocabulary: about 31 M parameters), written by
transformers' ``save_pretrained`` into a temporary directory and loaded by
``models.load_hf_checkpoint``. Workload: 32 prompts of 16-64 random tokens (left-padded for
PyTorch), 128 new tokens each, multinomial sampling at temperature 1 with no top-k / top-p and
no EOS, float32 everywhere (``--dtype bfloat16`` switches both sides). Each side is warmed
up once (our run compiles), then timed ``--repeats`` times, interleaved so that load from other
processes hits both alike; the median is reported.

Printed: tokens/s for both and their ratio, plus the ratio of process CPU seconds (``--threads
1`` pins the process to one core: the measure least disturbed by other processes on a shared
machine); where our time goes (prefill, one decode step, the model forward alone, the sampling
alone); and the achieved FLOP/s of our decoding as a fraction of the matmul peak measured in
the same process (a large float32 ``jnp.dot``). Useful FLOPs count 2 per multiply-add of every
weight matrix per token (embedding lookup excluded) plus the attention scores and values over
the real context length of each step.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    parser.add_argument("--steps-per-dispatch", type=int, default=None,
                        help="decode steps fused per dispatch (default: the sampler's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter and compute dtype of BOTH sides (bfloat16 uses AMX on "
                             "CPUs that have it, for PyTorch and XLA alike)")
    parser.add_argument("--threads", type=int, choices=(0, 1), default=0,
                        help="0: all cores (default); 1: the whole process pinned to one core "
                             "-- a comparison of work done, robust to other processes on the "
                             "machine")
    parser.add_argument("--skip-torch", action="store_true", help="time only our sampler")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="also time prefill / decode step / forward / sampling separately")
    return parser.parse_args(argv)


def make_checkpoint(args, directory: str):
    """Writes a random Qwen2 checkpoint with transformers and returns the torch model."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_theta=10000.0, initializer_range=0.02,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(directory)
    return model.to(getattr(torch, args.dtype))


def make_prompts(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, size=args.batch)
    return [rng.integers(2, args.vocab, size=int(n)).tolist() for n in lengths]


def decode_flops(cfg, prompts, new_tokens: int) -> float:
    """Useful FLOPs of generating ``new_tokens`` per prompt after the prefill (see module doc)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    matmul_params = cfg.num_layers * (d * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
                                      + cfg.num_heads * hd * d + 3 * d * f)
    matmul_params += d * cfg.vocab_size  # output projection
    total = 0.0
    for prompt in prompts:
        # Token t (t >= 1) comes from a forward of the previous token at context length len + t.
        contexts = len(prompt) + np.arange(1, new_tokens)
        total += (new_tokens - 1) * 2.0 * matmul_params
        total += float(np.sum(4.0 * cfg.num_layers * cfg.num_heads * hd * contexts))
    return total


def matmul_peak_flops(dtype: str, size: int = 2048, repeats: int = 10) -> float:
    """Best observed FLOP/s of a [size, size] @ [size, size] jnp.dot in ``dtype``."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def time_ours(cfg, params, prompts, args, seed: int) -> float:
    from offpolicy_jax import sampling

    extra = {}
    if args.steps_per_dispatch:
        extra["steps_per_dispatch"] = args.steps_per_dispatch
    start = time.perf_counter()
    out = sampling.generate(cfg, params, prompts, max_new_tokens=args.new_tokens,
                            temperature=1.0, eos_token_ids=(), seed=seed, **extra)
    elapsed = time.perf_counter() - start
    assert out.tokens.shape == (len(prompts), args.new_tokens), out.tokens.shape
    assert int(out.lengths.min()) == args.new_tokens
    return elapsed


def torch_inputs(prompts):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def time_torch(model, prompts, args, seed: int) -> float:
    import torch

    ids, mask = torch_inputs(prompts)
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape == (len(prompts), ids.shape[1] + args.new_tokens), out.shape
    return elapsed


def breakdown(cfg, params, prompts, args):
    """Times the pieces of our sampler separately (median of 20) and returns a dict of seconds."""
    import jax
    import jax.numpy as jnp

    from offpolicy_jax import models
    from offpolicy_jax.sampling import decode, distribution, sampler as gen

    def median_time(fn, *fn_args, repeats=20):
        jax.block_until_ready(fn(*fn_args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    batch = gen._power_of_two_at_least(len(prompts))
    prompt_bucket = gen._power_of_two_at_least(max(map(len, prompts)), gen.MIN_PROMPT_BUCKET)
    response_bucket = gen._power_of_two_at_least(args.new_tokens, gen.MIN_RESPONSE_BUCKET)
    window = min(response_bucket, gen.FIRST_CACHE_WINDOW)
    tokens, mask = gen._left_pad(prompts, batch, prompt_bucket)
    sampling_params = distribution.SamplingParams(temperature=1.0)
    keys = jax.random.split(jax.random.key(0), batch)
    statics = dict(params_sampling=sampling_params, eos_ids=(), pad_token_id=0, mesh=None)
    split = gen._split_layer_params(cfg, params)
    prefill = lambda: gen._prefill(cfg, split, tokens, mask, keys, np.ones(batch, bool),  # noqa
                                   jnp.int32(args.new_tokens), num_samples=1,
                                   response_bucket=response_bucket, cache_window=window,
                                   **statics)
    result = {"prefill": median_time(prefill, repeats=5)}

    result["split_params"] = median_time(gen._split_layer_params, cfg, params, repeats=5)
    cache, state = prefill()
    # Decode steps: time 16 steps from the same starting point (cache is donated: re-prefill).
    steps = 16

    def decode_chunk():
        c, s = prefill()
        jax.block_until_ready(s)
        start = time.perf_counter()
        jax.block_until_ready(gen._decode(cfg, split, c, s, steps=steps, **statics))
        return time.perf_counter() - start

    decode_chunk()
    result["decode_step"] = statistics.median(decode_chunk() for _ in range(5)) / steps

    forward = jax.jit(functools.partial(decode.decode_step, cfg))
    result["forward_step"] = median_time(forward, split, state["last_token"],
                                         state["next_position"], cache)
    model_cache = models.init_cache(cfg, batch, prompt_bucket + window)
    model_cache["mask"] = jnp.ones_like(model_cache["mask"])
    model_cache["index"] = jnp.int32(prompt_bucket)
    model_forward = jax.jit(lambda params, cache, tokens, positions: models.apply_cached(
        cfg, params, tokens[:, None], cache, positions[:, None]))
    result["models.apply_cached_step"] = median_time(
        model_forward, params, model_cache, state["last_token"], state["next_position"])
    logits = jax.random.normal(jax.random.key(1), (batch, cfg.vocab_size), jnp.float32)
    sample = jax.jit(lambda logits, keys: distribution.sample_from_logits(
        logits, distribution.row_uniforms(keys, 1), sampling_params))
    result["sampling_step"] = median_time(sample, logits, keys)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.threads == 1:
        # XLA:CPU's dot kernels keep a worker pool of their own whatever the Eigen flag says, so
        # pin the whole process (threads inherit the mask) to one core before JAX or PyTorch
        # starts a thread; the flag still keeps XLA from splitting its other ops.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()
    import jax
    import jax.numpy as jnp
    import torch

    from offpolicy_jax import models

    if args.threads == 1:
        torch.set_num_threads(1)
    prompts = make_prompts(args)
    with tempfile.TemporaryDirectory() as directory:
        torch_model = make_checkpoint(args, directory)
        cfg, params = models.load_hf_checkpoint(directory, dtype=getattr(jnp, args.dtype))
    generated = args.batch * args.new_tokens
    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")
    print(f"model: {cfg.num_params() / 1e6:.1f} M params (hidden {cfg.hidden_size}, "
          f"{cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"vocab {cfg.vocab_size}, {args.dtype}); batch {args.batch}, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens, {args.new_tokens} new tokens, temperature 1, no EOS")

    start = time.perf_counter()
    time_ours(cfg, params, prompts, args, seed=0)
    print(f"our warm-up (includes compilation): {time.perf_counter() - start:.2f} s")
    if not args.skip_torch:
        time_torch(torch_model, prompts, args, seed=0)
    ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
    for repeat in range(args.repeats):
        start_cpu = time.process_time()
        ours.append(time_ours(cfg, params, prompts, args, seed=repeat + 1))
        ours_cpu.append(time.process_time() - start_cpu)
        if not args.skip_torch:
            start_cpu = time.process_time()
            theirs.append(time_torch(torch_model, prompts, args, seed=repeat + 1))
            theirs_cpu.append(time.process_time() - start_cpu)
    ours_tps = generated / statistics.median(ours)
    print(f"ours:         {ours_tps:8.1f} tokens/s   (runs: "
          f"{', '.join(f'{t:.2f}' for t in ours)} s; CPU "
          f"{', '.join(f'{t:.2f}' for t in ours_cpu)} s)")
    if theirs:
        theirs_tps = generated / statistics.median(theirs)
        print(f"transformers: {theirs_tps:8.1f} tokens/s   (runs: "
              f"{', '.join(f'{t:.2f}' for t in theirs)} s; CPU "
              f"{', '.join(f'{t:.2f}' for t in theirs_cpu)} s)")
        print(f"speed-up:     {ours_tps / theirs_tps:8.2f} x wall clock; "
              f"{statistics.median(theirs_cpu) / statistics.median(ours_cpu):.2f} x in CPU "
              "time (process CPU seconds; with --threads 1 this is the load-robust measure)")

    peak = matmul_peak_flops(args.dtype)
    flops = decode_flops(cfg, prompts, args.new_tokens)
    if args.breakdown:
        parts = breakdown(cfg, params, prompts, args)
        print("where our time goes (median):")
        for name, seconds in parts.items():
            print(f"  {name:14s} {seconds * 1e3:8.2f} ms")
        decode_time = parts["decode_step"] * (args.new_tokens - 1)
        print(f"decode: {flops / decode_time / 1e9:.1f} GFLOP/s useful = "
              f"{flops / decode_time / peak:.1%} of the measured matmul peak "
              f"({peak / 1e9:.1f} GFLOP/s)")
    total_time = statistics.median(ours)
    print(f"whole generate (prefill included): {flops / total_time / 1e9:.1f} GFLOP/s of decode "
          f"work = {flops / total_time / peak:.1%} of peak")


if __name__ == "__main__":
    main()
