"""Prompt records: arith splits, JSONL loading and its errors, prompt templates, held-out split."""

import json

import pytest
import transformers

from offpolicy_jax.data import arith, prompts, tokenizer as char_tokenizer


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines))
    return str(path)


def test_arith_train_and_eval_records():
    train, heldout = prompts.load_train_and_eval("arith", eval_size=16, seed=5,
                                                 num_arith_train=200)
    # 200 draws, repeats removed (the generator repeats problems): every prompt appears once.
    assert 100 < len(train) <= 200 and len(heldout) == 16
    assert len({r["prompt"] for r in train}) == len(train)
    assert set(train[0]) == {"id", "prompt", "gold"}
    problem = arith.parse_expression(train[0]["prompt"][len("Q: "):-len("\nA: ")])
    assert train[0]["prompt"] == problem.prompt and train[0]["gold"] == problem.gold
    # The held-out set does not depend on the run's seed; training prompts do.
    train_other, heldout_other = prompts.load_train_and_eval("arith", eval_size=16, seed=6,
                                                             num_arith_train=200)
    assert heldout_other == heldout and train_other != train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert len({r["id"] for r in train}) == len(train)


def test_training_pool_keeps_distinct_prompts_and_takes_the_first_n():
    records = [{"id": str(i), "prompt": f"q{i % 3}", "gold": "1"} for i in range(7)]
    assert [r["id"] for r in prompts.distinct_prompts(records)] == ["0", "1", "2"]
    assert [r["id"] for r in prompts.training_pool(records, 2, source="d")] == ["0", "1"]
    assert len(prompts.training_pool(records, 0, source="d")) == 3
    with pytest.raises(ValueError, match="--train_size=4: d has 3 distinct training prompts"):
        prompts.training_pool(records, 4, source="d")
    train, _ = prompts.load_train_and_eval("arith", eval_size=16, num_arith_train=200,
                                           train_size=32)
    whole, _ = prompts.load_train_and_eval("arith", eval_size=16, num_arith_train=200)
    assert train == whole[:32]


def test_jsonl_dataset_with_field_flags(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"problem": f"What is {i}+1?", "solution": f"{i}+1={i + 1}\n#### {i + 1}"}
        for i in range(10)] + [""] + [{"problem": "Pi?", "solution": 3.14}])
    train, heldout = prompts.load_train_and_eval(path, prompt_field="problem",
                                                 answer_field="solution", eval_size=3)
    assert len(train) == 8 and len(heldout) == 3
    records = {r["id"]: r for r in train + heldout}
    assert records["d.jsonl:1"]["gold"] == "1"                 # after '####'
    assert records["d.jsonl:12"]["gold"] == "3.14"             # blank line 11 skipped
    assert records["d.jsonl:2"]["prompt"] == prompts.PLAIN_TEMPLATE.format(
        question="What is 1+1?", instruction=prompts.DEFAULT_INSTRUCTION)
    # A fixed choice: the same records are held out whatever the seed.
    assert prompts.load_train_and_eval(path, prompt_field="problem", answer_field="solution",
                                       eval_size=3, seed=9)[1] == heldout


@pytest.mark.parametrize("lines, match", [
    ([{"question": "a", "answer": "1"}, {"question": "b"}], r"d\.jsonl:2: no key 'answer'"),
    ([{"q": "a", "answer": "1"}], r"d\.jsonl:1: no key 'question'"),
    ([{"question": "a", "answer": "1"}, "{not json"], r"d\.jsonl:2: not valid JSON"),
    ([[1, 2]], r"d\.jsonl:1: expected a JSON object"),
    ([{"question": "", "answer": "1"}], r"d\.jsonl:1: key 'question' must be a non-empty"),
    ([{"question": "a", "answer": None}], r"d\.jsonl:1: key 'answer'"),
    ([{"question": "a", "answer": "#### "}], r"d\.jsonl:1: key 'answer' holds an empty"),
])
def test_jsonl_errors_name_file_line_and_key(tmp_path, lines, match):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        prompts.read_jsonl_questions(path)


def test_jsonl_missing_file_and_too_large_eval(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prompts.load_train_and_eval(str(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "1"}] * 3)
    with pytest.raises(ValueError, match="eval_size=3"):
        prompts.load_train_and_eval(path, eval_size=3)


def test_split_heldout_is_fixed_and_nested():
    records = [{"id": str(i)} for i in range(50)]
    train, heldout = prompts.split_heldout(records, 10)
    assert len(train) == 40 and {r["id"] for r in train}.isdisjoint(r["id"] for r in heldout)
    assert prompts.split_heldout(records, 20)[1][:10] == heldout
    assert [r["id"] for r in train] == sorted((r["id"] for r in train), key=int)


