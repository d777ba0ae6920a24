"""Context parallelism over packed XLDA batches: TE's THD split (padding, index arithmetic), the
CPU attention under CP2 (dense reference, gradients, leakage) and parallel == serial through the
real entry point for CP2 x DP2, CP2 with MTP, CP2 x TP2 (+SP) and CP2 x PP2."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from multiprocess import run_distributed
from test_xlda_attention import _config, dense_reference


def _batch(block_lengths):
    """A collated-looking batch whose token/label/position/loss-mask values name their position."""
    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks

    total = sum(block_lengths)
    cu = torch.tensor([0, *np.cumsum(block_lengths)], dtype=torch.int32)
    positions = torch.arange(total)
    return {"tokens": (positions + 1).unsqueeze(0), "labels": (positions + 1001).unsqueeze(0),
            "loss_mask": torch.ones(1, total), "position_ids": (positions + 2001).unsqueeze(0),
            "packed_seq_params": packed_seq_params_from_blocks(cu), "indices": [0]}


def test_partitioned_indices_are_tes_load_balanced_layout():
    """TE's thd_get_partitioned_indices: each padded block in 2 x CP chunks, rank r keeps chunk r
    and chunk 2 x CP - 1 - r, block after block."""
    from megatron_trillion.data.context_parallel import thd_partitioned_indices

    cu = torch.tensor([0, 8, 20], dtype=torch.int32)   # blocks of 8 and 12: chunks of 2 and 3
    assert thd_partitioned_indices(cu, 20, 2, 0).tolist() == [0, 1, 6, 7, 8, 9, 10, 17, 18, 19]
    assert thd_partitioned_indices(cu, 20, 2, 1).tolist() == [2, 3, 4, 5, 11, 12, 13, 14, 15, 16]
    cu4 = torch.tensor([0, 16], dtype=torch.int32)    # CP4: 8 chunks of 2
    assert [thd_partitioned_indices(cu4, 16, 4, r).tolist() for r in range(4)] == [
        [0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="multiple of 2 x CP"):
        thd_partitioned_indices(torch.tensor([0, 6]), 6, 2, 0)


def test_partitioned_indices_equal_tes_kernel():
    """Where Transformer Engine is installed (GPU), its kernel gives the same indices."""
    tex = pytest.importorskip("transformer_engine_torch")
    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine's index kernel needs a GPU")
    from megatron_trillion.data.context_parallel import thd_partitioned_indices

    cu = torch.tensor([0, 8, 24, 48], dtype=torch.int32)
    for cp in (2, 4):
        for rank in range(cp):
            theirs = tex.thd_get_partitioned_indices(cu.cuda(), 48, cp, rank)
            assert theirs.cpu().tolist() == thd_partitioned_indices(cu, 48, cp, rank).tolist()


@pytest.mark.parametrize("cp, multiple", [(2, 1), (2, 16), (4, 2)])
def test_split_pads_every_block_and_keeps_padding_out_of_the_loss(cp, multiple):
    from megatron_trillion.data.context_parallel import ContextParallelSplit

    lengths = [5, 12, 1, 7, 3]
    batch = _batch(lengths)
    shares = [ContextParallelSplit(cp, r, tokens_per_rank_multiple=multiple)(batch)
              for r in range(cp)]
    params = shares[0]["packed_seq_params"]
    padded = (params.cu_seqlens_q_padded[1:] - params.cu_seqlens_q_padded[:-1]).tolist()
    assert params.cu_seqlens_q.tolist() == [0, 5, 17, 18, 25, 28]     # real lengths kept
    assert all(p % (2 * cp) == 0 and p >= n for p, n in zip(padded, lengths))
    assert all(p - n < 2 * cp for p, n in zip(padded[:-1], lengths[:-1]))
    local = shares[0]["tokens"].shape[1]
    assert local * cp == sum(padded) and local % multiple == 0
    real_tokens = []
    for share in shares:
        mask = share["loss_mask"].reshape(-1).bool()
        tokens = share["tokens"].reshape(-1)
        # token, label and position id moved together; padding is all zeros, outside the loss
        assert torch.equal(share["labels"].reshape(-1)[mask], tokens[mask] + 1000)
        assert torch.equal(share["position_ids"].reshape(-1)[mask], tokens[mask] + 2000)
        assert not tokens[~mask].any() and not share["labels"].reshape(-1)[~mask].any()
        real_tokens += tokens[mask].tolist()
    assert sorted(real_tokens) == list(range(1, sum(lengths) + 1))      # each once, none lost


def test_split_with_mtp_gives_megatron_cores_roll_the_padded_boundaries():
    from megatron_trillion.data.context_parallel import ContextParallelSplit

    params = ContextParallelSplit(2, 0, mtp=True)(_batch([5, 12]))["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_q_padded.tolist() == [0, 8, 20]


def test_te_is_told_the_padding_between_blocks_that_the_split_knows():
    """TE derives ``pad_between_seqs`` from the padded cu_seqlens with two host syncs per
    attention call; the split states it (TE's rule, on the host) and the TE attention of the
    layer spec hands it to TE's forward (stand-ins for TE's and megatron-core's classes)."""
    import dataclasses

    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_trillion.data.context_parallel import ContextParallelSplit
    from megatron_trillion.models.te_attention_guard import pass_pad_between_seqs
    from megatron_trillion.platform.device import to_device

    padded = ContextParallelSplit(2, 0)(_batch([5, 12]))
    aligned = ContextParallelSplit(2, 0)(_batch([4, 8]))["packed_seq_params"]
    with_mtp = ContextParallelSplit(2, 0, mtp=True)(_batch([5, 12]))["packed_seq_params"]
    moved = to_device(padded, torch.device("cpu"))["packed_seq_params"]
    assert [padded["packed_seq_params"].pad_between_seqs, moved.pad_between_seqs,
            aligned.pad_between_seqs, with_mtp.pad_between_seqs] == [True, True, False, False]

    told = []

    class DotProductAttention(torch.nn.Module):  # TE's: derives the value when not given
        def forward(self, q, k, v, mask, pad_between_seqs=None, **packed):
            told.append(pad_between_seqs)
            return q

    class TEDotProductAttention(DotProductAttention):  # megatron-core's: its own fields only
        def forward(self, q, k, v, mask, attn_mask_type, attention_bias=None,
                    packed_seq_params=None):
            packed = {f.name: getattr(packed_seq_params, f.name)
                      for f in dataclasses.fields(PackedSeqParams)}
            return super().forward(q, k, v, mask, **packed)

    attention = pass_pad_between_seqs(TEDotProductAttention, te_base=DotProductAttention)()
    q = torch.zeros(1)
    for params in (moved, aligned, PackedSeqParams(qkv_format="thd")):
        attention(q, q, q, None, None, packed_seq_params=params)
    assert told == [True, False, None]  # None: TE keeps its own rule (no CP split)


def test_te_thd_context_parallel_limits_are_refused_up_front(tmp_path):
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import resolve_model_preset
    from megatron_trillion.training.validation import ConfigError, validate

    flags = ["--mock-data", "--seq-length", "128", "--micro-batch-size", "1",
             "--global-batch-size", "4", "--train-iters", "4", "--lr-warmup-iters", "1",
             "--context-parallel-size", "2"]
    from megatron_trillion.planning import plan_run

    config = parse_args(["--preset", "tiny-trinity", *flags])
    with pytest.raises(ConfigError, match="p2p ring, which has no sliding window"):
        validate(config, resolve_model_preset(config), 2, transformer_engine_available=True)
    with pytest.raises(ValueError, match="p2p ring, which has no sliding window"):
        plan_run(config, 2)   # the planner plans GPU runs
    validate(config, resolve_model_preset(config), 2, transformer_engine_available=False)
    config = parse_args(["--preset", "tiny-tri-7b", *flags])
    validate(config, resolve_model_preset(config), 2, transformer_engine_available=True)
    # Megatron-LM's --cp-comm-type: p2p (the default) reaches the model; the variants TE has no
    # THD path for are refused when the flags are parsed.
    from megatron_trillion.errors import UserError
    from megatron_trillion.training.build import build_transformer_config

    config = parse_args(["--preset", "tiny-tri-7b", *flags, "--cp-comm-type", "p2p"])
    shape = validate(config, resolve_model_preset(config), 2, transformer_engine_available=False)
    assert build_transformer_config(config, resolve_model_preset(config),
                                    shape).cp_comm_type == "p2p"
    for variant in ("a2a", "allgather", "a2a+p2p"):
        refusal = re.escape(f"--cp-comm-type {variant}: ") + ".*only its p2p ring"
        with pytest.raises(UserError, match=refusal):
            parse_args(["--preset", "tiny-tri-7b", *flags, "--cp-comm-type", variant])


# ----------------------------------------------------------------------------------------------
# Under gloo: one 4-process spawn (CP2 x DP2 and friends) covers the attention and every layout.

CU_REAL = [0, 5, 17, 18, 25, 31]   # blocks of 5, 12, 1, 7, 6 tokens: all straddle the CP split


def _cp2_attention_checks():
    """Inside an initialised CP2 run: the CP attention equals the dense reference on the padded
    row (forward and q/k/v gradients, gradients of remote keys/values arriving at their owners,
    with GQA and a sliding window), and leaks nothing: d out[i] / d (q, k, v)[j] is exactly zero
    outside i's block and in its future, non-zero for the keys/values inside."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.data.context_parallel import (
        ContextParallelSplit,
        thd_partitioned_indices,
    )
    from megatron_trillion.models.xlda_attention import XLDACoreAttention

    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    group = ps.get_context_parallel_group()
    lengths = np.diff(CU_REAL).tolist()
    split = ContextParallelSplit(cp, rank)(_batch(lengths))
    params = split["packed_seq_params"]
    padded_cu = params.cu_seqlens_q_padded.tolist()
    total = padded_cu[-1]
    slots = thd_partitioned_indices(params.cu_seqlens_q_padded, total, cp, rank)  # my tokens
    padded_real = torch.cat([torch.arange(a, a + n) for a, n in zip(padded_cu, lengths)])
    # the split put every real token in its slot of TE's layout
    mask = split["loss_mask"].reshape(-1).bool()
    assert torch.equal(split["tokens"].reshape(-1)[mask],
                       torch.searchsorted(padded_real, slots[mask]) + 1)

    heads, groups, d = 4, 2, 8
    for window in (None, 3):
        config = _config(heads=heads, groups=groups, context_parallel_size=cp,
                         **({"window_size": (window, 0)} if window else {}))
        attn = XLDACoreAttention(config, 1, AttnMaskType.causal, "self")
        gen = torch.Generator().manual_seed(3)
        full = [torch.randn(total, h, d, generator=gen) for h in (heads, groups, groups)]
        q, k, v = (x[slots].clone().requires_grad_() for x in full)
        out = attn(q, k, v, None, packed_seq_params=params)
        grad_full = torch.randn(total, heads * d, generator=gen)
        grads = torch.autograd.grad(out, (q, k, v), grad_full[slots])

        ref_inputs = [x.clone().requires_grad_() for x in full]
        ref = dense_reference(*ref_inputs, padded_cu, 1 / math.sqrt(d), window_left=window)
        # padding rows output zeros and carry no gradient (TE's convention)
        is_real = torch.zeros(total, dtype=torch.bool)
        is_real[padded_real] = True
        ref = ref * is_real[:, None]
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_full)
        torch.testing.assert_close(out, ref[slots], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want[slots], rtol=1e-5, atol=1e-5)

    # leakage probe: one query at a time, on whichever rank holds it
    attn = XLDACoreAttention(_config(heads=heads, groups=groups, context_parallel_size=cp), 1,
                             AttnMaskType.causal, "self")
    block_of = torch.full((total,), -1)
    block_of[padded_real] = torch.tensor(np.repeat(np.arange(len(lengths)), lengths))
    position = torch.zeros(total, dtype=torch.long)
    position[padded_real] = torch.cat([torch.arange(n) for n in lengths])
    for target in padded_real[[0, 4, 6, 12, 16, 17, 23, 30]].tolist():
        q, k, v = (x[slots].clone().requires_grad_() for x in full)
        out = attn(q, k, v, None, packed_seq_params=params)
        mine = (slots == target).nonzero().reshape(-1)
        (out[mine].sum() if len(mine) else out.sum() * 0).backward()
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            local = tensor.grad.reshape(len(slots), -1).abs().sum(dim=1)
            gathered = [torch.zeros_like(local) for _ in range(cp)]
            torch.distributed.all_gather(gathered, local, group=group)
            owners = torch.cat([thd_partitioned_indices(params.cu_seqlens_q_padded, total, cp, r)
                                for r in range(cp)])
            norm = torch.zeros(total)
            norm[owners] = torch.cat(gathered)
            visible = (block_of == block_of[target]) & (position <= position[target]) & \
                (block_of >= 0)
            if name == "q":
                visible = torch.arange(total) == target
            assert (norm[~visible] == 0).all(), f"leak into {name} at {(norm[~visible] != 0)}"
            if name == "v":   # every visible value moves the output
                assert (norm[visible] > 0).all(), f"{name} of block not seen by {target}"
    return rank


def _losses(argv):
    from megatron.core import parallel_state

    from test_pretrain_parallel import train_losses

    losses = train_losses(argv)
    parallel_state.destroy_model_parallel()
    return losses


def _argv(cache, *layout):
    return ["--preset", "tiny-tri-7b", "--mock-data", "--data-cache-path", cache,
            "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "4", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "2",
            "--lr-wsd-decay-fraction", "0.4", "--attention-masking", "xlda", "--seed", "7",
            "--no-progress-bar", *layout]


NO_MTP = ("--mtp-num-layers", "0")
CP2 = ("--context-parallel-size", "2")
LAYOUTS = {  # on 4 processes; tiny-tri-7b has one MTP layer
    "cp2-dp2": (*CP2, *NO_MTP),
    "cp2-dp2-mtp": CP2,
    "cp2-tp2-sp-mtp": (*CP2, "--tensor-model-parallel-size", "2", "--sequence-parallel"),
    "cp2-pp2-mtp": (*CP2, "--pipeline-model-parallel-size", "2"),
}


def _serial_runs(cache):
    return {"no-mtp": _losses(_argv(cache, *NO_MTP)), "mtp": _losses(_argv(cache))}


def _cp_runs(cache):
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(context=2), seed=1)
    _cp2_attention_checks()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return {name: _losses(_argv(cache, *layout)) for name, layout in LAYOUTS.items()}


@pytest.mark.slow
def test_cp2_attention_and_layouts_match_serial(tmp_path):
    cache = str(tmp_path)
    (serial,) = run_distributed(_serial_runs, 1, timeout=600, cache=cache)
    for losses in serial.values():
        assert len(losses) == 4 and losses[0] > losses[-1]
    parallel = run_distributed(_cp_runs, 4, timeout=1200, cache=cache)
    for name in LAYOUTS:
        want = serial["mtp" if name.endswith("mtp") else "no-mtp"]
        for rank_losses in parallel:
            np.testing.assert_allclose(rank_losses[name], want, rtol=0, atol=1e-5,
                                       err_msg=name)
