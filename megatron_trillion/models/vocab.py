"""Vocabulary padding that does not change what the model computes.

Megatron-LM pads the tokenizer's vocabulary to a multiple of ``make_vocab_size_divisible_by x
TP`` so the embedding and output layer split evenly over tensor-parallel ranks: an 8,000-token
tokenizer gets 8,064 rows at TP1 and 8,192 at TP2. Left alone, the padded rows are live output
classes: their logits enter the softmax, so the loss, the gradients and the sampled tokens
depend on the TP size. Here the padding is kept (the rows must exist for the even split) but
made inert, so any layout trains the one-process model of the tokenizer's own size:

- the output layer's logits of padded ids are ``-inf`` (``mask_padded_logits``): softmax gives
  them probability exactly 0, cross-entropy gives them zero gradient, greedy or sampled
  generation can never pick them;
- padded rows of the embedding and the output layer are zero and stay zero (no token indexes
  an embedding row >= the tokenizer size, masked logits send no gradient into the output rows,
  so Adam's state and update for them remain 0), and ``initialize_weights`` draws the real rows
  as if the tensor had exactly the tokenizer's rows;
- checkpoints carry the tokenizer's size in the model signature; megatron-core loads the
  embedding and output layer with ``allow_shape_mismatch`` (rows beyond the stored ones start
  at zero), so a checkpoint moves between TP sizes whatever padding each used.

Why mask instead of padding independently of TP: any fixed padding rule still has TP sizes it
does not divide, and the masked form also keeps Megatron-LM's flag meaning and tensor shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# torch is imported where the model is touched: the padding arithmetic also serves tokenizer
# training, which has no other use for torch.
if TYPE_CHECKING:
    import torch

VOCAB_PARALLEL_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Checkpoint keys (suffixes) of the tensors whose rows are vocabulary ids."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's padding: the next multiple of ``divisible_by x tensor_parallel``."""
    # max(1, ...): invalid flags are reported by validate(), which runs after this.
    multiple = max(1, divisible_by) * max(1, tensor_parallel)
    return -(-vocab_size // multiple) * multiple


def is_vocab_parallel_key(key: str) -> bool:
    return key.endswith(VOCAB_PARALLEL_KEYS)


def unpadded_vocab_size(model) -> int:
    """The tokenizer's vocabulary size of a model built by ``build_model``."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "unpadded_vocab_size", model.vocab_size)


def _local_columns(logits: torch.Tensor, padded: int) -> int:
    """Global id of the first column of ``logits`` (full, or this TP rank's slice)."""
    from megatron.core import parallel_state

    if logits.size(-1) == padded:
        return 0
    return parallel_state.get_tensor_model_parallel_rank() * logits.size(-1)


def mask_padded_logits(model, vocab_size: int) -> None:
    """Record ``vocab_size`` on ``model`` (a GPTModel built with a padded vocabulary), zero
    its padded embedding/output rows and make the output layer return ``-inf`` for them.

    The output layer is megatron-core's ``ColumnParallelLinear``; a forward hook edits its
    result, so the main head, the MTP heads (which call the same module) and inference all see
    the masked logits.
    """
    import torch

    padded = model.vocab_size
    if vocab_size > padded:
        raise ValueError(f"the tokenizer's vocabulary ({vocab_size}) exceeds the model's "
                         f"padded vocabulary ({padded})")
    model.unpadded_vocab_size = vocab_size
    if vocab_size == padded:
        return
    zero_padded_rows(model)
    output_layer = getattr(model, "output_layer", None)
    if output_layer is None:  # not the last pipeline stage
        return

    def hook(module, inputs, output):
        logits, bias = output
        first = _local_columns(logits, padded)
        if first + logits.size(-1) <= vocab_size:
            return output  # no padded id in this rank's slice: no extra work
        padding = torch.arange(first, first + logits.size(-1), device=logits.device) >= vocab_size
        return logits.masked_fill(padding, float("-inf")), bias

    output_layer.register_forward_hook(hook)


def zero_padded_rows(model) -> None:
    """Zero the rows of padded ids in this rank's slice of the embedding and output layer."""
    import torch
    from megatron.core import parallel_state

    vocab_size = unpadded_vocab_size(model)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        if not is_vocab_parallel_key(name):
            continue
        first = tp_rank * param.size(0)
        start = max(0, vocab_size - first)
        if start < param.size(0):
            with torch.no_grad():
                param[start:].zero_()
