"""Sampler throughput: ``offpolicy_jax.sampling.generate`` against transformers ``generate``.

    python benchmarks/sampler.py                 # the issue's setting (about 2-4 min on 2 cores)
    python benchmarks/sampler.py --repeats 5 --vocab 32768
    python benchmarks/sampler.py --lengths longtail  # long-tailed response lengths, budget 256

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

``--lengths longtail``: the lengths RL produces -- most responses short, a few at the budget.
The checkpoint is untied and its EOS logit raised by a constant (the embeddings carry a constant
1 in dimension 0, so after the final norm that dimension is a near-constant h0; the output row
of EOS gets ``offset / h0`` there), so every step ends a row with probability ~1/``--eos-mean``:
geometric lengths, mean ~25 % of the 256-token budget by default, a few rows at the budget. Both
sides sample with that EOS and stop rows at it; transformers keeps computing finished rows
until the longest ends, ours compacts them out (``sampling.generate(compact=True)``, the
default). Reported: *useful* tokens/s (the responses' real tokens, EOS included, per second),
for ours with and without compaction and for transformers, interleaved.
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
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per row (the budget with --lengths longtail; "
                             "default 128, or 256 with longtail)")
    parser.add_argument("--lengths", choices=("budget", "longtail"), default="budget",
                        help="budget: no EOS, every row runs to --new-tokens; longtail: "
                             "geometric lengths through a raised EOS logit")
    parser.add_argument("--eos-mean", type=float, default=None,
                        help="longtail: mean steps to EOS (default: a quarter of the budget)")
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
    args = parser.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = 256 if args.lengths == "longtail" else 128
    if args.eos_mean is None:
        args.eos_mean = args.new_tokens / 4
    if args.lengths == "longtail" and args.eos_mean <= 1:
        parser.error(f"--eos-mean must be > 1, got {args.eos_mean}")
    return args


EOS_ID = 1


def raise_eos_logit(model, args) -> None:
    """Makes every step end a row with probability ~1/``args.eos_mean`` (module doc, longtail):
    an untied checkpoint whose EOS logit is the random model's plus a constant offset."""
    import torch

    p = 1.0 / args.eos_mean
    offset = float(np.log(p * (args.vocab - 1) / (1.0 - p)))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[EOS_ID, :] = 0.0
        ids = torch.randint(2, args.vocab, (4, 32), generator=torch.Generator().manual_seed(0))
        h0 = float(model.model(input_ids=ids).last_hidden_state[..., 0].mean())
        model.lm_head.weight[EOS_ID, 0] = offset / h0


def make_checkpoint(args, directory: str):
    """Writes a random Qwen2 checkpoint with transformers and returns the torch model."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=args.lengths == "budget", rope_theta=10000.0, initializer_range=0.02,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if args.lengths == "longtail":
        raise_eos_logit(model, args)
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


def time_ours(cfg, params, prompts, args, seed: int, compact: bool = True) -> tuple[float, int]:
    """Seconds of one ``generate`` call and the useful tokens it produced."""
    from offpolicy_jax import sampling

    extra = {}
    if args.steps_per_dispatch:
        extra["steps_per_dispatch"] = args.steps_per_dispatch
    longtail = args.lengths == "longtail"
    start = time.perf_counter()
    out = sampling.generate(cfg, params, prompts, max_new_tokens=args.new_tokens,
                            temperature=1.0, eos_token_ids=(EOS_ID,) if longtail else (),
                            seed=seed, compact=compact, **extra)
    elapsed = time.perf_counter() - start
    assert out.tokens.shape == (len(prompts), args.new_tokens), out.tokens.shape
    assert longtail or int(out.lengths.min()) == args.new_tokens
    return elapsed, int(out.lengths.sum())


def torch_inputs(prompts):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def time_torch(model, prompts, args, seed: int) -> tuple[float, int]:
    """Seconds of one transformers ``generate`` call and the useful tokens it produced."""
    import torch

    ids, mask = torch_inputs(prompts)
    torch.manual_seed(seed)
    longtail = args.lengths == "longtail"
    lengths = dict(eos_token_id=EOS_ID) if longtail else dict(
        min_new_tokens=args.new_tokens, eos_token_id=None)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                             pad_token_id=0, **lengths)
    elapsed = time.perf_counter() - start
    new = out[:, ids.shape[1]:]
    if not longtail:
        assert new.shape == (len(prompts), args.new_tokens), out.shape
        return elapsed, new.numel()
    # A row's tokens run up to and including its first EOS (pads follow), else the budget.
    is_eos = (new == EOS_ID).int()
    ended = is_eos.any(dim=1)
    first = is_eos.argmax(dim=1) + 1
    useful = torch.where(ended, first, torch.full_like(first, new.shape[1]))
    return elapsed, int(useful.sum())


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
    longtail = args.lengths == "longtail"
    lengths_text = (f"EOS with probability ~1/{args.eos_mean:g} per step" if longtail
                    else "no EOS")
    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")
    print(f"model: {cfg.num_params() / 1e6:.1f} M params (hidden {cfg.hidden_size}, "
          f"{cfg.num_layers} layers, {cfg.num_heads}/{cfg.num_kv_heads} heads, "
          f"vocab {cfg.vocab_size}, {args.dtype}); batch {args.batch}, prompts {args.min_prompt}-"
          f"{args.max_prompt} tokens, {args.new_tokens} new tokens at most, temperature 1, "
          f"{lengths_text}")

    # Columns, timed interleaved; "static" is ours without compaction (long-tailed only).
    sides = {"ours": functools.partial(time_ours, cfg, params, prompts, args)}
    if longtail:
        sides["ours, static batch"] = functools.partial(time_ours, cfg, params, prompts, args,
                                                        compact=False)
    if not args.skip_torch:
        sides["transformers"] = functools.partial(time_torch, torch_model, prompts, args)
    for name, side in sides.items():
        start = time.perf_counter()
        side(seed=0)
        print(f"{name} warm-up (ours: includes compilation): {time.perf_counter() - start:.2f} s")
    runs = {name: [] for name in sides}          # (seconds, useful tokens, CPU seconds)
    for repeat in range(args.repeats):
        for name, side in sides.items():
            start_cpu = time.process_time()
            seconds, useful = side(seed=repeat + 1)
            runs[name].append((seconds, useful, time.process_time() - start_cpu))
    rates = {}
    for name, measured in runs.items():
        rates[name] = statistics.median(useful / seconds for seconds, useful, _ in measured)
        print(f"{name:19s} {rates[name]:8.1f} useful tokens/s   (runs: "
              f"{', '.join(f'{t:.2f} s/{n}' for t, n, _ in measured)} tokens; CPU "
              f"{', '.join(f'{c:.2f}' for _, _, c in measured)} s)")
    if "transformers" in rates:
        cpu_rate = {name: statistics.median(n / c for _, n, c in measured)
                    for name, measured in runs.items()}
        for name in [n for n in rates if n != "transformers"]:
            print(f"speed-up, {name}: {rates[name] / rates['transformers']:6.2f} x wall clock; "
                  f"{cpu_rate[name] / cpu_rate['transformers']:.2f} x useful tokens per CPU "
                  "second (with --threads 1 the load-robust measure)")
    if longtail:
        print(f"compaction: {rates['ours'] / rates['ours, static batch']:.2f} x the static batch")
        return
    ours = [seconds for seconds, _, _ in runs["ours"]]

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
