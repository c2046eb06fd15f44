"""The README's model demo runs end to end with the base install (torch made unimportable)."""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = """
import sys
sys.modules["torch"] = None  # behave as if torch were not installed (base install)
from absl import flags
from offpolicy_jax.models import demo
flags.FLAGS(["demo", "--max_new_tokens=3"])
demo.main([])
demo.main([])  # second run reuses the cached checkpoint
"""


def test_demo_builds_then_reuses_tiny_checkpoint_without_torch(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint_dir = tmp_path / "offpolicy_jax" / "demo-tiny-qwen2"
    assert (checkpoint_dir / "model.safetensors").exists()
    assert (checkpoint_dir / "tokenizer.json").exists()
    # The logits cover exactly the prompt's tokens (their count depends on the trained merges).
    prompt_lengths = re.findall(r"-> (\d+) tokens", result.stdout)
    logit_lengths = re.findall(r"logits: shape \(1, (\d+), 300\) float32", result.stdout)
    assert len(prompt_lengths) == 2 and logit_lengths == prompt_lengths
    assert result.stdout.count("greedy continuation (3 tokens, KV cache)") == 2
    assert "model: qwen2, 2 layers, hidden 64" in result.stdout
