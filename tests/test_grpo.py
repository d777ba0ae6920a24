"""GRPO's arithmetic (posttraining.grpo) and the RLVR prompt reader (posttraining.rlvr_data)."""

import math
import re

import pytest
import torch

from megatron_trillion.errors import UserError
from megatron_trillion.posttraining.grpo import (
    GRPOLossConfig,
    collate_sequences,
    group_advantages,
    k3_kl,
    logprob_drift,
    pack_in_order,
    reduce_token_losses,
    token_losses,
    training_sequences,
)
from megatron_trillion.posttraining.rlvr_data import read_rlvr_prompts

# --------------------------------------------------------------------------------------------
# advantages


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_advantages_sum_to_zero_in_every_group(scale_by_std):
    rewards = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    rewards[2] = 0.5  # an equal group: dropped, all zeros
    out = group_advantages(rewards, scale_by_std=scale_by_std)
    assert out.dropped == 1 and out.kept.tolist() == [True, True, False, True, True, True]
    assert torch.allclose(out.advantages.sum(dim=1), torch.zeros(6), atol=1e-6)
    assert torch.equal(out.advantages[2], torch.zeros(8))
    expected = rewards[0] - rewards[0].mean()
    if scale_by_std:
        expected = expected / (rewards[0].std() + 1e-6)
    assert torch.allclose(out.advantages[0], expected, atol=1e-6)


def test_a_group_with_equal_rewards_contributes_no_gradient_even_with_a_kl_penalty():
    # Two prompts, three samples, two response tokens each; the policy's per-token logits are
    # parameters so the gradient reaching each group is visible.
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    advantages = group_advantages(rewards)
    assert advantages.dropped == 1
    responses = [[[5, 6], [5, 7], [5, 8]], [[4, 6], [4, 7], [4, 8]]]
    sampler = [[[-1.0, -1.0]] * 3] * 2
    sequences = training_sequences([[1, 2], [1, 3]], responses, sampler, advantages)
    assert [s.group for s in sequences] == [1, 1, 1]
    logits = torch.zeros(2, 3, 2, requires_grad=True)  # [group, sample, token]
    ref = torch.full((2,), -0.3)  # != the policy, so the KL term has a gradient
    config = GRPOLossConfig(kl_coeff=0.5)
    total = 0.0
    for k, seq in enumerate(sequences):
        logprobs = torch.nn.functional.logsigmoid(logits[seq.group, k])
        terms = token_losses(logprobs, logprobs.detach(), torch.full((2,), seq.advantage),
                             config, ref_logprobs=ref)
        loss_sum, count, _ = reduce_token_losses(terms, logprobs, torch.ones(2))
        total = total + loss_sum
    total.backward()
    assert torch.count_nonzero(logits.grad[0]) == 0
    assert torch.count_nonzero(logits.grad[1]) == 6


def test_policy_equal_to_reference_gives_ratio_exactly_one_and_kl_zero():
    logprobs = (-torch.rand(50, generator=torch.Generator().manual_seed(1)) * 5).requires_grad_()
    advantages = torch.randn(50, generator=torch.Generator().manual_seed(2))
    terms = token_losses(logprobs, logprobs.detach(), advantages, GRPOLossConfig(kl_coeff=0.01),
                         ref_logprobs=logprobs.detach().clone())
    assert torch.equal(terms.ratio, torch.ones(50))
    assert torch.equal(terms.kl, torch.zeros(50))
    assert not terms.clipped.any()
    loss_sum, count, report = reduce_token_losses(terms, logprobs, torch.ones(50))
    loss_sum.backward()
    # The plain policy gradient: d(-ratio * A)/d logp = -A at ratio 1; the KL's is 0 there.
    assert torch.allclose(logprobs.grad, -advantages)
    assert int(count) == 50 and float(report["kl"][0]) == 0.0


