"""Unit tests of the loop's host-side pieces: packing, prompt arrays, the rollout container,
config validation. (The rollout stages are in test_replay.py, the engine in test_trainer.py, the
end-to-end runs in test_experiments.py.)"""

import numpy as np
import pytest

from offpolicy_jax.training import batch as batch_lib
from offpolicy_jax.training import rollout, trainer
from offpolicy_jax.training.algorithm import Algorithm
from offpolicy_jax.training.config import RunConfig


def test_pack_sequences_layout():
    prompts = [[5, 6, 7], [8]]
    response = np.array([[1, 2, 3, 9], [4, 9, 0, 0]])
    packed = rollout.pack_sequences(prompts, response, np.array([4, 2]), pad_id=0,
                                    prompt_bucket=4)
    np.testing.assert_array_equal(packed.tokens, [[0, 5, 6, 7, 1, 2, 3, 9],
                                                  [0, 0, 0, 8, 4, 9, 0, 0]])
    np.testing.assert_array_equal(packed.attention_mask, [[0, 1, 1, 1, 1, 1, 1, 1],
                                                          [0, 0, 0, 1, 1, 1, 0, 0]])
    # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
    np.testing.assert_array_equal(packed.positions, [[0, 0, 1, 2, 3, 4, 5, 6],
                                                     [0, 0, 0, 0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(packed.response_mask, [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert packed.prompt_length == 4


def test_pack_sequences_errors():
    with pytest.raises(ValueError, match="must agree on N"):
        rollout.pack_sequences([[1]], np.zeros((2, 3)), np.array([1, 1]), pad_id=0)
    with pytest.raises(ValueError, match="more than prompt_bucket=2"):
        rollout.pack_sequences([[1, 2, 3]], np.zeros((1, 3)), np.array([1]), pad_id=0,
                               prompt_bucket=2)


def test_bucket_length():
    assert [rollout.bucket_length(n) for n in (1, 8, 9, 33)] == [8, 8, 16, 64]


def test_prompt_array_round_trip():
    prompts = [[1, 2, 3], [4], [5, 6]]
    array, lengths = batch_lib.prompts_to_array(prompts, pad_id=0)
    assert array.shape == (3, 3)
    rows = batch_lib.Rollouts(
        prompt_tokens=array, prompt_lengths=lengths, tokens=np.zeros((3, 2), np.int32),
        lengths=np.ones(3, np.int32), behaviour_logp=np.zeros((3, 2), np.float32),
        rewards=np.zeros(3, np.float32), group_index=np.arange(3, dtype=np.int32),
        policy_version=np.zeros(3, np.int32))
    assert rows.prompts() == prompts
    assert rows.take([2, 0]).prompts() == [[5, 6], [1, 2, 3]]
    narrow = batch_lib.Rollouts(**{**rows.take([1]).as_dict(),
                                   "prompt_tokens": np.array([[4]], np.int32)})
    merged = batch_lib.concat([narrow, rows.take([0])], pad_id=9)
    assert merged.prompt_tokens.tolist() == [[4, 9, 9], [1, 2, 3]]   # padded to the widest part
    assert merged.prompts() == [[4], [1, 2, 3]]


def test_rollouts_reject_ragged_rows_and_partial_groups():
    with pytest.raises(ValueError, match="disagree on the number of rows 2"):
        batch_lib.Rollouts(
            prompt_tokens=np.zeros((2, 1), np.int32), prompt_lengths=np.ones(2, np.int32),
            tokens=np.zeros((3, 2), np.int32), lengths=np.ones(2, np.int32),
            behaviour_logp=np.zeros((3, 2), np.float32), rewards=np.zeros(2, np.float32),
            group_index=np.zeros(2, np.int32), policy_version=np.zeros(2, np.int32))
    rows = batch_lib.Rollouts.from_dict({
        "prompt_tokens": np.zeros((3, 1)), "prompt_lengths": np.ones(3), "tokens": np.zeros((3, 2)),
        "lengths": np.ones(3), "behaviour_logp": np.zeros((3, 2)), "rewards": np.zeros(3),
        "group_index": np.zeros(3), "policy_version": np.zeros(3)})
    with pytest.raises(ValueError, match="3 rows do not form whole groups of group_size=2"):
        rows.num_groups(2)
    with pytest.raises(ValueError, match=r"rollout arrays lack \['rewards'\]"):
        batch_lib.Rollouts.from_dict({k: v for k, v in rows.as_dict().items() if k != "rewards"})


def _algorithm(name="grpo", **kwargs):
    return Algorithm(name=name, loss=None, **kwargs)


def test_run_config_validation_names_the_flag():
    grouped = _algorithm()
    with pytest.raises(ValueError, match="--group_size=1: grpo normalises advantages"):
        RunConfig(workdir="w", group_size=1).validate(grouped)
    with pytest.raises(ValueError, match="--temperature must be > 0"):
        RunConfig(workdir="w", temperature=0.0).validate(grouped)
    with pytest.raises(ValueError, match="must divide into 3 minibatches"):
        RunConfig(workdir="w", batch_size=4, group_size=2, num_minibatches=3).validate(grouped)
    with pytest.raises(ValueError, match="--num_passes must be >= 1"):
        RunConfig(workdir="w", num_passes=0).validate(grouped)
    with pytest.raises(ValueError, match="--remat must be 'none', 'full' or a jax.checkpoint"):
        RunConfig(workdir="w", remat="dots_only").validate(grouped)
    for remat in ("none", "full", "dots_saveable"):
        RunConfig(workdir="w", remat=remat).validate(grouped)
    assert (trainer.remat_policy("none"), trainer.remat_policy("full")) == (False, True)
    ungrouped = _algorithm("topr", needs_groups=False)
    RunConfig(workdir="w", group_size=1).validate(ungrouped)


def test_run_config_checks_minibatches_against_the_algorithms_unit():
    # 3 groups of 4 rows: 12 rows split into 2 minibatches of rows, but not of whole groups.
    RunConfig(workdir="w", batch_size=3, group_size=4, num_minibatches=2).validate(_algorithm())
    by_group = _algorithm(minibatch_unit="group")
    with pytest.raises(ValueError, match="the 3 groups of 4 rows .* must divide into 2 minibatches"):
        RunConfig(workdir="w", batch_size=3, group_size=4, num_minibatches=2).validate(by_group)
    RunConfig(workdir="w", batch_size=4, group_size=4, num_minibatches=2).validate(by_group)
    by_pair = _algorithm("dpo", minibatch_unit="pair")
    with pytest.raises(ValueError, match="the 3 pairs of 2 rows"):
        RunConfig(workdir="w", batch_size=3, group_size=2, num_minibatches=2).validate(by_pair)


def test_algorithm_rejects_undeclared_policies_and_unknown_outputs():
    with pytest.raises(ValueError, match="forward outputs for 'ref', which is neither"):
        _algorithm(forward={"ref": ("logp",)})
    with pytest.raises(ValueError, match=r"unknown forward outputs \['logits'\]"):
        _algorithm(forward={"old": ("logits",)})
    with pytest.raises(ValueError, match="a 'values' output needs a value_head"):
        _algorithm(forward={"old": ("values",)})
    with pytest.raises(ValueError, match="minibatch_unit must be one of"):
        _algorithm(minibatch_unit="token")


@pytest.mark.parametrize("longest,budget,width", [(1, 48, 12), (12, 48, 12), (13, 48, 24),
                                                  (37, 48, 48), (48, 48, 48), (110, 256, 128),
                                                  (2, 5, 2), (3, 5, 4), (5, 5, 5)])
def test_response_bucket(longest, budget, width):
    assert rollout.response_bucket(longest, budget) == width


@pytest.mark.parametrize("longest", [0, 49])
def test_response_bucket_refuses_lengths_outside_the_budget(longest):
    with pytest.raises(ValueError, match=f"{longest} tokens"):
        rollout.response_bucket(longest, 48)


def test_update_at_the_trimmed_width_equals_the_padded_one():
    """The loss and its gradient on a batch cut after its longest response equal those on the
    batch padded to the whole budget (float32 round-off), Dr.GRPO's L_max included."""
    import jax
    import jax.numpy as jnp

    from offpolicy_jax import losses, models

    cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    budget, lengths = 16, np.array([3, 7, 2, 5])
    prompts = [list(rng.integers(1, 64, n)) for n in (4, 2, 5, 3)]
    responses = rng.integers(1, 64, (4, budget))
    old_logp = rng.normal(-4.0, 0.1, (4, budget)).astype(np.float32)

    def loss(inputs, info):
        clipped, _ = losses.ppo_clip(inputs["logp"], inputs["old_logp"], inputs["advantages"],
                                     inputs["mask"])
        dr, _ = losses.dr_grpo(inputs["logp"], inputs["old_logp"], inputs["advantages"],
                               inputs["mask"], max_len=info.max_new_tokens)
        return clipped + dr, {}

    config = RunConfig(workdir="unused", max_new_tokens=budget, group_size=2, remat="none")
    loss_fn = trainer.make_loss_fn(cfg, Algorithm(name="clip", loss=loss), config)

    def value_and_grad(width):
        packed = rollout.pack_sequences(prompts, responses[:, :width], lengths, pad_id=0)
        batch = {**packed.model_inputs(), "old_logp": old_logp[:, :width],
                 "advantages": np.array([1.0, -1.0, 0.5, -0.5], np.float32)}
        return jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, jax.random.key(0),
                                                               jnp.int32(1))[0]))(params, batch)

    width = rollout.response_bucket(int(lengths.max()), budget)
    assert width == 8 and budget == 16
    (trimmed, trimmed_grad), (padded, padded_grad) = value_and_grad(width), value_and_grad(budget)
    np.testing.assert_allclose(trimmed, padded, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(trimmed_grad), jax.tree.leaves(padded_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
