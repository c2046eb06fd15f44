"""Data for RL fine-tuning: the embedded ``arith`` task (``arith``), the character-level Hugging
Face tokenizer of the embedded model (``tokenizer``), prompt datasets as plain
``{"id", "prompt", "gold"}`` records (``prompts``: arith, GSM8K, MATH-500, JSONL files), and the
checkpointable, process-sharded grain prompt iterator of the RL loop (``pipeline``).

Submodules are imported explicitly (``from offpolicy_jax.data import arith``) so that, e.g.,
generating arith problems does not import JAX or grain.
"""
