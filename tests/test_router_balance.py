"""Router expert-bias rules (megatron-core's sign rule vs SMEBU) and routing-health statistics.

Single process, no model: the rules are driven by a synthetic skewed routing stream with
Trinity Large's routing shape (256 experts, top-4, sigmoid scores + bias). Measured (seed 0,
1,024 tokens per step, 600 steps; MaxVio starts at 41.3 with 88 experts idle; the last three
columns over the last 150 steps):

| rule                            | no expert empty from step | MaxVio (mean) | MaxVio step-to-step change | mean bias step |
|---------------------------------|---------------------------|---------------|----------------------------|----------------|
| sign, rate 1e-3 (megatron-core) | 177                       | 0.219         | 0.063                      | 5.3e-4         |
| SMEBU, 5e-4 / 0.5 / 2 (Trinity) | 445                       | 0.177         | 0.034                      | 4.4e-5         |

SMEBU's step is bounded by its rate (5e-4, half the sign rule's 1e-3), so it clears the initial
skew later; once balanced it sits lower, oscillates about half as much and moves the bias
twelve times less per step.
"""

from __future__ import annotations

import pytest
import torch

from megatron_trillion.models.router_balance import (
    ExpertBiasUpdate,
    empty_experts,
    max_violation,
    smebu_step,
)

EXPERTS, TOPK, TOKENS, STEPS, TAIL = 256, 4, 1024, 600, 150


def _sign_step(counts, bias, rate):
    # megatron-core's moe_utils.get_updated_expert_bias without its all-reduce.
    return bias + rate * torch.sign(counts.mean(-1, keepdim=True) - counts)


