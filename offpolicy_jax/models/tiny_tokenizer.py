"""A small byte-level BPE tokenizer for tiny random checkpoints (demo, tests).

Byte-level BPE (as in GPT-2 and Qwen) can encode any text losslessly: the base vocabulary is the
256 bytes, and we learn a few dozen merges from a fixed corpus of arithmetic and math-answer
text, so encodings are short enough to be readable. It is built with the ``tokenizers`` library
only (no download, no torch) and saved in the standard ``tokenizer.json`` form that
``transformers.AutoTokenizer`` loads.

Special tokens follow the Qwen chat convention: ``<|endoftext|>`` (end of document),
``<|im_start|>`` / ``<|im_end|>`` (chat turns, ``<|im_end|>`` is the EOS of a reply) and a
dedicated ``<|pad|>``.
"""

from __future__ import annotations

import os

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, "<|im_start|>", "<|im_end|>")
DEFAULT_VOCAB_SIZE = 300  # 256 bytes + 4 specials + 40 merges

# ChatML, the format of Qwen instruct checkpoints.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Training text for the merges: a fixed, deterministic mix of arithmetic and answer formats.
_CORPUS = [f"What is {a} + {b}? The answer is {a + b}. #### {a + b}"
           for a in range(0, 100, 7) for b in range(0, 100, 11)]
_CORPUS += [f"Solve for x: {a}x = {a * b}. So x = {b}, and the final answer is \\boxed{{{b}}}."
            for a in range(1, 20) for b in range(1, 20, 3)]
_CORPUS += ["Let's think step by step. Therefore the answer is the number of ways.",
            "Question: Answer: The the and of to in is that it for on with as."]


def build_tiny_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A ``transformers.PreTrainedTokenizerFast`` with ``vocab_size`` entries (≥ 260).

    Deterministic: the same ``vocab_size`` always yields the same vocabulary and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {minimum}, got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN,
                                   eos_token=EOS_TOKEN, chat_template=CHAT_TEMPLATE)


def save_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Builds the tokenizer and saves it into ``path`` (tokenizer.json + configs); returns it."""
    tokenizer = build_tiny_tokenizer(vocab_size)
    tokenizer.save_pretrained(os.fspath(path))
    return tokenizer
