"""Muon: equals torch.optim.Muon on one device, equals unsharded Muon under TP2, trains a GPT."""

import copy
import zlib

import pytest
import torch

from megatron_trillion.training.muon import (
    TensorParallelMuon,
    _gated_blocks,
    _gated_merge,
    _qkv_blocks,
    _qkv_merge,
    muon_param_kind,
    newton_schulz,
)

# q/k/v rows per query group for 4 heads, 2 groups, kv_channels 2: (2 heads x 2, 2, 2)
QKV_SPLIT = (4, 2, 2)


# ------------------------------------------------------------------------ single device

def test_newton_schulz_equals_torch_reference():
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    gen = torch.Generator().manual_seed(0)
    for shape in [(16, 24), (24, 16)]:
        x = torch.randn(*shape, generator=gen)
        ref = _zeropower_via_newtonschulz(x, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, 1e-7)
        assert torch.equal(newton_schulz(x), ref.float())
    # fp32 iteration lands near an orthogonal matrix (singular values in ~[0.7, 1.2])
    s = torch.linalg.svdvals(newton_schulz(torch.randn(16, 24, generator=gen),
                                           compute_dtype=torch.float32))
    assert 0.6 < s.min() and s.max() < 1.3


def test_single_device_equals_torch_muon():
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(12, 20, generator=gen), torch.randn(20, 12, generator=gen)]
    ours = [torch.nn.Parameter(w.clone()) for w in init]
    theirs = [torch.nn.Parameter(w.clone()) for w in init]
    opt_ours = TensorParallelMuon(ours, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.1,
                                  scale_mode="shape_scaling")
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, momentum=0.9, nesterov=True,
                                  weight_decay=0.1, adjust_lr_fn="original")
    for _ in range(4):
        grads = [torch.randn(w.shape, generator=gen) for w in init]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_block_layouts_round_trip_and_pick_the_right_rows():
    full = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)
    q, k, v = _qkv_blocks(full, QKV_SPLIT)
    assert q.shape == (8, 3) and k.shape == (4, 3)
    assert torch.equal(k[:2], full[4:6]) and torch.equal(k[2:], full[12:14])
    assert torch.equal(_qkv_merge([q, k, v], QKV_SPLIT, 3), full)
    # 2 shards of a gated fc1: rows [g0; u0; g1; u1]
    gate, up = _gated_blocks(full, shards=2)
    assert torch.equal(gate, torch.cat([full[0:4], full[8:12]]))
    assert torch.equal(_gated_merge([gate, up], 2), full)


def test_param_routing():
    w = torch.zeros(4, 4)
    assert muon_param_kind("decoder.layers.0.self_attention.linear_qkv.weight", w, True) == "qkv"
    assert muon_param_kind("decoder.layers.0.self_attention.linear_proj.weight", w, True) == "plain"
    assert muon_param_kind("decoder.layers.0.mlp.linear_fc1.weight", w, True) == "gated"
    assert muon_param_kind("decoder.layers.0.mlp.linear_fc1.weight", w, False) == "plain"
    assert muon_param_kind("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight",
                           w, True) == "gated"
    assert muon_param_kind("decoder.layers.1.mlp.router.weight", w, True) == "adam"
    assert muon_param_kind("embedding.word_embeddings.weight", w, True) == "adam"
    assert muon_param_kind("output_layer.weight", w, True) == "adam"
    assert muon_param_kind("decoder.layers.0.mlp.linear_fc1.bias", torch.zeros(4), True) == "adam"
    with pytest.raises(ValueError, match="GroupedMLP"):
        muon_param_kind("decoder.layers.0.mlp.experts.weight1", w, True)


# ------------------------------------------------------------------------ helpers for TP runs

def _full_tensor(name, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=gen) * 0.1


def _shard(full, partition_dim, tp, rank, gated):
    if gated:  # megatron keeps [gate_r; up_r] on TP rank r
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    return full.chunk(tp, dim=partition_dim)[rank].clone()


def _unshard(pieces, partition_dim, gated):
    if gated:
        gates, ups = zip(*(p.chunk(2, dim=0) for p in pieces))
        return torch.cat(list(gates) + list(ups))
    return torch.cat(pieces, dim=partition_dim)


# (name, full shape, partition dim, muon kind)
MATRICES = [
    ("column", (8, 6), 0, "plain"),
    ("row", (6, 8), 1, "plain"),
    ("qkv", (16, 6), 0, "qkv"),
    ("fc1", (16, 6), 0, "gated"),
]


