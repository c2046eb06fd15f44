"""The shared run settings: one field per shared flag (``training.flags``), validated at start-up."""

import dataclasses
import os

import jax

from offpolicy_jax.losses import corrections
from offpolicy_jax.training import rollout

# The units a rollout batch can be split into for minibatches, in rows (see algorithm.minibatches).
_UNIT_ROWS = {"row": lambda group_size: 1, "group": lambda group_size: group_size,
              "pair": lambda group_size: 2}


def _is_range(text: str) -> bool:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        return False
    return 0.0 <= low <= high <= 1.0


def _correction_check(mode: str, low, high) -> list:
    try:
        corrections.correction_bounds(mode, low, high)
    except ValueError as e:
        return [(False, f"--rollout_correction={mode} --correction_low={low} "
                        f"--correction_high={high}: {e}")]
    return []


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The shared run settings (one field per shared flag; see ``training.flags``).

    Counting: an *iteration* samples (or replays) one rollout batch of ``batch_size`` prompts ×
    ``group_size`` responses (a preference method's: ``batch_size`` pairs of responses, rows 2j
    and 2j + 1) and trains on it: ``num_passes`` passes over the batch, each split
    into ``num_minibatches`` optimizer updates, each accumulated over ``num_microbatches`` slices.
    ``TrainState.step`` counts the optimizer updates. *Rollouts* count the freshly sampled
    responses (replayed ones are not counted); a run ends after ``iterations`` iterations or, with
    ``rollout_budget``, at the first iteration whose rollouts reach it. With ``rollout_lag`` = k,
    iteration i samples from the policy at the start of iteration i − k (what a k-step
    asynchronous pipeline feeds its trainer); ``rollout_correction`` weights every objective's
    per-token gradient by the sampler/trainer gap (``losses.corrections``).
    """

    workdir: str
    model: str = "tiny-arith"
    dataset: str = "arith"
    prompt_field: str = "question"
    answer_field: str = "answer"
    prompt_format: str = "chat"
    data_dir: str | None = None
    train_size: int = 0
    prompt_selection: str = "stream"
    mopps_candidates: int = 16
    mopps_target: float = 0.5
    mopps_decay: float = 1.0
    mopps_range: str | None = None
    iterations: int = 40
    seed: int = 0
    mesh: str = "1,-1,1"
    batch_size: int = 16
    group_size: int = 8
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    learning_rate: float = 1e-6
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    num_passes: int = 1
    num_minibatches: int = 1
    num_microbatches: int = 1
    rollout_budget: int = 0
    rollout_lag: int = 0
    rollout_correction: str = "none"
    correction_low: float | None = None
    correction_high: float | None = None
    eval_every: int = 0
    eval_every_rollouts: int = 0
    eval_size: int = 64
    eval_samples: int = 8
    eval_temperature: float = 1.0
    ckpt_every: int = 10
    max_nonfinite_steps: int = 5
    dtype: str = "float32"
    remat: str = rollout.DEFAULT_REMAT
    pack_sequences: bool = True
    compilation_cache: str | None = None
    progress: bool = True
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "all"
    lora_init: str | None = None
    export_final: bool = True
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None

    @property
    def lora(self) -> bool:
        """Whether the run trains LoRA adapters (``--lora_rank`` > 0 or ``--lora_init``)."""
        return self.lora_rank > 0 or bool(self.lora_init)

    def validate(self, algorithm=None) -> None:
        """Fails fast, naming the flag, on settings that cannot work together."""
        checks = [
            (self.iterations >= 1, f"--iterations must be >= 1, got {self.iterations}"),
            (self.batch_size >= 1, f"--batch_size must be >= 1, got {self.batch_size}"),
            (self.train_size >= 0, f"--train_size must be >= 0 (0: every prompt), got "
             f"{self.train_size}"),
            (self.prompt_selection in ("stream", "mopps"),
             f"--prompt_selection must be 'stream' or 'mopps', got {self.prompt_selection!r}"),
            (self.mopps_candidates >= 1,
             f"--mopps_candidates must be >= 1, got {self.mopps_candidates}"),
            (0.0 <= self.mopps_target <= 1.0 and 0.0 <= self.mopps_decay <= 1.0,
             f"--mopps_target and --mopps_decay must be in [0, 1], got {self.mopps_target} and "
             f"{self.mopps_decay}"),
            (self.mopps_range is None or _is_range(self.mopps_range),
             f"--mopps_range must be 'low,high' with 0 <= low <= high <= 1, got "
             f"{self.mopps_range!r}"),
            (self.group_size >= 1, f"--group_size must be >= 1, got {self.group_size}"),
            (self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0, f"--temperature must be > 0 for RL rollouts (the behaviour "
             f"log-probs are log softmax(z/T)), got {self.temperature}"),
            (self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}"),
            (self.num_passes >= 1, f"--num_passes must be >= 1, got {self.num_passes}"),
            (self.num_minibatches >= 1,
             f"--num_minibatches must be >= 1, got {self.num_minibatches}"),
            (self.num_microbatches >= 1,
             f"--num_microbatches must be >= 1, got {self.num_microbatches}"),
            (self.rollout_budget >= 0,
             f"--rollout_budget must be >= 0 (0: none), got {self.rollout_budget}"),
            (self.rollout_lag >= 0,
             f"--rollout_lag must be >= 0 (0: sample from the current policy), got "
             f"{self.rollout_lag}"),
            *_correction_check(self.rollout_correction, self.correction_low,
                               self.correction_high),
            (self.eval_every >= 0, f"--eval_every must be >= 0, got {self.eval_every}"),
            (self.eval_every_rollouts >= 0,
             f"--eval_every_rollouts must be >= 0, got {self.eval_every_rollouts}"),
            (self.ckpt_every >= 1, f"--ckpt_every must be >= 1, got {self.ckpt_every}"),
            (self.eval_samples >= 1, f"--eval_samples must be >= 1, got {self.eval_samples}"),
            (self.dtype in ("float32", "bfloat16"),
             f"--dtype must be float32 or bfloat16, got {self.dtype!r}"),
            (self.remat in ("none", "full") or hasattr(jax.checkpoint_policies, self.remat),
             f"--remat must be 'none', 'full' or a jax.checkpoint_policies name, got "
             f"{self.remat!r}"),
            (self.lora_rank >= 0, f"--lora_rank must be >= 0 (0: full fine-tuning), got "
             f"{self.lora_rank}"),
            (self.lora_init is None or os.path.isdir(self.lora_init),
             f"--lora_init={self.lora_init!r} is not a directory (expected a PEFT adapter "
             f"directory with adapter_config.json and adapter_model.safetensors)"),
            (not (self.wandb_entity or self.wandb_run_name) or bool(self.wandb_project),
             "--wandb_entity and --wandb_run_name need --wandb_project"),
        ]
        if algorithm is not None:
            checks += self._algorithm_checks(algorithm)
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.lora_rank > 0:   # names the bad target or alpha
            from offpolicy_jax.models import lora
            lora.LoraConfig(self.lora_rank, self.lora_alpha, lora.parse_targets(self.lora_targets))

    def _algorithm_checks(self, algorithm) -> list:
        unit = algorithm.minibatch_unit
        # A batch of preference pairs holds --batch_size pairs; any other, --batch_size groups.
        rows = 2 * self.batch_size if unit == "pair" else self.batch_size * self.group_size
        unit_rows = _UNIT_ROWS[unit](self.group_size)
        units = rows // unit_rows if rows % unit_rows == 0 else 0
        # Microbatches split a minibatch too, and must not cut a unit either.
        per_minibatch = units // self.num_minibatches
        what = (f"--batch_size x --group_size = {rows} responses" if unit == "row"
                else f"the {units} {unit}s of {unit_rows} rows ({algorithm.name} keeps each "
                     f"{unit} in one minibatch)")
        return [
            (not (algorithm.needs_groups and self.group_size < 2),
             f"--group_size={self.group_size}: {algorithm.name} normalises advantages within a "
             f"group of responses to the same prompt, which needs --group_size >= 2"),
            (units > 0 and units % self.num_minibatches == 0
             and per_minibatch % self.num_microbatches == 0,
             f"{what} must divide into {self.num_minibatches} minibatches x "
             f"--num_microbatches={self.num_microbatches}"),
        ]
