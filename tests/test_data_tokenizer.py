"""The character-level tokenizer: loads with AutoTokenizer, round-trips exactly."""

import json

import pytest
import transformers

from offpolicy_jax.data import arith, tokenizer as char_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return char_tokenizer.build_char_tokenizer(tmp_path_factory.mktemp("char_tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_files_and_special_tokens(tokenizer_dir, hf_tokenizer):
    with open(f"{tokenizer_dir}/tokenizer_config.json") as f:
        config = json.load(f)
    assert "auto_map" not in config                               # no remote code
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id,
            hf_tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(hf_tokenizer) == 4 + len(char_tokenizer.DEFAULT_ALPHABET)


def test_round_trip_of_task_text_is_exact(hf_tokenizer):
    problems = arith.generate_problems(50, "train", seed=0,
                                       config=arith.ArithConfig(parentheses=True))
    texts = [p.prompt + p.response for p in problems] + [
        "  two  spaces , before . punctuation ' s \n\n trailing ",
        "Question: What is 3/4?\nPut your final answer within \\boxed{}.\nAnswer:",
    ]
    for text in texts:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)                              # one token per character
        assert hf_tokenizer.decode(ids) == text
        assert hf_tokenizer.encode(text) == ids                   # no BOS/EOS added by default


def test_special_tokens_are_skipped_on_decode(hf_tokenizer):
    ids = hf_tokenizer.encode("7*3=21", add_special_tokens=False)
    padded = [hf_tokenizer.pad_token_id] + ids + [hf_tokenizer.eos_token_id]
    assert hf_tokenizer.decode(padded, skip_special_tokens=True) == "7*3=21"
    assert hf_tokenizer.decode(padded) == "<pad>7*3=21<eos>"


def test_custom_alphabet_and_unknown_characters(tmp_path):
    alphabet = char_tokenizer.alphabet_of(["Q: 1+2\nA: ", "\\boxed{3}"])
    directory = char_tokenizer.build_char_tokenizer(tmp_path, alphabet=alphabet)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert len(tok) == 4 + len(alphabet)
    assert tok.decode(tok.encode("Q: 2+1", add_special_tokens=False)) == "Q: 2+1"
    assert tok.encode("Z", add_special_tokens=False) == [tok.unk_token_id]
    with pytest.raises(ValueError, match="empty"):
        char_tokenizer.build_char_tokenizer(tmp_path / "x", alphabet="")
