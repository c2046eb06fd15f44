"""The evaluation harness (``python -m offpolicy_jax.eval``) and the shared ``evaluate_prompts``.

Covered elsewhere, not repeated here: the unbiased pass@k estimator and maj@k against
hand-computed values (tests/test_eval_metrics.py); gold extraction of every benchmark file --
sizes, ids, normalisations, and every gold accepted when boxed -- (tests/test_rewards_pool.py:
``test_loaders``, ``test_loader_normalisations``, ``test_every_gold_equals_itself_and_its_boxed_form``).
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from offpolicy_jax import models, rewards
from offpolicy_jax.data import prompts as prompts_lib
from offpolicy_jax.eval import harness, metrics, runner

ROOT = pathlib.Path(__file__).resolve().parents[1]

SAMPLE_FIELDS = {"benchmark", "id", "problem_index", "sample_index", "prompt", "response",
                 "extracted", "gold", "correct", "reason", "length", "truncated"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny-arith-style checkpoint (2 layers, 10 SFT steps: built in seconds)."""
    from offpolicy_jax import tiny_arith
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        sft_examples=500, sft_steps=10, sft_batch_size=16)
    directory = tmp_path_factory.mktemp("eval_tiny_model")
    return tiny_arith.build(str(directory), recipe, log_fn=lambda *_: None)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    cfg, params = models.load_hf_checkpoint(tiny_model)
    return cfg, params, models.load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def pool():
    with rewards.VerifierPool(num_workers=1) as p:
        yield p


# ---------------------------------------------------------------------------------------------
# Flag parsing.


@pytest.mark.parametrize("n, expected", [(1, (1,)), (2, (1, 2)), (6, (1, 2, 4, 6)),
                                         (8, (1, 2, 4, 8)), (10, (1, 2, 4, 8, 10))])
def test_default_ks(n, expected):
    assert harness.default_ks(n) == expected
    assert harness.parse_ks(None, n) == expected
    assert harness.parse_ks(" ", n) == expected


def test_parse_ks_and_majority_ks():
    assert harness.parse_ks("16,1, 4,4", 16) == (1, 4, 16)
    with pytest.raises(ValueError, match=r"--k values must be in \[1, --num_samples=8\].*16"):
        harness.parse_ks("1,16", 8)
    with pytest.raises(ValueError, match="comma-separated list of integers"):
        harness.parse_ks("1,two", 8)
    assert harness.majority_ks((1, 2, 4), 8) == (2, 4, 8)
    assert harness.majority_ks((1,), 1) == (1,)


def test_parse_benchmarks():
    assert harness.parse_benchmarks("arith, gsm8k,arith") == ("arith", "gsm8k")
    assert set(harness.BENCHMARK_NAMES) == {"arith", *rewards.BENCHMARKS}
    with pytest.raises(ValueError) as info:
        harness.parse_benchmarks("math500,gsm9k")
    message = str(info.value)
    assert "unknown benchmark 'gsm9k'" in message
    assert all(name in message for name in harness.BENCHMARK_NAMES)
    with pytest.raises(ValueError, match="--benchmarks is empty"):
        harness.parse_benchmarks(" , ")


def test_config_validation_names_the_flag():
    harness.HarnessConfig().validate()
    for field, value, flag in [("num_samples", 0, "--num_samples"), ("top_p", 1.5, "--top_p"),
                               ("limit", 0, "--limit"), ("batch_size", 0, "--batch_size"),
                               ("ks", (1, 9), "--k"), ("benchmarks", ("mmlu",), "--benchmarks")]:
        config = harness.HarnessConfig(**{field: value})
        with pytest.raises(ValueError, match=flag):
            config.validate()


def test_effective_max_new_tokens():
    assert harness.effective_max_new_tokens(None, 256) == 128
    assert harness.effective_max_new_tokens(None, 32768) == 1024
    assert harness.effective_max_new_tokens(48, 256) == 48
    with pytest.raises(ValueError, match="--max_new_tokens=256 leaves no room"):
        harness.effective_max_new_tokens(256, 256)


# ---------------------------------------------------------------------------------------------
# Prompts, golds, model directory.


