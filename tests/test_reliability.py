"""Reliability contracts (MoE expert bias, zero-token experts, masking by construction,
up-front validation, hang watchdog, bad-batch record), each pinned by a test.

Process start-up dominates on CPU, so one 2-rank launch (``moe_run``) runs every MoE and
leakage check in phases and the tests assert on its results; the watchdog needs a launch of
its own because it ends the processes.
"""

from __future__ import annotations

import math
import os

import pytest

from multiprocess import DistributedTestError, run_distributed

SEQ = 64
GBS = 8
TOPK, EXPERTS = 2, 8  # tiny-trinity


def _argv(cache: str, *extra: str) -> list[str]:
    return ["--preset", "tiny-trinity", "--mock-data", "--data-cache-path", cache,
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", str(GBS),
            "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1",
            "--lr-decay-style", "cosine", "--seed", "7", "--no-progress-bar", *extra]


# --------------------------------------------------------------------------------------------
# the 2-rank MoE run: EP2 x DP2, full activation recompute, MTP (MoE) layer


def _routers(model_chunks):
    from megatron_trillion.training.loop import _unwrap

    return [(name, module) for chunk in model_chunks
            for name, module in _unwrap(chunk).named_modules()
            if getattr(module, "expert_bias", None) is not None]


def _moe_phases(cache: str, save: str) -> dict:
    import importlib

    import torch
    from megatron.core import parallel_state as ps

    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training import loop, objective
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    # pretrain's finalize (megatron-core's finalize_model_grads + the model's bias rule)
    fmg = importlib.import_module("megatron_trillion.training.expert_bias")
    rank = int(os.environ["RANK"])
    calls: list = []  # one entry per finalize_model_grads call
    real_finalize = fmg.finalize_grads_and_expert_bias

    def recording_finalize(model, *args, **kwargs):
        routers = _routers(model)
        counts = torch.stack([m.local_tokens_per_expert.clone() for _, m in routers])
        torch.distributed.all_reduce(
            counts, group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True))
        before = [m.expert_bias.clone() for _, m in routers]
        momentum = [m.expert_bias_momentum.clone() for _, m in routers]
        out = real_finalize(model, *args, **kwargs)
        calls.append({"names": [n for n, _ in routers], "counts": counts.tolist(),
                      "before": [b.tolist() for b in before],
                      "momentum_before": [m.tolist() for m in momentum],
                      "after": [m.expert_bias.tolist() for _, m in routers],
                      "momentum_after": [m.expert_bias_momentum.tolist() for _, m in routers],
                      "dtypes": sorted({str(m.expert_bias.dtype) for _, m in routers})})
        return out

    fmg.finalize_grads_and_expert_bias = recording_finalize  # read by pretrain at setup

    # Rank 1 poisons its loss in iteration 2: every rank must skip it and name its samples.
    progress = {"done": 0, "poison": 2}
    real_forward = objective.lm_forward_step

    def poisoning_forward(data_iterator, model):
        output, loss = real_forward(data_iterator, model)
        if rank == 1 and progress["done"] + 1 == progress["poison"]:
            output = output * float("nan")
        return output, loss

    objective.lm_forward_step = poisoning_forward
    lines: list = []
    losses: list = []

    def on_step(state, result):
        progress["done"] = state.iteration
        losses.append(result["lm loss"])

    recompute = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    tensorboard = os.path.join(save, "tensorboard")
    argv = _argv(cache, "--expert-model-parallel-size", "2", "--train-iters", "3",
                 "--tensorboard-dir", tensorboard,
                 "--save", save, "--save-interval", "2", *recompute)
    _, run = pretrain(parse_args(argv), log=lines.append, on_step=on_step)
    out = {"calls": calls[:], "losses": losses[:], "lines": lines[:]}
    if rank == 0:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(tensorboard)
        events.Reload()
        out["tensorboard"] = {tag: [e.value for e in events.Scalars(tag)]
                              for tag in events.Tags()["scalars"] if tag.startswith("moe/")}
    if rank == 0:
        # The bad-batch record must list every DP rank's samples of iteration 2.
        dataset = run.train_batches.dataset
        out["step2_docs"] = {}
        for index in range(GBS, 2 * GBS):
            by_source: dict = {}
            for source, document in dataset[index]["document_ids"].tolist():
                by_source.setdefault(int(source), []).append(int(document))
            out["step2_docs"][index] = by_source
        out["sources"] = [f"{s.language}:{s.path_prefix}" for s in dataset.mixture.sources]

    # Phase 2: every token prefers the experts of EP rank 0 -> EP rank 1 receives nothing;
    # the bias moves by megatron-core's sign rule for this step.
    from megatron_trillion.models.router_balance import ExpertBiasUpdate

    progress["poison"] = -1
    with torch.no_grad():
        for _, router in _routers(run.model):
            router.expert_bias_update = ExpertBiasUpdate("sign", 1e-3)
            router.expert_bias.zero_()
            router.expert_bias[EXPERTS // 2:] = -100.0
    del calls[:]
    result = loop.train_step(run, run.train_batches.for_step(0, GBS))
    out["zero"] = {"loss": float(result.loss), "skipped": result.skipped,
                   "counts": calls[0]["counts"], "before": calls[0]["before"],
                   "after": calls[0]["after"]}

    # Phase 3: resume from the iteration-2 checkpoint and redo iteration 3.
    ps.destroy_model_parallel()
    del calls[:], losses[:]
    progress["done"] = 2
    pretrain(parse_args(argv[:-10] + ["--load", save, "--ckpt-step", "2", *recompute]),
             log=lambda line: None, on_step=on_step)
    out["resumed"] = {"calls": calls[:], "losses": losses[:]}

    # Phase 4: leakage probes of the real tiny-trinity model (MoE + MTP) under TP2 and PP2.
    objective.lm_forward_step = real_forward
    fmg.finalize_grads_and_expert_bias = real_finalize
    ps.destroy_model_parallel()
    out["leak_tp2"] = _leakage_probe(tensor=2, pipeline=1)
    ps.destroy_model_parallel()
    out["leak_pp2"] = _leakage_probe(tensor=1, pipeline=2)
    return out


CU = [0, 10, 24, 40, 64]  # four attention blocks; the perturbed one is [10, 24)


def _leakage_probe(tensor: int, pipeline: int) -> dict:
    """Per-token main loss and per-block MTP loss of every block, before and after perturbing
    the tokens of block 1 (forward through megatron-core's pipeline schedule)."""
    import torch

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks
    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.models.init import initialize_weights
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(tensor=tensor, pipeline=pipeline), seed=5)
    config = build_transformer_config("tiny-trinity", None, sequence_parallel=tensor > 1,
                                      calculate_per_token_loss=True, hidden_dropout=0.0,
                                      attention_dropout=0.0)
    model = build_model("tiny-trinity", config=config, attention_masking="xlda")
    initialize_weights([model], seed=3)
    with torch.no_grad():
        # Every token picks experts 0 and 1: the expert GEMMs keep their shapes when block 1
        # changes (a different row count may change BLAS rounding of the other rows, which is
        # not leakage), so bit-for-bit equality is a fair test.
        for _, router in _routers([model]):
            router.expert_bias[:TOPK] = 100.0
    model.train()  # megatron-core tracks the MTP loss in training mode only (no dropout here)
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, 4000, (1, CU[-1]), generator=gen)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(CU, CU[1:])]).unsqueeze(0)
    labels = torch.randint(1, 4000, (1, CU[-1]), generator=gen)
    params = packed_seq_params_from_blocks(torch.tensor(CU))
    last = ps.is_pipeline_last_stage()

    def losses(tok) -> dict:
        result = {}
        for block in range(len(CU) - 1):
            mask = torch.zeros(1, CU[-1])
            mask[0, CU[block]:CU[block + 1]] = 1.0
            batch = {"tokens": tok, "position_ids": positions, "labels": labels,
                     "loss_mask": mask, "packed_seq_params": params}

            def forward_step(iterator, chunk):
                b = next(iterator)
                output = chunk(b["tokens"], b["position_ids"], None, labels=b["labels"],
                               loss_mask=b["loss_mask"], packed_seq_params=b["packed_seq_params"])
                return output, lambda o: (o.sum(), torch.tensor(1, dtype=torch.int),
                                          {"per_token": o.detach().float()})

            MTPLossLoggingHelper.clean_loss_in_tracker()
            with torch.no_grad():
                outputs = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                    num_microbatches=1, seq_length=CU[-1], micro_batch_size=1,
                    forward_only=True)
            if last:
                main = outputs[0]["per_token"][0, CU[block]:CU[block + 1]]
                mtp = MTPLossLoggingHelper.tracker["values"].clone()
                result[block] = {"main": main.tolist(), "mtp": mtp.tolist()}
        return result

    base = losses(tokens)
    perturbed = tokens.clone()
    perturbed[0, CU[1]:CU[2]] = (perturbed[0, CU[1]:CU[2]] + 7) % 4000 + 1
    return {"last": last, "base": base, "perturbed": losses(perturbed)}


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("moe-cache"))
    save = str(tmp_path_factory.mktemp("moe-ckpt"))
    return run_distributed(_moe_phases, 2, timeout=900, cache=cache, save=save)


