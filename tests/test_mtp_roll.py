"""MTP's shift of packed sequences (models.mtp_roll) equals megatron-core's per-block loop, with
and without context parallelism, and reads no value on the host."""

from __future__ import annotations

import pytest
import torch

from multiprocess import run_distributed

# blocks of 5, 0, 12, 1 and 7 tokens, then 2 tokens after the last block
CU = [0, 5, 5, 17, 18, 25]
LENGTH = 27


def _params(cu, device="cpu"):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(cu, dtype=torch.int32, device=device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)


def _inputs(length, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    return {"ids": torch.randint(1, 4096, (1, length), generator=generator).to(device),
            "loss_mask": (torch.rand(1, length, generator=generator) > 0.2).float().to(device),
            "two_rows": torch.randn(2, length, generator=generator).to(device)}


def test_roll_equals_megatron_cores_per_block_loop():
    from megatron_trillion.models.mtp_roll import megatron_roll_packed, roll_packed

    params = _params(CU)
    for name, tensor in _inputs(LENGTH).items():
        ours, ours_sum = roll_packed(tensor, -1, -1, params)
        theirs, theirs_sum = megatron_roll_packed(tensor, -1, -1, params)
        assert torch.equal(ours, theirs) and torch.equal(ours_sum, theirs_sum), name
    ids = _inputs(LENGTH)["ids"][0]
    rolled = roll_packed(ids.unsqueeze(0), -1, -1, params)[0][0]
    # each block's last token is 0, the rest is the next token, the tail stays
    assert rolled[4] == 0 and rolled[16] == 0 and rolled[17] == 0 and rolled[24] == 0
    assert torch.equal(rolled[:4], ids[1:5]) and torch.equal(rolled[25:], ids[25:])


def test_roll_reads_nothing_on_the_host():
    """On the meta device every host read of a value raises (as every read is a sync on a
    GPU); megatron-core's loop slices with 0-d cu_seqlens tensors and does."""
    from megatron_trillion.models.mtp_roll import megatron_roll_packed, roll_packed

    params = _params(CU, "meta")
    tensor = torch.ones(1, LENGTH, device="meta")
    assert roll_packed(tensor, -1, -1, params)[0].shape == (1, LENGTH)
    with pytest.raises(RuntimeError, match="meta"):
        megatron_roll_packed(tensor, -1, -1, params)


def _model_with_mtp_rolls_through_it() -> None:
    from megatron.core.transformer import multi_token_prediction

    from megatron_trillion.models.config import build_transformer_config
    from megatron_trillion.models.mtp_roll import roll_packed
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.models.specs import get_decoder_block_spec, get_mtp_block_spec

    config = build_transformer_config(get_preset("tiny-tri-7b"), None)
    assert config.mtp_num_layers
    get_mtp_block_spec(config, get_decoder_block_spec(config, transformer_impl="local"),
                       transformer_impl="local")
    assert multi_token_prediction._roll_tensor_packed_seq is roll_packed


def _cp_rolls(cp: int) -> bool:
    from megatron.core import parallel_state

    from megatron_trillion.data.context_parallel import ContextParallelSplit
    from megatron_trillion.models.mtp_roll import megatron_roll_packed, roll_packed
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(context=cp), seed=1)
    group = parallel_state.get_context_parallel_group()
    _model_with_mtp_rolls_through_it()
    lengths = [5, 12, 1, 7, 3]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lengths)
    from megatron.core.packed_seq_params import PackedSeqParams

    batch = {"tokens": torch.arange(1, total + 1).unsqueeze(0),
             "labels": torch.arange(1001, total + 1001).unsqueeze(0),
             "loss_mask": torch.ones(1, total),
             "position_ids": torch.arange(total).unsqueeze(0),
             "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                                                  cu_seqlens_kv=cu)}
    share = ContextParallelSplit(cp, parallel_state.get_context_parallel_rank(),
                                 mtp=True)(batch)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        ours = roll_packed(share[key], -1, -1, share["packed_seq_params"], group)
        theirs = megatron_roll_packed(share[key], -1, -1, share["packed_seq_params"], group)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1]), key
    return True


@pytest.mark.slow
def test_roll_under_context_parallelism_equals_megatron_cores():
    """CP2: one exchange of every block's boundary tokens per neighbour gives megatron-core's
    per-block send/receive result on every rank (and a model with MTP is specified to use it)."""
    assert run_distributed(_cp_rolls, 2, timeout=300, cp=2) == [True, True]
