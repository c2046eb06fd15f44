"""The embedded default model ``tiny-arith``: a ~1M-parameter Qwen2-architecture model with a
character-level tokenizer, warm-started by supervised training on ``arith`` demonstrations.

It is built on first use (about 3.5 minutes on 2 CPU cores), saved with ``save_hf_checkpoint``
into a cache directory (``$OFFPOLICY_JAX_CACHE``, default ``~/.cache/offpolicy_jax``) and loaded
from there through the same code path as any Hugging Face checkpoint. A stamp file records the
recipe; a missing or different stamp triggers a rebuild, so a change of recipe can never load a
stale model.

The warm start imitates demonstrations in which each arithmetic step is miscalculated with
probability ``slip_probability`` (``data.arith.demonstrations``): the model learns the procedure
and, at its mode, mostly the right arithmetic, but its samples slip. Sampled answers are then
right often but not always (held-out pass@1 well below pass@8, and below greedy accuracy), which
is the regime where RL from verifiable rewards has room to work.
"""

import dataclasses
import fcntl
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp

from offpolicy_jax import models, sft
from offpolicy_jax.data import arith, tokenizer as tokenizer_lib

ALIAS = "tiny-arith"
STAMP_FILE = "offpolicy_jax_recipe.json"

# The RL experiments' learning rate on this model (AdamW, a departure from the papers' ~1e-6 on
# 1.5B-8B models). Measured: with 5e-5 TOPR gains 16 points of held-out pass@1 in 200 iterations
# and every method in experiments/compare.py learns (README); in earlier tuning runs 1e-4
# collapsed TOPR, and 2e-4 made every compared method lose accuracy within 20 iterations.
RL_LEARNING_RATE = 5e-5


@dataclasses.dataclass(frozen=True)
class TinyArithRecipe:
    """How the embedded model is built. Changing any field rebuilds the cached model."""

    version: int = 2
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    sft_examples: int = 20_000
    sft_steps: int = 600
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    # Demonstrations miscalculate each step with this probability: the warm-started model knows
    # the procedure but slips when sampling (measured on 256 held-out problems: greedy 0.53,
    # sampled pass@1 0.27, pass@8 0.77), the regime where RL from a verifier has room to work.
    slip_probability: float = 0.2
    seed: int = 0


def model_config(vocab_size: int, recipe: TinyArithRecipe) -> models.ModelConfig:
    """A Qwen2-architecture config (qkv bias, tied embeddings, GQA) at tiny scale."""
    return models.ModelConfig(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_layers=recipe.num_layers,
        num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True, qk_norm=False,
        max_position_embeddings=256)


def fine_tune(cfg, params, tokenizer, examples, recipe, log_fn):
    """Supervised fine-tuning of a warm-start recipe (``TinyArithRecipe`` or
    ``TinyArithVerifyRecipe``: its SFT steps, batch size, learning rate and seed), 10 % warm-up,
    logging five times; returns the parameters."""
    params, _, _ = sft.train_sft(
        cfg, params, tokenizer, examples, steps=recipe.sft_steps,
        batch_size=recipe.sft_batch_size, learning_rate=recipe.sft_learning_rate,
        seed=recipe.seed, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        warmup_steps=recipe.sft_steps // 10, log_every=max(recipe.sft_steps // 5, 1),
        log_fn=log_fn)
    return params


