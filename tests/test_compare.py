"""experiments/compare.py's bookkeeping: equal-budget step counts, reading the runs' metrics, the
table and the plot (on fake metrics files; the real comparison is far too long for CI)."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_compare():
    if "experiments_compare" not in sys.modules:
        spec = importlib.util.spec_from_file_location("experiments_compare",
                                                      ROOT / "experiments" / "compare.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["experiments_compare"] = module
    return sys.modules["experiments_compare"]


compare = _load_compare()


def test_every_method_gets_the_same_budget_and_evaluation_points():
    """The plan is generic: one command shape for every method; only METHODS' flags differ."""
    from absl import flags
    from absl.testing import flagsaver
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(rollout_budget=1280, batch_size=16, group_size=8, eval_points=4):
        plans = {method: compare.plan(method, "0") for method in compare.METHODS}
    for method, run in plans.items():
        experiment, extra = compare.METHODS[method]
        assert run["command"][1].endswith(f"experiments/{experiment}.py")
        assert run["command"][2:2 + len(extra)] == extra
        shared = run["command"][2 + len(extra):]
        # 1280 rollouts = 10 on-policy iterations of 16 x 8; the cap is never the binding limit.
        for flag in ("--rollout_budget=1280", "--iterations=40", "--eval_every_rollouts=320",
                     "--batch_size=16", "--group_size=8", "--progress=false"):
            assert flag in shared, (method, flag)
    assert "--reincarnation_fraction=0.5" in plans["remix"]["command"]


def _write_metrics(path, points):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step, (rollouts, pass1) in enumerate(points):
            record = {"iteration": step, "eval/pass@1": pass1}
            if step:
                record["rollouts"] = rollouts
                record["zero_gradient_group_fraction"] = 0.25 * step
            f.write(json.dumps(record) + "\n")


def test_summary_table_and_plot(tmp_path):
    _write_metrics(tmp_path / "grpo", [(0, 0.2), (100, 0.3), (200, 0.4)])
    _write_metrics(tmp_path / "remix", [(0, 0.2), (60, 0.42), (200, 0.45)])
    runs = [{"method": m, "seed": "0", "workdir": str(tmp_path / m),
             "returncode": 0, "wall_s": 10.0} for m in ("grpo", "remix")]
    runs.append({"method": "rover", "seed": "0", "workdir": str(tmp_path / "none"),
                 "returncode": 1, "wall_s": 1.0})
    results = compare.summarise(runs)
    assert results["grpo_final_pass@1"] == pytest.approx(0.4)
    remix = results["methods"]["remix"]
    assert remix["rollouts_to_grpo_final"] == 60 and remix["pass@1_best"] == pytest.approx(0.45)
    # The starting evaluation never counts as reaching the target.
    assert compare.rollouts_to_reach([{"rollouts": 0, "pass@1": 0.9},
                                      {"rollouts": 10, "pass@1": 0.1}], 0.5) is None
    assert [p["rollouts"] for p in remix["curve"]] == [0, 60, 200]
    assert results["methods"]["rover"] == {"failed": True}
    compare.write_markdown(results, str(tmp_path / "results.md"), "python experiments/compare.py")
    table = (tmp_path / "results.md").read_text()
    assert "| remix | 2 | 200 | 0.200 | 0.450 | 0.450 | 60 |" in table
    assert "| rover | failed |" in table
    # Training diagnostics averaged over the iterations: (0.25 + 0.5) / 2.
    assert remix["training"] == {"zero_gradient_group_fraction": pytest.approx(0.375)}
    assert "| remix | 0.375 |" in table
    compare.plot(results, str(tmp_path / "comparison.png"))
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_lagged_runs_form_a_method_by_lag_table_and_plot(tmp_path):
    from absl import flags
    from absl.testing import flagsaver
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver(rollout_budget=1280, batch_size=16, group_size=8):
        run = compare.plan("gspo", "1", "4")
    assert run["method"] == "gspo_lag4" and run["workdir"].endswith("gspo_lag4_seed1")
    assert {"--variant=gspo", "--rollout_lag=4"} <= set(run["command"])

    runs = []
    for name, final in (("grpo_lag0", 0.4), ("grpo_lag4", 0.3), ("topr_lag0", 0.35)):
        _write_metrics(tmp_path / name, [(0, 0.2), (100, final)])
        runs.append({"method": name, "seed": "0", "workdir": str(tmp_path / name),
                     "returncode": 0, "wall_s": 1.0})
    table = compare.lag_table(compare.summarise(runs))
    assert table == {"grpo": {0: pytest.approx(0.4), 4: pytest.approx(0.3)},
                     "topr": {0: pytest.approx(0.35)}}
    text = compare.write_lag_markdown(table, [0, 4])
    assert "| grpo | 0.400 | 0.300 |" in text and "| topr | 0.350 | — |" in text
    compare.plot_lags(table, [0, 4], str(tmp_path / "staleness.png"))
    assert (tmp_path / "staleness.png").read_bytes()[:4] == b"\x89PNG"

    # A second seed of grpo_lag0 (final 0.5): the mean 0.45 and its standard error,
    # std([0.4, 0.5]) / sqrt(2) = 0.05; one-seed cells stay without one.
    _write_metrics(tmp_path / "grpo_lag0_s1", [(0, 0.2), (100, 0.5)])
    runs.append({"method": "grpo_lag0", "seed": "1", "workdir": str(tmp_path / "grpo_lag0_s1"),
                 "returncode": 0, "wall_s": 1.0})
    results = compare.summarise(runs)
    assert results["methods"]["grpo_lag0"]["pass@1_after_by_seed"] == [
        pytest.approx(0.4), pytest.approx(0.5)]
    errors = compare.lag_table(results, "pass@1_after_se")
    assert errors == {"grpo": {0: pytest.approx(0.05)}}
    text = compare.write_lag_markdown(compare.lag_table(results), [0, 4], errors)
    assert "| grpo | 0.450 ± 0.050 | 0.300 |" in text
    compare.plot_lags(compare.lag_table(results), [0, 4], str(tmp_path / "bands.png"), errors)
    assert (tmp_path / "bands.png").read_bytes()[:4] == b"\x89PNG"
