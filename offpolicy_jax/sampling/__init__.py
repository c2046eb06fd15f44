"""KV-cache sampler that returns the behaviour log-probs of every sampled token.

    out = sampling.generate(cfg, params, prompts, max_new_tokens=256, temperature=1.0,
                            top_k=None, top_p=None, eos_token_ids=(eos,), seed=0, num_samples=8)
    out.tokens [N, T_new]  out.lengths [N]  out.logprobs [N, T_new]  out.truncated_logprobs
    out.prompt_index [N]   out.num_decode_steps

``out.logprobs`` is ``log_softmax(logits / T)`` of each sampled token, the quantity the trainer
recomputes; ``out.truncated_logprobs`` is the log-prob under the top-k / top-p distribution the
token was actually drawn from. See ``distribution`` for the sampling math and ``sampler`` for
bucketing, the prefill / decode programs and the host loop.
"""

from offpolicy_jax.sampling.distribution import (SamplingParams, sample_categorical,
                                                 sample_from_logits, sampling_log_probs,
                                                 top_k_keep_mask, top_p_keep_mask,
                                                 validate_sampling_params)
from offpolicy_jax.sampling.sampler import DEFAULT_STEPS_PER_DISPATCH, SampleOutput, generate

__all__ = [
    "DEFAULT_STEPS_PER_DISPATCH", "SampleOutput", "SamplingParams", "generate",
    "sample_categorical", "sample_from_logits", "sampling_log_probs", "top_k_keep_mask",
    "top_p_keep_mask", "validate_sampling_params",
]
