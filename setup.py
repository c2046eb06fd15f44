"""offpolicy_jax: off-policy RL fine-tuning of language models with verifiable rewards, in JAX."""

from setuptools import find_packages, setup

# Lower bounds are the versions this project was developed and tested with.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "transformers>=5.23.0",
    "tokenizers>=0.23.3",
    "safetensors>=0.8.0",
    "sympy>=1.14.0",
    "absl-py>=2.5.1",
    "tqdm>=4.70.1",
    "numpy>=2.4.6",
    "tensorboardX>=2.6.5",
    "matplotlib>=3.10",
    # The persistent compilation cache's file lock (already a dependency of transformers).
    "filelock>=3.0",
]

EXTRAS_REQUIRE = {
    # torch is a reference implementation for parity tests only. Keep this exact pin: it is the
    # CPU build present on the development machines; a looser pin pulls CUDA wheels.
    "test": [
        "pytest>=9.0",
        "pytest-xdist>=3.8",
        "torch==2.13.0",
        "math-verify>=0.9.0",
        # PEFT adapter round trip and the offline W&B run in tests/test_lora_export.py.
        "peft>=0.21",
        "wandb>=0.31",
    ],
    # Optional at run time: --wandb_project.
    "wandb": ["wandb>=0.31"],
    "tpu": ["jax[tpu]>=0.10.2"],
    "gpu": ["jax[cuda12]>=0.10.2"],
}

setup(
    name="offpolicy_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["offpolicy_jax", "offpolicy_jax.*"]),
    # The benchmark files and their provenance/licence (read by offpolicy_jax.rewards.benchmarks).
    package_data={"offpolicy_jax.data": ["benchmarks/*.jsonl.gz", "benchmarks/PROVENANCE.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
