r"""One GRPO iteration, ours against TRL's ``GRPOTrainer``, on two response-length workloads.

    python benchmarks/rl_iteration.py                       # both workloads, TRL if importable
    python benchmarks/rl_iteration.py --workloads=longtail --iterations=5

The workload of the speed issue: a random 9.5M-parameter Qwen2-shaped checkpoint (hidden 384, 6
layers, 6 query / 2 key-value heads, the character tokenizer), 8 prompts x 8 responses per
iteration, one optimizer update per batch, no KL, temperature 1, float32, a reward that is a
fixed function of the response text (so the verifier costs nothing on either side). Two length
regimes, set through the EOS logit (the checkpoint is random, so lengths are what we make them):

* ``budget``: EOS never sampled: every response runs to ``--max_new_tokens`` = 64.
* ``longtail``: EOS gets a fixed logit offset so that each step ends a row with probability
  ~1/40 (geometric lengths, mean ~40, a few rows past 100) under a budget of 256 — the
  long-tailed lengths RL produces, where padding to the budget wastes most of the work.

Four columns, each measured in this process on the same checkpoint and prompts, the median of
``--iterations`` iterations after ``--warmup``:

* ``ours``: the trainer as it runs by default (``training.trainer.Learner.iteration``).
* ``ours, unpacked``: the same with ``--pack_sequences=false``: the update on rows padded to the
  batch's longest response (rounded up to a quarter of the budget) instead of packed rows.
* ``ours, padded``: the savings of the speed issue turned off — a separate forward for the old
  policy's log-probs, the update at the full response budget, no packing — i.e. the trainer
  before them.
* ``TRL``: ``trl.GRPOTrainer`` (``beta=0``, one iteration per generation), when ``trl`` is
  importable; otherwise the script says so and prints our columns only.

The update's model FLOPs on the real tokens (``benchmarks.common.model_flops_per_token``, the
same work on both sides) give each side's update FLOP/s against the float32 matmul peak measured
in the same run, and what our iteration would take with the update at that peak.

Per-stage split: ours reports rollout (generation + reward), prepare (old/stored-policy passes,
advantages) and update; TRL's step is split into generation+scoring and the rest. The ratio
printed is TRL's time / ours (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import matmul_peak_flops, model_flops_per_token  # noqa: E402

WORKLOADS = {"budget": {"max_new_tokens": 64, "eos_probability": 0.0},
             "longtail": {"max_new_tokens": 256, "eos_probability": 1 / 40}}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="budget,longtail")
    parser.add_argument("--iterations", type=int, default=7, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=3, help="iterations before measuring "
                        "(a batch whose response width is new compiles the update once)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--skip_trl", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.workloads = args.workloads.split(",")
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; choose from {sorted(WORKLOADS)}")
    return args


# -- the checkpoint and the prompts ------------------------------------------------------------


def make_checkpoint(directory: str, eos_probability: float) -> dict:
    """A random Qwen2-shaped checkpoint whose per-step EOS probability is ``eos_probability``
    (0: never), written as a Hugging Face checkpoint both sides load.

    How: every token embedding gets a constant 1.0 in dimension 0 (the other entries are
    0.02-scale), so after the final RMSNorm dimension 0 of the hidden state is a near-constant
    h0 at every position; the output projection's row 0 is zero except for the EOS column, which
    gets ``offset / h0``. The EOS logit is then the random model's logit plus ``offset``, chosen
    so that p(EOS) = ``eos_probability`` against the other tokens' near-uniform logits."""
    import jax
    import jax.numpy as jnp

    from offpolicy_jax import models
    from offpolicy_jax.data import tokenizer as tokenizer_lib

    tokenizer_lib.build_char_tokenizer(directory)
    tokenizer = models.load_tokenizer(directory)
    eos = tokenizer.eos_token_id
    cfg = models.ModelConfig(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1024,
        num_layers=6, num_heads=6, num_kv_heads=2, qkv_bias=True, tie_word_embeddings=False,
        max_position_embeddings=512, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(leaf.shape, np.float32)
        if "bias" in jax.tree_util.keystr(path):
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, models.param_shapes(cfg))
    params["embed"][:, 0] = 1.0
    params["lm_head"][0, :] = 0.0
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 32)), jnp.int32)
    hidden = models.apply_hidden(cfg, params, tokens)
    h0 = float(jnp.mean(hidden[..., 0]))
    if eos_probability > 0:
        offset = np.log(eos_probability * (cfg.vocab_size - 1) / (1.0 - eos_probability))
    else:
        offset = -1e4 / max(abs(h0), 1e-3)   # never
    params["lm_head"][0, eos] = offset / h0
    models.save_hf_checkpoint(directory, cfg, params)
    # The update's model FLOPs per real token (benchmarks.common): the matmul part, and the
    # attention part per position of context.
    return {"params_millions": round(cfg.num_params() / 1e6, 2), "h0": h0,
            "flops_per_token": model_flops_per_token(cfg, 0),
            "attention_flops_per_position": model_flops_per_token(cfg, 1)
            - model_flops_per_token(cfg, 0)}


