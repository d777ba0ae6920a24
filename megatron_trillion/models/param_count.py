"""Analytic parameter counts of a preset, without allocating any weight.

``count_parameters(preset) -> ParamCount(total, active)``. The formulas follow the modules the
builder creates (megatron-core GPTModel with SwiGLU, RMSNorm, no linear biases):

* embedding V x H, plus an untied output layer V x H, plus the final norm H;
* per layer: input norm H; QKV H x (n_q + 2 n_kv) d (+ n_q d for the attention output gate);
  output projection n_q d x H; QK-norm 2d; pre-MLP norm H; sandwich post-norms 2H;
* dense MLP 3 H F; MoE: router E x H, E experts of 3 H F_e (top-k of them active), shared expert
  3 H F_s. The expert-bias vector is a buffer in megatron-core (not trained by gradients) and not
  counted;
* MTP (only with ``include_mtp=True``; export drops it): two norms 2H, projection 2H x H, one
  transformer layer like the last decoder layer, and its final norm H.

A test checks these formulas against ``sum(p.numel())`` of real (tiny) models, so they cannot
drift from what ``build_model`` creates.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_trillion.models.presets import ModelPreset


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int


def _attention_params(p: ModelPreset) -> int:
    d, nq, nkv, h = p.head_dim, p.num_attention_heads, p.query_groups, p.hidden_size
    qkv = h * (nq + 2 * nkv) * d
    gate = h * nq * d if p.attention_output_gate else 0
    proj = nq * d * h
    qk_norm = 2 * d if p.qk_layernorm else 0
    return qkv + gate + proj + qk_norm


def _layer_params(p: ModelPreset, moe: bool) -> tuple[int, int]:
    """(total, active) of one decoder layer."""
    h = p.hidden_size
    norms = 2 * h + (2 * h if p.sandwich_norm else 0)
    common = _attention_params(p) + norms
    if not moe:
        mlp = 3 * h * p.ffn_hidden_size
        return common + mlp, common + mlp
    expert = 3 * h * p.moe_ffn_hidden_size
    shared = 3 * h * (p.moe_shared_expert_intermediate_size or 0)
    router = p.num_experts * h
    total = common + router + shared + p.num_experts * expert
    active = common + router + shared + p.moe_router_topk * expert
    return total, active


def count_parameters(p: ModelPreset, include_mtp: bool = False) -> ParamCount:
    """Total and per-token active parameters of ``p`` (without MTP unless asked)."""
    h, v = p.hidden_size, p.vocab_size
    embeddings = v * h * (2 if p.untie_embeddings_and_output_weights else 1)
    total = active = embeddings + h  # + final norm
    pattern = p.moe_layer_pattern()
    for is_moe in pattern:
        t, a = _layer_params(p, bool(is_moe))
        total += t
        active += a
    if include_mtp and p.mtp_num_layers:
        t, a = _layer_params(p, bool(pattern[-1]))
        extra_t = 2 * h + 2 * h * h + h
        total += p.mtp_num_layers * (t + extra_t)
        active += p.mtp_num_layers * (a + extra_t)
    return ParamCount(total=total, active=active)
