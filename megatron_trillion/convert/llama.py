"""Dense presets (tri-7b, tri-21b, trillion-7b and their tiny variants) <-> transformers'
``LlamaForCausalLM`` (``model_type: llama``; GQA through ``num_key_value_heads``)."""

from __future__ import annotations

from typing import Iterator

import torch

from megatron_trillion.convert import layout
from megatron_trillion.convert.layout import (GetTensor, join_swiglu, pack_qkv, split_qkv,
                                              split_swiglu)
from megatron_trillion.models.presets import ModelPreset

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"

# Preset fields whose value Llama has fixed: the features of a plain dense decoder.
FIXED_FIELDS = {
    "num_experts": None, "qk_layernorm": False, "attention_output_gate": False,
    "sliding_window": None, "sandwich_norm": False,
}


def unsupported_features(p: ModelPreset) -> list[str]:
    """Preset fields Llama cannot express (empty: exportable)."""
    return [f"{field}={value!r}" for field, value, _ in layout.differing_fields(p, FIXED_FIELDS)]


def hf_config(p: ModelPreset) -> dict:
    """config.json fields (without dtype / token ids, which the exporter adds)."""
    return {**layout.decoder_hf_config(p, ARCHITECTURE, MODEL_TYPE), "mlp_bias": False}


def export_steps(p: ModelPreset, get: GetTensor) -> list:
    """[(label, produce)]: ``produce()`` yields (HF name, tensor) for one piece of the model
    (embedding, one layer, head), reading only that piece."""

    def layer(i):
        def produce():
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            q, _, k, v = split_qkv(get(src + "self_attention.linear_qkv.weight"), p)
            gate, up = split_swiglu(get(src + "mlp.linear_fc1.weight"))
            yield from {
                dst + "input_layernorm.weight": get(src + "input_layernorm.weight"),
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": get(src + "self_attention.linear_proj.weight"),
                dst + "post_attention_layernorm.weight": get(src + "pre_mlp_layernorm.weight"),
                dst + "mlp.gate_proj.weight": gate,
                dst + "mlp.up_proj.weight": up,
                dst + "mlp.down_proj.weight": get(src + "mlp.linear_fc2.weight"),
            }.items()
        return produce

    return layout.decoder_export_steps(p, get, layer)


def import_tensors(p: ModelPreset, get: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) pairs from HF tensors (``get`` takes HF names)."""

    def layer(i):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield dst + "input_layernorm.weight", get(src + "input_layernorm.weight")
        yield dst + "self_attention.linear_qkv.weight", pack_qkv(
            get(src + "self_attn.q_proj.weight"), None, get(src + "self_attn.k_proj.weight"),
            get(src + "self_attn.v_proj.weight"), p)
        yield dst + "self_attention.linear_proj.weight", get(src + "self_attn.o_proj.weight")
        yield dst + "pre_mlp_layernorm.weight", get(src + "post_attention_layernorm.weight")
        yield dst + "mlp.linear_fc1.weight", join_swiglu(get(src + "mlp.gate_proj.weight"),
                                                         get(src + "mlp.up_proj.weight"))
        yield dst + "mlp.linear_fc2.weight", get(src + "mlp.down_proj.weight")

    return layout.decoder_import_tensors(p, get, layer)
