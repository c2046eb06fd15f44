"""Tiny random-initialised Hugging Face checkpoints of each supported family, for tests.

``make_tiny_checkpoint("qwen2" | "llama" | "qwen3", path)`` writes what a hub checkpoint
directory holds: ``config.json`` and ``model.safetensors`` via transformers' ``save_pretrained``
(PyTorch, the reference implementation) plus a byte-level BPE tokenizer. Weights are drawn with
a larger scale than transformers' default and the norms and biases are randomised too, so that
logits are O(1) and a parity test actually exercises every parameter.

Families (hidden 64, 2 layers, 4 query heads, 2 key/value heads by default):
  * qwen2: q/k/v biases, tied embeddings.
  * llama: untied, llama3 rope scaling with a short original context so that all three
    frequency bands (kept, blended, stretched) occur in a 16-wide head.
  * qwen3: q/k RMSNorm, head_dim 32 ≠ hidden/heads, untied.
"""

from __future__ import annotations

import os
import pathlib

FAMILIES = ("qwen2", "llama", "qwen3")


def hf_config(family: str, *, vocab_size: int, tie_word_embeddings: bool | None = None,
              hidden_size: int = 64, num_layers: int = 2, intermediate_size: int = 128):
    """The transformers config object of a tiny model of ``family``."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                  rms_norm_eps=1e-6, max_position_embeddings=128, eos_token_id=1,
                  pad_token_id=0)
    if family == "qwen2":
        tie = True if tie_word_embeddings is None else tie_word_embeddings
        return transformers.Qwen2Config(rope_theta=10000.0, tie_word_embeddings=tie, **common)
    if family == "llama":
        tie = False if tie_word_embeddings is None else tie_word_embeddings
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return transformers.LlamaConfig(rope_theta=500000.0, rope_scaling=rope_scaling,
                                        tie_word_embeddings=tie, **common)
    if family == "qwen3":
        tie = False if tie_word_embeddings is None else tie_word_embeddings
        return transformers.Qwen3Config(rope_theta=1000000.0, head_dim=32,
                                        tie_word_embeddings=tie, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def make_tiny_torch_model(family: str, *, vocab_size: int, seed: int = 0,
                          tie_word_embeddings: bool | None = None, **sizes):
    """A randomly initialised float32 ``AutoModelForCausalLM`` in eval mode."""
    import torch
    import transformers

    config = hf_config(family, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                       **sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def make_tiny_checkpoint(family: str, path, *, vocab_size: int | None = None, seed: int = 0,
                         tie_word_embeddings: bool | None = None, **sizes) -> pathlib.Path:
    """Writes a tiny ``family`` checkpoint + tokenizer into ``path`` and returns the path.

    Args:
      family: "qwen2", "llama" or "qwen3".
      path: target directory (created).
      vocab_size: model vocabulary; default the tokenizer's size (300). Larger values pad the
        embedding like Qwen's; smaller than the tokenizer is an error.
      seed: torch seed of the random weights.
      tie_word_embeddings: override the family default (qwen2 tied, llama/qwen3 untied).
      sizes: hidden_size, num_layers, intermediate_size overrides.
    """
    from offpolicy_jax.models import tiny_tokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer.save_tiny_tokenizer(path)
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    model = make_tiny_torch_model(family, vocab_size=vocab_size, seed=seed,
                                  tie_word_embeddings=tie_word_embeddings, **sizes)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(os.fspath(path))
    return path


def torch_logits(path, tokens, attention_mask):
    """Reference float32 logits from transformers for numpy ``tokens``/``attention_mask`` [B, T].

    Positions follow the left-padding convention ``cumsum(mask) − 1`` (what ``generate`` uses).
    """
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path),
                                                              dtype=torch.float32).eval()
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
                    attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()
