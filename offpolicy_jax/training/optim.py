"""Optimizers and learning-rate schedules.

Every optimizer is ``clip_by_global_norm -> {AdamW, Adafactor}`` with a schedule. RL fine-tuning of
LLMs uses small constant learning rates (1e-6 for GRPO/ROVER/ReMix, 5e-7 with Adafactor for TOPR), so
``constant`` with optional linear warm-up is the default; cosine decay is available.
"""

import dataclasses

import optax

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adafactor")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer settings.

    Attributes:
      name: ``adamw`` or ``adafactor``.
      learning_rate: peak learning rate.
      schedule: ``constant``, ``cosine`` (decay to ``end_lr_fraction`` of the peak) or ``linear``.
      warmup_steps: linear warm-up from 0 over this many optimizer steps.
      total_steps: schedule length (needed by ``cosine`` and ``linear``).
      end_lr_fraction: final learning rate as a fraction of the peak, for decaying schedules.
      weight_decay: decoupled weight decay (AdamW) / weight_decay_rate (Adafactor).
      b1, b2, eps: AdamW moments.
      grad_clip: global-norm clipping threshold; 0 or None disables it.
    """

    name: str = "adamw"
    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"schedule {self.schedule!r} needs total_steps > warmup_steps, got "
                f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Learning-rate schedule: linear warm-up, then constant, cosine or linear decay."""
    peak = config.learning_rate
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        decay_steps = config.total_steps - config.warmup_steps
        end = peak * config.end_lr_fraction
        if config.schedule == "cosine":
            main = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
        else:
            main = optax.linear_schedule(peak, end, decay_steps)
    if config.warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
    return optax.join_schedules([warmup, main], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """``clip_by_global_norm`` followed by AdamW or Adafactor on the configured schedule."""
    schedule = make_schedule(config)
    if config.name == "adamw":
        core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay)
    else:
        # Adafactor's own update clipping is disabled: global-norm clipping below is the one knob.
        core = optax.adafactor(schedule, clipping_threshold=None,
                               multiply_by_parameter_scale=False,
                               weight_decay_rate=config.weight_decay or None)
    if config.grad_clip:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), core)
    return core
