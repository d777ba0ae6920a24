"""Torch RMSNorm/LayerNorm for the local (CPU) spec that also works with sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel`` (an assertion) although a
torch norm needs nothing special under SP except the marker megatron uses to all-reduce the
weight's gradient over the tensor-parallel group (``param.sequence_parallel``, read by
``finalize_model_grads``): each TP rank then sees only its slice of the sequence. Without it,
MoE with TP (which megatron-core requires to run with SP) could not run on the local spec.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class TorchNorm:
    """Build-time factory with the constructor signature megatron's specs use for norms."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                **unused) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm' on the local "
                             f"spec, got {config.normalization!r}")
        if config.params_dtype != torch.float32:
            norm = norm.to(config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
