r"""Evaluate a checkpoint on math benchmarks: pass@k (unbiased), maj@k, lengths, no-answer rate.

    python -m offpolicy_jax.eval --model=DIR_OR_ALIAS --benchmarks=math500,aime24 \
        --num_samples=8 --temperature=0.6 --top_p=0.95 --max_new_tokens=4096 --out=DIR

``--model`` is a Hugging Face checkpoint directory (config.json, safetensors, tokenizer) or the
alias ``tiny-arith`` (the embedded model, built and cached on first use). ``--benchmarks`` takes
``arith`` (the embedded task's held-out set) and ``gsm8k``, ``gsm8k_train``, ``math500``,
``aime24``, ``amc23``, ``minerva``, ``olympiadbench``. The table is printed on stdout and written
with ``results.json`` and ``samples.jsonl`` into ``--out`` (without ``--out`` they go to a temporary
folder that is removed at the end); see ``offpolicy_jax.eval.harness``. The benchmark files ship
with the package; ``--data_dir`` (or ``$OFFPOLICY_JAX_DATA``) reads the user's own copies instead.

Test-time methods at matched compute (``--test_time_method``; see ``offpolicy_jax.eval.test_time``),
e.g. LatentSeek on the self-verifying warm start:

    python -m offpolicy_jax.eval --model=tiny-arith-verify --benchmarks=arith --limit=64 \
        --test_time_method=latentseek --num_samples=1 --max_new_tokens=48 --out=/tmp/evalls

Quick run of the embedded default (CPU, about a minute once the model is cached):

    python -m offpolicy_jax.eval --model=tiny-arith --benchmarks=arith --limit=64 \
        --num_samples=8 --max_new_tokens=48 --out=/tmp/evalout
"""

import sys
import tempfile

from absl import app, flags, logging as absl_logging

from offpolicy_jax import compilation_cache
from offpolicy_jax.data import prompts as prompts_lib
from offpolicy_jax.eval import harness, test_time

_DEFAULTS = harness.HarnessConfig()

MODEL = flags.DEFINE_string("model", _DEFAULTS.model, "Checkpoint directory, run "
                            "directory (its latest checkpoint) or alias "
                            "('tiny-arith').")
BENCHMARKS = flags.DEFINE_string("benchmarks", ",".join(_DEFAULTS.benchmarks),
                                 f"Comma list of: {', '.join(harness.BENCHMARK_NAMES)}.")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", _DEFAULTS.num_samples,
                                   "Responses per problem (n).")
TEMPERATURE = flags.DEFINE_float("temperature", _DEFAULTS.temperature,
                                 "Sampling temperature (0: greedy).")
TOP_P = flags.DEFINE_float("top_p", _DEFAULTS.top_p, "Nucleus mass in (0, 1]; 1 disables it.")
TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (unset: off).")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Response budget in tokens "
                                      "(default: min(1024, half the model's context)).")
K = flags.DEFINE_string("k", None, "Comma list of k for pass@k, each <= --num_samples "
                        "(default: every power of two <= n, and n). maj@k is reported for each "
                        "k >= 2 and for n.")
LIMIT = flags.DEFINE_integer("limit", None, "Only the first K problems of each benchmark "
                             f"(default: all; arith: {harness.ARITH_EVAL_SIZE}).")
MESH = flags.DEFINE_string("mesh", _DEFAULTS.mesh, "Device mesh 'data,fsdp,tensor'; -1 takes the "
                           "remaining devices.")
OUT = flags.DEFINE_string("out", None, "Output directory (results.md, results.json, "
                          "samples.jsonl); default: a temporary folder, removed at the end "
                          "(the table is printed either way).")
SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Sampling seed (the same for every "
                            "benchmark).")
USE_CHAT_TEMPLATE = flags.DEFINE_bool("use_chat_template", _DEFAULTS.use_chat_template,
                                      "Format questions with the tokenizer's chat template when "
                                      "it has one (else the plain template).")
INSTRUCTION = flags.DEFINE_string("instruction", prompts_lib.DEFAULT_INSTRUCTION,
                                  "Appended to every benchmark question ('' for none).")
PROMPT_FORMAT = flags.DEFINE_enum("prompt_format", _DEFAULTS.prompt_format,
                                  list(prompts_lib.PROMPT_FORMATS), "Benchmark questions: 'chat' "
                                  "(see --use_chat_template and --instruction), 'instruction' "
                                  "(the plain template with --instruction) or 'raw' (as is).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Problems per generation "
                                  "chunk (each chunk samples batch_size * num_samples rows).")
DTYPE = flags.DEFINE_enum("dtype", _DEFAULTS.dtype, ["float32", "bfloat16"], "Parameter dtype.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "A folder with your own copies of the benchmark "
                               "files (<file>.jsonl or .jsonl.gz, not checksum-verified); default: "
                               "$OFFPOLICY_JAX_DATA, else the files packaged with offpolicy_jax.")