def test_clipped_loss_matches_a_hand_worked_example_on_both_sides():
    config = GRPOLossConfig(clip_low=0.2, clip_high=0.28)
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    old = torch.full((5,), -2.0)
    logprobs = (old + ratio.log()).requires_grad_()
    terms = token_losses(logprobs, old, advantages, config)
    # A > 0, ratio above 1 + 0.28: capped at 1.28 (clipped, no gradient);
    # A > 0, ratio 0.5: min(0.5, 0.8) = 0.5, the ratio's term;
    # A < 0, ratio below 1 - 0.2: min(-0.5, -0.8) = -0.8 (clipped, no gradient);
    # A < 0, ratio 1.5: min(-1.5, -1.28) = -1.5, the ratio's term (no upper clip for A < 0);
    # inside the band: -2.2.
    assert torch.allclose(terms.policy, torch.tensor([-1.28, -0.5, 0.8, 1.5, -2.2]))
    assert terms.clipped.tolist() == [True, False, True, False, False]
    loss_sum, count, report = reduce_token_losses(terms, logprobs, torch.ones(5))
    assert math.isclose(loss_sum.item() / int(count), -1.68 / 5, rel_tol=1e-6)
    assert math.isclose(float(report["clip fraction"][0]), 2.0)
    loss_sum.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([0.0, -0.5, 0.0, 1.5, -2.2]))


def test_token_level_normalisation_returns_sums_over_the_masked_tokens():
    logprobs = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    terms = token_losses(logprobs, logprobs, torch.tensor([1.0, 1.0, 1.0, -2.0]),
                         GRPOLossConfig())
    loss_sum, count, report = reduce_token_losses(terms, logprobs, mask)
    assert float(loss_sum) == pytest.approx(-1.0 - 1.0 + 2.0)
    assert int(count) == 3
    assert report["entropy"].tolist() == pytest.approx([7.0, 3.0])


def test_k3_kl_hand_value_and_non_negative():
    assert float(k3_kl(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25)))) == \
        pytest.approx(0.5 + math.log(2) - 1)
    a, b = torch.randn(100), torch.randn(100)
    assert (k3_kl(a, b) >= 0).all()


def test_truncated_importance_sampling_weights_the_policy_term_and_caps_it():
    config = GRPOLossConfig(truncated_is_cap=1.5)
    old = torch.tensor([-1.0, -1.0, -1.0])
    sampler = torch.tensor([-1.0, -1.0 - math.log(2), -1.0 + math.log(2)])
    advantages = torch.ones(3)
    terms = token_losses(old.clone(), old, advantages, config, sampler_logprobs=sampler)
    assert terms.is_weight.tolist() == pytest.approx([1.0, 1.5, 0.5])
    assert terms.loss.tolist() == pytest.approx([-1.0, -1.5, -0.5])
    with pytest.raises(ValueError, match="sampler"):
        token_losses(old, old, advantages, config)


def test_kl_needs_a_reference_and_config_problems_are_named():
    with pytest.raises(ValueError, match="reference"):
        token_losses(torch.zeros(2), torch.zeros(2), torch.ones(2), GRPOLossConfig(kl_coeff=0.1))
    problems = GRPOLossConfig(clip_low=1.2, clip_high=0, kl_coeff=-1,
                              truncated_is_cap=0.5).problems()
    assert len(problems) == 4 and "--grpo-clip-low" in problems[0]


