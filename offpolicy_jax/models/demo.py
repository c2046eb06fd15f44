"""Model demo: load a Hugging Face checkpoint and its tokenizer, print next-token logits for a
prompt and a short greedy continuation decoded with the KV cache.

    python -m offpolicy_jax.models.demo                       # tiny random Qwen2 (built once)
    python -m offpolicy_jax.models.demo --model=/path/to/Qwen2.5-0.5B-Instruct --dtype=bfloat16

Without ``--model`` it builds a tiny random-initialised Qwen2-architecture checkpoint (our own
``init_params`` + ``save_hf_checkpoint`` + a byte-level BPE tokenizer) in
``$XDG_CACHE_HOME/offpolicy_jax/demo-tiny-qwen2`` (``~/.cache`` by default) and reuses it on later
runs. The weights are random, so the continuation is gibberish; the point is that the whole path
(config.json -> ModelConfig, safetensors -> params, tokenizer, forward, cached decode) runs with
the base install only (no torch).
"""

from __future__ import annotations

import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from offpolicy_jax.models import checkpoint, tiny_tokenizer, transformer
from offpolicy_jax.models.config import ModelConfig

_MODEL = flags.DEFINE_string("model", "", "checkpoint directory (config.json + safetensors + "
                             "tokenizer); empty: the tiny random demo checkpoint")
_PROMPT = flags.DEFINE_string("prompt", "What is 12 + 35?", "prompt text")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "parameter and compute dtype")
_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 8, "greedy tokens to decode")

TINY_CONFIG = ModelConfig(vocab_size=tiny_tokenizer.DEFAULT_VOCAB_SIZE, hidden_size=64,
                          intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          rope_theta=10000.0, tie_word_embeddings=True, qkv_bias=True,
                          max_position_embeddings=512, model_type="qwen2")


def default_demo_dir() -> pathlib.Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "offpolicy_jax" / "demo-tiny-qwen2"


def ensure_tiny_checkpoint(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Writes the tiny random Qwen2 checkpoint + tokenizer into ``directory`` unless present."""
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    if all((directory / name).exists() for name in needed):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer.save_tiny_tokenizer(directory, TINY_CONFIG.vocab_size)
    cfg = ModelConfig(**{**TINY_CONFIG.__dict__, "eos_token_id": tokenizer.eos_token_id,
                         "bos_token_id": None})
    params = transformer.init_params(cfg, jax.random.key(seed))
    checkpoint.save_hf_checkpoint(directory, cfg, params)
    return directory


def greedy_continuation(cfg, params, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the KV cache: one prefill, then one jitted step per token."""
    step = jax.jit(transformer.apply_cached, static_argnums=0)
    cache = transformer.init_cache(cfg, 1, len(prompt_ids) + max_new_tokens)
    logits, cache = step(cfg, params, jnp.asarray([prompt_ids], jnp.int32), cache)
    generated = []
    for _ in range(max_new_tokens):
        token = int(jnp.argmax(logits[0, -1]))
        generated.append(token)
        logits, cache = step(cfg, params, jnp.asarray([[token]], jnp.int32), cache)
    return generated


def run(model_dir: str | os.PathLike, prompt: str, dtype: str = "float32",
        max_new_tokens: int = 8) -> dict:
    """Loads ``model_dir``, prints the demo report and returns its numbers."""
    started = time.time()
    cfg, params = checkpoint.load_hf_checkpoint(model_dir, dtype=jnp.dtype(dtype))
    tokenizer = checkpoint.load_tokenizer(model_dir)
    prompt_ids = tokenizer(prompt)["input_ids"]
    logits = transformer.apply(cfg, params, jnp.asarray([prompt_ids], jnp.int32))
    last = np.asarray(logits[0, -1])
    top = np.argsort(-last)[:5]
    print(f"checkpoint: {model_dir}")
    print(f"model: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, vocab {cfg.vocab_size}, "
          f"{cfg.num_params() / 1e6:.2f}M parameters, dtype {cfg.dtype}, "
          f"devices {jax.devices()}")
    print(f"prompt: {prompt!r} -> {len(prompt_ids)} tokens {prompt_ids}")
    print(f"logits: shape {tuple(logits.shape)} {logits.dtype}, last position mean "
          f"{last.mean():+.4f} std {last.std():.4f}")
    print("top-5 next tokens:")
    for token in top:
        print(f"  {int(token):>6d} {tokenizer.decode([int(token)])!r:>16}  logit {last[token]:+.4f}")
    continuation = greedy_continuation(cfg, params, prompt_ids, max_new_tokens)
    print(f"greedy continuation ({max_new_tokens} tokens, KV cache): "
          f"{tokenizer.decode(continuation)!r}")
    print(f"done in {time.time() - started:.1f}s")
    return {"logits_shape": tuple(logits.shape), "top_tokens": [int(t) for t in top],
            "continuation": continuation}


def main(argv):
    del argv
    model_dir = _MODEL.value or ensure_tiny_checkpoint(default_demo_dir())
    run(model_dir, _PROMPT.value, _DTYPE.value, _NEW_TOKENS.value)


if __name__ == "__main__":
    app.run(main)
