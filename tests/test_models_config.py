"""ModelConfig parsing (transformers 4.x and 5.x config.json layouts) and the clear errors for
unsupported configs and broken checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_tiny
from offpolicy_jax import models

# config.json of Llama-3.2-1B as published (transformers 4.x layout), abridged.
LLAMA_32_1B_4X = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "head_dim": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "vocab_size": 128256, "attention_bias": False,
    "mlp_bias": False, "pretraining_tp": 1, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
# The same model as transformers 5.x writes it.
LLAMA_32_1B_5X = {
    **{k: v for k, v in LLAMA_32_1B_4X.items() if k not in ("rope_theta", "rope_scaling",
                                                            "torch_dtype")},
    "dtype": "bfloat16",
    "rope_parameters": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3",
                        "rope_theta": 500000.0},
}
# Qwen2.5-0.5B-Instruct (4.x): a sliding_window value that is NOT in use.
QWEN25_05B_4X = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_scaling": None, "sliding_window": 32768, "use_sliding_window": False,
    "tie_word_embeddings": True, "vocab_size": 151936, "eos_token_id": 151645,
}
# Qwen3-0.6B (4.x): head_dim 128 != hidden / heads = 64.
QWEN3_06B_4X = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000, "rope_scaling": None, "sliding_window": None,
    "use_sliding_window": False, "attention_bias": False, "tie_word_embeddings": True,
    "vocab_size": 151936,
}


def test_both_config_layouts_give_the_same_model():
    old, new = (models.ModelConfig.from_hf_config(c) for c in (LLAMA_32_1B_4X, LLAMA_32_1B_5X))
    assert old == new
    assert old.rope_theta == 500000.0 and old.head_dim == 64 and old.num_groups == 4
    assert old.rope_scaling == models.RopeScaling(factor=32.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0,
                                                  original_max_position_embeddings=8192)
    assert old.tie_word_embeddings and not old.qkv_bias and not old.qk_norm
    # 1.24B parameters, as published.
    assert abs(old.num_params() - 1.236e9) < 0.01e9


def test_published_qwen_configs_parse():
    qwen2 = models.ModelConfig.from_hf_config(QWEN25_05B_4X)
    assert (qwen2.qkv_bias, qwen2.qk_norm, qwen2.head_dim, qwen2.rope_scaling) == (True, False,
                                                                                   64, None)
    assert abs(qwen2.num_params() - 0.494e9) < 0.005e9
    qwen3 = models.ModelConfig.from_hf_config(QWEN3_06B_4X)
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.rope_theta) == (True, 128, 1e6)
    assert abs(qwen3.num_params() - 0.596e9) < 0.005e9


@pytest.mark.parametrize("family", hf_tiny.FAMILIES)
def test_to_hf_config_is_read_back_by_transformers_and_by_us(family):
    import transformers

    written = hf_tiny.hf_config(family, vocab_size=300).to_dict()  # 5.x layout
    cfg = models.ModelConfig.from_hf_config(written)
    exported = cfg.to_hf_config()  # 4.x layout
    assert "rope_theta" in exported and "rope_parameters" not in exported
    assert models.ModelConfig.from_hf_config(exported) == cfg
    hf = transformers.CONFIG_MAPPING[family](**exported)
    assert models.ModelConfig.from_hf_config(hf.to_dict()) == cfg


def test_config_is_hashable_and_a_static_jit_argument():
    cfg = models.ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                             num_heads=2, num_kv_heads=1,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32})
    assert isinstance(cfg.rope_scaling, models.RopeScaling)
    assert cfg.model_type == "llama" and cfg.head_dim == 4
    assert hash(cfg) == hash(models.ModelConfig(**cfg.__dict__))
    params = models.init_params(cfg, 0)
    forward = jax.jit(lambda c, p, t: models.apply(c, p, t), static_argnums=0)
    tokens = jnp.zeros((1, 3), jnp.int32)
    forward(cfg, params, tokens)
    forward(models.ModelConfig(**cfg.__dict__), params, tokens)
    assert forward._cache_size() == 1


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "unsupported model_type 'mistral' in config.json"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"unsupported rope scaling type 'yarn' \(config.json field rope_scaling\)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "unsupported rope scaling type 'linear'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}},
     r"unsupported rope scaling type 'dynamic' \(config.json field rope_parameters\)"),
    ({"num_experts": 8}, "mixture-of-experts is not supported: config.json field 'num_experts' = 8"),
    ({"num_local_experts": 4}, "field 'num_local_experts' = 4"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"attention_bias": True}, "field 'attention_bias' = True is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5 is not supported"),
])
def test_unsupported_llama_fields_raise_naming_the_field(change, message):
    with pytest.raises(models.UnsupportedConfigError, match=message):
        models.ModelConfig.from_hf_config({**LLAMA_32_1B_4X, **change})


def test_sliding_window_in_use_raises_but_an_unused_one_does_not():
    in_use = {**QWEN25_05B_4X, "use_sliding_window": True, "max_window_layers": 21}
    with pytest.raises(models.UnsupportedConfigError,
                       match="sliding-window attention is not supported: use_sliding_window = "
                             "True with sliding_window = 32768 and max_window_layers = 21"):
        models.ModelConfig.from_hf_config(in_use)
    layer_types = ["full_attention"] * 27 + ["sliding_attention"]
    with pytest.raises(models.UnsupportedConfigError,
                       match=r"layer_types contains \['sliding_attention'\]"):
        models.ModelConfig.from_hf_config({**QWEN3_06B_4X, "layer_types": layer_types})
    # Enabled but starting at max_window_layers == num_hidden_layers: no layer slides.
    models.ModelConfig.from_hf_config({**in_use, "max_window_layers": 24})


# ---------------------------------------------------------------------------------------------
# Broken checkpoints.


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return hf_tiny.make_tiny_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"))


def copy_checkpoint(source, target, edit_tensors=None, edit_config=None):
    target.mkdir(exist_ok=True)
    tensors = load_file(str(source / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_missing_unexpected_and_mis_shaped_tensors_are_listed_in_one_error(qwen2_dir, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.self_attn.k_proj.bias"]
        tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((128, 32), np.float32)
        tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)

    path = copy_checkpoint(qwen2_dir, tmp_path / "broken", edit)
    with pytest.raises(models.CheckpointError) as error:
        models.load_hf_checkpoint(path)
    message = str(error.value)
    assert "missing tensors (1): model.layers.1.self_attn.k_proj.bias" in message
    assert "unexpected tensors (1): model.layers.0.extra.weight" in message
    assert ("model.layers.0.mlp.up_proj.weight: expected (128, 64), found (128, 32) "
            "(in model.safetensors)") in message


def test_missing_tensor_alone(qwen2_dir, tmp_path):
    path = copy_checkpoint(qwen2_dir, tmp_path / "broken",
                           lambda t: t.pop("model.norm.weight"))
    with pytest.raises(models.CheckpointError, match="missing tensors \\(1\\): model.norm.weight"):
        models.load_hf_checkpoint(path)


def test_config_disagreeing_with_tensors_is_a_shape_error(qwen2_dir, tmp_path):
    path = copy_checkpoint(qwen2_dir, tmp_path / "broken",
                           edit_config=lambda c: c.update(intermediate_size=96))
    with pytest.raises(models.CheckpointError,
                       match=r"mis-shaped tensors \(6\):\n    model.layers.0.mlp.down_proj.weight: "
                             r"expected \(64, 96\), found \(64, 128\)"):
        models.load_hf_checkpoint(path)


def test_corrupt_and_truncated_files_name_the_file(qwen2_dir, tmp_path):
    corrupt = copy_checkpoint(qwen2_dir, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(models.CheckpointError,
                       match=r"cannot read safetensors file .*corrupt/model.safetensors"):
        models.load_hf_checkpoint(corrupt)

    truncated = copy_checkpoint(qwen2_dir, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(models.CheckpointError, match=r"truncated/model.safetensors.*truncated"):
        models.load_hf_checkpoint(truncated)


def test_missing_files_are_reported(qwen2_dir, tmp_path):
    with pytest.raises(models.CheckpointError, match="no config.json in"):
        models.load_hf_checkpoint(tmp_path)
    sharded = tmp_path / "sharded"
    cfg, params = models.load_hf_checkpoint(qwen2_dir)
    models.save_hf_checkpoint(sharded, cfg, params, max_shard_bytes=50_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (sharded / victim).unlink()
    with pytest.raises(models.CheckpointError, match=f"names shard files that do not exist .*"
                                                     f"{victim}"):
        models.load_hf_checkpoint(sharded)
