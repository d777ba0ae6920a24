"""Column/row-parallel linears whose forward without autograd, at TP1, is the plain matmul.

megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` route every forward through
autograd Functions (copy to / reduce from the tensor-parallel region, the linear with gradient
accumulation) and a process-group lookup that warns on every call. With one TP rank and no
gradient being recorded all of that computes exactly ``input @ weight.t()`` (+ bias), yet it costs
~25 us of Python per call: on CPU, a sixth of a small model's KV-cached decode step (generation,
GRPO rollouts). megatron-core's answer to per-step overhead is CUDA graphs, which the CPU has not.

The decoder layers get them through the local spec (``models.specs``); GPTModel builds its output
layer itself, so :func:`use_no_grad_output_layer` re-classes that one after construction.

These subclasses run the same two ops (``torch.matmul(input, weight.t())``, then ``+ bias``, in
megatron-core's order, so the numbers are bitwise the same) when ``torch.is_grad_enabled()`` is
False and the layer has one TP rank. Everything else (training, TP > 1, sequence parallelism,
CPU offloading, deferred embedding gradients) is megatron-core's forward unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

__all__ = ["NoGradColumnParallelLinear", "NoGradRowParallelLinear", "use_no_grad_output_layer"]


def _plain(layer) -> bool:
    """True where megatron-core's forward would compute just the matmul (and bias)."""
    return (not torch.is_grad_enabled() and layer.tp_group is not None
            and layer.tp_group.size() == 1 and layer.config._cpu_offloading_context is None)


def _matmul(layer, input_: torch.Tensor, weight: torch.Tensor):
    """(output, bias to add later) as megatron-core's linear computes them: the matmul, then the
    bias unless the layer hands it back (``skip_bias_add``)."""
    output = torch.matmul(input_, weight.t())
    if layer.skip_bias_add:
        return output, layer.bias
    if layer.bias is not None:
        output = output + layer.bias
    return output, None


class NoGradColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear``; without autograd at TP1, the plain matmul (module docstring)."""

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if self.config.defer_embedding_wgrad_compute or not _plain(self):
            return super().forward(input_, weight, runtime_gather_output)
        # weight: the shared embedding, where the output layer is tied to it
        return _matmul(self, input_, self.weight if weight is None else weight)


class NoGradRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear``; without autograd at TP1, the plain matmul (module docstring)."""

    def forward(self, input_: torch.Tensor):
        if not _plain(self):
            return super().forward(input_)
        return _matmul(self, input_, self.weight)


def use_no_grad_output_layer(model) -> None:
    """Give ``model``'s output layer (megatron-core's ``ColumnParallelLinear``, built inside
    ``GPTModel``, which takes no class for it) the no-autograd TP1 path of
    :class:`NoGradColumnParallelLinear`: the subclass adds no state, only that forward."""
    layer = getattr(model, "output_layer", None)
    if type(layer) is ColumnParallelLinear:
        layer.__class__ = NoGradColumnParallelLinear
