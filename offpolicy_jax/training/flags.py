"""The flags every experiment file shares (absl). Each experiment adds its algorithm's own flags.

Defining them here, once, is what lets a test parse every launch script and README command
against the real definitions: a renamed flag breaks that test instead of a user's run.
"""

from absl import flags

from offpolicy_jax.training.config import RunConfig

_DEFAULTS = RunConfig(workdir="")

WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, "
                              "TensorBoard events. Reusing it resumes the run. Default: "
                              "./workdirs/<experiment>.")
MODEL = flags.DEFINE_string("model", _DEFAULTS.model, "A Hugging Face checkpoint directory "
                            "(config.json + safetensors + tokenizer) or the alias 'tiny-arith' "
                            "(the embedded default, built and cached on first use).")
DATASET = flags.DEFINE_string("dataset", _DEFAULTS.dataset, "'arith' (embedded), 'gsm8k', "
                              "'math500', or a JSONL path (see --prompt_field/--answer_field).")
PROMPT_FIELD = flags.DEFINE_string("prompt_field", _DEFAULTS.prompt_field,
                                   "JSONL datasets: the field holding the question.")
ANSWER_FIELD = flags.DEFINE_string("answer_field", _DEFAULTS.answer_field,
                                   "JSONL datasets: the field holding the gold answer.")
PROMPT_FORMAT = flags.DEFINE_enum("prompt_format", _DEFAULTS.prompt_format,
                                  ["chat", "instruction", "raw"], "Benchmark and JSONL datasets: "
                                  "how a question becomes a prompt: the chat template (when the "
                                  "tokenizer has one) with the \\boxed{} instruction, the plain "
                                  "'Question: ... Answer:' template with it, or the text as is. "
                                  "arith prompts are always the task's own format.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "A folder with your own copies of the benchmark "
                               "files (<name>.jsonl or .jsonl.gz) for --dataset=gsm8k, math500, "
                               "...; default $OFFPOLICY_JAX_DATA, else the copies packaged with "
                               "offpolicy_jax.")
TRAIN_SIZE = flags.DEFINE_integer("train_size", _DEFAULTS.train_size, "Training pool: the first "
                                  "N distinct training prompts, revisited epoch after epoch so "
                                  "prompts recur (0: every distinct prompt; arith has 10,333).")
PROMPT_SELECTION = flags.DEFINE_enum("prompt_selection", _DEFAULTS.prompt_selection,
                                     ["stream", "mopps"], "How each iteration's prompts are "
                                     "chosen: the shuffled stream, or MoPPS (Thompson-sampled "
                                     "success rate near --mopps_target; arXiv 2507.04632).")
MOPPS_CANDIDATES = flags.DEFINE_integer("mopps_candidates", _DEFAULTS.mopps_candidates,
                                        "MoPPS: candidate pool = this x --batch_size prompts "
                                        "(paper: 16 for math, 8 countdown/geometry).")
MOPPS_TARGET = flags.DEFINE_float("mopps_target", _DEFAULTS.mopps_target,
                                  "MoPPS: target success rate γ* (paper 0.5).")
MOPPS_DECAY = flags.DEFINE_float("mopps_decay", _DEFAULTS.mopps_decay, "MoPPS: posterior decay "
                                 "λ (paper: 1.0 for math, 0.5 countdown/geometry).")
MOPPS_RANGE = flags.DEFINE_string("mopps_range", None, "MoPPS: 'low,high' selects Thompson "
                                  "samples inside this range (the paper's threshold variant, "
                                  "e.g. 0.3,0.7) instead of the closest to --mopps_target.")
ITERATIONS = flags.DEFINE_integer("iterations", _DEFAULTS.iterations, "RL iterations: each "
                                  "samples (or replays) one rollout batch and trains on it.")
SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed for data order, sampling, init.")
MESH = flags.DEFINE_string("mesh", _DEFAULTS.mesh, "Device mesh 'data,fsdp,tensor'; -1 takes the "
                           "remaining devices.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Prompts per iteration.")
GROUP_SIZE = flags.DEFINE_integer("group_size", _DEFAULTS.group_size, "Responses per prompt.")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", _DEFAULTS.max_new_tokens,
                                      "Response length budget (tokens).")
TEMPERATURE = flags.DEFINE_float("temperature", _DEFAULTS.temperature, "Rollout temperature.")
TOP_K = flags.DEFINE_integer("top_k", None, "Rollout top-k (None: off).")
TOP_P = flags.DEFINE_float("top_p", None, "Rollout top-p (None: off).")
LEARNING_RATE = flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Peak learning rate.")
OPTIMIZER = flags.DEFINE_enum("optimizer", _DEFAULTS.optimizer, ["adamw", "adafactor"],
                              "Optimizer.")
