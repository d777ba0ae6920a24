"""The generation engine (inference/engine.py) and tools/generate.py.

- sampling: on a fixed logit vector, temperature / top-k / top-p frequencies match the intended
  distribution (chi-square, fixed seed); bad sampling parameters are refused;
- one rank, on a checkpoint trained by the real entry point: greedy output equals transformers'
  ``generate`` on its HF export token for token (a batch of prompts of different lengths), the
  KV-cached and uncached paths give the same tokens, the returned log-probabilities equal a
  teacher-forced forward (fp32, <= 1e-5), sliding-window attention decodes through the cache,
  and tools/generate.py's flags, responses.jsonl and its user errors;
- two ranks at TP2: the same log-probability check, and the same samples as TP1 for one seed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from multiprocess import run_distributed

SEQ = 48
VOCAB = 1000   # padded to 1,024 rows at TP1 and TP2: the padded ids exist and are masked
PROMPTS = [[5, 17, 300, 2, 9, 11, 40, 41, 42, 43, 44], [7, 8], [100, 200, 300, 400, 500]]
SAMPLED = dict(max_new_tokens=14, temperature=1.0, top_p=0.9, top_k=50, num_samples=2, seed=3)


# ---------------------------------------------------------------------------------------------
# sampling on a fixed logit vector


LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -2.0])


def _intended(temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution the parameters describe, spelled out independently of the engine
    (LOGITS is sorted, so the top-k and the nucleus are prefixes)."""
    probs = torch.softmax(LOGITS.double() / temperature, dim=0)
    keep = len(LOGITS) if top_k == 0 else top_k
    probs[keep:] = 0
    probs /= probs.sum()
    if top_p < 1:
        mass, size = 0.0, 0
        while mass < top_p:
            mass += float(probs[size])
            size += 1
        probs[size:] = 0
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 4, 1.0), (1.4, 0, 0.7), (0.8, 6, 0.9)])
def test_sampling_frequencies_match_the_intended_distribution(temperature, top_k, top_p):
    from megatron_trillion.inference.engine import SamplingParams, sample_tokens

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = 20_000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_tokens(LOGITS.expand(draws, -1), params, uniforms)
    intended = _intended(temperature, top_k, top_p)
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    support = intended > 0
    assert counts[~support].sum() == 0                  # excluded tokens are never drawn
    expected = intended[support] * draws
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                            torch.tensor(chi2 / 2.0, dtype=torch.float64)))
    assert p_value > 1e-3, (chi2, dof, counts.tolist(), expected.tolist())
    # the returned log-probability is that of the distribution sampled from
    torch.testing.assert_close(logprobs.double().exp(), intended[tokens], rtol=1e-5, atol=1e-6)
    # the engine hands in the plain log-softmax it has; it is used only where it is the same
    plain = torch.log_softmax(LOGITS.expand(draws, -1), dim=-1)
    with_plain = sample_tokens(LOGITS.expand(draws, -1), params, uniforms, plain)
    assert torch.equal(with_plain[0], tokens) and torch.equal(with_plain[1], logprobs)


def test_greedy_is_the_argmax_with_a_point_mass():
    from megatron_trillion.inference.engine import SamplingParams, sample_tokens

    tokens, logprobs = sample_tokens(LOGITS.expand(3, -1), SamplingParams(), torch.rand(3))
    assert tokens.tolist() == [0, 0, 0] and logprobs.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("field,value,message", [
    ("max_new_tokens", -5, "max_new_tokens must be at least 1"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("temperature", -1.0, "temperature must be >= 0"),
    ("top_k", -1, "top_k must be >= 0"),
    ("num_samples", 0, "num_samples must be at least 1"),
    ("stop_strings", ("",), "a stop string is empty"),
])
def test_bad_sampling_parameters_are_refused(field, value, message):
    from megatron_trillion.errors import UserError
    from megatron_trillion.inference.engine import SamplingParams

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens", "-5"], "argument --max-new-tokens: must be at least 1, got -5"),
    (["--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0"),
])
def test_generate_refuses_bad_flags_before_loading(argv, message, capsys):
    from megatron_trillion.cli.generate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--load", "/nonexistent", "--prompt", "x", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# on a trained checkpoint