@pytest.mark.slow
def test_expert_bias_fp32_once_per_step_from_all_reduced_counts_under_recompute(moe_run):
    import torch

    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.models.router_balance import smebu_step

    rule = get_preset("tiny-trinity").expert_bias_update()  # SMEBU, Trinity's constants
    assert rule.style == "smebu"
    for out in moe_run:
        calls = out["calls"]
        # one finalize (= one bias update) per optimizer step, not per micro-batch (2 here)
        assert len(calls) == 3
        names = calls[0]["names"]
        # 3 MoE decoder layers + the MoE MTP layer, all fp32
        assert len(names) == 4 and any(n.startswith("mtp.") for n in names), names
        assert calls[0]["dtypes"] == ["torch.float32"]
        for call in calls:
            for counts in call["counts"]:
                # every routed token counted once over TP x CP x DP despite full recompute
                assert sum(counts) == GBS * SEQ * TOPK
            # the SMEBU update follows the counts reduced over TP x CP x DP (not local ones)
            bias, momentum = smebu_step(
                torch.tensor(call["counts"]), torch.tensor(call["before"]),
                torch.tensor(call["momentum_before"]), rate=rule.rate,
                momentum_coeff=rule.momentum, clamp_scale=rule.clamp_scale)
            torch.testing.assert_close(torch.tensor(call["after"]), bias, atol=1e-7, rtol=0)
            torch.testing.assert_close(torch.tensor(call["momentum_after"]), momentum,
                                       atol=1e-7, rtol=0)
            for before, after in zip(call["before"], call["after"]):
                assert any(a != b for a, b in zip(after, before))
        # the MTP layer's bias moved like the decoder layers' (it is balanced too)
        mtp = names.index(next(n for n in names if n.startswith("mtp.")))
        assert any(v != 0.0 for v in calls[0]["after"][mtp])
    # identical on both ranks (replicated routers)
    assert moe_run[0]["calls"][-1]["after"] == moe_run[1]["calls"][-1]["after"]


