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
        # The method's own flags come last, so they win over a shared one they also set.
        if extra and "{" not in "".join(extra):
            assert run["command"][len(run["command"]) - len(extra):] == extra
        shared = run["command"][2:len(run["command"]) - len(extra)]
        # 1280 rollouts = 10 on-policy iterations of 16 x 8; the cap is never the binding limit.
        for flag in ("--rollout_budget=1280", "--iterations=40", "--eval_every_rollouts=320",
                     "--batch_size=16", "--group_size=8", "--progress=false"):
            assert flag in shared, (method, flag)
    assert "--reincarnation_fraction=0.5" in plans["remix"]["command"]
    # Auto-CEI's IDK-capable model replaces the shared --model (absl keeps the last value).
    auto_cei = plans["auto_cei"]["command"]
    assert auto_cei.index("--model=tiny-arith-idk") > auto_cei.index("--model=tiny-arith")
    # The offline runs: one dataset of the budget (1280 / 8 prompts), one pass over it in the
    # on-policy iteration count, evaluated every 10 // 4 iterations; the budget switched off.
    offline = plans["reinforce_offline"]["command"]
    assert offline[-7:] == ["--mode=offline", "--objective=naive_reinforce",
                            "--offline_prompts=160", "--iterations=10", "--rollout_budget=0",
                            "--eval_every_rollouts=0", "--eval_every=2"]
    # Every method of the repository sits in one family of the published table.
    assert {compare.family(m) for m in compare.METHODS} == set(compare.FAMILIES)
    assert compare.family("cispo_lag4") == "on-policy baselines"
    assert compare.family("unknown") == "other"


