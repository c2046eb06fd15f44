"""Loss library, part 3: DPO / SPIN, NLL, entropy, the POLICY_LOSSES table, docstrings, and the
README's notebook example (extracted from README.md and executed, so it cannot rot)."""

import functools
import inspect
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offpolicy_jax import losses

ROOT = pathlib.Path(__file__).resolve().parents[1]
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def call(fn, *args, jit=False, **kwargs):
    bound = functools.partial(fn, **kwargs)
    return jax.jit(bound)(*args) if jit else bound(*args)


# DPO fixture, β = 0.1. Chosen: tokens [−1, −2] -> log π(y_w) = −3, reference −4.
# Rejected: one real token −5 (the second is padding) -> −5, reference −4.5.
#   h = 0.1·[(−3 + 4) − (−5 + 4.5)] = 0.15;  loss = log(1 + e^{−0.15}) = 0.6209570
#   d loss / d chosen token = −β(1 − σ(h)) = −0.1·(1 − 0.5374298) = −0.0462570;
#   d loss / d rejected (unmasked) token = +0.0462570.
CHOSEN = jnp.array([[-1.0, -2.0]])
REF_CHOSEN = jnp.array([[-2.0, -2.0]])
REJECTED = jnp.array([[-5.0, 123.0]])
REF_REJECTED = jnp.array([[-4.5, -9.0]])
CHOSEN_MASK = jnp.ones((1, 2))
REJECTED_MASK = jnp.array([[1, 0]])


