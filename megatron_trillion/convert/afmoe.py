"""Trinity presets (AFMoE-style MoE) <-> transformers' ``AfmoeForCausalLM`` (``model_type:
afmoe``): sigmoid router with expert bias, shared experts, QK-norm, gated attention, four norms
per layer (sandwich), local (sliding-window, RoPE) / global (NoPE) layers, dense first layers.

HF layout notes: on disk each expert is its own ``mlp.experts.{e}.{gate,up,down}_proj.weight``
-- the layout transformers 5's own ``save_pretrained`` writes for AFMoE (its conversion mapping
fuses the experts on load into ``mlp.experts.gate_up_proj`` [E, 2F, H] = per-expert [gate; up]
and ``down_proj`` [E, H, F]; import accepts that fused form too). The router's bias buffer is
``mlp.expert_bias``; the attention output gate is ``self_attn.gate_proj``.
"""

from __future__ import annotations

from typing import Iterator

import torch

from megatron_trillion.convert import layout
from megatron_trillion.convert.layout import (GetTensor, join_swiglu, pack_qkv, split_qkv,
                                              split_swiglu)
from megatron_trillion.models.presets import ModelPreset

ARCHITECTURE = "AfmoeForCausalLM"
MODEL_TYPE = "afmoe"


# Preset fields whose value AFMoE has fixed.
FIXED_FIELDS = {
    "qk_layernorm": True, "attention_output_gate": True, "sandwich_norm": True,
    "rope_on_global_layers": False, "moe_router_score_function": "sigmoid",
    "moe_router_enable_expert_bias": True,
}


def unsupported_features(p: ModelPreset) -> list[str]:
    """Preset fields AFMoE cannot express (empty: exportable)."""
    problems = [f"{field}={value!r} (AFMoE has {fixed!r})"
                for field, value, fixed in layout.differing_fields(p, FIXED_FIELDS)]
    if not p.is_moe:
        problems.append("num_experts=None (AFMoE is a mixture of experts)")
    if p.sliding_window is None or p.global_attn_every_n_layers is None:
        problems.append("sliding_window / global_attn_every_n_layers unset (AFMoE alternates "
                        "local and global layers)")
    shared = p.moe_shared_expert_intermediate_size
    if p.is_moe and p.moe_ffn_hidden_size and (not shared or shared % p.moe_ffn_hidden_size):
        problems.append(f"moe_shared_expert_intermediate_size={shared!r} (AFMoE needs a "
                        f"multiple of moe_ffn_hidden_size {p.moe_ffn_hidden_size})")
    return problems


def hf_config(p: ModelPreset) -> dict:
    """config.json fields (without dtype / token ids, which the exporter adds)."""
    return {
        **layout.decoder_hf_config(p, ARCHITECTURE, MODEL_TYPE),
        "moe_intermediate_size": p.moe_ffn_hidden_size,
        "num_dense_layers": p.num_dense_layers,
        "num_experts": p.num_experts,
        "num_experts_per_tok": p.moe_router_topk,
        "num_shared_experts": p.moe_shared_expert_intermediate_size // p.moe_ffn_hidden_size,
        "route_scale": p.moe_router_topk_scaling_factor or 1.0,
        "score_func": "sigmoid",
        "route_norm": True,
        "global_attn_every_n_layers": p.global_attn_every_n_layers,
        "sliding_window": p.sliding_window,
        "layer_types": ["sliding_attention" if local else "full_attention"
                        for local in p.local_layer_pattern()],
        # Input embeddings x sqrt(hidden_size) (models.afmoe.enable_mup_embedding_scale).
        "mup_enabled": p.mup_enabled,
    }