def _write_tokenizer(directory: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(directory, exist_ok=True)
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return directory


def _train_and_export(workdir: str, tokenizer: str) -> None:
    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    ckpt = os.path.join(workdir, "ckpt")
    pretrain(parse_args([
        "--preset", "tiny-tri-21b", "--mock-data", "--data-cache-path",
        os.path.join(workdir, "cache"), "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer, "--seq-length", str(SEQ), "--micro-batch-size", "2",
        "--global-batch-size", "2", "--lr", "2e-2", "--train-iters", "1", "--seed", "3",
        "--vocab-size", str(VOCAB),
        "--no-progress-bar", "--save", ckpt]), log=lambda line: None)
    export_checkpoint(ExportConfig(load=ckpt, save=os.path.join(workdir, "hf"), dtype="fp32"),
                      progress=False, log=lambda line: None)


def _teacher_forced_error(model, vocab: int, results) -> float:
    """Largest |engine logprob - log_softmax of a full forward over prompt + response|."""
    worst = 0.0
    for result in results:
        for completion in result.completions:
            sequence = torch.tensor([result.prompt_token_ids + completion.token_ids])
            with torch.no_grad():
                logits = model(sequence, torch.arange(sequence.size(1)).unsqueeze(0), None,
                               runtime_gather_output=True)[0, :, :vocab].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            start = len(result.prompt_token_ids) - 1
            forced = logprobs[start:start + len(completion.token_ids)].gather(
                1, torch.tensor(completion.token_ids).unsqueeze(1)).squeeze(1)
            worst = max(worst, (forced - torch.tensor(completion.logprobs)).abs().max().item())
    return worst


def _tokens(results) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.completions]


def _engine_checks(workdir: str, tensor: int) -> dict:
    from megatron_trillion.inference.engine import GenerationEngine, SamplingParams, load_engine
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    initialize_distributed(ParallelSizes(tensor=tensor), seed=1)
    engine, tokenizer, _, _ = load_engine(os.path.join(workdir, "ckpt"), log=lambda line: None)
    uncached = GenerationEngine(engine.model, tokenizer, engine.max_sequence_length,
                                kv_cache=False)
    out: dict = {"vocab": engine.vocab_size, "limit": engine.max_sequence_length}
    greedy = SamplingParams(max_new_tokens=16)
    sampled = SamplingParams(**SAMPLED)
    kept = {}
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        results = engine.generate(PROMPTS, params)
        kept[name] = results
        out[name] = _tokens(results)
        out[f"{name}_uncached_same"] = _tokens(uncached.generate(PROMPTS, params)) == out[name]
        out[f"{name}_logprob_error"] = _teacher_forced_error(engine.model, engine.vocab_size,
                                                             results)
        out[f"{name}_finish"] = [c.finish_reason for r in results for c in r.completions]
        out[f"{name}_sampled_logprobs"] = [c.sampled_logprobs for r in results
                                           for c in r.completions]
    # stops: a stop token is kept in the tokens (not the text), a stop string is cut
    full = engine.generate(PROMPTS[:1], greedy)[0].completions[0]
    stop_id = full.token_ids[3]
    word = tokenizer.decode([stop_id])
    by_token = engine.generate(PROMPTS[:1], SamplingParams(
        max_new_tokens=16, stop_token_ids=(stop_id,)))[0].completions[0]
    by_string = engine.generate(PROMPTS[:1], SamplingParams(
        max_new_tokens=16, stop_strings=(word,)))[0].completions[0]
    out["stops"] = {"full": full.token_ids, "full_text": full.text, "stop_id": stop_id,
                    "word": word, "by_token": by_token.token_ids, "by_token_text": by_token.text,
                    "by_token_finish": by_token.finish_reason, "by_string": by_string.token_ids,
                    "by_string_text": by_string.text,
                    "by_string_finish": by_string.finish_reason,
                    "by_string_decoded": tokenizer.decode(by_string.token_ids),
                    "before_stop_token": tokenizer.decode(
                        full.token_ids[:full.token_ids.index(stop_id)])}
    # a row's samples do not depend on the batch around it (nor on its left padding)
    one_by_one = GenerationEngine(engine.model, tokenizer, engine.max_sequence_length,
                                  max_batch_size=1)
    out["alone_same"] = _tokens(one_by_one.generate(PROMPTS, sampled)) == out["sampled"]
    # the position limit: a 40-token prompt gets the remaining 8 tokens
    long = engine.generate([list(range(1, 41))], SamplingParams(max_new_tokens=100))
    out["long"] = (len(long[0].completions[0].token_ids), long[0].completions[0].finish_reason)
    out["rope_lengths"] = _rope_lengths(engine)
    if tensor == 1:
        out["shortcuts_bitwise"] = _shortcuts_bitwise(engine)
        out["growth"] = _cache_growth(engine, out["greedy"], kept["sampled"])
    return out