def test_a_vary_sweep_adds_one_row_per_value_with_that_flag_last():
    from absl import flags
    from absl.testing import flagsaver
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    rows = compare.settings(["num_passes=1,4", "--baseline=-0.5"])
    assert rows == [None, ("num_passes", "1"), ("num_passes", "4"), ("baseline", "-0.5")]
    with flagsaver.flagsaver(rollout_budget=1280, batch_size=16, group_size=8,
                             workdir="/tmp/sweep"):
        run = compare.plan("remix", "2", None, ("num_passes", "4"))
        lagged = compare.plan("remix", "2", "4", ("num_passes", "4"))
    assert run["method"] == "remix+num_passes=4"
    assert run["workdir"] == "/tmp/sweep/remix+num_passes=4_seed2"
    # After the method's own --num_passes default and its flags, so the varied value wins.
    assert run["command"][-2:] == ["--reincarnation_fraction=0.5", "--num_passes=4"]
    assert lagged["method"] == "remix_lag4+num_passes=4"
    assert compare.family("remix+num_passes=4") == compare.family("remix_lag4+num_passes=4") \
        == "off-policy seed methods"
    for bad in ("num_passes", "num_passes=", "=1", "num_passes=1,,2"):
        with pytest.raises(ValueError, match="--vary"):
            compare.settings([bad])


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
    # One seed: no standard errors; no pass@4 logged.
    assert "| remix | 1 | 2 | 200 | 0.200 | 0.450 | — | 0.450 | 60 | 10 |" in table
    # Grouped by family: GRPO's group first, then the off-policy methods.
    assert table.index("**on-policy baselines**") < table.index("| grpo |") \
        < table.index("**off-policy seed methods**") < table.index("| remix |")
    assert "| rover | failed |" in table
    # Training diagnostics averaged over the iterations: (0.25 + 0.5) / 2.
    assert remix["training"] == {"zero_gradient_group_fraction": pytest.approx(0.375)}
    assert "| remix | 0.375 |" in table
    compare.plot(results, str(tmp_path / "comparison.png"))
    assert (tmp_path / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # An offline run evaluates at its dataset's size every time: no curve against rollouts.
    assert compare.on_rollout_axis(remix["curve"])
    assert not compare.on_rollout_axis([{"rollouts": 0}, {"rollouts": 200}, {"rollouts": 200}])


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


def test_seeds_give_errors_spreads_bands_and_a_diff(tmp_path):
    """Three seeds: every final number is the mean ± its standard error, hand-computed here;
    rollouts to GRPO's final pass@1 are counted per seed."""
    finals = {"grpo": (0.4, 0.5, 0.6), "topr": (0.5, 0.6, 0.4)}
    runs = []
    for method, values in finals.items():
        for seed, final in enumerate(values):
            workdir = tmp_path / f"{method}{seed}"
            workdir.mkdir()
            with open(workdir / "metrics.jsonl", "w") as f:
                f.write(json.dumps({"iteration": 0, "eval/pass@1": 0.2, "eval/pass@4": 0.5})
                        + "\n")
                f.write(json.dumps({"iteration": 5, "rollouts": 100, "eval/pass@1": final,
                                    "eval/pass@4": final + 0.2}) + "\n")
            runs.append({"method": method, "seed": str(seed), "workdir": str(workdir),
                         "returncode": 0, "wall_s": 60.0})
    results = compare.summarise(runs)
    topr = results["methods"]["topr"]
    # mean 0.5; std(ddof=1) of (0.5, 0.6, 0.4) = 0.1, / sqrt(3) = 0.0577.
    assert topr["pass@1_after"] == pytest.approx(0.5)
    assert topr["pass@1_after_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert topr["pass@4_after"] == pytest.approx(0.7)
    assert topr["pass@4_after_se"] == pytest.approx(0.1 / 3 ** 0.5)
    assert topr["curve"][0]["pass@1_se"] == pytest.approx(0.0)
    # GRPO's final mean is 0.5: TOPR's seeds 0 and 1 reach it at 100 rollouts, seed 2 never.
    assert topr["rollouts_to_grpo_final_by_seed"] == [100, 100, None]
    assert compare.reach_cell(topr) == "100 ± 0 (2/3)"
    compare.write_markdown(results, str(tmp_path / "results.md"), "cmd")
    table = (tmp_path / "results.md").read_text()
    assert "| topr | 3 | 5 | 100 | 0.200 | 0.500 ± 0.058 | 0.700 ± 0.058 | 0.500 |" in table
    compare.plot(results, str(tmp_path / "bands.png"))
    assert (tmp_path / "bands.png").read_bytes()[:4] == b"\x89PNG"

    # Against an earlier results.json where TOPR ended at 0.4 ± 0.03 (and a method that is gone).
    earlier = {"methods": {"topr": {"pass@1_after": 0.4, "pass@1_after_se": 0.03},
                           "rover": {"pass@1_after": 0.3, "pass@1_after_se": None}}}
    text = compare.changes(results, earlier)
    error = ((0.1 / 3 ** 0.5) ** 2 + 0.03 ** 2) ** 0.5
    assert f"| topr | 0.400 ± 0.030 | 0.500 ± 0.058 | 0.100 ± {error:.3f} |" in text
    assert "rover" not in text and "grpo" not in text


def test_a_finished_run_is_not_started_again(tmp_path):
    """``execute`` reads a summary that spent the budget instead of running the command (here one
    that would fail); a summary short of the budget runs it."""
    workdir = tmp_path / "grpo_seed0"
    workdir.mkdir()
    (workdir / "summary.json").write_text(json.dumps({"rollouts": 1280, "wall_s": 321.0}))
    run = {"method": "grpo", "seed": "0", "workdir": str(workdir), "rollout_budget": 1280,
           "command": [sys.executable, "-c", "raise SystemExit(3)"]}
    done = compare.execute(run)
    assert done["returncode"] == 0 and done["wall_s"] == 321.0
    assert compare.execute(dict(run, rollout_budget=2560))["returncode"] == 3


def test_final_checkpoint_evaluations_are_read_once_and_tabulated(tmp_path):
    """--final_eval_samples: each seed's harness results.json becomes a mean ± standard error
    row; an evaluation already on disk is not run again (the run's command would fail)."""
    from absl import flags
    from absl.testing import flagsaver
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    runs = []
    for seed, (pass8, distinct) in enumerate([(0.7, 1.0), (0.8, 1.5)]):
        workdir = tmp_path / f"rover_seed{seed}"
        _write_metrics(workdir, [(0, 0.2), (100, 0.4)])
        folder = pathlib.Path(compare.final_eval_dir(str(workdir), 16))
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"benchmarks": {"arith": {
            "pass@1": 0.4, "pass@8": pass8, "pass@16": 0.9, "maj@16": 0.5,
            "distinct_correct": distinct, "mean_length": 20.0}}}))
        runs.append({"method": "rover", "seed": str(seed), "workdir": str(workdir),
                     "command": [sys.executable, "-c", "raise SystemExit(3)"],
                     "returncode": 0, "wall_s": 1.0})
    assert compare.final_eval(runs[0], 16, 8) is runs[0]
    with flagsaver.flagsaver(final_eval_samples=16):
        results = compare.summarise(runs)
    final = results["methods"]["rover"]["final_eval"]
    assert set(final) == {"samples", "pass@1", "pass@8", "pass@16", "distinct_correct"}
    assert final["pass@8"]["by_seed"] == [0.7, 0.8]
    assert final["pass@8"]["mean"] == pytest.approx(0.75)
    assert final["pass@8"]["se"] == pytest.approx(0.05)     # sd 0.0707 / sqrt(2)
    compare.write_markdown(results, str(tmp_path / "results.md"), "cmd")
    table = (tmp_path / "results.md").read_text()
    assert "| method | pass@1 | pass@8 | pass@16 | distinct correct |" in table
    assert "| rover | 0.400 ± 0.000 | 0.750 ± 0.050 | 0.900 ± 0.000 | 1.25 ± 0.25 |" in table