def export_steps(p: ModelPreset, get: GetTensor) -> list:
    """[(label, produce)]: ``produce()`` yields (HF name, tensor) for one piece of the model
    (embedding, one layer, head), reading only what it yields next."""
    moe_pattern = p.moe_layer_pattern()

    def layer(i):
        def produce():
            src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
            q, gate, k, v = split_qkv(get(src + "self_attention.linear_qkv.weight"), p)
            out = {
                dst + "input_layernorm.weight": get(src + "input_layernorm.weight"),
                dst + "self_attn.q_proj.weight": q,
                dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.gate_proj.weight": gate,
                dst + "self_attn.o_proj.weight": get(src + "self_attention.linear_proj.weight"),
                dst + "self_attn.q_norm.weight": get(src + "self_attention.q_layernorm.weight"),
                dst + "self_attn.k_norm.weight": get(src + "self_attention.k_layernorm.weight"),
                dst + "post_attention_layernorm.weight":
                    get(src + "post_self_attn_layernorm.weight"),
                dst + "pre_mlp_layernorm.weight": get(src + "pre_mlp_layernorm.weight"),
                dst + "post_mlp_layernorm.weight": get(src + "post_mlp_layernorm.weight"),
            }
            if moe_pattern[i]:
                yield from out.items()
                out = {}
                # one expert at a time: a layer's experts together are most of its weights
                for e in range(p.num_experts):
                    expert = f"{src}mlp.experts.local_experts.{e}."
                    gate_w, up_w = split_swiglu(get(expert + "linear_fc1.weight"))
                    yield f"{dst}mlp.experts.{e}.gate_proj.weight", gate_w
                    yield f"{dst}mlp.experts.{e}.up_proj.weight", up_w
                    yield f"{dst}mlp.experts.{e}.down_proj.weight", get(
                        expert + "linear_fc2.weight")
                shared_gate, shared_up = split_swiglu(
                    get(src + "mlp.shared_experts.linear_fc1.weight"))
                out.update({
                    dst + "mlp.router.gate.weight": get(src + "mlp.router.weight"),
                    dst + "mlp.expert_bias": get(src + "mlp.router.expert_bias"),
                    dst + "mlp.shared_experts.gate_proj.weight": shared_gate,
                    dst + "mlp.shared_experts.up_proj.weight": shared_up,
                    dst + "mlp.shared_experts.down_proj.weight":
                        get(src + "mlp.shared_experts.linear_fc2.weight"),
                })
            else:
                gate_w, up_w = split_swiglu(get(src + "mlp.linear_fc1.weight"))
                out.update({dst + "mlp.gate_proj.weight": gate_w, dst + "mlp.up_proj.weight": up_w,
                            dst + "mlp.down_proj.weight": get(src + "mlp.linear_fc2.weight")})
            yield from out.items()
        return produce

    return layout.decoder_export_steps(p, get, layer)


def import_tensors(p: ModelPreset, get: GetTensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) pairs from HF tensors (``get`` takes HF names)."""
    moe_pattern = p.moe_layer_pattern()

    def layer(i):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield dst + "input_layernorm.weight", get(src + "input_layernorm.weight")
        yield dst + "self_attention.linear_qkv.weight", pack_qkv(
            get(src + "self_attn.q_proj.weight"), get(src + "self_attn.gate_proj.weight"),
            get(src + "self_attn.k_proj.weight"), get(src + "self_attn.v_proj.weight"), p)
        yield dst + "self_attention.linear_proj.weight", get(src + "self_attn.o_proj.weight")
        yield dst + "self_attention.q_layernorm.weight", get(src + "self_attn.q_norm.weight")
        yield dst + "self_attention.k_layernorm.weight", get(src + "self_attn.k_norm.weight")
        yield dst + "post_self_attn_layernorm.weight", get(src + "post_attention_layernorm.weight")
        yield dst + "pre_mlp_layernorm.weight", get(src + "pre_mlp_layernorm.weight")
        yield dst + "post_mlp_layernorm.weight", get(src + "post_mlp_layernorm.weight")
        if moe_pattern[i]:
            yield dst + "mlp.router.weight", get(src + "mlp.router.gate.weight")
            yield dst + "mlp.router.expert_bias", get(src + "mlp.expert_bias")
            yield from _import_experts(p, get, src, dst)
            yield dst + "mlp.shared_experts.linear_fc1.weight", join_swiglu(
                get(src + "mlp.shared_experts.gate_proj.weight"),
                get(src + "mlp.shared_experts.up_proj.weight"))
            yield dst + "mlp.shared_experts.linear_fc2.weight", get(
                src + "mlp.shared_experts.down_proj.weight")
        else:
            yield dst + "mlp.linear_fc1.weight", join_swiglu(get(src + "mlp.gate_proj.weight"),
                                                             get(src + "mlp.up_proj.weight"))
            yield dst + "mlp.linear_fc2.weight", get(src + "mlp.down_proj.weight")

    return layout.decoder_import_tensors(p, get, layer)


def _import_experts(p: ModelPreset, get: GetTensor, src: str, dst: str):
    """Per-expert tensors (the on-disk layout), or transformers' fused in-memory layout."""
    from megatron_trillion.convert.checkpoint_reader import MissingTensorError

    try:
        fused = (get(src + "mlp.experts.gate_up_proj"), get(src + "mlp.experts.down_proj"))
    except MissingTensorError:
        fused = None
    for e in range(p.num_experts):
        expert = f"{dst}mlp.experts.local_experts.{e}."
        if fused is not None:
            yield expert + "linear_fc1.weight", fused[0][e]
            yield expert + "linear_fc2.weight", fused[1][e]
        else:
            hf = f"{src}mlp.experts.{e}."
            yield expert + "linear_fc1.weight", join_swiglu(get(hf + "gate_proj.weight"),
                                                            get(hf + "up_proj.weight"))
            yield expert + "linear_fc2.weight", get(hf + "down_proj.weight")