def write_prompts(path: str, num: int, model_dir: str) -> float:
    """``num`` arith problems in the task's own prompt format, as a JSONL dataset (used raw);
    returns their mean length in tokens."""
    from offpolicy_jax import models
    from offpolicy_jax.data import prompts as prompts_lib
    tokenizer = models.load_tokenizer(model_dir)
    lengths = []
    with open(path, "w") as f:
        for record in prompts_lib.arith_records("heldout", num):
            f.write(json.dumps({"question": record["prompt"], "answer": record["gold"]}) + "\n")
            lengths.append(len(tokenizer.encode(record["prompt"], add_special_tokens=False)))
    return float(np.mean(lengths))


def text_reward(text: str) -> float:
    """A fixed function of the response text: half the responses score 1 (no verifier cost)."""
    return float(len(text) % 2)


# -- ours --------------------------------------------------------------------------------------


@contextlib.contextmanager
def padded_trainer():
    """The trainer with a separate old-policy forward and the update at the full budget."""
    from offpolicy_jax.training import rollout, trainer
    saved = trainer.old_outputs_in_update, rollout.response_bucket
    trainer.old_outputs_in_update = lambda algorithm, config: False
    rollout.response_bucket = lambda longest, budget, parts=4: budget
    try:
        yield
    finally:
        trainer.old_outputs_in_update, rollout.response_bucket = saved


def grpo_algorithm():
    from offpolicy_jax import losses
    from offpolicy_jax.training.algorithm import Algorithm

    def advantages(inputs, info):
        return {"advantages": np.asarray(losses.grpo_advantages(inputs["rewards"],
                                                                info.group_size))}

    def loss(inputs, info):
        del info
        return losses.grpo(inputs["logp"], inputs["old_logp"], inputs["advantages"],
                           inputs["mask"], kl_coef=0.0)

    def reward_fn(records, responses, pool):
        del records, pool
        return np.array([text_reward(text) for text in responses], np.float32)

    return Algorithm(name="grpo", loss=loss, prepare=advantages, forward={"old": ("logp",)},
                     reward_fn=reward_fn)


def make_learner(model_dir: str, dataset: str, workdir: str, max_new_tokens: int, args, *,
                 pack: bool = True):
    from offpolicy_jax.training import trainer
    from offpolicy_jax.training.config import RunConfig

    algorithm = grpo_algorithm()
    config = RunConfig(
        workdir=workdir, model=model_dir, dataset=dataset, prompt_format="raw",
        batch_size=args.prompts, group_size=args.group_size, max_new_tokens=max_new_tokens,
        num_minibatches=1, num_passes=1, temperature=1.0, learning_rate=1e-6, eval_size=1,
        eval_samples=1, progress=False, pack_sequences=pack)
    config.validate(algorithm)
    return trainer.Learner(trainer.Session(config, "grpo", reward_fn=algorithm.reward_fn),
                           algorithm)