def _route(style: str, update: ExpertBiasUpdate, seed: int = 0) -> dict:
    """Route a fixed skewed token set every step (expert preferences shared by all tokens plus
    per-token noise), update the bias from the counts, and record the routing health."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.sigmoid(torch.randn(EXPERTS, generator=gen)
                           + torch.randn(TOKENS, EXPERTS, generator=gen))
    bias, momentum = torch.zeros(1, EXPERTS), torch.zeros(1, EXPERTS)
    vio, empty, moved = [], [], []
    for _ in range(STEPS):
        top = torch.topk(scores + bias, TOPK, dim=1).indices
        counts = torch.bincount(top.flatten(), minlength=EXPERTS).float()[None]
        vio.append(float(max_violation(counts)))
        empty.append(int(empty_experts(counts)))
        before = bias
        if style == "sign":
            bias = _sign_step(counts, bias, update.rate)
        else:
            bias, momentum = smebu_step(counts, bias, momentum, rate=update.rate,
                                        momentum_coeff=update.momentum,
                                        clamp_scale=update.clamp_scale)
        moved.append(float((bias - before).abs().mean()))
    tail = torch.tensor(vio[-TAIL:])
    last_empty = max((i for i, e in enumerate(empty) if e), default=-1)
    return {"first": vio[0], "empty_first": empty[0], "no_empty_from": last_empty + 1,
            "settled": tail.mean().item(), "oscillation": (tail[1:] - tail[:-1]).abs().mean().item(),
            "moved": sum(moved[-TAIL:]) / TAIL}


def test_smebu_settles_lower_and_oscillates_less_than_sign_256_experts_top4():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: threads only add contention
    try:
        sign = _route("sign", ExpertBiasUpdate("sign", 1e-3))
        smebu = _route("smebu", get_trinity_update())
    finally:
        torch.set_num_threads(threads)
    print(f"sign {sign}\nsmebu {smebu}")
    # Same stream: heavily skewed at the start (dozens of experts idle) ...
    assert sign["first"] == smebu["first"] > 10 and sign["empty_first"] > 30
    # ... both balance it: no expert empty after some step (SMEBU's steps are at most half
    # of sign's here, rate 5e-4 vs 1e-3, so it gets there later) ...
    assert sign["no_empty_from"] < smebu["no_empty_from"] < STEPS - TAIL
    # ... and then SMEBU sits lower (0.177 vs 0.219), oscillates about half as much (0.034 vs
    # 0.063) and moves the bias far less (4.4e-5 vs 5.3e-4 per step).
    assert smebu["settled"] < 0.9 * sign["settled"]
    assert smebu["oscillation"] < 0.6 * sign["oscillation"]
    assert smebu["moved"] < 0.2 * sign["moved"]


def get_trinity_update() -> ExpertBiasUpdate:
    from megatron_trillion.models.presets import get_preset

    update = get_preset("trinity-large").expert_bias_update()
    assert update == ExpertBiasUpdate("smebu", 5e-4, 0.5, 2.0)
    return update


def test_smebu_step_follows_the_rule():
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([[0.1, 0.0, 0.0, -0.1], [0.0] * 4, [0.2] * 4])
    momentum = torch.tensor([[0.0, 1e-3, 0.0, 0.0], [0.0] * 4, [0.0] * 4])
    new_bias, new_momentum = smebu_step(counts, bias, momentum, rate=0.01, momentum_coeff=0.5,
                                        clamp_scale=2.0)
    # Layer 0: mean 2 -> violations (2 - n) / 2 = [-2, 0, 1, 1].
    step = 0.01 * torch.tanh(2.0 * torch.tensor([-2.0, 0.0, 1.0, 1.0]))
    step = step - step.mean()
    expected_m = 0.5 * momentum[0] + 0.5 * step
    torch.testing.assert_close(new_momentum[0], expected_m)
    torch.testing.assert_close(new_bias[0], bias[0] + expected_m)
    # the overloaded expert goes down, the idle ones up; the step is mean-centred
    assert new_bias[0, 0] < bias[0, 0] and (new_bias[0, 2:] > bias[0, 2:]).all()
    assert abs(step.sum().item()) < 1e-9
    # balanced layer and a layer without tokens: no step
    assert torch.equal(new_bias[1:], bias[1:]) and torch.equal(new_momentum[1:], momentum[1:])
    # the violation is normalised: 10x the tokens, the same step
    again = smebu_step(10 * counts, bias, momentum, rate=0.01, momentum_coeff=0.5,
                       clamp_scale=2.0)
    torch.testing.assert_close(again[0], new_bias)


def test_routing_health_statistics():
    counts = torch.tensor([[4.0, 2.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0] * 4])
    assert max_violation(counts).tolist() == [1.0, 0.0, 0.0]
    assert empty_experts(counts).tolist() == [1, 0, 4]


class _Router(torch.nn.Module):
    def __init__(self, layer_number: int, experts: int) -> None:
        super().__init__()
        self.layer_number = layer_number
        self.register_buffer("expert_bias", torch.zeros(experts))


class _Model(torch.nn.Module):
    """The shape RoutingHealth reads: a config and routers with a layer number."""

    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(num_moe_experts=4, moe_router_enable_expert_bias=True,
                                      num_layers=3, mtp_num_layers=1)
        self.decoder = torch.nn.ModuleList([_Router(2, 4), _Router(3, 4)])
        self.mtp = torch.nn.Module()
        self.mtp.layers = torch.nn.ModuleList([_Router(3, 4)])  # megatron reuses numbers


def test_routing_health_per_layer_summary_and_empty_expert_warning():
    from megatron_trillion.training.expert_bias import RoutingHealth

    model = _Model()
    health = RoutingHealth([model], warn_after_steps=2)
    layer2, layer3, mtp = model.decoder[0], model.decoder[1], model.mtp.layers[0]
    stream = [([4, 2, 2, 0], [2, 2, 2, 2], [1, 1, 3, 3]),
              ([3, 3, 2, 0], [2, 2, 2, 2], [1, 1, 3, 3]),
              ([3, 3, 2, 0], [2, 2, 2, 2], [1, 1, 3, 3])]
    warnings = []
    for iteration, rows in enumerate(stream, start=1):
        for router, row in zip((layer2, layer3, mtp), rows):
            router.routed_tokens = torch.tensor(row, dtype=torch.float32)
        health.record()
        warnings.append(health.warnings(iteration))
    assert health.per_layer() == {
        "moe/max_vio/layer_2": 0.5, "moe/empty_experts/layer_2": 1.0,
        "moe/max_vio/layer_3": 0.0, "moe/empty_experts/layer_3": 0.0,
        "moe/max_vio/mtp_1": 0.5, "moe/empty_experts/mtp_1": 0.0}
    assert health.summary() == {"moe max vio": 0.5, "moe empty experts": 1.0}
    # expert 3 of layer 2 is empty at iterations 1, 2, 3: warned once, when it reaches 2 steps
    assert warnings[0] == [] and warnings[2] == []
    assert len(warnings[1]) == 1 and "layer 2" in warnings[1][0] and "[3]" in warnings[1][0]
    assert "for 2 or more consecutive steps (up to iteration 2)" in warnings[1][0]


def test_invalid_bias_update_settings_are_refused():
    from megatron_trillion.models.presets import resolve_preset

    with pytest.raises(ValueError, match="moe_router_bias_update_momentum"):
        resolve_preset("tiny-trinity", {"moe_router_bias_update_momentum": 1.0})
    with pytest.raises(ValueError, match="moe_router_bias_update_style"):
        resolve_preset("tiny-trinity", {"moe_router_bias_update_style": "adam"})
    with pytest.raises(ValueError, match="needs an MoE preset"):
        resolve_preset("tiny-tri-7b", {"moe_router_bias_update_style": "smebu"})
    with pytest.raises(ValueError, match="needs moe_router_enable_expert_bias"):
        resolve_preset("tiny-trinity", {"moe_router_enable_expert_bias": False})
    with pytest.raises(ValueError, match="sandwich_post_norm_init needs sandwich_norm"):
        resolve_preset("tiny-tri-7b", {"sandwich_post_norm_init": "inverse_depth"})


def test_bias_update_flags_reach_the_preset_and_stray_ones_are_refused():
    from megatron_trillion.errors import UserError
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import resolve_model_preset

    def preset(*argv):
        return resolve_model_preset(parse_args(["--mock-data", "--train-iters", "1", *argv]))

    smebu = preset("--preset", "tiny-trinity", "--moe-router-bias-update-momentum", "0.9",
                   "--moe-router-bias-update-rate", "1e-4")
    assert smebu.expert_bias_update() == ExpertBiasUpdate("smebu", 1e-4, 0.9, 2.0)
    with pytest.raises(UserError, match="--moe-router-bias-update-clamp-scale only applies to "
                       "--moe-router-bias-update-style smebu"):
        preset("--preset", "tiny-trinity", "--moe-router-bias-update-style", "sign",
               "--moe-router-bias-update-clamp-scale", "3")
    with pytest.raises(UserError, match="--moe-router-bias-update-rate is set but the model is "
                       "dense"):
        preset("--preset", "tiny-tri-7b", "--moe-router-bias-update-rate", "1e-4")


def test_routing_health_of_a_model_or_stage_without_moe_layers_is_empty():
    from megatron_trillion.training.expert_bias import RoutingHealth

    dense = _Model()
    dense.config.num_moe_experts = None
    health = RoutingHealth([dense])
    health.record()  # a dense model: nothing to collect, nothing to report
    assert (health.per_layer(), health.summary(), health.warnings(1)) == ({}, {}, [])

    stage = _Model()  # a pipeline stage whose routers did not run this step
    health = RoutingHealth([stage])
    health.record()
    assert (health.per_layer(), health.summary()) == ({}, {})


def test_the_bias_rule_can_change_at_a_resume(tmp_path, capsys):
    """A sign-rule checkpoint resumes under SMEBU (its momentum starts at zero, said once) and a
    SMEBU checkpoint resumes under the sign rule (the saved momentum is left unread)."""
    from megatron_trillion.pretrain import main

    ckpt = str(tmp_path / "ckpt")
    common = ["--preset", "tiny-trinity", "--seq-length", "64", "--mock-data",
              "--data-cache-path", str(tmp_path / "cache"), "--micro-batch-size", "2",
              "--global-batch-size", "2", "--lr", "1e-3", "--lr-decay-style", "constant",
              "--lr-decay-iters", "6", "--eval-iters", "0", "--no-progress-bar",
              "--save", ckpt, "--load", ckpt, "--save-interval", "2"]
    for iters, rule in ((2, "sign"), (4, "smebu"), (6, "sign")):
        assert main(common + ["--train-iters", str(iters),
                              "--moe-router-bias-update-style", rule]) == 0, rule
        out = capsys.readouterr().out
        assert f"saved checkpoint at iteration       {iters}" in out
        switched = "was trained with the 'sign' expert-bias rule: SMEBU's momentum starts at zero"
        assert (switched in out) == (rule == "smebu")
