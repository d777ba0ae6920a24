"""A collated THD micro-batch -> this context-parallel rank's share, in Transformer Engine's layout.

With context parallelism (``--context-parallel-size CP``) every rank of a CP group reads the same
micro-batch and keeps 1/CP of each attention block (XLDA block, document or sample), the
load-balanced way megatron-core 0.16.1 and TE expect for packed (THD) sequences:

1. every block of real length ``L`` is padded at its end to ``P`` = ``L`` rounded up to a
   multiple of ``2 x CP`` (padding: token, label and position id 0, ``loss_mask`` 0, so it never
   reaches the loss); ``cu_seqlens_q/kv`` keep the real lengths, ``cu_seqlens_q/kv_padded`` are the
   cumulative padded lengths (where each block starts in the padded row);
2. the row may get extra padding at the end of its last block so that the tokens per rank are a
   multiple of ``tokens_multiple_per_rank`` (FP8 GEMMs need 16; sequence parallelism needs TP);
3. each padded block is cut into ``2 x CP`` equal chunks and rank ``r`` keeps chunks ``r`` and
   ``2 x CP - 1 - r`` (TE's ``thd_get_partitioned_indices``: causal attention costs the same on
   every rank). Tokens, labels, loss mask and position ids are split with the same indices.

megatron-core's ``get_thd_batch_on_this_cp_rank`` does this split with TE's CUDA kernel
(``tex.thd_get_partitioned_indices``), which needs the batch on the GPU and TE installed.
:func:`thd_partitioned_indices` is the same index arithmetic in torch, so the split happens in
the data loader on CPU, identically with and without a GPU (``XLDACoreAttention`` on CPU and
TE's attention on GPU read the same layout); the tests compare it with TE's kernel where TE is
installed.

megatron-core 0.16.1's multi-token-prediction roll (``roll_tensor`` for packed sequences under CP)
reads ``cu_seqlens_q`` and divides it by CP, i.e. it assumes padded boundaries; with MTP the
real-length ``cu_seqlens_q/kv`` are therefore replaced by the padded ones. Attention stays exact
for every real token: padding sits after the real tokens of its block and attention is causal.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "ContextParallelSplit",
    "pad_blocks_for_context_parallel",
    "thd_partitioned_indices",
    "tokens_multiple_per_rank",
]

# The [1, T] tensors of a collated batch that are split token by token.
TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def tokens_multiple_per_rank(*, fp8: bool, tensor_parallel: int, sequence_parallel: bool) -> int:
    """What each CP rank's token count must be a multiple of (1 when nothing constrains it)."""
    multiple = 16 if fp8 else 1  # FP8 GEMMs need the token dimension in multiples of 16
    if sequence_parallel:
        multiple = math.lcm(multiple, tensor_parallel)  # SP splits the tokens over TP ranks
    return multiple


def thd_partitioned_indices(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int,
                            cp_rank: int) -> torch.Tensor:
    """Positions (in the padded row) of the tokens CP rank ``cp_rank`` keeps, in its order.

    Same arithmetic as TE's ``thd_get_partitioned_indices``: every padded block of length ``P``
    (a multiple of ``2 x cp_size``) contributes chunk ``cp_rank`` then chunk
    ``2 x cp_size - 1 - cp_rank`` of its ``2 x cp_size`` chunks of ``P / (2 x cp_size)`` tokens.
    """
    cu = [int(x) for x in cu_seqlens_padded.reshape(-1).tolist()]
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is not in 0..{cp_size - 1}")
    if cu[0] != 0 or cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens_padded must run from 0 to the row's {total_tokens} tokens, "
                         f"got {cu[0]}..{cu[-1]}")
    pieces = []
    for start, end in zip(cu, cu[1:]):
        if (end - start) % (2 * cp_size):
            raise ValueError(f"padded block [{start}, {end}) is not a multiple of 2 x CP "
                             f"({2 * cp_size}) tokens")
        chunk = (end - start) // (2 * cp_size)
        for which in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + which * chunk, start + (which + 1) * chunk))
    if not pieces:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(pieces)


def pad_blocks_for_context_parallel(batch: dict, cp_size: int,
                                    tokens_per_rank_multiple: int = 1) -> tuple[dict, torch.Tensor,
                                                                                torch.Tensor]:
    """Pad every block of a collated batch to a multiple of ``2 x cp_size`` tokens.

    Returns ``(tensors, cu_seqlens, cu_seqlens_padded)``: the ``[1, T_padded]`` token tensors,
    the real cumulative block lengths and the padded ones (both int32)."""
    cu = [int(x) for x in batch["packed_seq_params"].cu_seqlens_q.reshape(-1).tolist()]
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    unit = 2 * cp_size
    padded = [-(-n // unit) * unit for n in lengths]
    row_multiple = math.lcm(unit, cp_size * tokens_per_rank_multiple)
    extra = -sum(padded) % row_multiple  # a multiple of 2 x CP: kept inside the last block
    if padded:
        padded[-1] += extra
    tensors = {}
    for key in TOKEN_KEYS + tuple(batch.get("extra_token_keys", ())):
        row = batch[key].reshape(-1)
        parts = []
        for start, length, size in zip(cu, lengths, padded):
            parts.append(row[start:start + length])
            if size > length:
                parts.append(row.new_zeros(size - length))
        tensors[key] = torch.cat(parts).unsqueeze(0)
    as_cu = lambda sizes: torch.tensor([0, *_cumsum(sizes)], dtype=torch.int32)  # noqa: E731
    return tensors, as_cu(lengths), as_cu(padded)


def _cumsum(values: Sequence[int]) -> list[int]:
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out


class ContextParallelSplit:
    """Callable: a collated batch -> this CP rank's share with CP-aware ``PackedSeqParams``
    (those ``get_thd_batch_on_this_cp_rank`` builds); ``mtp`` makes ``cu_seqlens_q/kv`` the
    padded boundaries (see module docstring)."""

    def __init__(self, cp_size: int, cp_rank: int, *, tokens_per_rank_multiple: int = 1,
                 mtp: bool = False) -> None:
        if cp_size < 2:
            raise ValueError(f"ContextParallelSplit needs a context-parallel size >= 2, "
                             f"got {cp_size}")
        self.cp_size, self.cp_rank = cp_size, cp_rank
        self.tokens_per_rank_multiple = tokens_per_rank_multiple
        self.mtp = mtp

    def __call__(self, batch: dict) -> dict:
        from megatron.core.packed_seq_params import PackedSeqParams

        tensors, cu, cu_padded = pad_blocks_for_context_parallel(
            batch, self.cp_size, self.tokens_per_rank_multiple)
        max_padded = int((cu_padded[1:] - cu_padded[:-1]).max())
        index = thd_partitioned_indices(cu_padded, tensors["tokens"].shape[1], self.cp_size,
                                        self.cp_rank)
        tensors = {key: value.index_select(1, index) for key, value in tensors.items()}
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                                 max_seqlen_q=max_padded, max_seqlen_kv=max_padded)
        if self.mtp:
            params.cu_seqlens_q = params.cu_seqlens_kv = cu_padded
        out = dict(batch)
        out.update(tensors)
        out["packed_seq_params"] = params
        # The unpadded, unsplit block boundaries: what FLOP accounting counts.
        out["cu_seqlens_blocks"] = batch["packed_seq_params"].cu_seqlens_q
        out["context_parallel_size"] = self.cp_size
        return out