RERANK_WITH = flags.DEFINE_string("rerank_with", None, "Best-of-n: rerank each problem's samples "
                                  "by a generative verifier's ratings, 'self' (the model rates "
                                  "its own samples) or a checkpoint directory / alias; reports "
                                  "reranked@n and the verifier's accuracy.")
RERANK_SAMPLES = flags.DEFINE_integer("rerank_samples", _DEFAULTS.rerank_samples,
                                      "Best-of-n: verifications per sample; LatentSeek's "
                                      "self-reward: ratings per answer (averaged).")
TEST_TIME_METHOD = flags.DEFINE_enum(
    "test_time_method", _DEFAULTS.test_time_method, list(test_time.TEST_TIME_METHODS),
    "How each problem's answer is produced: 'sample' (pass@k/maj@k of the n samples only), "
    "'majority' (vote of the n samples), 'best_of_n' (the sample the verifier rates best) or "
    "'latentseek' (policy gradient on the greedy answer's latent states, needs "
    "--num_samples=1); the last three report accuracy ± standard error, compute per problem "
    "and seconds in results.json's 'test_time'.")
TEST_TIME_REWARD = flags.DEFINE_enum(
    "test_time_reward", _DEFAULTS.test_time_reward, list(test_time.TEST_TIME_REWARDS),
    "What scores answers for best_of_n and latentseek: 'verifier' (--rerank_with, default the "
    "model itself) or 'oracle' (the gold answer, PSRM: uses the gold, an upper bound).")
LATENTSEEK_STEPS = flags.DEFINE_integer("latentseek_steps", _DEFAULTS.latentseek_steps,
                                        "LatentSeek: most latent updates per problem.")
LATENTSEEK_LR = flags.DEFINE_float("latentseek_lr", _DEFAULTS.latentseek_lr,
                                   "LatentSeek: Adam learning rate on the latents.")
LATENTSEEK_FRACTION = flags.DEFINE_float("latentseek_fraction", _DEFAULTS.latentseek_fraction,
                                         "LatentSeek: share rho of the greedy answer's positions "
                                         "optimised (K = min(floor(rho L), 300)).")
LATENTSEEK_THRESHOLD = flags.DEFINE_float("latentseek_threshold", _DEFAULTS.latentseek_threshold,
                                          "LatentSeek: stop once the reward (in [-1, 0]) is "
                                          "above this.")
PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars on stderr.")
COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX's persistent compilation "
                                        "cache directory (default: the package's cache, "
                                        "$OFFPOLICY_JAX_CACHE/jax_compilation_cache; empty: off).")


def config_from_flags() -> harness.HarnessConfig:
    """The :class:`harness.HarnessConfig` of the parsed flags (``--top_p=1`` means no nucleus)."""
    return harness.HarnessConfig(
        model=MODEL.value, benchmarks=harness.parse_benchmarks(BENCHMARKS.value),
        num_samples=NUM_SAMPLES.value, ks=harness.parse_ks(K.value, NUM_SAMPLES.value),
        temperature=TEMPERATURE.value, top_p=None if TOP_P.value == 1.0 else TOP_P.value,
        top_k=TOP_K.value, max_new_tokens=MAX_NEW_TOKENS.value, limit=LIMIT.value,
        seed=SEED.value, use_chat_template=USE_CHAT_TEMPLATE.value,
        instruction=INSTRUCTION.value, prompt_format=PROMPT_FORMAT.value, batch_size=BATCH_SIZE.value, mesh=MESH.value,
        dtype=DTYPE.value, data_dir=DATA_DIR.value, rerank_with=RERANK_WITH.value,
        rerank_samples=RERANK_SAMPLES.value, test_time_method=TEST_TIME_METHOD.value,
        test_time_reward=TEST_TIME_REWARD.value, latentseek_steps=LATENTSEEK_STEPS.value,
        latentseek_lr=LATENTSEEK_LR.value, latentseek_fraction=LATENTSEEK_FRACTION.value,
        latentseek_threshold=LATENTSEEK_THRESHOLD.value)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # JAX's INFO lines (backend probing) would interleave with the progress bars.
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        compilation_cache.enable(COMPILATION_CACHE.value)
        config = config_from_flags()
        if OUT.value is None:
            with tempfile.TemporaryDirectory(prefix="offpolicy_jax_eval_") as out_dir:
                summary = harness.run(config, out_dir, progress=PROGRESS.value)
        else:
            summary = harness.run(config, OUT.value, progress=PROGRESS.value)
    except (ValueError, FileNotFoundError) as error:
        # Bad input (a flag, a benchmark name, a data file, a checkpoint directory): one clear
        # line instead of a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(harness.results_table(summary["benchmarks"]))
    return 0


if __name__ == "__main__":
    app.run(main)