def build(directory: str, recipe: TinyArithRecipe = TinyArithRecipe(), *, log_fn=print) -> str:
    """Builds the tokenizer, initialises the model, warm-starts it with SFT, and saves both."""
    tokenizer_lib.build_char_tokenizer(directory)
    tokenizer = models.load_tokenizer(directory)
    cfg = model_config(len(tokenizer), recipe)
    params = models.init_params(cfg, jax.random.PRNGKey(recipe.seed), dtype=jnp.float32)
    examples = arith.demonstrations(recipe.sft_examples, seed=recipe.seed,
                                    slip_probability=recipe.slip_probability)
    log_fn(f"tiny-arith: warm-starting a {cfg.num_params() / 1e6:.2f}M-parameter model on "
           f"{len(examples)} arith demonstrations ({recipe.sft_steps} steps)")
    params = fine_tune(cfg, params, tokenizer, examples, recipe, log_fn)
    cfg = dataclasses.replace(cfg, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    return _save(directory, cfg, params, recipe)


def _save(directory: str, cfg, params, recipe) -> str:
    """Saves the checkpoint and the recipe's stamp (what ``_is_current`` compares) there."""
    models.save_hf_checkpoint(directory, cfg, params)
    with open(os.path.join(directory, STAMP_FILE), "w") as f:
        json.dump(dataclasses.asdict(recipe), f, indent=1)
    return directory


def _fine_tune_base(directory: str, recipe, examples, what: str, alias: str, *,
                    base_dir: str | None, cache_dir: str | None, log_fn) -> str:
    """A recipe built on ``tiny-arith``: fine-tunes the base model (``base_dir``, default the
    cached ``recipe.base`` build) on ``examples`` and saves it with its tokenizer and stamp in
    ``directory``."""
    base_dir = base_dir or ensure(cache_dir, recipe.base, log_fn=log_fn)
    tokenizer_lib.build_char_tokenizer(directory)
    tokenizer = models.load_tokenizer(directory)
    cfg, params = models.load_hf_checkpoint(base_dir, dtype=jnp.float32)
    log_fn(f"{alias}: fine-tuning {base_dir} on {len(examples)} {what} demonstrations "
           f"({recipe.sft_steps} steps)")
    params = fine_tune(cfg, params, tokenizer, examples, recipe, log_fn)
    return _save(directory, cfg, params, recipe)


VERIFY_ALIAS = "tiny-arith-verify"


@dataclasses.dataclass(frozen=True)
class TinyArithVerifyRecipe:
    """``tiny-arith-verify``: ``tiny-arith`` fine-tuned further on solving *and* verification
    demonstrations (``data.arith.verification_demonstrations``), so the embedded model can check
    its own solutions (RISE, TOPR's generative verifier). ``tiny-arith`` itself is untouched.

    Changing any field (or the base recipe) rebuilds the cached model.

    Attributes:
      base: the ``tiny-arith`` recipe it starts from (built first if needed).
      solve_examples: solving demonstrations in the mix (slipping at the base recipe's rate), so
        the solving skill is kept while verification is learned.
      verify_examples: verification demonstrations in the mix.
      solution_slip_probability: per-step slips of the solutions to verify (0.25: about half of
        them are wrong).
      check_slip_probability: per-step slips of the checker in the demonstrations: an imperfect
        verifier to start from, which RL can improve.
      no_answer_fraction: solutions cut off before their boxed answer (rated -1).
    """

    version: int = 1
    base: TinyArithRecipe = TinyArithRecipe()
    solve_examples: int = 7_000
    verify_examples: int = 14_000
    sft_steps: int = 450
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    solution_slip_probability: float = 0.25
    check_slip_probability: float = 0.1
    no_answer_fraction: float = 0.05
    seed: int = 1


def verify_examples(recipe: TinyArithVerifyRecipe) -> list[tuple[str, str]]:
    """The fine-tuning mix of ``recipe``: solving demonstrations, then verification ones."""
    solve = arith.demonstrations(recipe.solve_examples, seed=recipe.seed,
                                 slip_probability=recipe.base.slip_probability)
    verify = arith.verification_demonstrations(
        recipe.verify_examples, seed=recipe.seed,
        solution_slip_probability=recipe.solution_slip_probability,
        check_slip_probability=recipe.check_slip_probability,
        no_answer_fraction=recipe.no_answer_fraction)
    return solve + verify


def build_verify(directory: str, recipe: TinyArithVerifyRecipe = TinyArithVerifyRecipe(), *,
                 base_dir: str | None = None, cache_dir: str | None = None,
                 log_fn=print) -> str:
    """Fine-tunes the base model (``base_dir``, default the cached ``recipe.base`` build) on
    ``verify_examples(recipe)`` and saves it with its tokenizer in ``directory``."""
    return _fine_tune_base(directory, recipe, verify_examples(recipe),
                           "solving and verification", VERIFY_ALIAS, base_dir=base_dir,
                           cache_dir=cache_dir, log_fn=log_fn)


def ensure_verify(cache_dir: str | None = None,
                  recipe: TinyArithVerifyRecipe = TinyArithVerifyRecipe(), *,
                  log_fn=print) -> str:
    """The cached ``tiny-arith-verify`` directory, built first (after its base) if missing or
    stale; locking and staging as in ``ensure``."""
    return _ensure_built(cache_dir, VERIFY_ALIAS, recipe,
                         lambda directory: build_verify(directory, recipe, cache_dir=cache_dir,
                                                        log_fn=log_fn))


IDK_ALIAS = "tiny-arith-idk"


@dataclasses.dataclass(frozen=True)
class TinyArithIdkRecipe:
    """``tiny-arith-idk``: ``tiny-arith`` fine-tuned further on demonstrations that answer
    "I don't know" (``data.arith.IDK_PHRASE``) on part of the problems beyond its reach, so
    Auto-CEI (``experiments/auto_cei.py``) has an IDK answer form to reward. ``tiny-arith``
    itself is untouched.

    Beyond its reach, measured (tiny-arith, 256 held-out problems, 8 samples at temperature 1):
    sampled accuracy 0.59 on 1-step problems, 0.31 on 2-step, 0.15 on 3-step; 0.37 when every
    value is below 10 and 0.11 when one reaches 40-99. The hard problems (``data.arith.is_hard``)
    are those with ``hard_min_steps`` steps and a value of at least ``hard_min_value``.

    Changing any field (or the base recipe) rebuilds the cached model.

    Attributes:
      base: the ``tiny-arith`` recipe it starts from (built first if needed).
      examples: demonstrations in the mix (``data.arith.idk_demonstrations``).
      idk_fraction: share of the hard problems answered "I don't know" (after one to all of
        their steps); the rest, and every other problem, are solved, slipping at the base
        recipe's rate so the solving skill is kept.
    """

    version: int = 1
    base: TinyArithRecipe = TinyArithRecipe()
    examples: int = 12_000
    idk_fraction: float = 0.7
    hard_min_steps: int = 3
    hard_min_value: int = 20
    sft_steps: int = 300
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    seed: int = 2


def idk_examples(recipe: TinyArithIdkRecipe) -> list[tuple[str, str]]:
    """The fine-tuning mix of ``recipe`` (solving and IDK demonstrations, one list)."""
    return arith.idk_demonstrations(
        recipe.examples, seed=recipe.seed, slip_probability=recipe.base.slip_probability,
        idk_fraction=recipe.idk_fraction, hard_min_steps=recipe.hard_min_steps,
        hard_min_value=recipe.hard_min_value)


def build_idk(directory: str, recipe: TinyArithIdkRecipe = TinyArithIdkRecipe(), *,
              base_dir: str | None = None, cache_dir: str | None = None,
              log_fn=print) -> str:
    """Fine-tunes the base model (``base_dir``, default the cached ``recipe.base`` build) on
    ``idk_examples(recipe)`` and saves it with its tokenizer in ``directory``."""
    return _fine_tune_base(directory, recipe, idk_examples(recipe),
                           "solving and I-don't-know", IDK_ALIAS, base_dir=base_dir,
                           cache_dir=cache_dir, log_fn=log_fn)


def ensure_idk(cache_dir: str | None = None, recipe: TinyArithIdkRecipe = TinyArithIdkRecipe(),
               *, log_fn=print) -> str:
    """The cached ``tiny-arith-idk`` directory, built first (after its base) if missing or
    stale; locking and staging as in ``ensure``."""
    return _ensure_built(cache_dir, IDK_ALIAS, recipe,
                         lambda directory: build_idk(directory, recipe, cache_dir=cache_dir,
                                                     log_fn=log_fn))


def default_cache_dir() -> str:
    return os.environ.get("OFFPOLICY_JAX_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "offpolicy_jax"))


def ensure(cache_dir: str | None = None, recipe: TinyArithRecipe = TinyArithRecipe(), *,
           log_fn=print) -> str:
    """The cached tiny-arith checkpoint directory, built first if missing or stale.

    The model is built in a temporary directory and renamed into place, so an interrupted build
    never leaves a half-written checkpoint behind. Builds are serialised by a lock file: when
    several processes start at once (``launch/local.sh``), one builds and the others wait for it
    and then load its result.
    """
    return _ensure_built(cache_dir, ALIAS, recipe,
                         lambda directory: build(directory, recipe, log_fn=log_fn))


def _ensure_built(cache_dir: str | None, alias: str, recipe, build_fn) -> str:
    """``<cache>/<alias>-v<version>``, built with ``build_fn(staging directory)`` under the
    alias's lock unless a finished build of ``recipe`` is already there (see ``ensure``)."""
    cache_dir = cache_dir or default_cache_dir()
    directory = os.path.join(cache_dir, f"{alias}-v{recipe.version}")
    if _is_current(directory, recipe):
        return directory
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, f".{alias}-v{recipe.version}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file is closed
        if _is_current(directory, recipe):        # another process built it meanwhile
            return directory
        staging = tempfile.mkdtemp(prefix=f".{alias}-", dir=cache_dir)
        try:
            build_fn(staging)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _is_current(directory: str, recipe: TinyArithRecipe) -> bool:
    """Whether ``directory`` holds a finished build of ``recipe`` (its stamp matches)."""
    stamp = os.path.join(directory, STAMP_FILE)
    if not os.path.exists(stamp):
        return False
    with open(stamp) as f:
        return json.load(f) == dataclasses.asdict(recipe)


def resolve_model(name: str) -> str:
    """``--model`` to a checkpoint directory: the alias ``tiny-arith`` (or ``tiny-arith-verify``,
    ``tiny-arith-idk``) or an existing directory."""
    if name == ALIAS:
        return ensure()
    if name == VERIFY_ALIAS:
        return ensure_verify()
    if name == IDK_ALIAS:
        return ensure_idk()
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"--model={name!r}: the directory has no config.json; expected "
                                    f"a Hugging Face checkpoint directory")
        return name
    raise FileNotFoundError(f"--model={name!r} is neither the alias {ALIAS!r} (or "
                            f"{VERIFY_ALIAS!r}, {IDK_ALIAS!r}) nor an existing checkpoint "
                            f"directory")
