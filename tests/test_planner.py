"""The planner's weight / gradient / optimizer bytes vs what megatron-core allocates.

Tiny CPU models are built exactly as ``megatron_trillion.pretrain`` builds them (same flags,
same DDP and optimizer construction); the bytes of their parameters, DDP gradient buffers and
optimizer state (after one step, which creates the state) are compared with
``megatron_trillion.planning`` for the same flags. Activation formulas cannot be measured on
CPU (the local layer spec materialises attention scores that flash attention never stores);
their structure is tested instead.
"""

from __future__ import annotations

import pytest

from multiprocess import run_distributed

BASE = ["--mock-data", "--train-iters", "10", "--lr-warmup-iters", "1"]

# Every case runs on two gloo ranks (one spawn keeps the test short): without a sharding flag
# the two ranks are plain data-parallel replicas, i.e. the single-GPU case.
CASES = {
    "dense fp32 adam": ["--preset", "tiny-tri-7b"],
    "dense bf16 adam": ["--preset", "tiny-tri-7b", "--bf16"],
    "moe fp32 adam": ["--preset", "tiny-trinity"],
    "moe bf16 muon": ["--preset", "tiny-trinity", "--bf16", "--optimizer", "muon"],
    "DP2 distributed adam": ["--preset", "tiny-tri-7b", "--bf16", "--use-distributed-optimizer"],
    "TP2 SP distributed adam": ["--preset", "tiny-tri-21b", "--bf16",
                                "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                "--use-distributed-optimizer"],
    "PP2 (MTP on the last stage)": ["--preset", "tiny-tri-7b", "--bf16",
                                    "--pipeline-model-parallel-size", "2"],
    "EP2 distributed adam": ["--preset", "tiny-trinity", "--bf16", "--use-distributed-optimizer",
                             "--expert-model-parallel-size", "2"],
    "DP2 layer-wise muon": ["--preset", "tiny-trinity", "--bf16", "--optimizer", "muon",
                            "--use-distributed-optimizer"],
}


def _measure(flags: list) -> dict:
    """Bytes one rank holds for ``flags``, built the way pretrain builds a run."""
    import os

    import torch
    from megatron.core import parallel_state

    from megatron_trillion.platform.distributed import initialize_distributed
    from megatron_trillion.platform.warnings import quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import (
        build_model_chunks,
        build_optimizer,
        build_transformer_config,
        resolve_model_preset,
    )
    from megatron_trillion.training.validation import validate

    quiet_known_warnings()
    config = parse_args(flags)
    preset = resolve_model_preset(config)
    shape = validate(config, preset, int(os.environ["WORLD_SIZE"]), False)
    initialize_distributed(shape.parallel, seed=1, **preset.layout_dims())
    try:
        model = build_model_chunks(config, preset,
                                   build_transformer_config(config, preset, shape), shape)
        optimizer = build_optimizer(config, model)
        params = [p for chunk in model for p in chunk.module.parameters()]
        buffers = [b for chunk in model for b in list(chunk.buffers)
                   + list(chunk.expert_parallel_buffers)]
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
        optimizer.step()  # zero grads: creates every state tensor without changing weights
        # Tensors living in the model's own storage (fp32 shards of fp32 params) cost nothing.
        model_storage = {p.untyped_storage().data_ptr() for p in params}
        model_storage |= {b.param_data.untyped_storage().data_ptr() for b in buffers
                          if b.param_data is not None}
        seen, state = set(), 0
        for part in getattr(optimizer, "chained_optimizers", [optimizer]):
            torch_optimizer = part.optimizer
            tensors = [p for g in torch_optimizer.param_groups for p in g["params"]]
            tensors += [v for s in torch_optimizer.state.values() for v in s.values()]
            for t in tensors:
                if not torch.is_tensor(t) or t.dim() == 0:
                    continue  # Adam's step counters
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                if key[0] in model_storage or key in seen:
                    continue
                seen.add(key)
                state += t.numel() * t.element_size()
        return {"params": sum(p.numel() for p in params),
                "weights": sum(p.numel() * p.element_size() for p in params),
                "grads": grads, "optimizer": state,
                "stage": parallel_state.get_pipeline_model_parallel_rank()}
    finally:
        parallel_state.destroy_model_parallel()


def _measure_all(cases: dict) -> dict:
    return {name: _measure(flags + BASE) for name, flags in cases.items()}


def _planned(flags: list, world_size: int):
    from megatron_trillion.planning import plan_run
    from megatron_trillion.training.arguments import parse_args

    return plan_run(parse_args(flags + BASE), world_size)


def _check(name: str, flags: list, per_rank: list) -> None:
    plan = _planned(flags, len(per_rank))
    for rank, measured in enumerate(per_rank):
        stage = plan.stages[measured["stage"]]
        where = f"{name}, rank {rank}"
        assert measured["params"] == stage.params, where
        assert measured["weights"] == stage.weights, where
        # DDP pads its gradient buckets (to whole DP shards): never less, at most 1% more.
        assert stage.grads <= measured["grads"] <= 1.01 * stage.grads, (where, measured, stage)
    # The planner gives the most loaded rank of the data-parallel group.
    worst = max(m["optimizer"] for m in per_rank)
    stage = plan.stages[max(per_rank, key=lambda m: m["optimizer"])["stage"]]
    assert stage.optimizer * 0.99 <= worst <= stage.optimizer * 1.01, (name, worst, stage)


@pytest.mark.slow
def test_planned_bytes_match_megatron_core():
    measured = run_distributed(_measure_all, 2, cases=CASES)
    for name, flags in CASES.items():
        _check(name, flags, [rank[name] for rank in measured])
    # bf16 halves weights and adds an fp32 master copy: 2 + 4 + 12 bytes per parameter.
    dense = measured[0]["dense bf16 adam"]
    assert dense["weights"] * 9 == dense["weights"] + dense["grads"] + dense["optimizer"]
    # The shards really shrink what one rank holds.
    assert measured[0]["DP2 distributed adam"]["optimizer"] < 0.51 * dense["optimizer"]
    assert {rank["PP2 (MTP on the last stage)"]["stage"] for rank in measured} == {0, 1}


# --------------------------------------------------------------------------------------------
# activations and fit (no model built)


def _plan(*flags, world=256, **kwargs):
    from megatron_trillion.planning import plan_run
    from megatron_trillion.training.arguments import parse_args

    return plan_run(parse_args(list(flags) + ["--mock-data", "--train-iters", "10"]), world,
                    **kwargs)


def test_sequence_parallel_and_recompute_shrink_activations():
    base = ("--preset", "tri-7b", "--seq-length", "4096", "--bf16", "--tensor-model-parallel-size",
            "2", "--use-distributed-optimizer")
    plain = _plan(*base).stages[0].activations
    sp = _plan(*base, "--sequence-parallel").stages[0].activations
    full = _plan(*base, "--sequence-parallel", "--recompute-granularity", "full",
                 "--recompute-method", "uniform", "--recompute-num-layers", "1")
    assert sp < plain
    # What remains: each layer's input, one layer's backward, the logits of the loss.
    assert full.stages[0].activations < 0.4 * sp
    # Full recompute runs the decoder's forward twice: HFU/MFU between 1.2 and 4/3.
    ratio = full.throughput.hardware_flops_per_token / full.throughput.flops_per_token
    assert 1.2 < ratio < 4 / 3


def test_pipeline_stages_hold_fewer_microbatches_towards_the_end():
    plan = _plan("--preset", "tri-21b", "--bf16", "--tensor-model-parallel-size", "4",
                 "--pipeline-model-parallel-size", "4", "--sequence-parallel",
                 "--global-batch-size", "256", "--use-distributed-optimizer")
    assert [s.in_flight_microbatches for s in plan.stages] == [4, 3, 2, 1]
    assert plan.stages[0].activations > plan.stages[1].activations > plan.stages[2].activations
    interleaved = _plan("--preset", "tri-21b", "--bf16", "--tensor-model-parallel-size", "4",
                        "--pipeline-model-parallel-size", "4", "--sequence-parallel",
                        "--num-layers-per-virtual-pipeline-stage", "2",
                        "--global-batch-size", "256", "--use-distributed-optimizer")
    # megatron-core's interleaving penalty on the first stage: p (1 + (p - 1) / (p v)), with
    # v = 40 layers / (4 stages x 2 layers) = 5 virtual stages.
    assert interleaved.stages[0].in_flight_microbatches == pytest.approx(4 * (1 + 3 / 20))


def test_throughput_follows_the_flop_count():
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.training.flops import training_flops

    plan = _plan("--preset", "trillion-7b", "--bf16", "--global-batch-size", "512",
                 "--use-distributed-optimizer", mfu=0.425)
    t = plan.throughput
    assert t.step_flops == pytest.approx(512 * training_flops(get_preset("trillion-7b"),
                                                               [[4096]]))
    assert t.tokens_per_second == pytest.approx(0.425 * 989e12 * 256 / t.flops_per_token)
    assert t.step_seconds == pytest.approx(t.step_flops / (0.425 * 989e12 * 256))


def test_configs_over_80_gib_are_refused(tmp_path):
    from megatron_trillion.planning import DoesNotFitError, check_fits

    # Tri-21B on one GPU per replica: 18 bytes per parameter alone is ~370 GB.
    plan = _plan("--preset", "tri-21b", "--bf16")
    assert not plan.fits
    with pytest.raises(DoesNotFitError, match="--use-distributed-optimizer"):
        check_fits(plan)
    from megatron_trillion.cli.plan import main as plan_main

    assert plan_main(["--world-size", "256", "--preset", "tri-21b", "--bf16", "--mock-data",
                      "--train-iters", "10"]) == 1
    assert plan_main(["--world-size", "256", "--preset", "tiny-tri-7b", "--mock-data",
                      "--train-iters", "10"]) == 0


def test_plan_is_for_the_full_batch_and_says_what_the_rampup_does(capsys):
    from megatron_trillion.planning import format_plan, plan_run
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.model_flags import resolve_model
    from megatron_trillion.training.validation import validate

    run = ["--preset", "tri-7b", "--seq-length", "4096", "--bf16", "--mock-data",
           "--use-distributed-optimizer", "--global-batch-size", "512"]
    flags = run + ["--rampup-batch-size", "256", "256", "1000000",
                   "--train-samples", "488281250"]
    config = parse_args(flags)
    shape = validate(config, resolve_model(config.model), 256, transformer_engine_available=True)
    plan = plan_run(config, 256, shape=shape)
    assert plan.shape is shape and plan.global_batch_size == 512
    assert plan.microbatches_per_step == 2  # the full batch: 512 / (1 x DP 256)
    full = plan_run(parse_args(run + ["--train-samples", "488281250"]), 256)
    assert [s.total for s in plan.stages] == [s.total for s in full.stages]
    assert plan.throughput == full.throughput
    # 256 sequences per step until 1,000,000 samples are consumed: 3,907 steps.
    assert plan.rampup == (3907, 3907 * 256) and full.rampup == (0, 0)
    assert ("batch ramp-up: the global batch grows from 256 to 512 over the first 3,907 "
            "iterations (1,000,192 samples, 4.1B tokens, 0.20% of the run)") in format_plan(plan)
    assert "ramp-up" not in format_plan(full)

    from megatron_trillion.cli.plan import main as plan_main

    assert plan_main(["--world-size", "256"] + flags) == 0
    assert "grows from 256 to 512" in capsys.readouterr().out
    # As in pretrain: the ramp counts samples, so --train-iters is refused.
    assert plan_main(["--world-size", "256"] + flags[:-2] + ["--train-iters", "10"]) == 2
    assert "--rampup-batch-size counts samples" in capsys.readouterr().err
