"""Expert-iteration options from BFS-Prover-V2 (perplexity-band filter, retraining from the base
on a plateau): the pure rules against hand-computed values, and the refusal of bad flags. The
options' end-to-end run is in tests/test_experiments.py."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from offpolicy_jax import sft

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("expert_iteration",
                                               ROOT / "experiments" / "expert_iteration.py")
expert_iteration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(expert_iteration)


def test_perplexity_band_keeps_the_middle_with_inclusive_bounds():
    perplexities = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    # Quantiles 0.25 and 0.75 of 1..5 (linear interpolation) are exactly 2 and 4: both kept.
    keep, low, high = sft.perplexity_band(perplexities, 0.25, 0.75)
    assert (low, high) == (2.0, 4.0)
    assert keep.tolist() == [False, False, True, True, True]
    # Between data points: quantile 0.1 is 1.4, 0.9 is 4.6; the tails 1 and 5 go.
    keep, low, high = sft.perplexity_band(perplexities, 0.1, 0.9)
    assert (low, high) == pytest.approx((1.4, 4.6))
    assert keep.tolist() == [False, False, True, True, True]
    # (0, 1): everything; a zero-width band: the median only.
    assert sft.perplexity_band(perplexities, 0.0, 1.0)[0].all()
    assert sft.perplexity_band(perplexities, 0.5, 0.5)[0].tolist() == [False, False, True,
                                                                       False, False]


def test_perplexity_band_rejects_bad_quantiles_and_handles_nothing_kept():
    with pytest.raises(ValueError, match="low_quantile"):
        sft.perplexity_band(np.array([1.0, 2.0]), 0.8, 0.2)
    with pytest.raises(ValueError, match="low_quantile"):
        sft.perplexity_band(np.array([1.0, 2.0]), 0.0, 1.5)
    keep, low, high = sft.perplexity_band(np.array([]), 0.1, 0.9)
    assert keep.shape == (0,) and np.isnan(low) and np.isnan(high)


def test_plateau_update_restarts_after_patience_evaluations_without_progress():
    update = expert_iteration.plateau_update
    # Progress: strictly more than best + min_delta.
    assert update(0.50, 0, 0.55, min_delta=0.0, patience=2) == (0.55, 0, False)
    assert update(0.50, 0, 0.50, min_delta=0.0, patience=2) == (0.50, 1, False)
    assert update(0.50, 0, 0.52, min_delta=0.05, patience=2) == (0.50, 1, False)
    # The second evaluation without progress triggers the restart and resets the count.
    assert update(0.50, 1, 0.49, min_delta=0.0, patience=2) == (0.50, 0, True)
    assert update(0.50, 0, 0.40, min_delta=0.0, patience=1) == (0.50, 0, True)


def _run(*flags):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "expert_iteration.py"),
                           *flags], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("flags,message", [
    (["--ppl_band_low=0.9", "--ppl_band_high=0.1"], "--ppl_band_low (0.9) and --ppl_band_high"),
    (["--plateau_patience=0"], "--plateau_patience must be >= 1"),
    (["--m_step_init=plateau"], "--m_step_init=plateau watches held-out pass@1"),
    (["--trace_selection=process_value", "--value_rollouts=0"], "--value_rollouts must be >= 1"),
    (["--value_threshold=1.5"], "--value_threshold is a value in [0, 1]"),
])
def test_bad_options_are_refused_naming_the_flag(tmp_path, flags, message):
    result = _run(f"--workdir={tmp_path}", *flags)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


class _CharTokenizer:
    """Character ids 4..63 (0-3 reserved), enough for the perplexity check."""

    def encode(self, text, add_special_tokens=False):
        del add_special_tokens
        return [4 + ord(c) % 60 for c in text]


@pytest.mark.slow      # 20 s; the experiments smoke run computes the band by default
def test_completion_perplexities_match_a_direct_forward_pass():
    import jax

    from offpolicy_jax import models

    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(cfg, jax.random.key(7))
    tokenizer, eos = _CharTokenizer(), 2
    examples = [("Q: 1+2\nA: ", "1+2=3. \\boxed{3}"), ("Q: 9\nA: ", "9"),
                ("Q: 4*5-6\nA: ", "4*5=20, 20-6=14. \\boxed{14}")]
    # batch_size 2: the last batch is padded, which must not change its row.
    got = sft.completion_perplexities(cfg, params, tokenizer, examples, eos_id=eos, pad_id=0,
                                      batch_size=2)
    for (prompt, completion), value in zip(examples, got):
        prompt_ids = tokenizer.encode(prompt)
        completion_ids = tokenizer.encode(completion) + [eos]
        tokens = np.array([prompt_ids + completion_ids], np.int32)
        logp = np.asarray(jax.nn.log_softmax(models.apply(cfg, params, tokens)[0], axis=-1))
        # Position P + j - 1 predicts completion token j.
        nll = -np.mean([logp[len(prompt_ids) + j - 1, token]
                        for j, token in enumerate(completion_ids)])
        assert value == pytest.approx(np.exp(nll), rel=1e-4)
