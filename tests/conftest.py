"""Test-wide JAX settings, and the tiny random checkpoint the in-process engine tests share.

Eight fake CPU devices let sharding tests build real meshes; the flag must be set before JAX
initialises its backend, which is why it lives here and not in a fixture.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests read the benchmark files packaged with offpolicy_jax; a developer's own data folder must
# not change what they see (the tests of the override set it themselves).
os.environ.pop("OFFPOLICY_JAX_DATA", None)

import jax  # noqa: E402
import pytest  # noqa: E402

# Catch silent broadcasting bugs ([B] against [B, T]) in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory):
    """A tiny random Qwen2-style checkpoint with tiny-arith's character tokenizer, saved as a
    Hugging Face checkpoint and loaded through ``--model=<dir>`` like a real model.

    No SFT warm start (in-process runs of the engine need a sampler, not a solver), and the
    weights are drawn with numpy over ``models.param_shapes`` (normal(0.02), unit norms, as
    ``init_params`` does) because compiling the flax initialiser would cost more than the rest of
    the setup. Shared by tests/test_trainer.py and tests/test_pairs.py."""
    import dataclasses

    import numpy as np

    from offpolicy_jax import models, tiny_arith
    from offpolicy_jax.data import tokenizer as tokenizer_lib
    directory = str(tmp_path_factory.mktemp("tiny_model"))
    tokenizer_lib.build_char_tokenizer(directory)
    tokenizer = models.load_tokenizer(directory)
    recipe = tiny_arith.TinyArithRecipe(hidden_size=64, intermediate_size=128, num_layers=2,
                                        num_heads=4, num_kv_heads=2)
    cfg = tiny_arith.model_config(len(tokenizer), recipe)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, models.param_shapes(cfg))
    cfg = dataclasses.replace(cfg, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    models.save_hf_checkpoint(directory, cfg, params)
    return directory
