"""Mapping between Hugging Face LlamaForCausalLM weights/config and ChuXinForCausalLM.

Parameter names are the same on both sides; only linear weights differ in layout (Hugging Face / PyTorch
store [out, in], Paddle [in, out]), so they are transposed. Rotary inverse frequencies are computed, not
stored, and are skipped.
"""
import numpy as np

from ppzoo.models.chuxin.model import ChuXinConfig

_LINEAR_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                    "gate_proj.weight", "up_proj.weight", "down_proj.weight", "lm_head.weight")


def _is_linear(name):
    return name.endswith(_LINEAR_SUFFIXES)


def hf_to_ppzoo_state(hf_state):
    """{hf name: numpy array} -> {ChuXinForCausalLM name: numpy array}."""
    out = {}
    for name, value in hf_state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(value.T) if _is_linear(name) else value
    return out


def ppzoo_to_hf_state(state):
    """{ChuXinForCausalLM name: numpy array} -> {hf name: numpy array}."""
    return {name: (np.ascontiguousarray(v.T) if _is_linear(name) else v) for name, v in state.items()}


def chuxin_config_from_hf(hf_config):
    """A ChuXinConfig from a Hugging Face config.json dict."""
    return ChuXinConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"],
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
        # transformers 5 nests it in rope_parameters; older versions write it at the top level.
        rope_theta=float((hf_config.get("rope_parameters") or {}).get("rope_theta", hf_config.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        initializer_range=float(hf_config.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    )


def hf_config_from_chuxin(config):
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
