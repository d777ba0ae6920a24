"""XLDACoreAttention: equals a dense-mask reference, leaks nothing across blocks, works under TP2
and inside a megatron-core GPTModel built from the local layer spec."""

from __future__ import annotations

import math
import types

import pytest
import torch

from multiprocess import run_distributed


def _config(heads=4, groups=2, head_dim=8, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(num_layers=2, hidden_size=heads * head_dim, num_attention_heads=heads,
                  num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0,
                  hidden_dropout=0.0, use_cpu_initialization=True)
    fields.update(overrides)
    return TransformerConfig(**fields)


class _OneRankGroup:
    """A tensor-parallel group of size 1, so single-process tests need no torch.distributed."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _attention(config, layer_number=1, **kwargs):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.models.xlda_attention import XLDACoreAttention

    return XLDACoreAttention(config, layer_number, AttnMaskType.causal, "self",
                             pg_collection=types.SimpleNamespace(tp=_OneRankGroup()), **kwargs)


def _packed(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(cu, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def dense_reference(q, k, v, cu, scale, window_left=None):
    """Attention with an explicit [T, T] mask built from the block boundaries: q [T, H, d]."""
    t, heads, _ = q.shape
    block = torch.zeros(t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        block[a:b] = i
    rows, cols = torch.arange(t).unsqueeze(1), torch.arange(t).unsqueeze(0)
    allowed = (block.unsqueeze(1) == block.unsqueeze(0)) & (cols <= rows)
    if window_left is not None:
        allowed &= cols >= rows - window_left
    rep = heads // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hij,jhd->ihd", probs, v).reshape(t, -1)


def _qkv(t, heads, groups, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(t, h, d, generator=gen, requires_grad=True)  # noqa: E731
    return make(heads), make(groups), make(groups)


# Lengths with repeats (batched path) and singletons (single-block path).
CU = [0, 5, 12, 17, 18, 25, 30, 37]


@pytest.mark.parametrize("heads,groups,scale", [(4, 2, None), (4, 4, 0.3), (6, 1, None)])
def test_thd_matches_dense_mask_forward_and_gradients(heads, groups, scale):
    config = _config(heads=heads, groups=groups)
    attn = _attention(config, softmax_scale=scale)
    q, k, v = _qkv(CU[-1], heads, groups, 8)
    out = attn(q, k, v, None, packed_seq_params=_packed(CU))
    assert out.shape == (CU[-1], heads * 8)
    ref = dense_reference(q, k, v, CU, scale if scale is not None else 1 / math.sqrt(8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_empty_blocks_are_skipped():
    cu = [0, 5, 5, 12, 12]
    attn = _attention(_config())
    q, k, v = _qkv(12, 4, 2, 8, seed=4)
    out = attn(q, k, v, None, packed_seq_params=_packed(cu))
    torch.testing.assert_close(out, dense_reference(q, k, v, cu, 1 / math.sqrt(8)),
                               rtol=1e-5, atol=1e-5)


def test_sliding_window_matches_dense_mask():
    config = _config(window_size=(3, 0))
    attn = _attention(config)
    q, k, v = _qkv(CU[-1], 4, 2, 8, seed=1)
    out = attn(q, k, v, None, packed_seq_params=_packed(CU))
    ref = dense_reference(q, k, v, CU, 1 / math.sqrt(8), window_left=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # window_attn_skip_freq=2: layer 2 is a global layer, so it ignores the window.
    config = _config(window_size=(3, 0), window_attn_skip_freq=2)
    out_global = _attention(config, layer_number=2)(q, k, v, None, packed_seq_params=_packed(CU))
    torch.testing.assert_close(out_global, dense_reference(q, k, v, CU, 1 / math.sqrt(8)),
                               rtol=1e-5, atol=1e-5)


def test_no_leakage_gradient_is_zero_exactly_outside_own_block_and_future():
    _assert_no_leakage([0, 4, 9, 13])


def _assert_no_leakage(cu):
    attn = _attention(_config(heads=2, groups=1))
    total = cu[-1]
    q, k, v = _qkv(total, 2, 1, 8, seed=2)
    out = attn(q, k, v, None, packed_seq_params=_packed(cu))
    block = [next(b for b in range(len(cu) - 1) if cu[b] <= i < cu[b + 1])
             for i in range(total)]
    for i in range(total):
        probe = torch.randn(out.shape[1], generator=torch.Generator().manual_seed(i))
        gq, gk, gv = torch.autograd.grad(out[i] @ probe, (q, k, v), retain_graph=True)
        # A query that sees a single key has softmax weight 1 on it: d/dk is then 0 legitimately.
        sees_several = i > cu[block[i]]
        for j in range(total):
            allowed = block[j] == block[i] and j <= i
            for name, g in (("k", gk), ("v", gv)):
                norm = g[j].abs().sum().item()
                if allowed and (name == "v" or sees_several):
                    assert norm > 0, f"d out[{i}] / d {name}[{j}] should be non-zero"
                elif not allowed:
                    assert norm == 0.0, f"leak: d out[{i}] / d {name}[{j}] = {norm}"
            if j != i:
                assert gq[j].abs().sum().item() == 0.0, f"leak: d out[{i}] / d q[{j}]"
            elif sees_several:
                assert gq[j].abs().sum().item() > 0


def scope_cu(scope):
    """Block boundaries of a micro-batch of two packed samples under an XLDA block scope: a
    cross-lingual [EN1 5][KO1 7][EN2 5][KO2 4] and a monolingual one of three documents."""
    from megatron_trillion.data.attention_blocks import MONOLINGUAL, block_cu_seqlens

    cross = block_cu_seqlens([0, 5, 12, 17, 21], [0, 5, 12, 17], [0, 0, 1, 1], "xlda", scope)
    mono = block_cu_seqlens([0, 3, 8, 12], [0], [MONOLINGUAL], "xlda", scope)
    return [int(c) for c in cross] + [int(c) + int(cross[-1]) for c in mono[1:]]


def test_block_scopes_give_the_documented_blocks():
    assert scope_cu("pair") == [0, 12, 21, 24, 29, 33]      # (EN1 KO1) (EN2 KO2) | 3 docs
    assert scope_cu("sequence") == [0, 21, 24, 29, 33]      # (EN1 KO1 EN2 KO2) | 3 docs


@pytest.mark.parametrize("scope", ["pair", "sequence"])
def test_block_scopes_match_dense_mask_and_leak_nothing(scope):
    cu = scope_cu(scope)
    attn = _attention(_config())
    q, k, v = _qkv(cu[-1], 4, 2, 8, seed=6)
    out = attn(q, k, v, None, packed_seq_params=_packed(cu))
    ref = dense_reference(q, k, v, cu, 1 / math.sqrt(8))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # The probe checks both directions: EN2 (tokens 12..16) sees KO1 (5..11) exactly when
    # the scope puts them in one block.
    _assert_no_leakage(cu)


def test_sbhd_path_is_causal_attention_and_bottom_right_for_decoding():
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups, s, b = 4, 2, 9, 2
    attn = _attention(_config(heads=heads, groups=groups))
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(s, b, heads, 8, generator=gen)
    k = torch.randn(s, b, groups, 8, generator=gen)
    v = torch.randn(s, b, groups, 8, generator=gen)
    out = attn(q, k, v, None)
    assert out.shape == (s, b, heads * 8)
    for i in range(b):
        ref = dense_reference(q[:, i], k[:, i], v[:, i], [0, s], 1 / math.sqrt(8))
        torch.testing.assert_close(out[:, i], ref, rtol=1e-5, atol=1e-5)
    # Decoding: the last 2 queries against all 9 keys see exactly what they saw in full.
    last = attn(q[-2:], k, v, None)
    torch.testing.assert_close(last, out[-2:], rtol=1e-5, atol=1e-5)
    # A megatron attention mask (True = masked) is honoured on top of causality.
    mask = torch.zeros(1, 1, s, s, dtype=torch.bool)
    mask[..., :, 0] = True
    mask[..., 0, 0] = False
    masked = attn(q, k, v, mask)
    assert not torch.allclose(masked[1:], out[1:])
    torch.testing.assert_close(masked[0], out[0])
    # no_mask: bidirectional.
    full = attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask)
    assert not torch.allclose(full[0], out[0])


def test_one_query_decode_step_attends_per_key_group():
    """A KV-cache decode step (one query per row, GQA): the query heads of a group attend to
    its keys without the cache being repeated per head; the padding mask (per key) and the
    sliding window still apply, and a batch-major cache view gives the same result."""
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups, s, b, d = 4, 2, 9, 2, 8
    scale = 1 / math.sqrt(d)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(s, b, heads, d, generator=gen)
    k = torch.randn(s, b, groups, d, generator=gen)
    v = torch.randn(s, b, groups, d, generator=gen)
    batch_major = [x.permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3) for x in (k, v)]
    pad = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    pad[0, ..., :3] = True   # row 0: three padding keys (True = masked, megatron convention)
    for window in (None, 3):
        attn = _attention(_config(heads=heads, groups=groups,
                                  **({} if window is None else {"window_size": (window, 0)})))
        attn._expand_groups = None   # the one-query path must not repeat keys per head
        for keys, values in ((k, v), batch_major):
            out = attn(q[-1:], keys, values, pad, attn_mask_type=AttnMaskType.no_mask)
            assert out.shape == (1, b, heads * d)
            for i, first in enumerate((3, 0)):
                ref = dense_reference(q[first:, i], k[first:, i], v[first:, i], [0, s - first],
                                      scale, window_left=window)
                torch.testing.assert_close(out[0, i], ref[-1], rtol=1e-5, atol=1e-5)


def test_masked_modes_refuse_to_run_without_packed_params():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.models.xlda_attention import xlda_core_attention_spec

    config = _config()
    pg = types.SimpleNamespace(tp=_OneRankGroup())
    q = torch.randn(6, 1, 4, 8)
    k = v = torch.randn(6, 1, 2, 8)
    for mode in ("xlda", "document"):
        attn = build_module(xlda_core_attention_spec(mode), config=config, layer_number=1,
                            attn_mask_type=AttnMaskType.causal, attention_type="self",
                            pg_collection=pg)
        with pytest.raises(ValueError, match="block mask would be ignored"):
            attn(q, k, v, None)
        with pytest.raises(ValueError, match="qkv_format='sbhd'"):
            attn(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    unmasked = build_module(xlda_core_attention_spec("none"), config=config, layer_number=1,
                            attn_mask_type=AttnMaskType.causal, attention_type="self",
                            pg_collection=pg)
    assert unmasked(q, k, v, None).shape == (6, 1, 32)
    with pytest.raises(ValueError, match="unknown masking mode"):
        xlda_core_attention_spec("xdla")


def test_bad_inputs_raise_actionable_errors():
    attn = _attention(_config())
    q, k, v = _qkv(10, 4, 2, 8)
    with pytest.raises(ValueError, match="end at the number of tokens"):
        attn(q, k, v, None, packed_seq_params=_packed([0, 4, 9]))
    with pytest.raises(ValueError, match="attention_mask=None"):
        attn(q, k, v, torch.zeros(1, 1, 10, 10, dtype=torch.bool),
             packed_seq_params=_packed([0, 10]))
    with pytest.raises(ValueError, match="key/value groups"):
        attn(q, q, q, None, packed_seq_params=_packed([0, 10]))
    with pytest.raises(ValueError, match="context-parallel process group has 1 ranks"):
        _attention(_config(context_parallel_size=2))


def test_dropout_only_in_training():
    from megatron.core import tensor_parallel

    from megatron_trillion.platform import cpu_compat

    cpu_compat.apply()
    tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    attn = _attention(_config(attention_dropout=0.5))
    q, k, v = _qkv(CU[-1], 4, 2, 8)
    attn.train()
    dropped = attn(q, k, v, None, packed_seq_params=_packed(CU))
    attn.eval()
    clean = attn(q, k, v, None, packed_seq_params=_packed(CU))
    torch.testing.assert_close(clean, dense_reference(q, k, v, CU, 1 / math.sqrt(8)),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dropped, clean)


# ----------------------------------------------------------------------------------------------
# TP2: each rank runs its half of the heads; the gathered result equals the unsharded reference.


def _tp2_attention_matches_unsharded(cu):
    """Called inside an initialised TP2 run."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_trillion.models.xlda_attention import XLDACoreAttention

    rank = parallel_state.get_tensor_model_parallel_rank()
    heads, groups, d = 4, 2, 8
    q, k, v = _qkv(cu[-1], heads, groups, d, seed=5)   # same full tensors on both ranks
    attn = XLDACoreAttention(_config(heads=heads, groups=groups), 1, AttnMaskType.causal, "self")
    hq, hg = heads // 2, groups // 2
    q_shard = q[:, rank * hq:(rank + 1) * hq].detach().requires_grad_()
    k_shard = k[:, rank * hg:(rank + 1) * hg].detach().requires_grad_()
    v_shard = v[:, rank * hg:(rank + 1) * hg].detach().requires_grad_()
    out = attn(q_shard, k_shard, v_shard, None, packed_seq_params=_packed(cu))
    grad_out = torch.randn(cu[-1], heads * d, generator=torch.Generator().manual_seed(9))
    grad_shard = grad_out[:, rank * hq * d:(rank + 1) * hq * d]
    grads = torch.autograd.grad(out, (q_shard, k_shard, v_shard), grad_shard)

    ref = dense_reference(q, k, v, cu, 1 / math.sqrt(d))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref[:, rank * hq * d:(rank + 1) * hq * d],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0][:, rank * hq:(rank + 1) * hq],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], ref_grads[1][:, rank * hg:(rank + 1) * hg],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2], ref_grads[2][:, rank * hg:(rank + 1) * hg],
                               rtol=1e-5, atol=1e-5)
    return rank




