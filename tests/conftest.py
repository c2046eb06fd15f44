"""Test-wide JAX settings.

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

# Catch silent broadcasting bugs ([B] against [B, T]) in every test.
jax.config.update("jax_numpy_rank_promotion", "raise")
