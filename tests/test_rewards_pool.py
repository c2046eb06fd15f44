"""The verifier pool: deadlines, recovery, adversarial inputs, every benchmark gold, and loaders."""

import os
import re
import signal
import threading
import time

import numpy as np
import pytest

from offpolicy_jax import rewards

SIZES = {"gsm8k_train": 7473, "gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40,
         "minerva": 272, "olympiadbench": 675}


@pytest.fixture(scope="module")
def pool():
    with rewards.VerifierPool(num_workers=2, timeout=2.0) as p:
        yield p


def test_score_batch_shapes_and_reasons(pool):
    out = rewards.score_batch(["so \\boxed{\\frac{1}{2}}", "#### 7", "no answer", "\\boxed{3}"],
                              ["0.5", "7", "1", "4"], pool=pool)
    assert out.rewards.dtype == np.float32 and out.rewards.shape == (4,)
    np.testing.assert_array_equal(out.rewards, [1, 1, 0, 0])
    assert out.equivalent == [True, True, False, False]
    assert out.extracted == ["\\frac{1}{2}", "7", None, "3"]
    assert out.reasons[2] == "no answer extracted"
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        rewards.score_batch(["a", "b"], ["1"], pool=pool)


def test_score_batch_without_a_pool():
    out = rewards.score_batch(["\\boxed{2}"], ["2"])
    assert out.rewards.tolist() == [1.0]


def test_adversarial_inputs_return_in_time_and_execute_nothing(pool, tmp_path):
    marker = tmp_path / "pwned"
    adversarial = [
        f"__import__('os').system('touch {marker}')",
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        "9^9^9^9^9", "10**10**10", "x" * 100_000, "{" * 1000 + "1" + "}" * 1000,
        "\\frac{1}{" * 500 + "2" + "}" * 500, "(10^{100})!", "99999999!", "1000000!",
        "e^{e^{e^{e^{e^{10}}}}}",
    ]
    responses = [f"The answer is \\boxed{{{a}}}" for a in adversarial] + adversarial
    start = time.monotonic()
    out = rewards.score_batch(responses, ["5"] * len(responses), pool=pool, timeout=2.0)
    elapsed = time.monotonic() - start
    assert not any(out.equivalent)
    assert elapsed < 2.0 * len(responses)
    assert not marker.exists()
    assert rewards.score_batch(["\\boxed{5}"], ["5"], pool=pool).rewards.tolist() == [1.0]


def test_new_syntax_adversarial_inputs_return_in_time_and_execute_nothing(pool, tmp_path):
    """Issue 21's syntax (\\overline, \\dot, scaled matrices, Python spellings, units, labels)."""
    marker = tmp_path / "pwned"
    adversarial = [
        f"np.__import__('os').system('touch {marker}')",
        f"math.sqrt(__import__('os').system('touch {marker}'))",
        f"(a, b) = (__import__('os'), 1)",
        "0." + "\\overline{" * 80 + "3" + "}" * 80,
        "0.\\overline{" + "9" * 900 + "}",
        "0.\\dot{3}" * 100,
        "\\begin{pmatrix}" + "1&" * 450 + "1\\end{pmatrix}",
        "9^{99}\\begin{pmatrix}" + "x&" * 250 + "x\\end{pmatrix}",
        "np.exp(" * 80 + "1" + ")" * 80,
        "np.exp(np.exp(np.exp(np.exp(np.exp(10)))))",
        "+".join(["np.sin(x)**2"] * 70),
        "2**" * 300 + "2",
        "1" + "0" * 900 + " \\text{ hours}",
    ]
    golds = ["5", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "45 \\text{ minutes}"]
    pairs = [(g, a) for a in adversarial for g in golds]
    start = time.monotonic()
    verdicts = pool.check_many([g for g, _ in pairs], [a for _, a in pairs], timeout=2.0)
    elapsed = time.monotonic() - start
    assert not any(v.equivalent for v in verdicts)
    assert elapsed < 2.0 * len(pairs)
    assert not marker.exists()
    # only the exponential tower needs the deadline; everything else is refused or compared fast
    slow = {a for (_, a), v in zip(pairs, verdicts) if v.reason.startswith("timeout")}
    assert slow <= {"np.exp(np.exp(np.exp(np.exp(np.exp(10)))))"}, slow
    assert pool.check("5", "5.0").equivalent


def test_timeout_kills_the_worker_and_the_pool_recovers():
    slow = "\\boxed{e^{e^{e^{e^{e^{10}}}}}}"  # about 0.4 s of evaluation: far beyond 20 ms
    with rewards.VerifierPool(num_workers=1, timeout=0.02) as small:
        before = small.worker_pids()
        out = small.run([("score", slow, "5"), ("score", "\\boxed{5}", "5")], timeout=0.02)
        assert out[0][2].startswith("timeout after")
        assert small.restarts >= 1 and small.worker_pids() != before
        # with a normal deadline the replacement worker answers
        good = rewards.score_batch(["\\boxed{5}"] * 3, ["5"] * 3, pool=small, timeout=5.0)
        assert good.rewards.tolist() == [1.0, 1.0, 1.0]