def test_drift_is_mean_and_max_absolute_difference_over_response_tokens():
    sampler = torch.tensor([-1.0, -2.0, -3.0, -9.0])
    trainer = torch.tensor([-1.5, -2.0, -2.0, 0.0])
    out = logprob_drift(sampler, trainer, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert out.tolist() == pytest.approx([1.5, 1.0, 3.0])


# --------------------------------------------------------------------------------------------
# rollouts -> micro-batches


def test_sequences_pack_in_order_and_collate_with_the_loss_on_response_labels():
    assert pack_in_order([3, 4, 2, 5, 1], capacity=7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="more than"):
        pack_in_order([8], capacity=7)
    advantages = group_advantages(torch.tensor([[1.0, 0.0]]))
    sequences = training_sequences([[10, 11, 12]], [[[20, 21], [22]]],
                                   [[[-0.1, -0.2], [-0.3]]], advantages)
    assert [len(s) for s in sequences] == [4, 3]
    batch = collate_sequences(sequences, capacity=9, pad_token=0)
    assert batch["tokens"].tolist() == [[10, 11, 12, 20, 10, 11, 12, 0, 0]]
    assert batch["labels"].tolist() == [[11, 12, 20, 21, 11, 12, 22, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 1, 0, 0]]
    assert batch["advantages"].tolist() == [[0, 0, 0.5, 0.5, 0, 0, -0.5, 0, 0]]
    assert batch["sampler_logprobs"][0].tolist() == pytest.approx(
        [0, 0, -0.1, -0.2, 0, 0, -0.3, 0, 0])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert batch["packed_seq_params"].cu_seqlens_q.tolist() == [0, 4, 7, 9]


# --------------------------------------------------------------------------------------------
# the RLVR reader


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_rlvr_prompts_in_both_layouts_with_the_system_prompt(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def words(response, truth):\n    return float(len(response.split()) == truth)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(tmp_path / "rl_en.jsonl", [
        '{"prompt": "2+3?", "ground_truth": "5", "verifier": "gsm8k"}',
        '',
        '{"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": '
        '"Write 3 words"}], "ground_truth": 3, "verifier": "my_rewards:words", "id": 7}',
    ])
    first, second = read_rlvr_prompts([(path, "en")])
    assert first.where == f"{path}:1" and second.where == f"{path}:3"
    assert first.conversation("Think.") == [{"role": "system", "content": "Think."},
                                            {"role": "user", "content": "2+3?"}]
    assert first.conversation() == [{"role": "user", "content": "2+3?"}]
    assert second.conversation("Think.")[0]["content"] == "Own."
    assert second.ground_truth == 3 and second.verifier == "my_rewards:words"
    assert second.language == "en" and second.record["id"] == 7
    # the rewards are the registry's verifiers
    from megatron_trillion.posttraining.scoring import verifier_score

    assert verifier_score(first, "2 + 3 = 5. The answer is 5.") == 1.0
    assert verifier_score(first, "The answer is 6.") == 0.0
    assert verifier_score(second, "one two three") == 1.0


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "x", "verifier": "gsm8k"}', 'no "ground_truth"'),
    ('{"prompt": "x", "ground_truth": null, "verifier": "gsm8k"}', 'no "ground_truth"'),
    ('{"prompt": "x", "ground_truth": "seven", "verifier": "gsm8k"}', "is not a number"),
    ('{"prompt": "x", "ground_truth": "1"}', '"verifier" must be'),
    ('{"prompt": "x", "ground_truth": "1", "verifier": "no_such_module_q:f"}', "cannot import"),
    ('{"prompt": "x", "ground_truth": "1", "verifier": "nope"}', "unknown verifier 'nope'"),
    ('{"ground_truth": "1", "verifier": "gsm8k"}', 'exactly one of "messages" and "prompt"'),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"ground_truth": "1", "verifier": "gsm8k"}', "last message is a assistant turn"),
    ('{"messages": [{"role": "bot", "content": "q"}], "ground_truth": "1", "verifier": "gsm8k"}',
     "unknown role 'bot'"),
    ('[1, 2]', "not a JSON object"),
    ('{"prompt": ', "not valid JSON"),
])
def test_bad_rlvr_lines_are_refused_naming_file_and_line(tmp_path, line, problem):
    good = '{"prompt": "q", "ground_truth": "1", "verifier": "gsm8k"}'
    path = _write(tmp_path / "rl.jsonl", [good, line])
    with pytest.raises(UserError, match=rf"rl\.jsonl:2: .*{re.escape(problem)}"):
        read_rlvr_prompts([(path, "en")])