def time_ours(model_dir: str, dataset: str, workdir: str, max_new_tokens: int, args) -> dict:
    """Our columns, their iterations interleaved (ours, unpacked, padded, ours, ...) so that a
    change in the machine's load hits all alike. Each learner samples from its own policy with
    the same seeds, so all see the same lengths up to round-off."""
    learners = {"ours": make_learner(model_dir, dataset, os.path.join(workdir, "ours"),
                                     max_new_tokens, args),
                "ours_unpacked": make_learner(model_dir, dataset,
                                              os.path.join(workdir, "unpacked"),
                                              max_new_tokens, args, pack=False)}
    with padded_trainer():
        learners["ours_padded"] = make_learner(model_dir, dataset,
                                               os.path.join(workdir, "padded"),
                                               max_new_tokens, args, pack=False)
    records = {name: [] for name in learners}
    for iteration in range(1, args.warmup + args.iterations + 1):
        for name in ("ours", "ours_unpacked"):
            records[name].append(learners[name].iteration(iteration))
        with padded_trainer():
            records["ours_padded"].append(learners["ours_padded"].iteration(iteration))
    for learner in learners.values():
        learner.session.pool.close()
        learner.session.checkpointer.close()
        learner.session.logger.close()
    return {name: summarise(rows, args.warmup) for name, rows in records.items()}


def summarise(records: list[dict], warmup: int) -> dict:
    measured = records[warmup:]
    median = lambda key: float(np.median([r[key] for r in measured]))   # noqa: E731
    return {"iteration_s": median("step_s"), "rollout_s": median("rollout_s"),
            "prepare_s": median("prepare_s"), "update_s": median("update_s"),
            "first_iteration_s": records[0]["step_s"],
            "mean_length": float(np.mean([r["response_length"] for r in measured])),
            "widths": sorted({int(r["response_width"]) for r in measured}),
            # The share of the update's forward positions that are real tokens (prompt and
            # response), of the padded rows and, when packed, of the packed rows.
            "token_fraction": float(np.mean([r.get("packed_token_fraction",
                                                   r["padded_token_fraction"])
                                             for r in measured]))}


# -- TRL ---------------------------------------------------------------------------------------


def time_trl(model_dir: str, dataset: str, workdir: str, max_new_tokens: int, args) -> dict:
    import datasets
    import torch
    import transformers
    import trl

    prompts = [json.loads(line)["question"] for line in open(dataset)]

    # A fixed fingerprint: datasets' hashing of a fresh table fails with some pyarrow builds,
    # and the benchmark needs no cache.
    train = datasets.Dataset(datasets.table.InMemoryTable.from_pydict({"prompt": prompts * 64}),
                             fingerprint="rl_iteration_prompts")

    def reward(completions, **kwargs):
        del kwargs
        return [text_reward(text) for text in completions]

    steps = args.warmup + args.iterations
    config = trl.GRPOConfig(
        output_dir=workdir, per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size, max_completion_length=max_new_tokens,
        temperature=1.0, beta=0.0, num_iterations=1, learning_rate=1e-6,
        lr_scheduler_type="constant", max_steps=steps,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", bf16=False,
        seed=0, shuffle_dataset=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    grpo = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=train,
                           processing_class=tokenizer)
    times, generation = [], []
    generate = grpo._generate_and_score_completions   # noqa: SLF001 (timing only)

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        generation.append(time.perf_counter() - start)
        return out

    grpo._generate_and_score_completions = timed_generate   # noqa: SLF001

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *unused, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, *unused, **kw):
            times.append(time.perf_counter() - self.start)

    grpo.add_callback(StepTimer())
    grpo.train()
    measured = times[args.warmup:]
    gen = generation[args.warmup:len(times)]
    return {"iteration_s": float(np.median(measured)),
            "generation_s": float(np.median(gen)) if gen else None,
            "first_iteration_s": times[0]}


