"""offpolicy_jax: off-policy RL fine-tuning of language models with verifiable rewards, in JAX.

Public modules: ``models`` (Flax decoder, Hugging Face checkpoint import/export, partition rules),
``sampling`` (KV-cache sampler returning behaviour log-probs), ``losses`` (every objective as a pure
function of arrays) and ``rewards`` (time-bounded, code-free math answer verification).
Submodules are imported on first attribute access so that, e.g., the verifier does not pay for
importing JAX.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "sampling", "losses", "rewards")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
