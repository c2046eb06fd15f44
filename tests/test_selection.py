"""Prompt selection: MoPPS's posterior update (hand-computed), its preference for prompts near the
target success rate (a seeded statistical check), its metrics, and its state through a real
orbax checkpoint; the shared flag that plugs it into every experiment file."""

import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax.training import checkpoint as checkpoint_lib
from offpolicy_jax.training import selection as selection_lib
from offpolicy_jax.training.batch import Rollouts
from offpolicy_jax.training.config import RunConfig


def test_posterior_update_matches_hand_computed_values():
    # No decay (math): 6 of 8 right from the prior Beta(1, 1) -> Beta(1 + 6, 1 + 2).
    assert selection_lib.update_posterior(1.0, 1.0, 0.75, 8) == (7.0, 3.0)
    # λ = 0.5 from Beta(3, 5): α = 0.5·3 + 0.5·1 + 0.75·8 = 8, β = 0.5·5 + 0.5·1 + 0.25·8 = 5.
    assert selection_lib.update_posterior(3.0, 5.0, 0.75, 8, decay=0.5) == (8.0, 5.0)
    # λ = 0 forgets everything but the prior.
    assert selection_lib.update_posterior(30.0, 2.0, 0.0, 4, decay=0.0) == (1.0, 5.0)


def test_beta_entropy_is_highest_for_the_uniform_prior():
    np.testing.assert_allclose(selection_lib.beta_entropy(1.0, 1.0), 0.0, atol=1e-12)
    assert selection_lib.beta_entropy(50.0, 50.0) < selection_lib.beta_entropy(2.0, 2.0) < 0.0


def _records(n):
    return [{"id": f"p{i}", "prompt": f"q{i}", "gold": "1"} for i in range(n)]


def _mopps(n=32, batch_size=4, candidates=8, **kwargs):
    mopps = selection_lib.MoPPS(candidates=candidates, **kwargs)
    mopps.bind(_records(n), RunConfig(workdir="", batch_size=batch_size, group_size=2, seed=3))
    return mopps


def _rollouts(records, success_rates, group_size=4):
    """A fake batch: group g gets round(s_g · G) rewards of 1 first, the rest 0."""
    rewards = np.concatenate([(np.arange(group_size) < round(s * group_size)).astype(np.float32)
                              for s in success_rates])
    n = len(records) * group_size
    return Rollouts(prompt_tokens=np.ones((n, 1), np.int32), prompt_lengths=np.ones(n, np.int32),
                    tokens=np.ones((n, 2), np.int32), lengths=np.ones(n, np.int32),
                    behaviour_logp=np.zeros((n, 2), np.float32), rewards=rewards,
                    group_index=np.repeat(np.arange(len(records)), group_size).astype(np.int32),
                    policy_version=np.zeros(n, np.int32))


def test_selection_prefers_prompts_predicted_near_the_target():
    # Even prompts: confidently near 0.5 (Beta(50, 50)); odd ones: confidently easy (Beta(95, 5)).
    mopps = _mopps(n=32, batch_size=4, candidates=8)
    mopps.alpha[1::2], mopps.beta[1::2] = 95.0, 5.0
    mopps.alpha[0::2], mopps.beta[0::2] = 50.0, 50.0
    chosen = [int(r["id"][1:]) for iteration in range(1, 11) for r in mopps.select(4, iteration)]
    # Every pool of 32 holds 16 of each kind: the 4 picked are always near-0.5 prompts.
    assert len(chosen) == 40 and all(i % 2 == 0 for i in chosen)
    # With the uniform prior everywhere, the choice is a fair draw: both kinds get picked.
    uniform = _mopps(n=32, batch_size=4, candidates=8)
    picked = [int(r["id"][1:]) % 2 for it in range(1, 26) for r in uniform.select(4, it)]
    assert 30 < sum(picked) < 70                               # 100 draws, p = 0.5


def test_threshold_variant_picks_samples_inside_the_range_else_the_closest():
    mopps = _mopps(n=32, batch_size=4, candidates=8, target_range=(0.3, 0.7))
    mopps.alpha[1::2], mopps.beta[1::2] = 95.0, 5.0       # odd: near 0.95, outside the range
    mopps.alpha[0::2], mopps.beta[0::2] = 50.0, 50.0      # even: near 0.5, inside
    picked = [int(r["id"][1:]) for it in range(1, 6) for r in mopps.select(4, it)]
    assert all(i % 2 == 0 for i in picked)
    # Nothing inside: the samples closest to the range (0.25 beats 0.05).
    easy = _mopps(n=8, batch_size=2, candidates=4, target_range=(0.3, 0.7))
    easy.alpha[:], easy.beta[:] = 5.0, 95.0                # ~0.05
    easy.alpha[3], easy.beta[3] = 250.0, 750.0             # ~0.25
    assert "p3" in [r["id"] for r in easy.select(2, 1)]
    built = selection_lib.make_selection(RunConfig(workdir="", prompt_selection="mopps",
                                                   mopps_range="0.3,0.7"))
    assert built.target_range == (0.3, 0.7)
    with pytest.raises(ValueError, match="--mopps_range must be 'low,high'"):
        RunConfig(workdir="", mopps_range="0.7,0.3").validate()


