"""How megatron-core packs fused weights, shared by the architecture mappings.

* ``linear_qkv`` rows are grouped per query group ``g``: the group's ``r`` query heads, then (with
  ``attention_output_gate``) its ``r`` gate heads, then one key head and one value head
  (``r = num_attention_heads / num_query_groups``).
* SwiGLU ``linear_fc1`` rows are ``[gate; up]`` (``silu(gate) * up``).

The names used by the mappings are those of a TP1 local-spec GPTModel's ``state_dict()``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from megatron_trillion.models.presets import ModelPreset

GetTensor = Callable[[str], torch.Tensor]
"""Returns the tensor of a name or raises (``MissingTensorError``) naming it."""


def split_qkv(qkv: torch.Tensor, p: ModelPreset):
    """(q, gate or None, k, v) in head-major order (HF's q_proj / k_proj / v_proj rows)."""
    d, groups, heads, h = p.head_dim, p.query_groups, p.num_attention_heads, qkv.shape[-1]
    r = heads // groups
    per_group = 2 * r + 2 if p.attention_output_gate else r + 2
    expected = (groups * per_group * d, h)
    if tuple(qkv.shape) != expected:
        raise ValueError(f"linear_qkv.weight has shape {tuple(qkv.shape)}, expected {expected} "
                         f"for {heads} heads in {groups} groups of head dim {d}")
    view = qkv.view(groups, per_group, d, h)
    q = view[:, :r].reshape(heads * d, h)
    gate = view[:, r:2 * r].reshape(heads * d, h) if p.attention_output_gate else None
    k = view[:, -2].reshape(groups * d, h)
    v = view[:, -1].reshape(groups * d, h)
    return q, gate, k, v


def pack_qkv(q: torch.Tensor, gate: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
             p: ModelPreset) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    d, groups, h = p.head_dim, p.query_groups, q.shape[-1]
    r = p.num_attention_heads // groups
    parts = [q.reshape(groups, r, d, h)]
    if p.attention_output_gate:
        parts.append(gate.reshape(groups, r, d, h))
    parts += [k.reshape(groups, 1, d, h), v.reshape(groups, 1, d, h)]
    return torch.cat(parts, dim=1).reshape(-1, h)


def split_swiglu(fc1: torch.Tensor):
    """(gate, up) rows of a SwiGLU ``linear_fc1`` weight."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def join_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)



# --------------------------------------------------------------------------------------------
# what every decoder architecture shares: config.json fields, embedding and head


def differing_fields(p: ModelPreset, fixed: dict[str, object]) -> list[tuple[str, object, object]]:
    """``(field, preset's value, architecture's value)`` of each preset field whose value
    differs from the one the architecture has fixed (``fixed``: field name -> that value)."""
    return [(name, getattr(p, name), value) for name, value in fixed.items()
            if getattr(p, name) != value]


def decoder_hf_config(p: ModelPreset, architecture: str, model_type: str) -> dict:
    """The config.json fields every exported decoder has (the architecture adds its own)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.ffn_hidden_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.query_groups,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.seq_length,
        "rms_norm_eps": p.norm_epsilon,
        # transformers 5 reads rope_parameters; vLLM / SGLang / transformers 4 read rope_theta.
        "rope_theta": p.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rotary_base},
        "tie_word_embeddings": not p.untie_embeddings_and_output_weights,
        "attention_bias": False,
        "initializer_range": p.init_method_std,
        "use_cache": True,
    }


def decoder_export_steps(p: ModelPreset, get: GetTensor, layer: Callable) -> list:
    """[(label, produce)]: ``produce()`` yields (HF name, tensor) for one piece of the model
    (embedding, one layer, head), reading only what it yields next; ``layer(i)`` is layer i's."""

    def embedding():
        yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")

    def head():
        yield "model.norm.weight", get("decoder.final_layernorm.weight")
        if p.untie_embeddings_and_output_weights:
            yield "lm_head.weight", get("output_layer.weight")

    return ([("embedding", embedding)]
            + [(f"layer {i}", layer(i)) for i in range(p.num_layers)]
            + [("head", head)])


def decoder_import_tensors(p: ModelPreset, get: GetTensor,
                           layer: Callable) -> Iterator[tuple[str, torch.Tensor]]:
    """(megatron name, tensor) pairs from HF tensors (``get`` takes HF names); ``layer(i)``
    yields layer i's."""
    yield "embedding.word_embeddings.weight", get("model.embed_tokens.weight")
    for i in range(p.num_layers):
        yield from layer(i)
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if p.untie_embeddings_and_output_weights:
        yield "output_layer.weight", get("lm_head.weight")
