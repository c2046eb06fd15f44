"""The embedded default's ingredients: slipped demonstrations and the tokenizer loaded through the
same path as a real checkpoint (a qwen2 config.json next to a character-level tokenizer)."""

import re

import numpy as np
import pytest

from offpolicy_jax import models
from offpolicy_jax.data import arith, tokenizer as tokenizer_lib

STEP = re.compile(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)")


def _steps_and_answer(response):
    body, boxed = response.split(". \\boxed{")
    return [STEP.fullmatch(step).groups() for step in body.split(", ")], int(boxed[:-1])


def test_demonstrations_without_slips_are_the_clean_ones():
    clean = [(p.prompt, p.response) for p in arith.generate_problems(50, "train", 3)]
    assert arith.demonstrations(50, seed=3) == clean
    assert arith.demonstrations(50, seed=3, slip_probability=0.0) == clean


def test_slipped_demonstrations_are_self_consistent_and_slip_at_the_given_rate():
    slip_probability = 0.3
    pairs = arith.demonstrations(2000, seed=1, slip_probability=slip_probability)
    clean = arith.demonstrations(2000, seed=1)
    steps_total = slips = wrong_answers = 0
    for (prompt, response), (_, clean_response) in zip(pairs, clean):
        steps, answer = _steps_and_answer(response)
        for a, op, b, written in steps:
            true = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert abs(int(written) - true) <= 2          # a slip is off by 1 or 2
            slips += int(written) != true
            steps_total += 1
        assert answer == int(steps[-1][3])                # the boxed answer follows the working
        wrong_answers += answer != _steps_and_answer(clean_response)[1]
    rate = slips / steps_total
    # Binomial standard error at ~5,000 steps is ~0.0065; 4 sigma keeps this test deterministic
    # in practice (fixed seed) while still catching a wrong rate.
    assert abs(rate - slip_probability) < 4 * np.sqrt(slip_probability * 0.7 / steps_total)
    assert wrong_answers > 0


def test_slip_probability_is_validated():
    with pytest.raises(ValueError, match="slip_probability must be in"):
        arith.demonstrations(1, seed=0, slip_probability=1.0)


def test_char_tokenizer_keeps_whitespace_when_loaded_beside_a_qwen2_config(tmp_path):
    # transformers 5 would otherwise swap in Qwen2Tokenizer, whose pre-tokenizer drops spaces.
    cfg = models.ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=16,
                             intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             qkv_bias=True, tie_word_embeddings=True)
    models.save_hf_checkpoint(tmp_path, cfg, models.init_params(cfg, 0))
    tokenizer_lib.build_char_tokenizer(tmp_path)
    tokenizer = models.load_tokenizer(tmp_path)
    text = "Q: 12+7*3\nA: 7*3=21, 12+21=33. \\boxed{33}"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_concurrent_ensure_builds_once(tmp_path, monkeypatch):
    """Processes that start together (launch/local.sh) build the cached model once; the others
    wait on the lock and load that build."""
    import dataclasses
    import json
    import threading
    import time

    from offpolicy_jax import tiny_arith

    builds = []

    def fake_build(directory, recipe, *, log_fn=print):
        del log_fn
        builds.append(directory)
        time.sleep(0.5)                       # long enough for the other caller to arrive
        with open(f"{directory}/{tiny_arith.STAMP_FILE}", "w") as f:
            json.dump(dataclasses.asdict(recipe), f)
        return directory

    monkeypatch.setattr(tiny_arith, "build", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny_arith.ensure(str(tmp_path))))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [str(tmp_path / f"tiny-arith-v{tiny_arith.TinyArithRecipe().version}")] * 2


def test_verify_recipe_builds_on_its_base_and_is_cached_under_its_own_alias(tmp_path):
    """``tiny-arith-verify`` = its base recipe's build (made first, cached under ``tiny-arith``)
    fine-tuned on solving + verification demonstrations, cached under its own alias with a stamp
    that holds both recipes; a second call loads it."""
    import json

    from offpolicy_jax import tiny_arith

    base = tiny_arith.TinyArithRecipe(hidden_size=32, intermediate_size=64, num_layers=1,
                                      num_heads=2, num_kv_heads=1, sft_examples=64, sft_steps=2,
                                      sft_batch_size=8)
    recipe = tiny_arith.TinyArithVerifyRecipe(base=base, solve_examples=32, verify_examples=32,
                                              sft_steps=2, sft_batch_size=8)
    quiet = dict(log_fn=lambda *_: None)
    directory = tiny_arith.ensure_verify(str(tmp_path), recipe, **quiet)
    assert directory == str(tmp_path / f"{tiny_arith.VERIFY_ALIAS}-v{recipe.version}")
    assert (tmp_path / f"{tiny_arith.ALIAS}-v{base.version}" / "config.json").exists()
    with open(f"{directory}/{tiny_arith.STAMP_FILE}") as f:
        stamp = json.load(f)
    assert stamp["base"]["hidden_size"] == 32 and stamp["sft_steps"] == 2
    cfg, _ = models.load_hf_checkpoint(directory)
    assert cfg.hidden_size == 32
    tokenizer = models.load_tokenizer(directory)
    text = "Q: 1+2\nA: 1+2=3. \\boxed{3}\nC: 1+2=3 3 ok. \\boxed{1}"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    mtime = (tmp_path / f"{tiny_arith.VERIFY_ALIAS}-v{recipe.version}" / "config.json").stat()
    assert tiny_arith.ensure_verify(str(tmp_path), recipe, **quiet) == directory
    assert (tmp_path / f"{tiny_arith.VERIFY_ALIAS}-v{recipe.version}" /
            "config.json").stat().st_mtime == mtime.st_mtime
    # The mix: solving demonstrations first, then verification ones.
    examples = tiny_arith.verify_examples(recipe)
    assert len(examples) == 64
    assert all(p.endswith("\nA: ") for p, _ in examples[:32])
    assert all(p.endswith(arith.VERIFY_CUE) for p, _ in examples[32:])


def test_the_main_recipe_is_unchanged():
    """The main command's model: adding tiny-arith-verify must not touch tiny-arith's recipe
    (its stamp would change and every cache would rebuild a different model)."""
    import dataclasses

    from offpolicy_jax import tiny_arith
    assert dataclasses.asdict(tiny_arith.TinyArithRecipe()) == {
        "version": 2, "hidden_size": 128, "intermediate_size": 384, "num_layers": 4,
        "num_heads": 4, "num_kv_heads": 2, "sft_examples": 20_000, "sft_steps": 600,
        "sft_batch_size": 64, "sft_learning_rate": 3e-3, "slip_probability": 0.2, "seed": 0}