def _muon_on_matrices(tp_group, tp, rank, tp_mode, steps=3):
    """Run Muon on shards (or on full matrices with tp=1); return the full results."""
    params, groups = [], []
    for name, shape, dim, kind in MATRICES:
        p = torch.nn.Parameter(_shard(_full_tensor(name, shape), dim, tp, rank, kind == "gated"))
        p.tensor_model_parallel, p.partition_dim = True, dim
        params.append((name, shape, dim, kind, p))
    opts = [TensorParallelMuon([p], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1,
                               compute_dtype=torch.float32, tp_mode=tp_mode, kind=kind,
                               qkv_split=QKV_SPLIT, tp_group=tp_group)
            for _, _, _, kind, p in params]
    for step in range(steps):
        for name, shape, dim, kind, p in params:
            p.grad = _shard(_full_tensor(f"{name}-grad{step}", shape), dim, tp, rank,
                            kind == "gated")
        for opt in opts:
            opt.step()
    out = {}
    for name, shape, dim, kind, p in params:
        if tp == 1:
            out[name] = p.detach().clone()
        else:
            pieces = [torch.empty_like(p) for _ in range(tp)]
            torch.distributed.all_gather(pieces, p.detach().contiguous(), group=tp_group)
            out[name] = _unshard(pieces, dim, kind == "gated")
    return out


# ------------------------------------------------------------------------ tiny GPT training

def _tiny_gpt(tp):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, tensor_model_parallel_size=tp,
        params_dtype=torch.float32)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=64,
                     max_sequence_length=16, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    # Same full weights at every TP size, drawn per parameter name, then sharded.
    rank = torch.distributed.get_rank() if tp > 1 else 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else 0
            shape = list(p.shape)
            shape[dim] *= tp
            p.copy_(_shard(_full_tensor(name, shape), dim, tp, rank,
                           name.endswith("linear_fc1.weight")))
    return model


def _train_gpt(tp, steps=4, layer_wise=False):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig

    from megatron_trillion.training.muon import get_muon_optimizer
    from megatron_trillion.training.schedules import LRScheduleConfig, ParamScheduler

    model = _tiny_gpt(tp)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(),
                                  module=model)
    opt_config = OptimizerConfig(optimizer="adam", lr=2e-3, min_lr=2e-4, weight_decay=0.1,
                                 adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
                                 muon_momentum=0.95, muon_use_nesterov=True,
                                 muon_fp32_matmul_prec="highest", muon_scale_mode="spectral",
                                 muon_extra_scale_factor=0.2)
    if layer_wise:  # ZeRO-1 by whole parameters over DP
        opt_config.use_distributed_optimizer = True
    optimizer = get_muon_optimizer(opt_config, [ddp], muon_lr=8e-3)
    scheduler = ParamScheduler(optimizer, LRScheduleConfig(
        max_lr=2e-3, min_lr=2e-4, total_steps=10, warmup_steps=2, init_lr=1e-3), weight_decay=0.1)

    # Shadow torch.optim.AdamW for the Adam-handled params (single process only).
    adam_names = {}
    dp = torch.distributed.get_world_size() // tp
    if tp == 1 and dp == 1:
        adam_ids = {id(p) for o in optimizer.chained_optimizers
                    if not isinstance(o.optimizer, TensorParallelMuon) for p in o.get_parameters()}
        adam_names = {n: p for n, p in model.named_parameters() if id(p) in adam_ids}
        shadow = {n: torch.nn.Parameter(p.detach().clone()) for n, p in adam_names.items()}
        shadow_opt = torch.optim.AdamW(
            [{"params": [q], "name": n} for n, q in shadow.items()],
            betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 64, (2, 17), generator=gen)
    # Each DP rank trains on its share of the 2 sequences; DDP averages the gradients.
    dp_rank = torch.distributed.get_rank() // tp if dp > 1 else 0
    tokens = tokens[dp_rank::dp]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(16).unsqueeze(0).expand(tokens.size(0), -1)
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), diagonal=1)
    losses, adam_err, lrs = [], 0.0, []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(inputs, positions, mask, labels=labels).mean()
        loss.backward()
        finalize_model_grads([ddp])
        ok, grad_norm, _ = optimizer.step()
        assert ok and torch.isfinite(torch.tensor(grad_norm))
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        lrs.append(sorted({round(g["lr"], 12) for g in optimizer.param_groups if g["params"]}))
        if adam_names:
            for group in shadow_opt.param_groups:
                name = group["name"]
                real = adam_names[name]
                group["lr"] = groups[id(real)]["lr"]
                group["weight_decay"] = groups[id(real)]["weight_decay"]
                group["params"][0].grad = real.main_grad.clone()  # clipped in place by mcore
            shadow_opt.step()
            adam_err = max(adam_err, max((shadow[n] - p).abs().max().item()
                                         for n, p in adam_names.items()))
        scheduler.step(1)
        if dp > 1:
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= dp
        losses.append(loss.item())
    result = {"losses": losses, "adam_err": adam_err, "n_adam": len(adam_names), "lrs": lrs,
              "n_local": sum(len(g["params"]) for g in optimizer.param_groups),
              "n_total": sum(1 for p in model.parameters() if p.requires_grad)}
    if tp == 1 and dp == 1:
        # Checkpoint round trip: a fresh optimizer loads the Muon momentum and Adam moments.
        state = copy.deepcopy(optimizer.state_dict())
        fresh = get_muon_optimizer(opt_config, [ddp], muon_lr=8e-3)
        fresh.load_state_dict(state)
        result["state_restored"] = all(
            torch.equal(a.state[p][k], b.state[q][k])
            for a, b in zip(optimizer.chained_optimizers, fresh.chained_optimizers)
            for p, q in zip(a.get_parameters(), b.get_parameters())
            for k in a.state[p])
        result["has_momentum"] = all(
            "momentum_buffer" in o.state[p] for o in optimizer.chained_optimizers[:3]
            for p in o.get_parameters())
        result["muon_kinds"] = [getattr(o.optimizer, "kind", "adam")
                                for o in optimizer.chained_optimizers]
    return result