def test_bad_utf8_and_empty_files_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "q", "ground_truth": "\xff", "verifier": "gsm8k"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: invalid UTF-8"):
        read_rlvr_prompts([(str(bad), "en")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no prompts"):
        read_rlvr_prompts([(str(empty), "en")])


# --------------------------------------------------------------------------------------------
# the trainer's passes on a tiny model (one process)


@pytest.fixture(scope="module")
def tiny_model():
    import dataclasses

    from megatron_trillion.models.config import build_model, build_transformer_config
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.platform.distributed import (
        destroy_distributed,
        initialize_single_process,
    )

    initialize_single_process()
    preset = dataclasses.replace(get_preset("tiny-tri-7b"), vocab_size=64)
    config = build_transformer_config(preset, None, hidden_dropout=0.0, attention_dropout=0.0)
    yield build_model(preset, config=config, attention_masking="document")
    destroy_distributed()


def _rollout_batch():
    advantages = group_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    sequences = training_sequences([[1, 2, 3]], [[[4, 5], [6, 7, 8], [9]]],
                                   [[[-1.0] * 2, [-1.0] * 3, [-1.0]]], advantages)
    return sequences, collate_sequences(sequences, 16, pad_token=0)


def test_packed_responses_score_as_if_alone_and_the_first_epoch_ratio_is_one(tiny_model):
    from megatron_trillion.posttraining.grpo_objective import (
        GRPO_LOSS,
        grpo_forward_step,
        grpo_metrics,
        report_fields,
        score_rollout_batches,
        sequence_logprobs,
    )

    sequences, batch = _rollout_batch()
    packed = sequence_logprobs(tiny_model, [batch])[0][0]
    at = 0
    for seq in sequences:
        alone = sequence_logprobs(tiny_model, [collate_sequences([seq], 16, 0)])[0][0]
        assert torch.allclose(packed[at:at + len(seq)], alone[:len(seq)], atol=1e-5)
        at += len(seq)
    # the drift against a sampler that said -1.0 for every response token
    mask = batch["loss_mask"][0].bool()
    drift = score_rollout_batches(tiny_model, [batch], None)
    expected = (packed[mask] + 1.0).abs()
    assert drift.tolist() == pytest.approx([float(expected.sum()), float(expected.max()), 6.0])

    fields = report_fields(["gsm8k"], ["en"])
    output, loss_func = grpo_forward_step(GRPOLossConfig(), fields, iter([batch]), tiny_model)
    loss_sum, count, report = loss_func(output)
    values = grpo_metrics(fields, report[GRPO_LOSS].tolist())
    assert values["ratio"] == 1.0 and values["clip fraction"] == 0.0 and int(count) == 6
    assert torch.equal(batch["old_logprobs"].reshape(-1), packed.detach())  # for epoch 2
    # sum of advantage * 1 over the response tokens: 2 * 2/3 - 4 * 1/3 = 0
    assert loss_sum.item() == pytest.approx(0.0, abs=1e-6)


def test_reference_weights_swap_in_and_back_bit_for_bit(tiny_model):
    from megatron_trillion.posttraining.grpo_objective import (
        ReferencePolicy,
        sequence_logprobs,
    )

    _, batch = _rollout_batch()
    start = [p.detach().clone() for p in tiny_model.parameters()]
    reference = ReferencePolicy(tiny_model)
    assert reference.host_bytes == sum(p.numel() * p.element_size() for p in start)
    at_start = sequence_logprobs(tiny_model, [batch])[0]
    try:
        with torch.no_grad():
            for p in tiny_model.parameters():
                p.add_(0.01)
        moved = [p.detach().clone() for p in tiny_model.parameters()]
        with reference.swapped_in():
            assert torch.equal(sequence_logprobs(tiny_model, [batch])[0], at_start)
        assert all(torch.equal(a, p) for a, p in zip(moved, tiny_model.parameters()))
    finally:
        with torch.no_grad():
            for p, s in zip(tiny_model.parameters(), start):
                p.copy_(s)


# --------------------------------------------------------------------------------------------
# rollouts from the generation engine on the training model


class _IdText:
    """A tokenizer stand-in: a response's text is its ids."""

    eod = 0

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_prompt_order_is_a_fresh_permutation_per_pass_and_depends_on_the_position_only():
    from megatron_trillion.posttraining.rollout import prompt_order

    first = [prompt_order(5, 7, p) for p in range(5)]
    second = [prompt_order(5, 7, p) for p in range(5, 10)]
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4] and first != second
    assert prompt_order(5, 7, 8) == second[3]


def test_a_rollout_step_samples_scores_and_matches_the_trainers_log_probabilities(tiny_model):
    from megatron_trillion.inference.engine import GenerationEngine
    from megatron_trillion.posttraining.grpo_objective import grpo_objective, report_fields
    from megatron_trillion.posttraining.rlvr_data import RLVRPrompt
    from megatron_trillion.posttraining.rollout import (
        GRPOBatches,
        RolloutConfig,
        _generating,
    )

    # The training model of a masked (document) run with an MTP head, as --grpo builds it.
    assert tiny_model.mtp_process
    with _generating(tiny_model) as generating:
        engine = GenerationEngine(generating.core, _IdText(), 64, eos_token_ids=(0,))
    prompts = [RLVRPrompt(({"role": "user", "content": c},), "x", "even", lang, f"f:{i}")
               for i, (c, lang) in enumerate([("a", "en"), ("b", "ko"), ("c", "ko")])]

    def even_first_token(prompt, text):
        return float(int(text.split()[0]) % 2 == 0)

    fields = report_fields(["even"], ["en", "ko"])
    source = GRPOBatches([tiny_model], engine, prompts, [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                         RolloutConfig(samples_per_prompt=4, max_new_tokens=6, seed=3),
                         even_first_token, fields, capacity=64, pad_token=0, epochs=2,
                         state={"prompts": "fp"})
    batches = source.for_step(0, 2)
    rollout = source.last_rollout
    assert tiny_model.training and tiny_model.mtp_process  # restored after sampling
    for result, prompt, rewards in zip(rollout.results, rollout.prompts, rollout.rewards):
        assert len(result.completions) == 4
        assert rewards.tolist() == [even_first_token(prompt, c.text)
                                    for c in result.completions]
    kept = rollout.advantages.kept_groups()
    response_tokens = sum(len(c.token_ids) for g in kept for c in rollout.results[g].completions)
    assert sum(float(b["loss_mask"].sum()) for b in batches) == response_tokens
    assert sorted(i for b in batches for i in b["indices"]) == sorted(kept)

    objective = grpo_objective(GRPOLossConfig(), fields)
    output, loss_func = objective.forward_step(iter(batches), tiny_model)
    _, _, report = loss_func(output)
    values = objective.values(report["grpo loss"].tolist())
    # On CPU in fp32 the engine's log-probabilities are the trainer's (KV cache vs packed).
    assert values["drift max"] < 1e-5 and values["ratio"] == 1.0
    assert values["reward"] == pytest.approx(float(rollout.rewards.mean()))
    assert values["dropped groups"] == rollout.advantages.dropped / 2
    assert values["response length max"] == max(len(c.token_ids) for r in rollout.results
                                                for c in r.completions)
    # The second epoch trains on the same rollout; its statistics are not counted twice.
    again = source.for_step(2, 2)
    assert again is batches and float(again[0]["rollout_report"].abs().sum()) == 0.0
    assert source.state_dict(4) == {"kind": "grpo", "consumed_samples": 4, "prompts": "fp"}


# --------------------------------------------------------------------------------------------
# flags


def test_grpo_flags_are_checked_up_front(tmp_path):
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.validation import ConfigError, validate

    prompts = _write(tmp_path / "rl_en.jsonl",
                     ['{"prompt": "q", "ground_truth": "1", "verifier": "gsm8k"}'])
    config = parse_args([
        "--grpo", "--data-path", "2", prompts, "--valid-data-path", prompts,
        "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--pipeline-model-parallel-size", "2", "--grpo-samples-per-prompt", "1",
        "--grpo-temperature", "0", "--grpo-clip-low", "1.5", "--train-iters", "2",
        "--grpo-epochs", "2", "--save-interval", "3",  # a save inside a rollout is fine
        "--system-prompt-file", str(tmp_path / "missing.txt")])
    assert config.kind == "grpo" and config.optimizer.weight_decay == 0.0  # GRPO's defaults
    with pytest.raises(ConfigError) as info:
        validate(config, get_preset("tiny-tri-7b"), 4, False)
    text = str(info.value)
    for expected in ("--pipeline-model-parallel-size 1", "drop --sequence-parallel",
                     "--grpo-samples-per-prompt must be >= 2", "--grpo-temperature must be > 0",
                     "--grpo-clip-low must lie in (0, 1)", "no validation loss",
                     "missing.txt: no such file", "files without weights"):
        assert expected in text, text
    assert "multiple of --grpo-epochs" not in text, text
    with pytest.raises(ConfigError, match="--grpo-kl-coeff, --grpo-epochs need --grpo"):
        validate(parse_args(["--mock-data", "--grpo-kl-coeff", "0.1", "--grpo-epochs", "2",
                             "--train-iters", "2"]), get_preset("tiny-tri-7b"), 1, False)
    assert parse_args(["--grpo", "--grpo-prompts-per-step", "6"]).batch.global_batch_size == 6
    with pytest.raises(UserError, match="differ"):
        parse_args(["--grpo", "--grpo-prompts-per-step", "6", "--global-batch-size", "8"])


def test_a_resume_inside_a_rollout_needs_its_layout_and_epochs(monkeypatch):
    from types import SimpleNamespace

    from megatron_trillion.posttraining import grpo_setup
    from megatron_trillion.posttraining.grpo_setup import rollout_epochs_done
    from megatron_trillion.training import checkpointing

    assert rollout_epochs_done(12, 4, 3) == 0  # after 3 steps: a rollout boundary
    assert rollout_epochs_done(16, 4, 3) == 1
    assert rollout_epochs_done(8, 4, 1) == 0
    monkeypatch.setattr(checkpointing, "rank_layout", lambda: [1, 1, 2])
    config = SimpleNamespace(grpo=SimpleNamespace(grpo_epochs=2),
                             checkpoint=SimpleNamespace(load="ckpt"))
    shape = SimpleNamespace(global_batch_size=4)

    def resume(epochs, consumed, layout):
        grpo_setup._resume_inside_rollout(
            config, shape, {"data": {"consumed_samples": consumed}, "rng_layout": layout,
                            "config": {"grpo_epochs": epochs}, "iteration": consumed // 4},
            batches=None, log=print)

    resume(2, 8, [1, 2, 1])  # a rollout boundary: nothing per rank to take back
    with pytest.raises(UserError, match=r"resume it at its layout \(PP, TP, DP\) \[1, 2, 1\], "
                                        r"not \[1, 1, 2\]"):
        resume(2, 4, [1, 2, 1])
    with pytest.raises(UserError, match="after epoch 2 of a rollout of 3 epochs: resume it with "
                                        "that --grpo-epochs, not 2"):
        resume(3, 8, [1, 1, 2])


def test_the_tri_7b_grpo_recipe_validates_at_its_world_size(tmp_path):
    import os
    import shlex
    import subprocess
    from pathlib import Path

    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import resolve_model_preset
    from megatron_trillion.training.validation import validate

    recipe = Path(__file__).resolve().parent.parent / "examples" / "tri_7b" / "grpo.sbatch"
    data, init = tmp_path / "data", tmp_path / "dpo"
    data.mkdir()
    (init / "iter_0000001").mkdir(parents=True)  # a --load to start from holds a checkpoint
    for name in ("rlvr_en.jsonl", "rlvr_ko.jsonl", "system_prompt.txt"):
        (data / name).write_text("x\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(recipe)], capture_output=True, text=True, timeout=60,
                            env={**env, "DRY_RUN": "1", "DATA_DIR": str(data),
                                 "INIT_CHECKPOINT": str(init),
                                 "CKPT_DIR": str(tmp_path / "ckpt"),
                                 "TOKENIZER": str(tmp_path / "tok")})
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip())
    flags = command[command.index("-m") + 2:]
    assert flags[flags.index("--load") + 1] == str(init) and "--finetune" in flags
    config = parse_args(flags)
    shape = validate(config, resolve_model_preset(config), 8, transformer_engine_available=True)
    assert config.kind == "grpo" and shape.global_batch_size == 48
    assert shape.parallel.tensor == 2 and shape.data_parallel_size == 4
