"""Multi-token prediction's shift of packed (THD) sequences, as tensor operations.

MTP shifts the input ids, position ids, labels and loss mask one token left within every
attention block (the last token of a block gets 0), four rolls per micro-batch on the last
stage. megatron-core 0.16.1 does it in ``_roll_tensor_packed_seq`` with a Python loop over the
blocks that slices with 0-d ``cu_seqlens`` device tensors: about four host syncs per block, and
under context parallelism one send/receive pair per block. Every batch here is THD and every
Tri/Trillion preset has MTP, so that loop ran on every step.

:func:`roll_packed` computes the same result with an index shift and a boundary mask built from
``cu_seqlens`` on the device (no host read), and under context parallelism exchanges the
boundary tokens of all blocks in one send/receive per neighbour. It has megatron-core's
signature and replaces its function in the MTP module (``use_vectorised_packed_roll``), whose
``roll_tensor`` both callers (the MTP layer's embedding input and GPTModel's MTP loss) go
through; megatron-core's own is kept as :data:`megatron_roll_packed` for the equality tests.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import multi_token_prediction

megatron_roll_packed = multi_token_prediction._roll_tensor_packed_seq


def _positions(length: int, device) -> torch.Tensor:
    return torch.arange(length, device=device)


def roll_packed(tensor: torch.Tensor, shifts: int, dims: int, packed_seq_params,
                cp_group=None):
    """``(rolled, rolled.sum())``: ``tensor`` shifted one token left inside each block of
    ``packed_seq_params.cu_seqlens_q`` (megatron-core's ``_roll_tensor_packed_seq`` contract:
    last dimension, shift -1; under CP the boundaries are the global padded ones and this
    rank holds chunks ``r`` and ``2 CP - 1 - r`` of every block)."""
    if not (dims == -1 or dims == tensor.dim() - 1):
        raise ValueError("a packed-sequence roll runs along the last dimension")
    if shifts != -1:
        raise ValueError("a packed-sequence roll shifts one token left (shifts=-1)")
    cu_seqlens = packed_seq_params.cu_seqlens_q
    if cu_seqlens is None:
        raise ValueError("a packed-sequence roll needs packed_seq_params.cu_seqlens_q")
    cu = cu_seqlens.to(device=tensor.device, dtype=torch.long)
    cp_size = cp_group.size() if cp_group is not None else 1
    rolled = torch.roll(tensor, shifts=-1, dims=-1)
    length = tensor.shape[-1]
    if cp_size == 1:
        starts, ends = cu[:-1], cu[1:]
        # The last token of every non-empty block gets 0; an empty block marks nothing.
        lasts = torch.where(ends > starts, ends - 1, torch.full_like(ends, length))
        boundary = torch.zeros(length + 1, dtype=torch.bool, device=tensor.device)
        boundary[lasts] = True
        rolled = rolled.masked_fill(boundary[:length], 0)
        # Positions after the last block are left as they were.
        rolled = torch.where(_positions(length, tensor.device) < cu[-1], rolled, tensor)
        return rolled, rolled.sum()

    # This rank's share of block b: a front chunk [s_b, s_b + c_b) then a back chunk
    # [s_b + c_b, e_b), with s_b, e_b the global boundaries / CP.
    local = cu // cp_size
    starts, ends = local[:-1], local[1:]
    chunk = (ends - starts) // 2
    front_first, back_first = starts, starts + chunk
    front_last, back_last = back_first - 1, ends - 1
    # Each chunk's last token takes the first token of the chunk after it in the block:
    # front chunk r <- front chunk r + 1 (the next rank's; the last rank's own back chunk),
    # back chunk 2 CP - 1 - r <- back chunk 2 CP - r (the previous rank's; rank 0's back
    # chunk ends the block: 0).
    firsts_of_front = tensor.index_select(-1, front_first).contiguous()
    firsts_of_back = tensor.index_select(-1, back_first).contiguous()
    rank = torch.distributed.get_rank(group=cp_group)
    ranks = torch.distributed.get_process_group_ranks(cp_group)
    next_rank, prev_rank = ranks[(rank + 1) % cp_size], ranks[(rank - 1) % cp_size]
    for_front = torch.empty_like(firsts_of_front)
    for_back = torch.empty_like(firsts_of_back)
    requests = []
    if rank != 0:
        requests.append(torch.distributed.isend(firsts_of_front, dst=prev_rank))
        requests.append(torch.distributed.irecv(for_back, src=prev_rank))
    else:
        for_back.zero_()
    if rank != cp_size - 1:
        requests.append(torch.distributed.irecv(for_front, src=next_rank))
        requests.append(torch.distributed.isend(firsts_of_back, dst=next_rank))
    else:
        for_front.copy_(firsts_of_back)
    for request in requests:
        request.wait()
    rolled = rolled.index_copy(-1, front_last, for_front).index_copy(-1, back_last, for_back)
    rolled = torch.where(_positions(length, tensor.device) < local[-1], rolled, tensor)
    return rolled, rolled.sum()


def use_vectorised_packed_roll() -> None:
    """Make megatron-core's ``roll_tensor`` use :func:`roll_packed` for packed sequences
    (idempotent; called when a model with MTP layers is specified)."""
    multi_token_prediction._roll_tensor_packed_seq = roll_packed