GRAD_CLIP = flags.DEFINE_float("grad_clip", _DEFAULTS.grad_clip, "Global-norm gradient clip.")
NUM_PASSES = flags.DEFINE_integer("num_passes", _DEFAULTS.num_passes, "Passes over each rollout "
                                  "batch (PPO epochs; the UTD ratio).")
NUM_MINIBATCHES = flags.DEFINE_integer("num_minibatches", _DEFAULTS.num_minibatches,
                                       "Optimizer updates per pass (the batch is split into this "
                                       "many minibatches).")
NUM_MICROBATCHES = flags.DEFINE_integer("num_microbatches", _DEFAULTS.num_microbatches,
                                        "Gradient-accumulation slices per optimizer update.")
ROLLOUT_BUDGET = flags.DEFINE_integer("rollout_budget", _DEFAULTS.rollout_budget, "End the run "
                                     "at the first iteration whose fresh rollouts (sampled "
                                     "responses; replayed ones do not count) reach this many "
                                     "(0: none; --iterations stays the upper bound). Runs of "
                                     "different methods then spend equal budgets.")
ROLLOUT_LAG = flags.DEFINE_integer("rollout_lag", _DEFAULTS.rollout_lag, "Bounded staleness: "
                                  "iteration i samples its fresh rollouts from the policy at the "
                                  "start of iteration i - k (the initial policy before), as a "
                                  "k-step asynchronous pipeline would (0: on-policy sampling).")
ROLLOUT_CORRECTION = flags.DEFINE_enum("rollout_correction", _DEFAULTS.rollout_correction,
                                       ["none", "tis", "seq_tis", "mis", "seq_mis", "geo_mask",
                                        "icepop"], "Weight every objective's per-token gradient "
                                       "by the trainer/sampler gap exp(old_logp - "
                                       "behaviour_logp): truncated (tis), masked (mis) IS per "
                                       "token or sequence, the geometric sequence mask, or "
                                       "IcePop's two-sided token mask (losses.corrections).")
CORRECTION_LOW = flags.DEFINE_float("correction_low", None, "Rollout correction: lower bound "
                                    "of the kept weight (default per mode: mis 0, seq_mis 0.5, "
                                    "geo_mask 0.999, icepop 0.5).")
CORRECTION_HIGH = flags.DEFINE_float("correction_high", None, "Rollout correction: truncation "
                                     "or upper bound (default per mode: tis/seq_tis/mis/seq_mis "
                                     "2, geo_mask 1.001, icepop 5).")
EVAL_EVERY = flags.DEFINE_integer("eval_every", _DEFAULTS.eval_every, "Held-out evaluation every "
                                  "N iterations (0 disables periodic evaluation; the start and "
                                  "the end are always evaluated).")
EVAL_EVERY_ROLLOUTS = flags.DEFINE_integer("eval_every_rollouts", _DEFAULTS.eval_every_rollouts,
                                          "Held-out evaluation at the iteration whose rollouts "
                                          "cross each multiple of this (0: off): evaluation "
                                          "points at equal budgets across methods.")
EVAL_SIZE = flags.DEFINE_integer("eval_size", _DEFAULTS.eval_size, "Held-out prompts.")
EVAL_SAMPLES = flags.DEFINE_integer("eval_samples", _DEFAULTS.eval_samples,
                                    "Samples per held-out prompt (pass@1 is their mean).")
EVAL_TEMPERATURE = flags.DEFINE_float("eval_temperature", _DEFAULTS.eval_temperature,
                                      "Sampling temperature of the held-out evaluation.")
CKPT_EVERY = flags.DEFINE_integer("ckpt_every", _DEFAULTS.ckpt_every, "Checkpoint every N "
                                  "iterations (and at the end).")
DTYPE = flags.DEFINE_enum("dtype", _DEFAULTS.dtype, ["float32", "bfloat16"], "Parameter dtype.")
REMAT = flags.DEFINE_string("remat", _DEFAULTS.remat, "Activation recomputation in the training "
                            "backward pass: 'none', 'full', or a jax.checkpoint_policies name "
                            "(default: keep matmul outputs, recompute the elementwise ops).")
PACK_SEQUENCES = flags.DEFINE_bool("pack_sequences", _DEFAULTS.pack_sequences, "Train on packed "
                                   "rows: the batch's sequences laid end to end, so the forward "
                                   "and backward passes skip the padding (same results within "
                                   "float32 round-off); false: the padded layout.")
COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX's persistent "
                                        "compilation cache: compiled programs are reused by "
                                        "later runs on this machine (default: "
                                        "$OFFPOLICY_JAX_CACHE/jax_compilation_cache, i.e. "
                                        "~/.cache/offpolicy_jax/...; empty: off).")
PROGRESS = flags.DEFINE_bool("progress", _DEFAULTS.progress, "Show a progress bar.")
LORA_RANK = flags.DEFINE_integer("lora_rank", _DEFAULTS.lora_rank, "LoRA rank r: train rank-r "
                                 "adapters on frozen base weights (0: full fine-tuning). Only "
                                 "the adapters are optimized and checkpointed.")
LORA_ALPHA = flags.DEFINE_float("lora_alpha", _DEFAULTS.lora_alpha, "LoRA alpha: the update is "
                                "scaled by alpha / rank.")
LORA_TARGETS = flags.DEFINE_string("lora_targets", _DEFAULTS.lora_targets, "Comma-separated "
                                   "projections to adapt, any of q,k,v,o,gate,up,down, or 'all'.")
LORA_INIT = flags.DEFINE_string("lora_init", None, "A PEFT adapter directory (adapter_config.json "
                                "+ adapter_model.safetensors) to continue training from; its "
                                "rank, alpha and targets are used (--lora_rank, if set, must "
                                "match).")
EXPORT_FINAL = flags.DEFINE_bool("export_final", _DEFAULTS.export_final, "At the end of the run, "
                                 "write the final policy as a Hugging Face checkpoint to "
                                 "<workdir>/export (LoRA runs: merged weights, plus the PEFT "
                                 "adapter in <workdir>/export/adapter).")
WANDB_PROJECT = flags.DEFINE_string("wandb_project", None, "Also log the metrics to this Weights "
                                    "& Biases project (TensorBoard stays on; WANDB_MODE=offline "
                                    "works without a network).")
WANDB_ENTITY = flags.DEFINE_string("wandb_entity", None, "Weights & Biases entity (team/user).")
WANDB_RUN_NAME = flags.DEFINE_string("wandb_run_name", None, "Weights & Biases run name "
                                     "(default: the workdir's name).")


def run_config(experiment_name: str) -> RunConfig:
    """A ``RunConfig`` from the parsed shared flags."""
    return RunConfig(
        workdir=WORKDIR.value or f"workdirs/{experiment_name}",
        model=MODEL.value, dataset=DATASET.value, prompt_field=PROMPT_FIELD.value,
        answer_field=ANSWER_FIELD.value, prompt_format=PROMPT_FORMAT.value,
        data_dir=DATA_DIR.value, train_size=TRAIN_SIZE.value,
        prompt_selection=PROMPT_SELECTION.value, mopps_candidates=MOPPS_CANDIDATES.value,
        mopps_target=MOPPS_TARGET.value, mopps_decay=MOPPS_DECAY.value,
        mopps_range=MOPPS_RANGE.value,
        iterations=ITERATIONS.value,
        seed=SEED.value, mesh=MESH.value, batch_size=BATCH_SIZE.value,
        group_size=GROUP_SIZE.value, max_new_tokens=MAX_NEW_TOKENS.value,
        temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value,
        learning_rate=LEARNING_RATE.value, optimizer=OPTIMIZER.value, grad_clip=GRAD_CLIP.value,
        num_passes=NUM_PASSES.value, num_minibatches=NUM_MINIBATCHES.value,
        num_microbatches=NUM_MICROBATCHES.value, rollout_budget=ROLLOUT_BUDGET.value,
        rollout_lag=ROLLOUT_LAG.value, rollout_correction=ROLLOUT_CORRECTION.value,
        correction_low=CORRECTION_LOW.value, correction_high=CORRECTION_HIGH.value,
        eval_every=EVAL_EVERY.value, eval_every_rollouts=EVAL_EVERY_ROLLOUTS.value,
        eval_size=EVAL_SIZE.value, eval_samples=EVAL_SAMPLES.value,
        eval_temperature=EVAL_TEMPERATURE.value, ckpt_every=CKPT_EVERY.value, dtype=DTYPE.value,
        remat=REMAT.value, pack_sequences=PACK_SEQUENCES.value,
        compilation_cache=COMPILATION_CACHE.value, progress=PROGRESS.value,
        lora_rank=LORA_RANK.value, lora_alpha=LORA_ALPHA.value, lora_targets=LORA_TARGETS.value,
        lora_init=LORA_INIT.value, export_final=EXPORT_FINAL.value,
        wandb_project=WANDB_PROJECT.value, wandb_entity=WANDB_ENTITY.value,
        wandb_run_name=WANDB_RUN_NAME.value)
