"""MTP layer whose full activation recompute works with packed sequences (THD / XLDA).

megatron-core 0.16.1's ``MultiTokenPredictionLayer._checkpointed_forward`` hands every forward
argument to ``tensor_parallel.checkpoint``, which stores them with ``save_for_backward``; that
rejects the ``PackedSeqParams`` object, so ``--recompute-granularity full`` with an MTP layer
and packed sequences (every XLDA run) fails with "save_for_backward can only save variables".
The decoder block does not have the problem: it binds the non-tensor arguments in a closure.
:class:`PackedRecomputeMTPLayer` does the same for the MTP layer - identical recompute (same
function, same RNG handling, same tensors saved), only the non-tensor arguments are captured
instead of saved. Remove it once megatron-core binds them itself.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer


class PackedRecomputeMTPLayer(MultiTokenPredictionLayer):
    def _checkpointed_forward(self, forward_func, *args, **kwargs):
        # Only megatron's own checkpoint path (uniform, no FP8) saves every argument; TE's
        # checkpoint and the 'block' method (no MTP recompute) are left to megatron-core.
        if self.config.fp8 or self.config.recompute_method != "uniform" or args:
            return super()._checkpointed_forward(forward_func, *args, **kwargs)
        if self.config.recompute_num_layers != 1:
            raise ValueError("MTP recompute needs --recompute-num-layers 1 with "
                             "--recompute-method uniform (megatron-core's MTP restriction)")
        tensor_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        bound = {k: v for k, v in kwargs.items() if k not in tensor_names}

        def run(*tensors):
            return forward_func(**bound, **dict(zip(tensor_names, tensors)))

        return tensor_parallel.checkpoint(run, self.config.distribute_saved_activations,
                                          *[kwargs[k] for k in tensor_names])


def use_packed_recompute_mtp_layers(mtp_block_spec):
    """Swap megatron's MTP layer class for :class:`PackedRecomputeMTPLayer` in a block spec."""
    if mtp_block_spec is None:
        return None
    for layer_spec in mtp_block_spec.layer_specs:
        if layer_spec.module is MultiTokenPredictionLayer:
            layer_spec.module = PackedRecomputeMTPLayer
    return mtp_block_spec