def test_plain_and_chat_templates(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        char_tokenizer.build_char_tokenizer(tmp_path))
    plain = prompts.format_question("What is 2+2?", tokenizer=tokenizer)   # no chat template
    assert plain == ("Question: What is 2+2?\nPlease reason step by step, and put your final "
                     "answer within \\boxed{}.\nAnswer:")
    assert prompts.format_question("Hi", instruction="") == "Question: Hi\nAnswer:"
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = prompts.format_question("What is 2+2?", tokenizer=tokenizer, instruction="Box it.")
    assert chat == "<user>What is 2+2?\nBox it.\n<assistant>"
    assert prompts.format_question("What is 2+2?", tokenizer=tokenizer, instruction="Box it.",
                                   use_chat_template=False) == \
        "Question: What is 2+2?\nBox it.\nAnswer:"


def test_plain_template_keeps_the_bos_a_tokenizer_prepends(tmp_path):
    from tokenizers import processors

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        char_tokenizer.build_char_tokenizer(tmp_path))
    assert prompts.format_question("2+2?", tokenizer=tokenizer, instruction="").startswith("Q")
    # A Llama-style tokenizer: every encoding starts with BOS (template post-processor).
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    prompt = prompts.format_question("2+2?", tokenizer=tokenizer, instruction="")
    assert prompt == f"{bos}Question: 2+2?\nAnswer:"
    ids = tokenizer.encode(prompt, add_special_tokens=False)   # how the loop and eval encode
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_gsm8k_uses_train_split_for_training_and_test_split_for_eval():
    train, heldout = prompts.load_train_and_eval("gsm8k", eval_size=32)
    assert len(train) == 7473 and len(heldout) == 32
    assert all(r["id"].startswith("gsm8k_train-") for r in train)
    assert all(r["id"].startswith("gsm8k-") for r in heldout)
    assert train[0]["gold"] == "72"                              # Natalia's clips
    assert train[0]["prompt"].startswith("Question: Natalia sold clips")
    assert train[0]["prompt"].endswith("within \\boxed{}.\nAnswer:")
    _, whole_test = prompts.load_train_and_eval("gsm8k", eval_size=5000)
    assert len(whole_test) == 1319


def test_math500_holds_out_a_fixed_subset():
    train, heldout = prompts.load_train_and_eval("math500", eval_size=100, seed=1)
    assert len(train) == 400 and len(heldout) == 100
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in heldout)
    assert prompts.load_train_and_eval("math500", eval_size=100, seed=2)[1] == heldout


def test_unknown_dataset_name_is_reported():
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        prompts.load_train_and_eval("gsm9k")


def test_prompt_formats(tmp_path):
    """--prompt_format: 'chat' is today's wrapping, 'instruction' forces the plain template,
    'raw' keeps the question as written (after the BOS a tokenizer would prepend)."""
    from tokenizers import processors

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        char_tokenizer.build_char_tokenizer(tmp_path))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    question = "What is 2+2?"
    assert prompts.format_question(question, tokenizer=tokenizer, instruction="Box it.",
                                   prompt_format="chat") == "<user>What is 2+2?\nBox it.\n<assistant>"
    assert prompts.format_question(question, tokenizer=tokenizer, instruction="Box it.",
                                   prompt_format="instruction") == \
        "Question: What is 2+2?\nBox it.\nAnswer:"
    assert prompts.format_question(question, tokenizer=tokenizer, prompt_format="raw") == question
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    assert prompts.format_question(question, tokenizer=tokenizer, prompt_format="raw") == \
        bos + question
    with pytest.raises(ValueError, match="--prompt_format='plain'"):
        prompts.format_question(question, prompt_format="plain")


def test_jsonl_dataset_raw_prompts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": f"{i}+1", "answer": str(i + 1)}
                                              for i in range(6)])
    train, heldout = prompts.load_train_and_eval(path, eval_size=2, prompt_format="raw")
    assert sorted(r["prompt"] for r in train + heldout) == [f"{i}+1" for i in range(6)]
    # arith prompts are the task's own format whatever the flag says.
    arith_raw = prompts.load_train_and_eval("arith", eval_size=4, num_arith_train=10,
                                            prompt_format="raw")
    assert arith_raw == prompts.load_train_and_eval("arith", eval_size=4, num_arith_train=10)
    with pytest.raises(ValueError, match="--prompt_format"):
        prompts.load_train_and_eval(path, eval_size=2, prompt_format="as-is")