# ----------------------------------------------------------------------------------------------
# Integration: a tiny megatron-core GPTModel from the local spec with XLDACoreAttention plugged in.


def _tiny_gpt_leakage_probe(cu):
    """Called inside an initialised (TP1 or TP2) run; block A is ``[0, cu[1])``, block B
    ``[cu[1], cu[2])``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_trillion.models.xlda_attention import xlda_core_attention_spec

    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = _config(heads=4, groups=2, head_dim=8, num_layers=2, tensor_model_parallel_size=tp)
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = xlda_core_attention_spec("xlda")
    vocab = 64
    model = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=64,
                     position_embedding_type="rope")
    model.eval()

    a, b = cu[1], cu[2]
    total = cu[-1]
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, vocab, (1, total), generator=gen)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(cu, cu[1:])]).unsqueeze(0)
    packed = _packed(cu)

    def logits(tok, pos=positions, params=packed):
        with torch.no_grad():
            out = model(tok, pos, None, packed_seq_params=params)  # [1, T, vocab/TP]
        return gather_from_tensor_model_parallel_region(out)

    base = logits(tokens)
    perturbed = tokens.clone()
    perturbed[0, 0:a] = (perturbed[0, 0:a] + 1 + torch.arange(a)) % vocab   # block A
    after = logits(perturbed)
    others = torch.cat([base[:, a:], after[:, a:]], dim=0)
    assert torch.equal(others[0], others[1]), "perturbing block A changed another block's logits"
    assert not torch.allclose(base[:, :a], after[:, :a]), "block A's own logits did not change"

    # RoPE restarts at each block: block B alone, as an ordinary sequence (sbhd path of a
    # model without the masked-mode guard), gives the same logits as inside the pack.
    plain_spec = get_gpt_layer_local_spec()
    plain_spec.submodules.self_attention.submodules.core_attention = xlda_core_attention_spec(
        "none")
    plain = GPTModel(config, plain_spec, vocab_size=vocab, max_sequence_length=64,
                     position_embedding_type="rope")
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad():
        alone = gather_from_tensor_model_parallel_region(
            plain(tokens[:, a:b], torch.arange(b - a).unsqueeze(0), None))
    torch.testing.assert_close(alone, base[:, a:b], rtol=1e-5, atol=1e-5)

    # The masked-mode model refuses to run without the block boundaries.
    try:
        model(tokens, positions, None)
    except ValueError as exc:
        assert "block mask would be ignored" in str(exc)
    else:
        raise AssertionError("masked-mode model ran without packed_seq_params")
    return True


@pytest.mark.slow
def test_tp2_attention_and_gpt_model_leakage_probe():
    """One 2-rank run (process start-up dominates): the sharded attention equals the unsharded
    dense reference, and a TP2 GPTModel with XLDA attention leaks nothing across blocks —
    for generic blocks and for the blocks of both XLDA block scopes."""
    cus = [CU, scope_cu("pair"), scope_cu("sequence")]
    assert run_distributed(_tp2_checks, 2, cus=cus) == [0, 1]


def _tp2_checks(cus):
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(tensor=2), seed=1234)
    for cu in ([0, 7, 16, 20, 30], *cus[1:]):
        _tiny_gpt_leakage_probe(cu)
    ranks = {_tp2_attention_matches_unsharded(cu) for cu in cus}
    assert len(ranks) == 1
    return ranks.pop()