@pytest.mark.parametrize("name", harness.BENCHMARK_NAMES)
def test_benchmark_records_keep_the_loader_golds(name):
    records = harness.benchmark_prompt_records(name, limit=3)
    assert len(records) == 3
    if name == "arith":
        assert records == prompts_lib.arith_records("heldout", 3)
        assert records[0]["prompt"].startswith("Q: ")
        return
    items = rewards.load_benchmark(name)[:3]
    assert [r["gold"] for r in records] == [i["gold"] for i in items]
    assert [r["id"] for r in records] == [i["id"] for i in items]
    for record, item in zip(records, items):
        assert record["prompt"] == prompts_lib.format_question(item["question"])
        assert prompts_lib.DEFAULT_INSTRUCTION in record["prompt"]


def test_arith_records_extend_the_rl_loop_heldout_set():
    _, loop_heldout = prompts_lib.load_train_and_eval("arith", eval_size=64, num_arith_train=10)
    assert harness.benchmark_prompt_records("arith", limit=100)[:64] == loop_heldout
    assert len(harness.benchmark_prompt_records("arith")) == harness.ARITH_EVAL_SIZE


def test_chat_template_is_used_when_present_and_can_be_turned_off(loaded):
    _, _, tokenizer = loaded
    assert harness.prompt_format("gsm8k", tokenizer, True) == "plain"
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)   # a private copy
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    chat = harness.benchmark_prompt_records("amc23", tokenizer=tokenizer, limit=1,
                                            instruction="Box it.")
    question = rewards.load_benchmark("amc23")[0]["question"]
    assert chat[0]["prompt"] == f"<|user|>{question}\nBox it.\n<|assistant|>"
    plain = harness.benchmark_prompt_records("amc23", tokenizer=tokenizer, limit=1,
                                             use_chat_template=False, instruction="Box it.")
    assert plain[0]["prompt"] == f"Question: {question}\nBox it.\nAnswer:"
    assert harness.prompt_format("amc23", tokenizer, True) == "chat template"
    assert harness.prompt_format("amc23", tokenizer, False) == "plain"
    assert harness.prompt_format("arith", tokenizer, True) == "arith"
    # --prompt_format: the question as written, or the plain template despite a chat template.
    raw = harness.benchmark_prompt_records("amc23", tokenizer=tokenizer, limit=1,
                                           prompt_format="raw")
    assert raw[0]["prompt"] == question
    assert harness.benchmark_prompt_records("amc23", tokenizer=tokenizer, limit=1,
                                            instruction="Box it.",
                                            prompt_format="instruction") == plain
    assert harness.prompt_format("amc23", tokenizer, True, "raw") == "raw"
    assert harness.prompt_format("amc23", tokenizer, True, "instruction") == "plain"


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "aime24_test.jsonl")):
        harness.benchmark_prompt_records("aime24", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'aime25'"):
        harness.benchmark_prompt_records("aime25", data_dir=tmp_path)


def test_run_fails_on_a_missing_data_file_before_loading_weights(tiny_model, tmp_path,
                                                                 monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    monkeypatch.setattr(models, "load_hf_checkpoint", must_not_load)
    config = harness.HarnessConfig(model=tiny_model, benchmarks=("arith", "minerva"),
                                   data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "minerva_math_test.jsonl")):
        harness.run(config, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_run_checks_data_files_before_resolving_the_model(tmp_path, monkeypatch):
    """A bad data folder must not wait for --model=tiny-arith to be built (minutes on first use)."""
    def must_not_resolve(model):
        raise AssertionError(f"--model={model} resolved before the data files were checked")

    monkeypatch.setattr(harness, "resolve_checkpoint", must_not_resolve)
    config = harness.HarnessConfig(model="tiny-arith", benchmarks=("gsm8k",),
                                   data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gsm8k_test.jsonl")):
        harness.run(config, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_run_rejects_an_out_path_that_is_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "resolve_checkpoint", lambda model: pytest.fail("resolved"))
    out = tmp_path / "results.txt"
    out.write_text("")
    with pytest.raises(ValueError, match="--out=.*results.txt exists and is not a directory"):
        harness.run(harness.HarnessConfig(), str(out), progress=False)


def test_model_directory_errors(tiny_model, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in os.listdir(tiny_model):
        if name.endswith((".safetensors", "config.json")) and not name.startswith(
                ("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(tiny_model, name), no_tokenizer)
    assert (no_tokenizer / "config.json").exists()
    with pytest.raises(FileNotFoundError, match=f"{no_tokenizer} has no tokenizer"):
        harness.resolve_checkpoint(str(no_tokenizer))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        harness.resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither the alias"):
        harness.resolve_checkpoint(str(tmp_path / "absent"))
    assert harness.resolve_checkpoint(tiny_model) == tiny_model


def test_stop_token_ids_merge_tokenizer_config_and_generation_config(loaded, tmp_path):
    cfg, _, tokenizer = loaded
    assert harness.stop_token_ids(tokenizer, cfg) == (tokenizer.eos_token_id,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert harness.stop_token_ids(tokenizer, cfg, str(tmp_path)) == tuple(
        sorted({tokenizer.eos_token_id, 5, 7}))


def test_results_table_hand_values():
    table = harness.results_table({"gsm8k": {
        "pass@1": 0.125, "pass@4": 0.5, "maj@4": 0.25, "mean_length": 37.25,
        "no_answer_fraction": 0.0625, "distinct_correct": 0.75, "num_prompts": 4,
        "num_samples": 4, "num_too_long": 1}})
    lines = table.splitlines()
    assert lines[0] == ("| benchmark | problems | n | pass@1 (%) | pass@4 (%) | maj@4 (%) | "
                        "distinct correct | mean length | no answer (%) | too long |")
    assert lines[2] == "| gsm8k | 4 | 4 | 12.5 | 50.0 | 25.0 | 0.75 | 37.2 | 6.2 | 1 |"


# ---------------------------------------------------------------------------------------------
# evaluate_prompts: chunking, too-long prompts, the RL loop's call.


def _arith_inputs(tokenizer, num):
    records = prompts_lib.arith_records("heldout", num)
    return ([tokenizer.encode(r["prompt"], add_special_tokens=False) for r in records],
            [r["gold"] for r in records])


def test_chunked_sampling_keeps_the_first_chunk_and_the_metrics_consistent(loaded, pool):
    cfg, params, tokenizer = loaded
    prompts, golds = _arith_inputs(tokenizer, 4)
    common = dict(num_samples=3, ks=(1, 2, 3), max_new_tokens=24, temperature=1.0, seed=7,
                  eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                  pool=pool)
    whole = runner.evaluate_prompts(cfg, params, tokenizer, prompts, golds, **common)
    done = []
    chunked = runner.evaluate_prompts(cfg, params, tokenizer, prompts, golds, batch_size=2,
                                      on_samples=done.append, **common)
    assert done == [6, 6]
    # Chunk 0 draws exactly the rows an unchunked call draws for those prompts; chunk 1 uses
    # another key.
    assert chunked.responses[:6] == whole.responses[:6]
    assert chunked.responses[6:] != whole.responses[6:]
    for result in (whole, chunked):
        m = result.metrics
        assert m["pass@1"] == pytest.approx(result.correct.mean())
        assert m["pass@3"] == pytest.approx(result.correct.any(axis=1).mean())
        keys = [runner.vote_key(e) for e in result.extracted]
        assert m["maj@3"] == metrics.mean_maj_at_k(
            [keys[p * 3:(p + 1) * 3] for p in range(4)], result.correct, 3)
        assert m["num_correct"] == int(result.correct.sum())
        # Different correct texts per prompt, counted by hand from the prompt-major rows.
        assert m["distinct_correct"] == pytest.approx(np.mean([
            len({"".join(result.responses[p * 3 + j].split())
                 for j in range(3) if result.correct[p, j]}) for p in range(4)]))
        assert m["mean_length"] == pytest.approx(result.lengths.mean())
        assert m["no_answer_fraction"] == pytest.approx(
            np.mean([e is None for e in result.extracted]))
        assert m["num_prompts"] == 4 and m["num_responses"] == 12 and m["num_too_long"] == 0
        assert not result.too_long.any()
        # truncated: the whole budget used without an EOS token
        assert not result.truncated[result.lengths < 24].any()
        assert m["num_truncated"] == int(result.truncated.sum())


def test_too_long_prompts_are_skipped_and_scored_wrong_only_when_asked(loaded, pool):
    cfg, params, tokenizer = loaded
    prompts, golds = _arith_inputs(tokenizer, 2)
    long_prompt = tokenizer.encode("Q: " + "1+" * 118 + "1\nA: ", add_special_tokens=False)
    assert len(long_prompt) + 24 > cfg.max_position_embeddings >= len(long_prompt)
    args = dict(num_samples=2, max_new_tokens=24, temperature=1.0,
                eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
                pool=pool)
    with pytest.raises(ValueError, match="max_new_tokens=24 does not fit"):
        runner.evaluate_prompts(cfg, params, tokenizer, prompts + [long_prompt], golds + ["223"],
                                **args)
    result = runner.evaluate_prompts(cfg, params, tokenizer, [long_prompt] + prompts,
                                     ["223"] + golds, skip_too_long=True, **args)
    assert result.too_long.tolist() == [True, False, False]
    assert result.responses[:2] == ["", ""] and not result.correct[0].any()
    assert result.reasons[0].startswith(f"not sampled: prompt of {len(long_prompt)} tokens")
    m = result.metrics
    assert m["num_too_long"] == 1 and m["num_responses"] == 4 and m["num_prompts"] == 3
    assert m["pass@1"] == pytest.approx(result.correct.sum() / 6)     # skipped count as wrong
    assert m["mean_length"] == pytest.approx(result.lengths[2:].mean())
    all_long = runner.evaluate_prompts(cfg, params, tokenizer, [long_prompt], ["1"],
                                       skip_too_long=True, **args)
    assert all_long.metrics["pass@1"] == 0.0 and all_long.metrics["mean_length"] is None


def test_vote_key_groups_formatting_variants():
    assert runner.vote_key(None) is None
    assert runner.vote_key("\\dfrac{1}{2}") == runner.vote_key("\\frac{1}{2}")
    assert runner.vote_key("\\left( 1, 2 \\right)") == runner.vote_key("(1,2)")
    assert runner.vote_key("$5$.") == runner.vote_key("5")
    assert runner.vote_key("X") != runner.vote_key("x")       # case is kept


def test_majority_vote_groups_answers_that_differ_only_in_formatting(loaded, monkeypatch):
    """maj@k in evaluate_prompts votes on vote_key: two spellings of 1/2 outvote one "3"."""
    cfg, params, tokenizer = loaded
    prompts, _ = _arith_inputs(tokenizer, 1)
    answers = ["3", "\\dfrac{1}{2}", "\\frac{1}{2}", None]
    verdicts = [False, True, True, False]

    def fake_score_batch(texts, golds, pool=None):
        assert len(texts) == 4
        return rewards.BatchScore(rewards=np.array(verdicts, np.float32), equivalent=verdicts,
                                  extracted=answers, reasons=["fake"] * 4)

    monkeypatch.setattr(runner.rewards, "score_batch", fake_score_batch)
    result = runner.evaluate_prompts(
        cfg, params, tokenizer, prompts, ["1/2"], num_samples=4, ks=(1, 4), maj_ks=(3, 4),
        max_new_tokens=4, temperature=1.0, eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id)
    assert result.extracted == answers
    assert result.metrics["maj@3"] == 1.0 and result.metrics["maj@4"] == 1.0
    # By raw text each spelling would be its own group and "3", first, would win the tie.
    assert metrics.maj_at_k(answers, verdicts, 4) == 0.0
    assert result.metrics["pass@1"] == 0.5 and result.metrics["no_answer_fraction"] == 0.25


def test_the_rl_loop_call_is_unchanged(loaded, pool):
    """``training.loop.evaluate`` calls evaluate_prompts without the new keywords."""
    cfg, params, tokenizer = loaded
    prompts, golds = _arith_inputs(tokenizer, 2)
    result = runner.evaluate_prompts(
        cfg, params, tokenizer, prompts, golds, num_samples=2, ks=(1, 2), max_new_tokens=16,
        temperature=1.0, seed=1, eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id, pool=pool, mesh=None)
    assert {"pass@1", "pass@2", "maj@2", "mean_length", "no_answer_fraction"} <= set(
        result.metrics)
    assert result.correct.shape == (2, 2) and len(result.responses) == 4
    with pytest.raises(ValueError, match=r"k value must be in \[1, num_samples=2\]"):
        runner.evaluate_prompts(cfg, params, tokenizer, prompts, golds, num_samples=2, ks=(3,),
                                max_new_tokens=16, temperature=1.0)


# ---------------------------------------------------------------------------------------------
# End to end: the command.


def _run_cli(*flags):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)    # one CPU device, like a laptop run
    return subprocess.run([sys.executable, "-m", "offpolicy_jax.eval", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_command_end_to_end_writes_table_results_and_samples(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = _run_cli(f"--model={tiny_model}", "--benchmarks=arith,gsm8k", "--limit=3",
                      "--num_samples=4", "--max_new_tokens=24", "--temperature=1.0",
                      "--batch_size=2", f"--out={out}", "--progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "samples.jsonl"]

    summary = json.loads((out / "results.json").read_text())
    assert summary["model"] == tiny_model and summary["model_dir"] == tiny_model
    settings = summary["settings"]
    assert settings["ks"] == [1, 2, 4] and settings["maj_ks"] == [2, 4]
    assert (settings["num_samples"], settings["max_new_tokens"], settings["limit"],
            settings["temperature"], settings["top_p"], settings["batch_size"]) == \
        (4, 24, 3, 1.0, 0.95, 2)
    assert list(summary["benchmarks"]) == ["arith", "gsm8k"]
    samples = _read_jsonl(out / "samples.jsonl")
    assert len(samples) == 2 * 3 * 4
    assert all(set(row) == SAMPLE_FIELDS for row in samples)

    for name, fmt in [("arith", "arith"), ("gsm8k", "plain")]:
        bench = summary["benchmarks"][name]
        for key in ("pass@1", "pass@2", "pass@4", "maj@2", "maj@4", "mean_length",
                    "no_answer_fraction", "truncated_fraction", "num_prompts", "num_samples",
                    "num_responses", "num_correct", "num_no_answer", "num_too_long", "seconds"):
            assert key in bench, (name, key)
        assert bench["prompt_format"] == fmt and bench["settings"]["prompt_format"] == fmt
        assert bench["num_prompts"] == 3 and bench["num_samples"] == 4
        rows = [r for r in samples if r["benchmark"] == name]
        correct = np.array([r["correct"] for r in rows]).reshape(3, 4)
        assert bench["num_correct"] == int(correct.sum())
        assert bench["pass@1"] == pytest.approx(correct.mean())
        assert bench["pass@4"] == pytest.approx(correct.any(axis=1).mean())
        answers = [[runner.vote_key(r["extracted"]) for r in rows[p * 4:(p + 1) * 4]]
                   for p in range(3)]
        assert bench["maj@4"] == pytest.approx(metrics.mean_maj_at_k(answers, correct, 4))
        assert [r["sample_index"] for r in rows] == [0, 1, 2, 3] * 3
        for row in rows:
            if row["reason"].startswith("not sampled"):
                assert row["response"] == "" and not row["correct"]
            elif row["extracted"] is not None:
                assert rewards.check(row["gold"], row["extracted"]).equivalent == row["correct"]
    arith_rows = [r for r in samples if r["benchmark"] == "arith"]
    assert [r["gold"] for r in arith_rows[::4]] == [
        r["gold"] for r in prompts_lib.arith_records("heldout", 3)]
    assert arith_rows[0]["prompt"].startswith("Q: ")
    # GSM8K questions in the plain template are longer than most of this model's 256-token
    # context; those are reported, not sampled.
    gsm_rows = [r for r in samples if r["benchmark"] == "gsm8k"]
    too_long = sum(r["reason"].startswith("not sampled") for r in gsm_rows[::4])
    assert summary["benchmarks"]["gsm8k"]["num_too_long"] == too_long

    table = (out / "results.md").read_text()
    assert "| benchmark | problems | n | pass@1 (%) | pass@2 (%) | pass@4 (%) | maj@2 (%)" in table
    assert harness.results_table(summary["benchmarks"]) in result.stdout
    assert "| arith | 3 | 4 |" in result.stdout and "| gsm8k | 3 | 4 |" in result.stdout


def test_command_reports_bad_input_in_one_line(tmp_path):
    result = _run_cli(f"--model={tmp_path / 'absent'}", "--benchmarks=arith,mmlu",
                      f"--out={tmp_path}")
    assert result.returncode == 2
    assert "error: unknown benchmark 'mmlu' in --benchmarks; valid names: arith, gsm8k_train" \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)
    result = _run_cli(f"--model={tmp_path / 'absent'}", f"--out={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: --model='{tmp_path / 'absent'}' is neither the alias" in result.stderr
    # --out is optional; a --data_dir that does not exist is named, with the benchmark.
    missing = tmp_path / "no_such_folder"
    result = _run_cli("--model=tiny-arith", "--benchmarks=math500", f"--data_dir={missing}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: benchmark 'math500': data folder {missing} (from --data_dir) does not exist" \
        in result.stderr


def _documented_commands() -> list[list[str]]:
    """argv (after the module) of every ``python -m offpolicy_jax.eval`` line in the README's eval
    section and in the command's module docstring."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- section: eval -->")[1].split("<!-- end: eval -->")[0]
    docstring = (ROOT / "offpolicy_jax" / "eval" / "__main__.py").read_text().split('"""')[1]
    commands = []
    for text in (section, docstring):
        for line in text.replace("\\\n", " ").splitlines():
            if "python -m offpolicy_jax.eval " in line:
                commands.append(shlex.split(line.split("python -m offpolicy_jax.eval", 1)[1]))
    return commands


def test_documented_commands_parse_with_the_real_flags():
    commands = _documented_commands()
    assert len(commands) >= 3, commands
    script = (
        "import json, sys\n"
        "from absl import flags\n"
        "import offpolicy_jax.eval.__main__ as command\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    flags.FLAGS.unparse_flags()\n"
        "    flags.FLAGS(['eval'] + argv)\n"
        "    command.config_from_flags().validate()\n"
        "print('parsed', len(json.loads(sys.argv[1])))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(commands)],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"parsed {len(commands)}" in result.stdout


# ---------------------------------------------------------------------------------------------
# Best-of-n with a generative verifier.


def test_rerank_picks_the_sample_with_the_best_mean_rating(monkeypatch):
    """2 problems x 3 samples, 2 verifications each (ratings by hand); ties go to the earlier
    sample; a missing or foreign rating counts as -1."""
    from offpolicy_jax import verification
    result = runner.EvalResult(
        metrics={}, responses=["a0", "a1", "a2", "b0", "b1", "b2"],
        extracted=["1", "2", None, "5", "5", "6"],
        correct=np.array([[False, True, False], [True, True, False]]), reasons=[""] * 6,
        lengths=np.ones(6, np.int32))
    ratings = {"a0": ["1", "-0.5"], "a1": ["1", "1"], "a2": [None, "1"],
               "b0": ["-0.5", "1"], "b1": ["1", "-0.5"], "b2": ["7", "1"]}
    seen = {}

    def fake_evaluate(cfg, params, tokenizer, prompts, golds, *, num_samples, **kwargs):
        texts = [tokenizer.decode(p) for p in prompts]
        seen.update(golds=golds, num_samples=num_samples, texts=texts)
        extracted = [r for text in texts for r in ratings[text.split("|")[1]]]
        correct = np.array([runner.vote_key(x) == runner.vote_key(g) if x else False
                            for x, g in zip(extracted, np.repeat(golds, num_samples))])
        return runner.EvalResult(metrics={}, responses=[""] * len(extracted),
                                 extracted=extracted,
                                 correct=correct.reshape(len(prompts), num_samples),
                                 reasons=[""] * len(extracted),
                                 lengths=np.ones(len(extracted), np.int32))

    class Tokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    monkeypatch.setattr(runner, "evaluate_prompts", fake_evaluate)
    records = [{"prompt": "p", "gold": "1"}, {"prompt": "q", "gold": "5"}]
    out = verification.rerank_best_of_n(
        None, None, Tokenizer(), records, result,
        make_prompt=lambda record, text, tokenizer: f"{record['prompt']}|{text}", samples=2,
        max_new_tokens=8, temperature=1.0)
    # Problem 0: means 0.25, 1, 0 -> sample 1 (correct). Problem 1: 0.25, 0.25, 0 -> sample 0
    # (the tie goes to the earlier one; correct).
    assert out["reranked@3"] == 1.0
    assert out["pass@1"] == pytest.approx(3 / 6) and out["pass@3"] == 1.0
    assert seen["num_samples"] == 2 and seen["texts"][0] == "p|a0"
    assert seen["golds"] == ["-0.5", "1", "-1", "1", "1", "-0.5"]
    # Verifier accuracy: a rating is accurate when it is the sample's own.
    assert out["verify_accuracy"] == pytest.approx(5 / 12)


def test_command_reranks_with_the_model_itself(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = _run_cli(f"--model={tiny_model}", "--benchmarks=arith", "--limit=3",
                      "--num_samples=2", "--max_new_tokens=24", "--temperature=1.0",
                      "--rerank_with=self", "--rerank_samples=2", f"--out={out}",
                      "--progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((out / "results.json").read_text())["benchmarks"]["arith"]
    assert 0.0 <= bench["reranked@2"] <= bench["pass@2"]
    assert 0.0 <= bench["verify_accuracy"] <= 1.0
    assert bench["settings"]["rerank_with"] == "self"
    assert "reranked@2 (%)" in result.stdout
