"""Tiny presets under TP2, PP2 (1F1B and interleaved), EP2 match one process (fp32, 1e-5).

tiny-trinity carries Trinity's training details: SMEBU expert-bias updates (bias and momentum
after the step are compared), the muP embedding scale and depth-scaled sandwich post-norms.

Both runs start from ``initialize_weights(seed)`` (layout-invariant initialisation, nothing
loaded from the other run), take the same global batch through megatron-core's
``forward_backward`` schedule, DDP and ``finalize_model_grads``, and compare the loss and every
full (gathered) gradient, plus the full initial weights themselves.

Two process launches in total: one single-process run computes every serial reference, one
two-rank run every parallel layout (megatron's parallel state is rebuilt between cases).
"""

from __future__ import annotations

import pytest
import torch

from multiprocess import run_distributed

SEED = 1234
MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 2, 2, 32

# name -> (preset, layout, TransformerConfig fields)
CASES = {
    "tp2_gqa": ("tiny-tri-21b", dict(tensor=2), {}),
    "pp2_1f1b_mtp": ("tiny-tri-7b", dict(pipeline=2), {}),
    "pp2_interleaved_mtp": ("tiny-tri-7b", dict(pipeline=2, virtual_pipeline=2), {}),
    "ep2_moe": ("tiny-trinity", dict(expert=2), {}),
    # megatron-core requires sequence parallelism for MoE with TP.
    "tp2_sp_moe": ("tiny-trinity", dict(tensor=2), dict(sequence_parallel=True)),
}


def _global_batch(vocab: int):
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ + 1), generator=gen)
    return [
        {
            "tokens": t[:, :-1].contiguous(),
            "labels": t[:, 1:].contiguous(),
            "loss_mask": torch.ones(MICRO_BATCH_SIZE, SEQ),
            "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH_SIZE, SEQ),
        }
        for t in tokens
    ]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   loss_mask=batch["loss_mask"])

    def loss_func(output_tensor):
        mask = batch["loss_mask"].reshape(-1)
        loss = (output_tensor.float().reshape(-1) * mask).sum() / mask.sum()
        # clone: the schedule divides the returned loss in place by the micro-batch count.
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def train_step(preset: str, layout: dict, config_kwargs: dict, seed: int = SEED) -> dict:
    """One forward/backward of the global batch on the current ranks under ``layout``.

    Returns full initial params, full grads (after finalize_model_grads) and the loss (mean
    over the global batch), identical on every rank.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.models.init import gather_full_tensors, initialize_weights
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed
    from megatron_trillion.training.expert_bias import finalize_grads_and_expert_bias

    parallel_state.destroy_model_parallel()
    sizes = ParallelSizes(**layout)
    initialize_distributed(sizes, seed=seed, **get_preset(preset).layout_dims())
    config = build_transformer_config(preset, **config_kwargs)
    vpp = sizes.virtual_pipeline or 1
    chunks = [build_model(preset, config=config, vp_stage=(v if vpp > 1 else None))
              for v in range(vpp)]
    initialize_weights(chunks, seed)
    params = gather_full_tensors(chunks, "param")
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c)
              for c in chunks]
    for c in chunks:
        c.zero_grad_buffer()

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    batch = _global_batch(get_preset(preset).vocab_size)[dp_rank::dp_size]
    iterators = [iter(list(batch)) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if vpp > 1 else iterators[0],
        model=chunks if vpp > 1 else chunks[0],
        num_microbatches=len(batch),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH_SIZE,
        forward_only=False,
    )
    # What pretrain schedules: megatron-core's finalize_model_grads with the model's expert-bias
    # rule (tiny-trinity: SMEBU, whose bias and momentum are compared below).
    finalize_grads_and_expert_bias(chunks)
    grads = gather_full_tensors(chunks, "main_grad")
    after = {k: v for k, v in gather_full_tensors(chunks, "param").items() if "expert_bias" in k}

    local = [float(d["lm loss"]) for d in losses] if losses else []
    everything = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everything, local)
    # Each micro-batch's loss is reported once per TP rank of a last stage: deduplicate by value.
    last_stage_losses = [x for ranks in everything for x in ranks]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    loss = sum(last_stage_losses) / len(last_stage_losses)
    assert len(last_stage_losses) == MICRO_BATCHES * tp, last_stage_losses
    return {"loss": loss, "params": params, "grads": grads, "expert_bias_after": after}


def _to_numpy(result: dict) -> dict:
    # torch tensors would travel through shared memory that dies with the worker process.
    return {k: ({n: t.numpy() for n, t in v.items()} if isinstance(v, dict) else v)
            for k, v in result.items()}


def _to_torch(result: dict) -> dict:
    return {k: ({n: torch.from_numpy(t) for n, t in v.items()} if isinstance(v, dict) else v)
            for k, v in result.items()}


def run_cases(cases: list) -> list:
    results = [_to_numpy(train_step(*case)) for case in cases]
    return results if torch.distributed.get_rank() == 0 else None


@pytest.fixture(scope="module")
def serial_results():
    presets = sorted({case[0] for case in CASES.values()})
    results = run_distributed(run_cases, 1, cases=[(p, {}, {}) for p in presets])[0]
    return {p: _to_torch(r) for p, r in zip(presets, results)}


@pytest.fixture(scope="module")
def parallel_results():
    names = list(CASES)
    results = run_distributed(run_cases, 2, cases=[CASES[n] for n in names])[0]
    return {n: _to_torch(r) for n, r in zip(names, results)}


def _assert_tensors_match(ref: dict, got: dict, what: str, atol: float = 1e-5) -> None:
    assert sorted(ref) == sorted(got), f"{what}: different keys"
    if not ref:
        return
    worst = max(((k, (ref[k] - got[k]).abs().max().item()) for k in ref), key=lambda kv: kv[1])
    print(f"{what}: max |diff| {worst[1]:.2e} ({worst[0]})")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=1e-5,
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_matches_serial(case, serial_results, parallel_results):
    preset = CASES[case][0]
    ref, got = serial_results[preset], parallel_results[case]
    # Same seed -> same full initial weights at this layout (exactly: same generators).
    for key in ref["params"]:
        assert torch.equal(ref["params"][key], got["params"][key]), key
    print(f"{case}: loss serial {ref['loss']:.7f} parallel {got['loss']:.7f}")
    assert abs(ref["loss"] - got["loss"]) <= 1e-5
    _assert_tensors_match(ref["grads"], got["grads"], f"{case} grads")
    _assert_tensors_match(ref["expert_bias_after"], got["expert_bias_after"],
                          f"{case} expert bias")
    if preset == "tiny-trinity":  # SMEBU moved bias and momentum (not a vacuous comparison)
        assert any("expert_bias_momentum" in k for k in ref["expert_bias_after"])
        assert all(v.abs().max() > 0 for v in ref["expert_bias_after"].values())
    # The comparison is not vacuous: the model learns something from this batch.
    assert max(g.abs().max().item() for g in ref["grads"].values()) > 1e-3