@pytest.mark.slow
def test_skipped_step_leaves_expert_bias_and_names_its_samples(moe_run):
    out = moe_run[0]
    # iteration 2 was skipped: the bias and SMEBU momentum before iteration 3 are the ones
    # before iteration 2
    assert math.isnan(out["losses"][1])
    assert out["calls"][2]["before"] == out["calls"][1]["before"]
    assert out["calls"][2]["momentum_before"] == out["calls"][1]["momentum_before"]
    assert out["calls"][2]["before"] != out["calls"][0]["before"]
    assert out["calls"][2]["momentum_before"] != out["calls"][0]["momentum_before"]
    record = [line for line in out["lines"] if "skipped iteration 2" in line]
    assert len(record) == 1, out["lines"]
    line = record[0]
    for index, by_source in out["step2_docs"].items():  # rank 1's samples too
        assert by_source
        for source, documents in by_source.items():
            assert f"{out['sources'][source]} (sample {index}): docs {documents}" in line


@pytest.mark.slow
def test_expert_bias_restored_from_checkpoint(moe_run):
    for out in moe_run:
        resumed = out["resumed"]
        assert len(resumed["calls"]) == 1
        # the bias and SMEBU momentum the resumed iteration 3 starts from are the saved ones
        # (not zeros), bit for bit, and so is what it leaves
        assert resumed["calls"][0]["before"] == out["calls"][2]["before"]
        assert resumed["calls"][0]["momentum_before"] == out["calls"][2]["momentum_before"]
        assert resumed["calls"][0]["after"] == out["calls"][2]["after"]
        assert resumed["calls"][0]["momentum_after"] == out["calls"][2]["momentum_after"]
        assert resumed["losses"] == [out["losses"][2]]