def _cache_growth(engine, greedy_tokens, sampled_results) -> dict:
    """A cache that starts with room for 1 token past the prompts and doubles (several copies
    within 16 tokens) gives the tokens and log-probabilities of the default one (room for 64:
    no growth at this sequence length); the allocations it made, and one for a row that stops
    early."""
    from unittest import mock

    from megatron_trillion.inference.engine import SamplingParams
    from megatron_trillion.models.rotated_cache_attention import RotatedCacheSelfAttention

    lengths = []
    allocate = RotatedCacheSelfAttention._allocate_memory

    def recording(self, length, *args):
        if self.layer_number == 1:
            lengths.append(length)
        return allocate(self, length, *args)

    out = {}
    with mock.patch.object(RotatedCacheSelfAttention, "cache_room", 1), \
            mock.patch.object(RotatedCacheSelfAttention, "_allocate_memory", recording):
        out["greedy_same"] = _tokens(engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=16))) == greedy_tokens
        results = engine.generate(PROMPTS, SamplingParams(**SAMPLED))
        out["sampled_same"] = _tokens(results) == _tokens(sampled_results)
        out["logprob_difference"] = max(
            abs(a - b) for r, s in zip(results, sampled_results)
            for c, d in zip(r.completions, s.completions) for a, b in zip(c.logprobs, d.logprobs))
        lengths.clear()
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16))
        out["one_row_lengths"] = list(lengths)
    out["prompt"] = len(PROMPTS[0])
    return out


