"""What megatron-core 0.16.1 lacks for AFMoE (Trinity): the post-sublayer ("sandwich") norms.

AFMoE's decoder layer (transformers' ``AfmoeDecoderLayer``) is::

    h = x + post_attention_layernorm(attn(input_layernorm(x)))
    y = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

Everything else in AFMoE maps onto megatron-core 0.16.1 features, configured by
``megatron_trillion.models.config``:

==========================================  ================================================
AFMoE (transformers)                        megatron-core 0.16.1
==========================================  ================================================
q_norm / k_norm (RMSNorm over head dim)     ``qk_layernorm=True`` with RMSNorm
gate_proj + ``out * sigmoid(gate)``         ``attention_output_gate=True`` (gate rows packed
                                            into ``linear_qkv`` per query group: q, gate, k, v)
sliding / full layer types                  ``window_size=(W-1, 0)`` + ``window_attn_skip_freq``
RoPE only on sliding layers                 ``no_rope_freq`` list (1 = skip RoPE)
sigmoid router, top-k on score+expert_bias, ``moe_router_score_function='sigmoid'``,
normalised top-k scores x route_scale       ``moe_router_enable_expert_bias``,
                                            ``moe_router_topk_scaling_factor``
shared experts (n x moe_intermediate)       ``moe_shared_expert_intermediate_size`` (no gate)
first ``num_dense_layers`` dense            ``moe_layer_freq`` list
==========================================  ================================================

Differences to keep in mind for the HF exporter: megatron's ``expert_bias`` is a buffer (HF: a
``requires_grad=False`` parameter ``mlp.expert_bias``) updated by megatron's aux-loss-free rule;
HF initialises the router weight to zeros, megatron to normal(0, std).

Here:

* :class:`SandwichTransformerLayer`, a ``TransformerLayer`` whose bias-dropout-add steps first
  normalise the sublayer output with its own RMSNorm. Its two extra norms are layer submodules
  (``post_self_attn_layernorm``, ``post_mlp_layernorm``), so checkpoints name them
  ``decoder.layers.N.post_self_attn_layernorm.weight`` / ``...post_mlp_layernorm.weight``.
  Their initial weight is the layer's ``post_norm_init_gain`` (depth-scaled sandwich norm:
  Trinity starts them at 1 / num_layers); ``models.init`` asks the layer via
  ``initial_values()``.
* :func:`enable_mup_embedding_scale`: AFMoE's ``mup_enabled`` multiplies the input embeddings
  by sqrt(hidden_size). megatron-core's ``LanguageModelEmbedding`` has no multiplier, so a
  forward hook scales its output (the MTP layers embed through the same module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)


@dataclass
class SandwichTransformerLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus the norms applied to each sublayer's output."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class _NormThenBiasDropoutAdd:
    """Wraps a megatron bias-dropout-add factory so the sublayer output is normalised first.

    megatron calls ``bda(training, fused)((out, bias), residual, dropout_prob)``; this returns
    the same with ``out := norm(out + bias)`` and no bias. The norm is owned (registered) by the
    layer; this object only holds a reference, so it is not a module itself.
    """

    def __init__(self, norm: Callable, bda: Callable) -> None:
        self.norm = norm
        self.bda = bda

    def __call__(self, training: bool, fused: bool) -> Callable:
        inner = self.bda(training, fused)

        def norm_then_bda(x_with_bias, residual, prob):
            out, bias = x_with_bias
            if bias is not None:
                out = out + bias
            return inner((self.norm(out), None), residual, prob)

        return norm_then_bda


class SandwichTransformerLayer(TransformerLayer):
    """AFMoE decoder layer: pre-norm *and* post-norm around attention and around the MLP/MoE."""

    def __init__(self, config, submodules: SandwichTransformerLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        self.post_self_attn_layernorm = build_module(
            submodules.post_self_attn_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        self.post_mlp_layernorm = build_module(
            submodules.post_mlp_layernorm,
            config=self.config,
            hidden_size=self.config.hidden_size,
            eps=self.config.layernorm_epsilon,
        )
        # The parent's forward calls these at the residual adds; everything else (recompute,
        # MoE paths, sequence parallel) stays the parent's code.
        self.self_attn_bda = _NormThenBiasDropoutAdd(self.post_self_attn_layernorm,
                                                     self.self_attn_bda)
        self.mlp_bda = _NormThenBiasDropoutAdd(self.post_mlp_layernorm, self.mlp_bda)
        self.post_norm_init_gain = 1.0

    def set_post_norm_init_gain(self, gain: float) -> None:
        """Start the post-sublayer norm weights at ``gain`` (now, and in ``models.init``)."""
        self.post_norm_init_gain = float(gain)
        with torch.no_grad():
            for weight in self.initial_values():
                weight.fill_(self.post_norm_init_gain)

    def initial_values(self) -> dict:
        """{parameter: initial value} for the parameters not initialised like the defaults."""
        return {norm.weight: self.post_norm_init_gain
                for norm in (self.post_self_attn_layernorm, self.post_mlp_layernorm)
                if isinstance(getattr(norm, "weight", None), torch.Tensor)}


def set_post_norm_init_gain(model: torch.nn.Module, gain: float) -> None:
    """Depth-scaled sandwich norm: every sandwich layer's post-norms start at ``gain``."""
    for module in model.modules():
        if isinstance(module, SandwichTransformerLayer):
            module.set_post_norm_init_gain(gain)


def _scale_output(module, inputs, output):
    return output * module.mup_embedding_scale


def enable_mup_embedding_scale(model: torch.nn.Module, hidden_size: int) -> None:
    """Multiply ``model.embedding``'s output by sqrt(hidden_size) (AFMoE ``mup_enabled``).

    Elementwise, so it commutes with the embedding's dropout and sequence-parallel scatter."""
    embedding = getattr(model, "embedding", None)
    if embedding is None:  # a pipeline stage without the embedding
        return
    if getattr(embedding, "mup_embedding_scale", None) is None:
        embedding.register_forward_hook(_scale_output)
    embedding.mup_embedding_scale = float(hidden_size) ** 0.5


def sandwich_layer_spec(layer_spec: ModuleSpec, norm: Union[ModuleSpec, type]) -> ModuleSpec:
    """Turn a megatron-core ``TransformerLayer`` spec into a :class:`SandwichTransformerLayer`
    spec with ``norm`` after attention and after the MLP."""
    if layer_spec.module is not TransformerLayer:
        raise ValueError(
            f"sandwich norm expects a megatron-core TransformerLayer spec, got "
            f"{layer_spec.module!r}"
        )
    sub = layer_spec.submodules
    fields = {name: getattr(sub, name) for name in sub.__dataclass_fields__}
    return ModuleSpec(
        module=SandwichTransformerLayer,
        params=dict(layer_spec.params),
        submodules=SandwichTransformerLayerSubmodules(
            **fields, post_self_attn_layernorm=norm, post_mlp_layernorm=norm
        ),
    )
