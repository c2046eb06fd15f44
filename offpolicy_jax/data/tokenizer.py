"""A character-level tokenizer saved as a Hugging Face tokenizer (the embedded model's).

One token per character of a fixed alphabet (by default printable ASCII and newline), plus the
special tokens ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``. It is built with the ``tokenizers``
library (a word-level model over single characters: the pre-tokenizer isolates every character and
the decoder concatenates tokens without separators), and saved as ``tokenizer.json`` +
``tokenizer_config.json`` + ``special_tokens_map.json`` so that
``transformers.AutoTokenizer.from_pretrained(directory)`` loads it without remote code.
Encoding then decoding any text over the alphabet gives back exactly the same text: no added or
removed spaces (``clean_up_tokenization_spaces`` is off).
"""

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)   # ids 0, 1, 2, 3

# Printable ASCII (space to '~') and newline: covers the arith task (digits, '+-*()=', 'Q: ',
# 'A: ', '\boxed{}', ', .') and plain English prompts.
DEFAULT_ALPHABET = "".join(chr(code) for code in range(32, 127)) + "\n"


def char_vocab(alphabet: str = DEFAULT_ALPHABET) -> dict[str, int]:
    """Token -> id: the special tokens first (0-3), then each distinct character in order."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        if char not in vocab:
            vocab[char] = len(vocab)
    return vocab


def make_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` (not yet saved); characters outside the alphabet map to
    ``<unk>``."""
    if not alphabet:
        raise ValueError("make_char_tokenizer: the alphabet is empty")
    tokenizer = Tokenizer(models.WordLevel(char_vocab(alphabet), unk_token=UNK_TOKEN))
    # '[\s\S]' matches every single character, newline included ('.' would skip newlines).
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_char_tokenizer(directory: str | os.PathLike, alphabet: str = DEFAULT_ALPHABET,
                         *, model_max_length: int = 2048) -> str:
    """Builds the character tokenizer and saves it in ``directory`` (created if needed).

    Args:
      directory: where ``tokenizer.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json`` are written (other files there are left alone, so this can
        share the model's checkpoint directory).
      alphabet: the characters that get their own token.
      model_max_length: recorded in ``tokenizer_config.json``.

    Returns:
      ``directory`` as a string, ready for ``AutoTokenizer.from_pretrained``.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    make_char_tokenizer(alphabet).save(os.path.join(directory, "tokenizer.json"))
    special = {"pad_token": PAD_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
               "unk_token": UNK_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        # Decoding must give back the characters exactly; the default clean-up would, e.g.,
        # turn "33 ." into "33.".
        "clean_up_tokenization_spaces": False,
        # Prompts are encoded as they are: no <bos> is prepended (the sampler and the SFT code
        # pass add_special_tokens=False anyway; this keeps plain calls consistent with them).
        "add_bos_token": False,
        "add_eos_token": False,
        "padding_side": "left",
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return directory


def alphabet_of(texts) -> str:
    """The sorted distinct characters of ``texts`` (to build a minimal alphabet for a task)."""
    return "".join(sorted(set("".join(texts))))


__all__ = ["build_char_tokenizer", "make_char_tokenizer", "char_vocab", "alphabet_of",
           "DEFAULT_ALPHABET", "SPECIAL_TOKENS", "PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN",
           "UNK_TOKEN"]