def _shortcuts_bitwise(engine) -> dict:
    """The engine's shortcuts give megatron-core's bits: the linears' no-autograd TP1 path (a
    forward without autograd against one recording it, which takes megatron-core's path), and
    the rotated cache's shared cos/sin RoPE against megatron-core's apply_rotary_pos_emb."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from unittest import mock

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    model = engine.model
    layer = model.decoder.layers[0]
    out = {"layers": len(model.decoder.layers), "classes": [type(m).__name__ for m in (
        layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
        layer.mlp.linear_fc1, layer.mlp.linear_fc2, model.output_layer)]}
    tokens = torch.tensor([PROMPTS[0]])
    positions = torch.arange(tokens.size(1)).unsqueeze(0)
    calls = []

    def counted(original):
        def forward(self, *args, **kwargs):
            calls.append(type(self).__name__)
            return original(self, *args, **kwargs)
        return forward

    # megatron-core's forwards, counted: none without autograd
    with mock.patch.object(ColumnParallelLinear, "forward",
                           counted(ColumnParallelLinear.forward)), \
            mock.patch.object(RowParallelLinear, "forward", counted(RowParallelLinear.forward)):
        with torch.no_grad():
            plain = model(tokens, positions, None, runtime_gather_output=True)
        out["megatron_calls_no_grad"] = len(calls)
        with torch.enable_grad():
            recorded = model(tokens, positions, None, runtime_gather_output=True)
        out["megatron_calls_grad"] = len(calls) - out["megatron_calls_no_grad"]
    out["linears"] = torch.equal(plain, recorded.detach())
    attention = layer.self_attention
    freqs = model.rotary_pos_emb(64)
    context = StaticInferenceContext(1, 64)
    gen = torch.Generator().manual_seed(0)
    same = []
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(5, 2, 3, freqs.size(-1), generator=gen).to(dtype)
        for start in (0, 7, 7):   # the second 7 reads the shared cos/sin
            same.append(torch.equal(attention._rotate(t, freqs, start, start + 5, context),
                                    apply_rotary_pos_emb(t, freqs[start:start + 5],
                                                         config=attention.config)))
    out["rope"] = same
    return out


def _rope_lengths(engine) -> list[int]:
    """The sequence lengths RoPE is applied to while a 5-token prompt generates 4 tokens: the
    prompt's at prefill, then 1 per decode step when the cache holds rotated keys (re-rotating
    the cache would show 6, 7, 8)."""
    from unittest import mock

    import megatron.core.transformer.attention as mcore_attention

    from megatron_trillion.inference.engine import SamplingParams
    from megatron_trillion.models import rotated_cache_attention

    lengths: set[int] = set()

    def recording(original, tensor_at=0):
        def apply(*args, **kwargs):
            lengths.add(args[tensor_at].shape[0])
            return original(*args, **kwargs)
        return apply

    attention = rotated_cache_attention.RotatedCacheSelfAttention
    with mock.patch.object(mcore_attention, "apply_rotary_pos_emb",
                           recording(mcore_attention.apply_rotary_pos_emb)), \
            mock.patch.object(rotated_cache_attention, "apply_rotary_pos_emb",
                              recording(rotated_cache_attention.apply_rotary_pos_emb)), \
            mock.patch.object(attention, "_rotate", recording(attention._rotate, 1)):
        engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4))
    return sorted(lengths)


def _sliding_window_checks() -> dict:
    """tiny-trinity (sliding window of 8 tokens on its local layers, MoE): cached decoding
    far past the window gives the uncached tokens."""
    from megatron_trillion.data.attention_blocks import MASKING_NONE
    from megatron_trillion.inference.engine import GenerationEngine, SamplingParams
    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.init import initialize_weights

    model = build_model("tiny-trinity", {"mtp_num_layers": 0, "vocab_size": VOCAB},
                        attention_masking=MASKING_NONE, hidden_dropout=0.0,
                        attention_dropout=0.0)
    initialize_weights([model], seed=5)
    model.eval()
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1)
    cached = GenerationEngine(model, None, 64, ()).generate(PROMPTS, params)
    uncached = GenerationEngine(model, None, 64, (), kv_cache=False).generate(PROMPTS, params)
    return {"same": _tokens(cached) == _tokens(uncached),
            "logprob_error": _teacher_forced_error(model, VOCAB, cached)}


def _hf_greedy(workdir: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "hf"),
                                              dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                    do_sample=False, eos_token_id=0, pad_token_id=0)
        out.append(generated[0, len(prompt):].tolist())
    return out


def _cli_checks(workdir: str) -> dict:
    import contextlib
    import io

    from megatron_trillion.cli.generate import main as generate_main

    messages: dict = {}

    def main(argv: list[str]) -> int:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            rc = generate_main(argv)
        messages[len(messages)] = stderr.getvalue()
        return rc

    ckpt = os.path.join(workdir, "ckpt")
    prompts = os.path.join(workdir, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"prompt": "w5 w17 w300", "id": "a"}) + "\n")
        f.write(json.dumps({"prompt": "w7", "id": "b"}) + "\n")
    output = os.path.join(workdir, "responses.jsonl")
    out = {"rc": main(["--load", ckpt, "--prompts-file", prompts, "--output", output,
                       "--num-samples", "2", "--temperature", "1.0", "--top-p", "0.9",
                       "--seed", "4", "--max-new-tokens", "100000"])}
    with open(output) as f:
        out["lines"] = [json.loads(line) for line in f]
    errors = {}
    for name, extra in {
        "empty": ["--prompt", " "],
        "too_long": ["--prompt", " ".join(["w3"] * SEQ)],
        "unknown_stop_token": ["--prompt", "w3", "--stop-token", "<|im_end|>"],
        "no_prompt": [],
    }.items():
        errors[name] = main(["--load", ckpt, "--output", os.path.join(workdir, name), *extra])
        errors[name + "_written"] = os.path.exists(os.path.join(workdir, name))
    out["errors"] = errors
    out["truncated_rc"] = main(["--load", ckpt, "--prompt", " ".join(["w3"] * SEQ),
                                "--truncate-prompts", "--max-new-tokens", "4",
                                "--no-progress-bar"])
    out["messages"] = list(messages.values())
    return out


def _single_rank(workdir: str) -> dict:
    tokenizer = _write_tokenizer(os.path.join(workdir, "tokenizer"))
    _train_and_export(workdir, tokenizer)
    from megatron_trillion.platform.distributed import destroy_distributed

    destroy_distributed()
    out = _engine_checks(workdir, tensor=1)
    out["hf_greedy"] = _hf_greedy(workdir)
    out["sliding_window"] = _sliding_window_checks()
    destroy_distributed()
    out["cli"] = _cli_checks(workdir)
    return out


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("generation"))
    (result,) = run_distributed(_single_rank, 1, timeout=600, workdir=workdir)
    return workdir, result


@pytest.mark.slow
def test_greedy_equals_transformers_generate_on_the_export(single_rank):
    _, r = single_rank
    assert r["vocab"] == VOCAB and r["limit"] == SEQ
    assert r["greedy"] == r["hf_greedy"]
    assert all(len(t) == 16 or t[-1] == 0 for t in r["greedy"])


@pytest.mark.slow
def test_decode_steps_rotate_only_the_new_keys(single_rank):
    _, r = single_rank
    assert r["rope_lengths"] == [1, len(PROMPTS[2])]


def test_shortcuts_give_megatron_cores_bits(single_rank):
    _, r = single_rank
    assert r["shortcuts_bitwise"]["classes"] == ["NoGradColumnParallelLinear",
                                                 "NoGradRowParallelLinear"] * 2 + \
        ["NoGradColumnParallelLinear"]
    assert r["shortcuts_bitwise"]["linears"]
    assert r["shortcuts_bitwise"]["megatron_calls_no_grad"] == 0
    assert r["shortcuts_bitwise"]["megatron_calls_grad"] == \
        4 * r["shortcuts_bitwise"]["layers"] + 1                   # + the output layer
    assert r["shortcuts_bitwise"]["rope"] == [True] * 6


def test_the_cache_grows_as_generation_goes(single_rank):
    _, r = single_rank
    growth = r["growth"]
    assert growth["greedy_same"] and growth["sampled_same"]
    assert growth["logprob_difference"] <= 1e-6
    # one row, 16 new tokens: room for the prompt + 1, then doubling, up to prompt + 16 (the
    # most this generation can hold), never the model's 48-token limit
    n = growth["prompt"]
    assert growth["one_row_lengths"] == [n + 1] * 2 + [2 * (n + 1)] * 2 + [n + 16] * 2  # K, V


def test_dropping_finished_rows_keeps_the_cache_layout():
    from megatron_trillion.inference.engine import _select_rows

    batch_major = torch.arange(3 * 2 * 5 * 4.0).reshape(3, 2, 5, 4).permute(2, 0, 1, 3)
    index = torch.tensor([0, 2])
    for memory in (batch_major, batch_major.contiguous()):   # [seq, batch, groups, d] views
        kept = _select_rows(memory, index)
        assert torch.equal(kept, memory[:, index])
        assert (kept.stride(1) > kept.stride(0)) == (memory.stride(1) > memory.stride(0))


@pytest.mark.slow
def test_cached_uncached_and_teacher_forced_agree(single_rank):
    _, r = single_rank
    for name in ("greedy", "sampled"):
        assert r[f"{name}_uncached_same"], name
        assert r[f"{name}_logprob_error"] <= 1e-5, (name, r[f"{name}_logprob_error"])
    assert all(0 <= t < VOCAB for tokens in r["sampled"] for t in tokens)
    assert len(r["sampled"]) == len(PROMPTS) * SAMPLED["num_samples"]
    assert r["sampled"][0] != r["sampled"][1]                   # two samples per prompt
    assert all(lp == 0.0 for lps in r["greedy_sampled_logprobs"] for lp in lps)
    assert all(lp <= 0.0 for lps in r["sampled_sampled_logprobs"] for lp in lps)
    assert r["alone_same"]
    stops = r["stops"]
    cut = stops["full"].index(stops["stop_id"]) + 1
    assert stops["by_token"] == stops["full"][:cut] and stops["by_token_finish"] == "stop"
    assert stops["by_token_text"] == stops["before_stop_token"]   # the stop token's text is out
    assert stops["by_string_finish"] == "stop"
    assert stops["by_string"] == stops["full"][:len(stops["by_string"])]
    assert stops["word"] in stops["by_string_decoded"] and stops["word"] not in \
        stops["by_string_text"]
    assert stops["full_text"].startswith(stops["by_string_text"])
    assert r["long"] == (SEQ - 40, "length")
    assert r["sliding_window"]["same"]
    assert r["sliding_window"]["logprob_error"] <= 1e-5


@pytest.mark.slow
def test_generate_tool(single_rank):
    _, r = single_rank
    cli = r["cli"]
    messages = cli["messages"]
    cap = f"note: --max-new-tokens 100000 is beyond the model's {SEQ}-token limit"
    assert cap in messages[0] and "generating" in messages[0]      # the cap, the progress bar
    assert [m.strip() for m in messages[1:5]] == [
        "error: --prompt number 1 is empty",
        f"error: prompt 1 has {SEQ} tokens: no room within the model's {SEQ}-token limit "
        "(--truncate-prompts keeps its end)",
        "error: --stop-token '<|im_end|>' is not a token of the vocabulary (--stop takes stop "
        "strings)",
        "error: no prompts: give --prompt or --prompts-file"]
    assert f"note: left-truncated 1 of 1 prompts to {SEQ - 4} tokens" in messages[5]
    assert cli["rc"] == 0 and cli["truncated_rc"] == 0
    assert [line["id"] for line in cli["lines"]] == ["a", "b"]
    first = cli["lines"][0]
    assert first["prompt"] == "w5 w17 w300" and first["prompt_token_ids"] == [5, 17, 300]
    assert len(first["responses"]) == 2
    for line in cli["lines"]:
        for response in line["responses"]:
            assert set(response) == {"text", "token_ids", "logprobs", "finish_reason"}
            assert len(response["logprobs"]) == len(response["token_ids"])
            # capped at the model's limit: prompt + response never exceed --seq-length
            assert len(line["prompt_token_ids"]) + len(response["token_ids"]) <= SEQ
            assert response["finish_reason"] in ("stop", "length")
    errors = cli["errors"]
    assert errors == {"empty": 2, "too_long": 2, "unknown_stop_token": 2, "no_prompt": 2,
                      "empty_written": False, "too_long_written": False,
                      "unknown_stop_token_written": False, "no_prompt_written": False}


# ---------------------------------------------------------------------------------------------
# tensor parallel


def _tp2_then_pp2(workdir: str) -> dict:
    from megatron.core import parallel_state

    from megatron_trillion.errors import UserError
    from megatron_trillion.inference.engine import load_engine
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed

    out = _engine_checks(workdir, tensor=2)
    parallel_state.destroy_model_parallel()
    initialize_distributed(ParallelSizes(pipeline=2), seed=1)
    try:
        load_engine(os.path.join(workdir, "ckpt"), log=lambda line: None)
    except UserError as exc:
        out["pp_error"] = str(exc)
    return out


@pytest.mark.slow
def test_tp2_logprobs_and_same_samples_as_tp1_and_pp_is_refused(single_rank):
    workdir, tp1 = single_rank
    ranks = run_distributed(_tp2_then_pp2, 2, timeout=600, workdir=workdir)
    for r in ranks:
        assert r["pp_error"].startswith("generation runs without pipeline parallelism")
        for name in ("greedy", "sampled"):
            assert r[f"{name}_uncached_same"], name
            assert r[f"{name}_logprob_error"] <= 1e-5, (name, r[f"{name}_logprob_error"])
            assert r[name] == tp1[name], name