def _as_lists(tensors):
    # Plain lists: tensors sent through the result queue would need the dead rank's fds.
    return {name: t.tolist() for name, t in tensors.items()}


def _single_process():
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(), seed=1234)
    return {"muon": _as_lists(_muon_on_matrices(None, 1, 0, "duplicated")), "gpt": _train_gpt(1)}


def _tp2():
    from megatron.core import parallel_state

    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(tensor=2), seed=1234)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    exact = _muon_on_matrices(group, 2, rank, "duplicated")
    blockwise = _muon_on_matrices(group, 2, rank, "blockwise")
    gpt = _train_gpt(2)
    # Same two processes as DP2 with the distributed (layer-wise ZeRO-1) optimizer.
    parallel_state.destroy_model_parallel()
    initialize_distributed(ParallelSizes(), seed=1234)
    dp2 = _train_gpt(1, layer_wise=True)
    return {"muon": _as_lists(exact), "blockwise": _as_lists(blockwise), "gpt": gpt,
            "dp2": dp2}


@pytest.mark.slow
def test_muon_tp2_equals_unsharded_and_gpt_trains_the_same():
    """One process vs TP2 vs DP2 with the layer-wise distributed optimizer: same losses."""
    from multiprocess import run_distributed

    (single,) = run_distributed(_single_process, 1, timeout=240)
    tp2 = run_distributed(_tp2, 2, timeout=240)

    # TP2 Muon (full-matrix orthogonalisation) == unsharded Muon, every matrix kind.
    unsharded = {n: torch.tensor(v) for n, v in single["muon"].items()}
    for rank_result in tp2:
        for name, full in unsharded.items():
            torch.testing.assert_close(torch.tensor(rank_result["muon"][name]), full, rtol=0,
                                       atol=1e-5, msg=f"{name}: TP2 Muon differs from unsharded")
    # The per-shard approximation is measurably different, so the check above can fail.
    worst = max((torch.tensor(tp2[0]["blockwise"][n]) - unsharded[n]).abs().max().item()
                for n in unsharded)
    assert worst > 1e-3

    # The Adam part is torch AdamW with megatron's per-group lr / weight decay.
    gpt1 = single["gpt"]
    assert gpt1["n_adam"] >= 5  # embedding, output layer, norms
    assert gpt1["adam_err"] < 1e-6
    assert gpt1["state_restored"] and gpt1["has_momentum"]
    assert gpt1["muon_kinds"] == ["plain", "qkv", "gated", "adam"]
    # One schedule drives both learning rates (Muon at 4x Adam).
    for adam_lr, muon_lr in gpt1["lrs"]:
        assert muon_lr == pytest.approx(4 * adam_lr, rel=1e-9)

    # Single process and TP2 train identically; the loss falls.
    losses1 = gpt1["losses"]
    assert losses1[-1] < losses1[0] - 0.05
    # DP2: each rank holds the optimizer state of only some whole parameters.
    assert [r["dp2"]["n_local"] for r in tp2] != [gpt1["n_total"]] * 2
    assert sum(r["dp2"]["n_local"] for r in tp2) == gpt1["n_total"]
    for rank_result in tp2:
        for run in ("gpt", "dp2"):
            for a, b in zip(rank_result[run]["losses"], losses1):
                assert abs(a - b) < 1e-5, (run, rank_result[run]["losses"], losses1)