@pytest.mark.slow
def test_alltoall_with_an_ep_rank_receiving_zero_tokens(moe_run):
    for out in moe_run:
        zero = out["zero"]
        assert not zero["skipped"] and math.isfinite(zero["loss"])
        for counts, before, after in zip(zero["counts"], zero["before"], zero["after"]):
            assert counts[EXPERTS // 2:] == [0.0] * (EXPERTS // 2)
            assert sum(counts) == GBS * SEQ * TOPK
            # megatron-core's sign rule (the other --moe-router-bias-update-style)
            mean = sum(counts) / len(counts)
            expected = [b + 1e-3 * ((mean > c) - (mean < c)) for b, c in zip(before, counts)]
            assert after == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_routing_health_in_the_log_and_tensorboard(moe_run):
    out = moe_run[0]
    steps = [line for line in out["lines"] if line.startswith(" iteration")]
    assert len(steps) == 3
    for line in steps:
        assert "moe max vio: " in line and "moe empty experts: " in line
    # per MoE layer (layers 2-4 of tiny-trinity, and its MTP layer), one value per iteration
    tags = out["tensorboard"]
    layers = ["layer_2", "layer_3", "layer_4", "mtp_1"]
    assert sorted(tags) == sorted([f"moe/{what}/{layer}" for what in ("max_vio", "empty_experts")
                                   for layer in layers])
    assert all(len(values) == 3 for values in tags.values())
    # MaxVio of the first step, from the all-reduced counts the bias update saw
    counts = out["calls"][0]["counts"][0]
    mean = sum(counts) / len(counts)
    assert tags["moe/max_vio/layer_2"][0] == pytest.approx(max(counts) / mean - 1, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["leak_tp2", "leak_pp2"])
def test_leakage_probe_with_mtp(moe_run, layout):
    results = [out[layout] for out in moe_run if out[layout]["last"]]
    assert results
    for probe in results:
        base, perturbed = probe["base"], probe["perturbed"]
        for block in (0, 2, 3):  # before and after the perturbed block: bit-for-bit equal
            assert base[block] == perturbed[block], block
        assert base[1]["main"] != perturbed[1]["main"]
        assert base[1]["mtp"] != perturbed[1]["mtp"]


# --------------------------------------------------------------------------------------------
# hang watchdog


def _stall() -> None:
    import time

    time.sleep(600)


def _stalling_run(cache: str) -> None:
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training import objective
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    rank = int(os.environ["RANK"])
    done = {"n": 0}
    real_forward = objective.lm_forward_step

    def stalling_forward(data_iterator, model):
        if rank == 1 and done["n"] == 1:
            _stall()
        return real_forward(data_iterator, model)

    objective.lm_forward_step = stalling_forward
    argv = ["--preset", "tiny-tri-7b", "--mock-data", "--data-cache-path", cache,
            "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--train-iters", "3", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
            "--no-progress-bar", "--hang-timeout-seconds", "6"]
    pretrain(parse_args(argv), log=lambda line: None,
             on_step=lambda state, result: done.__setitem__("n", state.iteration))


@pytest.mark.slow
def test_hang_watchdog_dumps_every_rank_and_exits_nonzero(tmp_path, capfd):
    from megatron_trillion.training.watchdog import HANG_EXIT_CODE

    with pytest.raises(DistributedTestError) as info:
        run_distributed(_stalling_run, 2, timeout=300, cache=str(tmp_path))
    err = capfd.readouterr().err
    for rank in (0, 1):
        assert f"rank {rank} exited with code {HANG_EXIT_CODE}" in str(info.value)
        assert f"hang watchdog: rank {rank} made no progress in iteration 2" in err
    assert "in _stall" in err  # the stalled rank's stack
    assert "--hang-timeout-seconds 6" in err


def test_hang_watchdog_writes_each_rank_dump_in_one_write(tmp_path, monkeypatch):
    import threading

    from megatron_trillion.training import watchdog as watchdog_module

    writes = []
    real_write = os.write
    monkeypatch.setattr(watchdog_module.os, "write",
                        lambda fd, data: writes.append(data) or real_write(fd, data))
    exited = threading.Event()
    codes = []
    release = threading.Event()

    def parked_in_a_named_function():
        release.wait(30)

    parked = threading.Thread(target=parked_in_a_named_function, daemon=True)
    parked.start()
    with open(tmp_path / "stderr", "w") as stream:
        dog = watchdog_module.HangWatchdog(0.2, rank=3, stream=stream,
                                           exit_fn=lambda code: (codes.append(code), exited.set()))
        dog.start(5)
        assert exited.wait(30)
        dog.stop()
    release.set()
    text = (tmp_path / "stderr").read_text()
    assert codes == [watchdog_module.HANG_EXIT_CODE]
    assert len(writes) == 1 and writes[0].decode() == text  # header and stacks: one write
    assert text.startswith("hang watchdog: rank 3 made no progress in iteration 5")
    assert "[rank 3]" in text and "in parked_in_a_named_function" in text


# --------------------------------------------------------------------------------------------
# single-process checks


def test_one_bad_config_reports_every_conflict_before_any_process_group(capsys):
    import torch

    from megatron_trillion.pretrain import main

    code = main(["--preset", "tiny-trinity", "--mock-data", "--train-iters", "4",
                 "--global-batch-size", "4", "--micro-batch-size", "3",
                 "--tensor-model-parallel-size", "3", "--expert-model-parallel-size", "3",
                 "--moe-router-topk", "9", "--make-vocab-size-divisible-by", "0",
                 "--seq-length", "250", "--context-parallel-size", "2",
                 "--lr-warmup-iters", "10", "--log-interval", "0", "--lang-beta", "xx=1.0",
                 "--hang-timeout-seconds", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert not torch.distributed.is_initialized()
    for expected in ("--moe-router-topk 9 must be in 1..--num-experts (8)",  # MoE sizes
                     "--num-experts (8) is not divisible by --expert-model-parallel-size (3)",
                     "--make-vocab-size-divisible-by must be >= 1",       # vocabulary
                     "--seq-length (250) must be divisible by 2 x --context-parallel-size",
                     "--global-batch-size (4) is not a multiple of --micro-batch-size (3)",
                     "--tensor-model-parallel-size (3)",                  # parallel sizes
                     "runs into the WSD decay stage",                     # schedule lengths
                     "--log-interval must be >= 1",
                     "--lang-beta names languages ['xx']",                # data blend
                     "--hang-timeout-seconds must be > 0"):
        assert expected in err, expected


def test_transformer_engine_attention_refuses_masked_modes_without_thd(monkeypatch):
    """The TE spec path (faked: no TE on CPU) wraps TE's core attention with the guard."""
    import sys
    import types

    import torch
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_trillion.models import specs

    class FakeTEDotProductAttention(torch.nn.Module):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, num_splits=None):
            return query

    def fake_te_spec(**kwargs):
        spec = gpt_layer_specs.get_gpt_layer_local_spec()
        spec.submodules.self_attention.submodules.core_attention = FakeTEDotProductAttention
        return spec

    monkeypatch.setitem(sys.modules, "megatron.core.extensions.transformer_engine",
                        types.SimpleNamespace(TENorm=torch.nn.LayerNorm))
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        fake_te_spec)
    config = types.SimpleNamespace(moe_grouped_gemm=False, qk_layernorm=False)
    q = torch.zeros(4, 1, 2, 8)
    thd = PackedSeqParams(qkv_format="thd")
    for masking in ("xlda", "document"):
        spec = specs._layer_spec(config, None, "transformer_engine", masking, False)
        attention = spec.submodules.self_attention.submodules.core_attention()
        assert isinstance(attention, FakeTEDotProductAttention)
        with pytest.raises(ValueError, match="block mask would be ignored"):
            attention(q, q, q, None, None)
        with pytest.raises(ValueError, match="qkv_format='sbhd'"):
            attention(q, q, q, None, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
        assert attention(q, q, q, None, None, packed_seq_params=thd) is q
    plain = specs._layer_spec(config, None, "transformer_engine", "none", False)
    assert plain.submodules.self_attention.submodules.core_attention is FakeTEDotProductAttention