@JIT
def test_dpo_hand_values(jit):
    loss, metrics = call(losses.dpo, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_MASK,
                         REJECTED_MASK, jit=jit)
    np.testing.assert_allclose(loss, 0.6209570, rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_margin"], 0.15, rtol=1e-5)
    np.testing.assert_allclose(metrics["reward_accuracy"], 1.0)
    np.testing.assert_allclose(metrics["chosen_reward"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(metrics["rejected_reward"], -0.05, rtol=1e-5)
    grad_chosen, grad_rejected = jax.grad(
        lambda c, r: losses.dpo(c, r, REF_CHOSEN, REF_REJECTED, CHOSEN_MASK, REJECTED_MASK)[0],
        argnums=(0, 1))(CHOSEN, REJECTED)
    np.testing.assert_allclose(grad_chosen, [[-0.0462570, -0.0462570]], rtol=1e-5)
    np.testing.assert_allclose(grad_rejected, [[0.0462570, 0.0]], rtol=1e-5)


def test_dpo_label_smoothing_and_reference_has_no_gradient():
    # s = 0.2: −0.8 log σ(0.15) − 0.2 log σ(−0.15) = 0.8·0.6209570 + 0.2·(0.6209570 + 0.15).
    loss, _ = losses.dpo(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_MASK, REJECTED_MASK,
                         label_smoothing=0.2)
    np.testing.assert_allclose(loss, 0.6209570 + 0.2 * 0.15, rtol=1e-5)
    grad_ref = jax.grad(lambda ref: losses.dpo(CHOSEN, REJECTED, ref, REF_REJECTED, CHOSEN_MASK,
                                               REJECTED_MASK)[0])(REF_CHOSEN)
    np.testing.assert_array_equal(grad_ref, 0.0)
    with pytest.raises(ValueError, match="ref_chosen_logp has shape"):
        losses.dpo(CHOSEN, REJECTED, REF_CHOSEN[:, :1], REF_REJECTED, CHOSEN_MASK, REJECTED_MASK)


@JIT
def test_spin_is_dpo_with_the_previous_iterate_as_reference(jit):
    loss, metrics = call(losses.spin, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_MASK,
                         REJECTED_MASK, jit=jit, lam=0.1)
    np.testing.assert_allclose(loss, 0.6209570, rtol=1e-5)
    loss5, _ = losses.spin(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_MASK, REJECTED_MASK,
                           lam=5.0)
    np.testing.assert_allclose(loss5, math.log1p(math.exp(-7.5)), rtol=1e-5)   # z = 5 · 1.5
    assert float(metrics["reward_accuracy"]) == 1.0


def test_preference_losses_finite_for_extremes():
    big = jnp.array([[-1000.0, -1000.0]])
    for fn in (losses.dpo, losses.spin):
        for chosen, rejected in ((big, jnp.zeros((1, 2))), (jnp.zeros((1, 2)), big)):
            (loss, metrics), grad = jax.value_and_grad(
                lambda c, fn=fn, r=rejected: fn(c, r, jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                                CHOSEN_MASK, CHOSEN_MASK), has_aux=True)(chosen)
            for leaf in jax.tree.leaves((loss, metrics, grad)):
                assert np.all(np.isfinite(leaf))


@JIT
def test_nll_hand_values(jit):
    # token-mean of −log: (log 2 + log 4 + log 5) / 3; seq-mean-token-mean: (1.5 log 2 + log 5) / 2.
    logp = jnp.log(jnp.array([[0.5, 0.25], [0.2, 0.7]]))
    mask = jnp.array([[1, 1], [1, 0]])
    loss, metrics = call(losses.nll, logp, mask, jit=jit)
    np.testing.assert_allclose(loss, (math.log(2) + math.log(4) + math.log(5)) / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["perplexity"], math.exp(float(loss)), rtol=1e-5)
    assert float(metrics["num_tokens"]) == 3
    loss, _ = call(losses.nll, logp, mask, jit=jit, agg="seq-mean-token-mean")
    np.testing.assert_allclose(loss, (1.5 * math.log(2) + math.log(5)) / 2, rtol=1e-6)
    # ReST-EM: reward-weighted; the second (wrong, r = 0) sample drops out of the numerator.
    loss, _ = call(losses.nll, logp, mask, jit=jit, weights=jnp.array([1.0, 0.0]),
                   agg="seq-mean-token-sum")
    np.testing.assert_allclose(loss, (3 * math.log(2) + 0.0) / 2, rtol=1e-6)


@JIT
def test_entropy_hand_values(jit):
    # logits [0, log 3] -> p = [.25, .75] -> H = 0.5623351; a −inf logit contributes nothing;
    # uniform over 4 -> log 4.
    logits = jnp.array([[[0.0, math.log(3.0), -jnp.inf, -jnp.inf],
                         [0.0, 0.0, 0.0, 0.0]]])
    per_token = call(losses.token_entropy, logits, jit=jit)
    np.testing.assert_allclose(per_token, [[0.5623351, math.log(4)]], rtol=1e-6)
    value, metrics = call(losses.entropy, logits, jnp.array([[1, 0]]), jit=jit)
    np.testing.assert_allclose(value, 0.5623351, rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda z: losses.entropy(z, jnp.ones((1, 2)))[0])(logits)))
    # Temperature: T → large flattens towards log 4.
    hot = losses.token_entropy(logits[:, 1:], temperature=100.0)
    np.testing.assert_allclose(hot, [[math.log(4)]], rtol=1e-6)


def test_policy_losses_table_and_docstrings():
    expected = {"reinforce", "topr", "ppo_clip", "grpo", "dr_grpo", "dapo", "mix_ppg", "remix",
                "rover", "nll", "dpo", "spin"}
    assert expected <= set(losses.POLICY_LOSSES)
    documented = [getattr(losses, name) for name in losses.__all__
                  if inspect.isfunction(getattr(losses, name))]
    for fn in documented:
        doc = inspect.getdoc(fn) or ""
        assert doc, fn.__name__
        assert len(doc.splitlines()[0]) <= 100, fn.__name__
    for name, fn in losses.POLICY_LOSSES.items():
        doc = inspect.getdoc(fn)
        assert "arxiv.org/abs/" in doc and "Args:" in doc and "Returns:" in doc, name
    # The DESIGN.md signatures are stable.
    assert list(inspect.signature(losses.topr).parameters)[:4] == [
        "logp", "behaviour_logp", "rewards", "mask"]
    topr_defaults = inspect.signature(losses.topr).parameters
    assert topr_defaults["baseline"].default == 0.0
    assert topr_defaults["ratio_level"].default == "sequence"
    ppo = inspect.signature(losses.ppo_clip).parameters
    assert [ppo[k].default for k in ("eps_low", "eps_high", "dual_clip", "agg")] == [
        0.2, 0.2, None, "token-mean"]
    adv = inspect.signature(losses.grpo_advantages).parameters
    assert adv["std_normalize"].default is True and adv["eps"].default == 1e-6


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- section: losses -->(.*?)<!-- end: losses -->", text, re.S)
    assert section, "README.md lost its losses section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "the README losses section has no ```python example"
    return block.group(1)


def test_readme_notebook_example_runs(capsys):
    namespace = {}
    exec(compile(_readme_example(), "README.md:losses", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "TOPR loss" in out and "GRPO loss" in out
    grad = np.asarray(namespace["grad"])
    assert grad.shape == (2, 3) and grad[1, 2] == 0.0 and np.all(np.isfinite(grad))
    # The printed weight is the truncated ratio (.2/.3)·(.3/.3) = 2/3.
    assert "weight on the negative 0.667" in out