def main(argv=None):
    args = parse_args(argv)
    results = {}
    try:
        import trl   # noqa: F401
        have_trl = not args.skip_trl
    except ImportError:
        have_trl = False
        print("trl is not importable: the TRL column is not measured (pip install trl)")
    # The float32 matmul peak of this machine, now: what an update could reach at best.
    peak = matmul_peak_flops()
    print(f"float32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s")
    results["matmul_peak_flops"] = peak
    for name in args.workloads:
        workload = WORKLOADS[name]
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, dataset = os.path.join(tmp, "model"), os.path.join(tmp, "prompts.jsonl")
            info = make_checkpoint(model_dir, workload["eos_probability"])
            info["prompt_tokens"] = write_prompts(dataset, args.prompts * 2, model_dir)
            row = {"checkpoint": info, **time_ours(model_dir, dataset, tmp,
                                                   workload["max_new_tokens"], args)}
            if have_trl:
                row["trl"] = time_trl(model_dir, dataset, os.path.join(tmp, "trl"),
                                      workload["max_new_tokens"], args)
            row["update"] = update_throughput(row, args.prompts * args.group_size, peak)
            results[name] = row
        print_row(name, workload, row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def update_throughput(row: dict, rows: int, peak: float) -> dict:
    """Model FLOP/s of the update, ours and TRL's (its step less generation and scoring), on the
    iteration's real tokens (prompt and response, no padding) — the same work on both sides;
    and what our iteration would take, and TRL's time over it, with the update at ``peak``."""
    info, ours = row["checkpoint"], row["ours"]
    sequence = info["prompt_tokens"] + ours["mean_length"]
    flops = rows * sequence * (info["flops_per_token"]
                               + info["attention_flops_per_position"] * sequence)
    result = {"flops": flops, "ours_flops_per_s": flops / ours["update_s"],
              "iteration_s_at_peak": ours["rollout_s"] + ours["prepare_s"] + flops / peak,
              "peak_flops_per_s": peak}
    trl_row = row.get("trl")
    if trl_row and trl_row.get("generation_s") is not None:
        rest = trl_row["iteration_s"] - trl_row["generation_s"]
        result["trl_flops_per_s"] = flops / rest
        result["trl_over_ours_at_peak"] = trl_row["iteration_s"] / result["iteration_s_at_peak"]
    return result


def print_row(name: str, workload: dict, row: dict) -> None:
    ours, unpacked, padded = row["ours"], row["ours_unpacked"], row["ours_padded"]
    print(f"\n{name}: budget {workload['max_new_tokens']}, mean response length "
          f"{ours['mean_length']:.1f}, {row['checkpoint']['params_millions']}M parameters")
    for label, r in (("ours", ours), ("ours, unpacked", unpacked), ("ours, padded", padded)):
        print(f"  {label:15s} {r['iteration_s']:6.2f} s/iteration (rollout {r['rollout_s']:.2f}, "
              f"prepare {r['prepare_s']:.2f}, update {r['update_s']:.2f}; first "
              f"{r['first_iteration_s']:.1f} s; real tokens {r['token_fraction']:.2f} of the "
              f"update's positions, widths {r['widths']})")
    print(f"  unpacked / ours: {unpacked['iteration_s'] / ours['iteration_s']:.2f}x, "
          f"padded / ours: {padded['iteration_s'] / ours['iteration_s']:.2f}x")
    if "trl" in row:
        trl_row = row["trl"]
        generation = (f"generation+scoring {trl_row['generation_s']:.2f}, "
                      if trl_row["generation_s"] is not None else "")
        print(f"  {'TRL':15s} {trl_row['iteration_s']:6.2f} s/iteration ({generation}first "
              f"{trl_row['first_iteration_s']:.1f} s)")
        print(f"  TRL / ours: {trl_row['iteration_s'] / ours['iteration_s']:.2f}x")
    update = row["update"]
    peak = update["peak_flops_per_s"]
    line = (f"  update: {update['flops'] / 1e9:.0f} GFLOP of real tokens; ours "
            f"{update['ours_flops_per_s'] / 1e9:.0f} GFLOP/s "
            f"({update['ours_flops_per_s'] / peak:.0%} of the matmul peak)")
    if "trl_flops_per_s" in update:
        line += (f", TRL {update['trl_flops_per_s'] / 1e9:.0f} GFLOP/s "
                 f"({update['trl_flops_per_s'] / peak:.0%})")
    print(line)
    line = (f"  with our update at the matmul peak: {update['iteration_s_at_peak']:.2f} "
            f"s/iteration")
    if "trl_over_ours_at_peak" in update:
        line += f", TRL / ours {update['trl_over_ours_at_peak']:.2f}x"
    print(line)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
