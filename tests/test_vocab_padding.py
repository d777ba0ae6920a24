"""The vocabulary padded for TP is inert: the padded model is the unpadded one (one process).

The multi-process proof (TP2 x PP2 x DP2 with an 8,000-token vocabulary equals one process) is in
test_pretrain_parallel.py; checkpoints moving between paddings in test_checkpointing.py."""

from __future__ import annotations

from multiprocess import run_distributed

VOCAB = 8000


def _padded_against_unpadded() -> dict:
    import torch
    from megatron.core import tensor_parallel

    from megatron_trillion.inference.engine import GenerationEngine, SamplingParams
    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.init import initialize_weights
    from megatron_trillion.models.presets import resolve_preset
    from megatron_trillion.models.vocab import padded_vocab_size
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(), seed=1)
    preset = resolve_preset("tiny-tri-7b", {"vocab_size": VOCAB, "mtp_num_layers": 0})
    models = {}
    for divisible_by in (1, 128):  # 8,000 rows (no padding) and 8,064
        model = build_model(preset, make_vocab_size_divisible_by=divisible_by)
        initialize_weights([model], seed=5)
        models[divisible_by] = model
    plain, padded = models[1], models[128]

    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).unsqueeze(0).expand(2, 16)
    labels = torch.roll(tokens, -1, dims=1)
    out = {"rows": {k: m.embedding.word_embeddings.weight.shape[0] for k, m in models.items()},
           "padded_vocab_size": padded_vocab_size(VOCAB, 128, 2)}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        a, b = plain.get_parameter(name), padded.get_parameter(name)
        out[f"init_equal {name}"] = torch.equal(a, b[:VOCAB])
        out[f"padding_zero {name}"] = bool((b[VOCAB:] == 0).all())

    logits = {}
    for key, model in models.items():
        logits[key] = model(tokens, positions, None)
        loss = tensor_parallel.vocab_parallel_cross_entropy(
            logits[key].transpose(0, 1).contiguous().float(), labels.transpose(0, 1).contiguous()).mean()
        loss.backward()
    out["logits_diff"] = (logits[1] - logits[128][..., :VOCAB]).abs().max().item()
    out["padded_logits_masked"] = bool((logits[128][..., VOCAB:] == float("-inf")).all())
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        grad_a = plain.get_parameter(name).grad
        grad_b = padded.get_parameter(name).grad
        out[f"grad_diff {name}"] = (grad_a - grad_b[:VOCAB]).abs().max().item()
        out[f"padding_grad_zero {name}"] = bool((grad_b[VOCAB:] == 0).all())

    # Generation from a model that would prefer a padded id: it still emits only real ids.
    with torch.no_grad():
        padded.output_layer.weight[VOCAB:] = 10.0
    (result,) = GenerationEngine(padded.eval(), None, 16, ()).generate(
        [[5, 17, 300]], SamplingParams(max_new_tokens=4))
    out["generated"] = result.completions[0].token_ids
    return out


def test_padded_vocabulary_is_inert():
    (r,) = run_distributed(_padded_against_unpadded, 1, timeout=300)
    print(r)
    assert r["rows"] == {1: VOCAB, 128: 8064} and r["padded_vocab_size"] == 8192
    for key, value in r.items():
        if key.startswith(("init_equal", "padding_zero", "padding_grad_zero")):
            assert value is True, key
        if key.startswith(("grad_diff", "logits_diff")):
            assert value <= 1e-6, (key, value)
    assert r["padded_logits_masked"]
    assert len(r["generated"]) == 4 and all(0 <= t < VOCAB for t in r["generated"])