def test_a_second_draw_in_one_iteration_gets_independent_samples(monkeypatch):
    # Dynamic sampling refills from the selection within one iteration: the second pool's
    # Thompson samples must come from another generator than the first's; the first draw of an
    # iteration keeps the (seed, iteration) generator, so a resumed run draws the same.
    seeds, real = [], np.random.default_rng
    monkeypatch.setattr(selection_lib.np.random, "default_rng",
                        lambda seed: seeds.append(list(seed)) or real(seed))
    mopps = _mopps(n=16, batch_size=2, candidates=8)
    for iteration in (1, 1, 2):
        mopps.select(2, iteration)
    assert seeds == [[3, 1, 19], [3, 1, 19, 1], [3, 2, 19]]


def test_observe_updates_only_the_selected_prompts_and_reports_metrics():
    mopps = _mopps(n=8, batch_size=2, candidates=2)
    records = mopps.select(2, iteration=1)
    positions = [mopps.index[r["id"]] for r in records]
    mopps.observe(records, _rollouts(records, [0.75, 0.25]), iteration=1)
    np.testing.assert_allclose(mopps.alpha[positions], [4.0, 2.0])   # 1 + 3, 1 + 1
    np.testing.assert_allclose(mopps.beta[positions], [2.0, 4.0])
    others = np.setdiff1d(np.arange(8), positions)
    assert (mopps.alpha[others] == 1.0).all() and (mopps.beta[others] == 1.0).all()
    metrics = mopps.metrics()
    assert metrics["realised"] == pytest.approx(0.5)
    assert metrics["seen_fraction"] == pytest.approx(0.25)
    assert metrics["posterior_entropy"] == pytest.approx(0.0, abs=1e-12)   # both were Beta(1, 1)
    assert -1.0 <= metrics["correlation"] <= 1.0


def test_state_round_trips_through_a_checkpoint(tmp_path):
    def run(mopps, iterations):
        picked = []
        for iteration in iterations:
            records = mopps.select(2, iteration)
            rates = [(int(r["id"][1:]) % 5) / 4 for r in records]
            mopps.observe(records, _rollouts(records, rates), iteration)
            picked.append([r["id"] for r in records])
        return picked

    straight = _mopps(n=12, batch_size=2, candidates=3)
    expected = run(straight, range(1, 9))
    first = _mopps(n=12, batch_size=2, candidates=3)
    run(first, range(1, 5))
    meta, arrays = first.state_dict()
    checkpointer = checkpoint_lib.Checkpointer(str(tmp_path / "ckpt"))
    state = {"w": jnp.zeros(2)}
    checkpointer.save(4, state, {"selection": meta}, arrays)
    _, restored_meta, restored_arrays = checkpointer.restore(4, checkpoint_lib.abstract_like(state))
    checkpointer.close()
    resumed = _mopps(n=12, batch_size=2, candidates=3)
    resumed.load_state_dict(restored_meta["selection"], restored_arrays)
    assert run(resumed, range(5, 9)) == expected[4:]
    np.testing.assert_array_equal(resumed.alpha, straight.alpha)
    with pytest.raises(ValueError, match="holds 12 posteriors, the training pool has 5"):
        _mopps(n=5, batch_size=2, candidates=2).load_state_dict(restored_meta["selection"],
                                                                restored_arrays)


def test_the_flag_builds_the_selection_and_bad_values_are_refused():
    assert type(selection_lib.make_selection(RunConfig(workdir=""))).__name__ == "PromptStream"
    mopps = selection_lib.make_selection(RunConfig(workdir="", prompt_selection="mopps",
                                                   mopps_candidates=4, mopps_decay=0.5))
    assert (mopps.candidates, mopps.target, mopps.decay) == (4, 0.5, 0.5)
    with pytest.raises(ValueError, match="--prompt_selection must be 'stream' or 'mopps'"):
        RunConfig(workdir="", prompt_selection="random").validate()
    with pytest.raises(ValueError, match="ids are not unique"):
        selection_lib.MoPPS().bind([{"id": 1}, {"id": 1}], RunConfig(workdir=""))