def test_deadline_holds_outside_the_main_thread():
    """No signal.alarm: a check that runs long is cut off when the pool is used from a thread."""
    slow = "\\boxed{e^{e^{e^{e^{e^{10}}}}}}"
    results = {}

    def score():
        with rewards.VerifierPool(num_workers=1, timeout=0.02) as small:
            results["slow"] = small.run([("score", slow, "5")], timeout=0.02)[0]
            results["after"] = rewards.score_batch(["\\boxed{5}"], ["5"], pool=small, timeout=5.0)

    thread = threading.Thread(target=score)
    thread.start()
    thread.join(timeout=240)
    assert not thread.is_alive()
    assert results["slow"][2].startswith("timeout after")
    assert results["after"].rewards.tolist() == [1.0]


def test_score_batch_bounds_and_odd_responses(pool):
    huge = "x" * 300_000 + " so \\boxed{5}"  # longer than MAX_RESPONSE_CHARS: only the tail is sent
    out = rewards.score_batch([huge, None, 5], ["5", "5", "5"], pool=pool)
    assert out.rewards.tolist() == [1.0, 0.0, 0.0]
    assert out.reasons[1:] == ["no answer extracted"] * 2


def test_pool_recovers_after_a_worker_is_killed_from_outside(pool):
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    time.sleep(0.2)
    out = rewards.score_batch(["\\boxed{%d}" % k for k in range(20)], [str(k) for k in range(20)],
                              pool=pool)
    assert out.rewards.tolist() == [1.0] * 20


def test_pool_check_and_close():
    p = rewards.VerifierPool(num_workers=1)
    assert p.check("\\frac{1}{2}", "0.5").equivalent
    assert not p.check("\\pi", "3.14").equivalent
    p.close()
    p.close()
    with pytest.raises(RuntimeError, match="closed"):
        p.check("1", "1")


def test_every_gold_equals_itself_and_its_boxed_form(pool):
    golds = []
    for name in rewards.BENCHMARKS:
        golds += [item["gold"] for item in rewards.load_benchmark(name)]
    assert len(golds) == sum(SIZES.values())
    boxed = rewards.score_batch(["Therefore \\boxed{" + g + "}." for g in golds], golds, pool=pool)
    failures = [(g, r) for g, ok, r in zip(golds, boxed.equivalent, boxed.reasons) if not ok]
    assert not failures, failures[:10]
    assert boxed.extracted == golds
    same = pool.check_many(golds, golds)
    assert all(v.equivalent for v in same), [g for g, v in zip(golds, same) if not v.equivalent][:10]


@pytest.mark.parametrize("name", rewards.BENCHMARKS)
def test_loaders(name):
    items = rewards.load_benchmark(name)
    assert len(items) == SIZES[name]
    assert all(set(item) == {"id", "question", "gold"} for item in items)
    assert all(isinstance(item["gold"], str) and item["gold"] for item in items)
    assert len({item["id"] for item in items}) == len(items)
    # math delimiters are removed; an escaped dollar sign (MATH-500's "\\$36") is part of the answer
    assert not any(re.search(r"(?<!\\)\$", item["gold"]) for item in items)


def test_loader_normalisations():
    aime = [i["gold"] for i in rewards.load_benchmark("aime24")]
    assert "25" in aime and not any(g.startswith("0") for g in aime)
    amc = [i["gold"] for i in rewards.load_benchmark("amc23")]
    assert amc[:3] == ["27", "36", "45"]
    gsm = [i["gold"] for i in rewards.load_benchmark("gsm8k")]
    assert "2125" in gsm and not any("," in g for g in gsm)
    minerva = [i["gold"] for i in rewards.load_benchmark("minerva")]
    assert minerva[1] == "4.5 \\times 10^{33}" and "-1/3" in minerva and "\\arcsin(10/13)" in minerva
    olympiad = {i["id"]: i["gold"] for i in rewards.load_benchmark("olympiadbench")}
    assert olympiad["olympiadbench-2045"] == "(0,4]"
    assert olympiad["olympiadbench-1970"] == "(-\\infty, 0) \\cup\\{1\\}"


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        rewards.load_benchmark("mmlu", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "aime24_test.jsonl")):
        rewards.load_benchmark("aime24", tmp_path)


def test_default_data_dir_from_env(tmp_path, monkeypatch):
    (tmp_path / "amc23_test.jsonl").write_text('{"id": 0, "problem": "p", "answer": 3.0}\n')
    monkeypatch.setenv("OFFPOLICY_JAX_DATA", str(tmp_path))
    assert rewards.load_benchmark("amc23") == [{"id": "amc23-0", "question": "p", "gold": "3"}]
