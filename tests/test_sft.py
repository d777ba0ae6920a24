"""Supervised fine-tuning (--sft): chat templates and loss masks against transformers, packing,
bad input, and (slow) the real entry point under TP2xPP2xDP2 vs one process, learning only the
responses, no cross-talk between packed conversations, and model merging across layouts."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from multiprocess import run_distributed

# ChatML with generation tags: transformers then reports its own assistant mask.
CHATML_WITH_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EDGE_CONVERSATIONS = [
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "  spaces around  "}],
    [{"role": "system", "content": "Be brief.\nReally."},
     {"role": "user", "content": "오늘 날씨는?"}, {"role": "assistant", "content": "맑음.\n"},
     {"role": "user", "content": "明日は？"}, {"role": "assistant", "content": "雨です。"},
     {"role": "user", "content": "trailing user turn"}],
]


def _write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A byte-level BPE trained by the project (ships a ChatML template with <|im_start|>/
    <|im_end|> special tokens) and a copy of it without any chat template."""
    from megatron_trillion.data.sample_corpus import write_sample_corpus
    from megatron_trillion.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    corpus = write_sample_corpus(root / "corpus.jsonl", docs_per_lang=60)
    own = root / "with_template"
    # padded for TP2, so the serial and the TP2 runs build the same vocabulary (768)
    train_tokenizer(TokenizerTrainingConfig(inputs=(str(corpus),), output_dir=str(own),
                                            vocab_size=600, heldout_docs=0,
                                            tensor_model_parallel_size=2))
    plain = root / "plain"
    shutil.copytree(own, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    template_file = root / "chatml.jinja"
    template_file.write_text(CHATML_WITH_GENERATION)
    return {"own": str(own), "plain": str(plain), "chatml_file": str(template_file)}


def _chat(tokenizer_dir: str, template_file=None):
    from megatron_trillion.data.chat_template import ChatFormat, resolve_chat_template
    from megatron_trillion.data.tokenizers import HuggingFaceTokenizer

    template, _ = resolve_chat_template(template_file, tokenizer_dir)
    return ChatFormat(template, HuggingFaceTokenizer(tokenizer_dir))


def _exported_tokenizer(chat, tokenizer_dir: str, directory: str):
    """The tokenizer as the HF export ships it, loaded by transformers."""
    from transformers import AutoTokenizer

    from megatron_trillion.convert.hf_files import copy_tokenizer_files
    from megatron_trillion.data.chat_template import write_chat_template

    os.makedirs(directory, exist_ok=True)
    copy_tokenizer_files({"tokenizer_type": "HuggingFaceTokenizer",
                          "tokenizer_model": tokenizer_dir}, directory)
    write_chat_template(directory, chat.template, chat.tokenizer)
    return AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize("case", ["default-template", "chat-template-file"])
def test_loss_mask_is_exactly_the_assistant_spans_of_transformers(tokenizers, tmp_path, case):
    from megatron_trillion.data.sample_corpus import iter_sample_conversations
    from megatron_trillion.data.sft import build_sft_dataset

    if case == "default-template":  # a tokenizer without a template: the built-in one
        chat = _chat(tokenizers["plain"])
        assert "<|assistant|>" in chat.template
    else:
        chat = _chat(tokenizers["own"], tokenizers["chatml_file"])
        assert chat.template == CHATML_WITH_GENERATION
    hf = _exported_tokenizer(chat, tokenizers["plain"], str(tmp_path / "hf"))
    records = list(iter_sample_conversations(60, seed=3)) + [
        {"messages": m} for m in EDGE_CONVERSATIONS]
    path = _write_jsonl(tmp_path / "chat_en.jsonl", records)

    expected = []
    for record in records:
        out = hf.apply_chat_template(record["messages"], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, flags = chat.encode(record["messages"])
        assert ids == list(out["input_ids"])
        assert flags == list(out["assistant_masks"]) and sum(flags) > 0
        expected.append((ids, flags))
    assert any(len(r["messages"]) >= 4 for r in records)  # multi-turn covered

    # In packed samples: each attention block is one whole conversation, and the loss falls on
    # exactly the positions whose label is an assistant token of transformers' mask.
    longest = max(len(ids) for ids, _ in expected)
    seq = 2 * longest
    dataset = build_sft_dataset([(None, path, "en")], chat, seq, 40, seed=5)
    source = dataset.sources[0]
    seen = []
    for index in range(source.num_bins):  # the first epoch: every packed sample once
        sample = dataset[index]
        _, conversations = dataset.conversations(index)
        cu = sample["cu_seqlens_blocks"].tolist()
        for c, start, end in zip(conversations.tolist(), cu[:-1], cu[1:]):
            ids, flags = expected[c]
            assert end - start == len(ids)
            assert sample["tokens"][start:end].tolist() == ids
            assert sample["labels"][start:end - 1].tolist() == ids[1:]
            assert sample["loss_mask"][start:end].tolist() == flags[1:] + [0]
            assert sample["position_ids"][start:end].tolist() == list(range(len(ids)))
            seen.append(c)
        if len(cu) - 1 > len(conversations):  # the padding tail: its own block, no loss
            assert sample["loss_mask"][cu[-2]:].sum() == 0
    assert sorted(seen) == list(range(len(records)))  # no conversation split or repeated
    filled = sum(len(ids) for ids, _ in expected) / (source.num_bins * seq)
    assert filled > 0.8, filled


def test_truncation_is_counted_and_error_policy_names_the_line(tokenizers, tmp_path):
    from megatron_trillion.data.sft import SFTDataError, build_sft_dataset

    chat = _chat(tokenizers["plain"])
    long_answer = " ".join(["river"] * 60)
    records = [
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "short"}]},
        {"messages": [{"role": "user", "content": "long please"},
                      {"role": "assistant", "content": long_answer}]},
        {"messages": [{"role": "user", "content": long_answer},
                      {"role": "assistant", "content": "prompt too long"}]},
    ]
    path = _write_jsonl(tmp_path / "chat_en.jsonl", records)
    seq = 32
    lines = []
    dataset = build_sft_dataset([(None, path, "en")], chat, seq, 4, log=lines.append)
    assert "1 truncated to --seq-length 32, 1 dropped" in lines[0]
    ids, flags = chat.encode(records[1]["messages"])
    found = False
    for index in range(len(dataset)):
        sample = dataset[index]
        _, conversations = dataset.conversations(index)
        if 1 in conversations.tolist():
            found = True
            assert conversations.tolist() == [1]  # the cut conversation fills the sample
            assert sample["tokens"].tolist() == ids[:seq]
            assert sample["labels"].tolist() == ids[1:seq + 1]  # its true continuation
            assert sample["loss_mask"].tolist() == flags[1:seq + 1]
    assert found
    with pytest.raises(SFTDataError, match=rf"{path}:2: the conversation has \d+ tokens"):
        build_sft_dataset([(None, path, "en")], chat, seq, 4, overlong="error")


def test_weighted_files_blend_by_whole_samples(tokenizers, tmp_path):
    from megatron_trillion.data.sample_corpus import iter_sample_conversations
    from megatron_trillion.data.sft import blend_order, build_sft_dataset, parse_sft_data_path

    source, local = blend_order([3.0, 1.0], 8)
    assert source.tolist() == [0, 0, 1, 0, 0, 0, 1, 0] and local.tolist() == [0, 1, 0, 2, 3, 4,
                                                                              1, 5]
    en = _write_jsonl(tmp_path / "chat_en.jsonl", iter_sample_conversations(30, 1,
                                                                            languages=("en",)))
    ko = _write_jsonl(tmp_path / "chat_ko.jsonl", iter_sample_conversations(30, 1,
                                                                            languages=("ko",)))
    entries = parse_sft_data_path(["0.75", en, "0.25", f"xx:{ko}"])
    assert [(s.weight, s.language) for s in entries] == [(0.75, "en"), (0.25, "xx")]
    dataset = build_sft_dataset(entries, _chat(tokenizers["own"]), 256, 40)
    from_ko = [dataset.conversations(i)[0] for i in range(len(dataset))].count(1)
    assert from_ko == 10  # a quarter of the samples, each from one file only
    with pytest.raises(ValueError, match="give a weight to every file or to none"):
        parse_sft_data_path(["0.5", en, ko])


def test_bad_lines_are_reported_by_file_and_line_and_nothing_is_cached(tokenizers, tmp_path):
    from megatron_trillion.data.sft import SFTDataError, build_sft_dataset

    chat = _chat(tokenizers["own"])
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "chat_en.jsonl"
    with open(path, "wb") as f:
        for record in (good, {"text": "no messages"},
                       {"messages": [{"role": "bot", "content": "x"}]},
                       {"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "  "}]}):
            f.write(json.dumps(record).encode() + b"\n")
        f.write(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
        f.write(b'{"messages": [\n')
        f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}).encode())
    cache = tmp_path / "cache"
    with pytest.raises(SFTDataError) as info:
        build_sft_dataset([(None, str(path), "en")], chat, 64, 4, cache_dir=str(cache))
    message = str(info.value)
    for line, problem in ((2, 'no "messages" field'), (3, "unknown role 'bot'"),
                          (4, "empty assistant turn"), (5, "invalid UTF-8 at byte"),
                          (6, "not valid JSON"), (7, "no assistant turn")):
        reported = [l for l in message.splitlines() if l.strip().startswith(f"{path}:{line}: ")]
        assert len(reported) == 1 and problem in reported[0], message
    assert f"{path}:1:" not in message
    assert not cache.exists() or not os.listdir(cache)  # nothing half-written


def test_sft_flags_are_validated_up_front(tokenizers, tmp_path):
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.validation import ConfigError, validate

    from megatron_trillion.models.presets import get_preset

    config = parse_args(["--sft", "--mock-data", "--attention-masking", "none",
                         "--tokenizer-type", "SentencePieceTokenizer",
                         "--chat-template", str(tmp_path / "missing.jinja"),
                         "--train-iters", "2"])
    with pytest.raises(ConfigError) as info:
        validate(config, get_preset("tiny-tri-7b"), 1, False)
    text = str(info.value)
    for expected in ("--mock-data has no conversations", "--tokenizer-type HuggingFaceTokenizer "
                     "or GPT2BPETokenizer", "--attention-masking none",
                     "missing.jinja: no such file"):
        assert expected in text, text
    config = parse_args(["--sft", "--data-path", str(tmp_path / "a.txt"), "--tokenizer-model",
                         tokenizers["own"], "--train-iters", "2"])
    with pytest.raises(ConfigError, match="reads chat JSONL files"):
        validate(config, get_preset("tiny-tri-7b"), 1, False)


def test_non_incremental_template_is_refused(tokenizers):
    from megatron_trillion.data.chat_template import ChatFormat, ChatTemplateError
    from megatron_trillion.data.tokenizers import HuggingFaceTokenizer

    # Renders only the last user turn: earlier renderings are not prefixes of the whole.
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' or loop.last %}"
                "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}")
    chat = ChatFormat(template, HuggingFaceTokenizer(tokenizers["own"]))
    with pytest.raises(ChatTemplateError, match="does not render conversations incrementally"):
        chat.encode(EDGE_CONVERSATIONS[1])


# --------------------------------------------------------------------------------------------
# the real entry point (slow)

SERIAL_STEPS = 20
PARALLEL_STEPS = 4


def _sft_argv(workdir: str, tokenizer: str, steps: int, save: str, *layout: str) -> list[str]:
    return [
        "--preset", "tiny-tri-7b", "--sft", "--tokenizer-model", tokenizer,
        "--data-path", os.path.join(workdir, "ok_en.jsonl"),
        "--valid-data-path", os.path.join(workdir, "valid_en.jsonl"),
        os.path.join(workdir, "valid_ko.jsonl"),
        "--data-cache-path", os.path.join(workdir, "cache"), "--seq-length", "128",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(steps),
        "--lr", "3e-3", "--lr-decay-style", "constant", "--lr-warmup-iters", "2",
        "--eval-interval", str(PARALLEL_STEPS), "--eval-iters", "1", "--seed", "7",
        "--no-progress-bar", "--save", save, *layout,
    ]


def _train(argv: list[str]) -> dict:
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    losses: list[float] = []
    lines: list[str] = []
    _, run = pretrain(parse_args(argv), log=lines.append,
                      on_step=lambda state, result: losses.append(result["lm loss"]))
    return {"losses": losses, "lines": lines, "run": run}


def _hf_tensors(directory: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(directory, name)))
    return tensors


def _serial_then_probe_and_merge(workdir: str, tokenizer: str, parallel_ckpt: str) -> dict:
    """One process: a bad-data run through main(), the serial SFT run, the leakage probe,
    chatting through the template, and merging the serial (TP1) with the TP2xPP2 checkpoint."""
    import torch

    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.convert.merge import merge_checkpoints
    from megatron_trillion.data.packed_batch import collate_packed
    from megatron_trillion.inference.engine import SamplingParams, load_engine
    from megatron_trillion.pretrain import main
    from megatron_trillion.training.checkpointing import CheckpointError

    out: dict = {}
    bad_save = os.path.join(workdir, "bad_ckpt")
    argv = _sft_argv(workdir, tokenizer, 2, bad_save)
    argv[argv.index("--data-path") + 1] = os.path.join(workdir, "bad_en.jsonl")
    out["bad_rc"] = main(argv)
    out["bad_saved"] = os.path.exists(bad_save) and sorted(os.listdir(bad_save))

    serial_ckpt = os.path.join(workdir, "serial")
    result = _train(_sft_argv(workdir, tokenizer, SERIAL_STEPS, serial_ckpt))
    out["losses"], out["lines"] = result["losses"], result["lines"]
    run = result["run"]

    # leakage probe: change the tokens of one conversation of a packed sample; the per-token
    # losses (every position, unmasked) of the other conversations must not move, its own must.
    model = run.model[0]
    model.eval()
    dataset = run.train_batches.dataset
    index = next(i for i in range(len(dataset)) if len(dataset.conversations(i)[1]) >= 2)
    sample = dataset[index]
    cu = sample["cu_seqlens_blocks"].tolist()

    def token_losses(tokens):
        batch = collate_packed([dict(sample, tokens=tokens)])
        with torch.no_grad():  # labels as well: the MTP block of the training model needs them
            return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                         packed_seq_params=batch["packed_seq_params"])[0]

    base = token_losses(sample["tokens"])
    probe = []
    for target in range(2):
        start, end = cu[target], cu[target + 1]
        changed = sample["tokens"].copy()
        changed[start:end] = (changed[start:end] + 17) % 600
        moved = (token_losses(changed) - base).abs()
        probe.append({"inside": float(moved[start:end].max()),
                      "outside": float(torch.cat([moved[:start], moved[end:]]).max())})
    out["probe"] = probe

    # chatting through the checkpoint's template (tools/generate.py --chat)
    engine, _, chat, _ = load_engine(serial_ckpt)
    prompt = chat.prompt_ids([{"role": "user", "content": "apple river song"}])
    (result,) = engine.generate([prompt], SamplingParams(
        max_new_tokens=8, stop_token_ids=tuple(chat.end_of_turn_ids())))
    out["answer"] = result.completions[0].text

    # merging across saved layouts: TP1 (serial) and TP2 x PP2 (parallel run)
    exports = {}
    for name, ckpt in (("serial", serial_ckpt), ("parallel", parallel_ckpt)):
        exports[name] = os.path.join(workdir, f"hf_{name}")
        export_checkpoint(ExportConfig(load=ckpt, save=exports[name], dtype="fp32"),
                          progress=False, log=lambda line: None)
    messages: list[str] = []
    for name, weights in (("mean", None), ("weighted", [3, 1])):
        merged = os.path.join(workdir, f"merged_{name}")
        merge_checkpoints([serial_ckpt, parallel_ckpt], merged, weights, log=messages.append)
        exports[name] = os.path.join(workdir, f"hf_{name}")
        export_checkpoint(ExportConfig(load=merged, save=exports[name], dtype="fp32"),
                          progress=False, log=lambda line: None)
    out["merge_log"] = messages
    tensors = {name: _hf_tensors(path) for name, path in exports.items()}
    errors = {}
    for name, (a, b) in (("mean", (0.5, 0.5)), ("weighted", (0.75, 0.25))):
        assert set(tensors[name]) == set(tensors["serial"]) == set(tensors["parallel"])
        errors[name] = max(float((tensors[name][k] - (a * tensors["serial"][k].double()
                                                       + b * tensors["parallel"][k].double())
                                  ).abs().max()) for k in tensors[name])
    out["merge_error"] = errors
    out["inputs_differ"] = max(float((tensors["serial"][k] - tensors["parallel"][k]).abs().max())
                               for k in tensors["serial"])
    out["hf_dirs"] = exports

    # refusals: another vocabulary, bad weights; nothing written
    _other_vocab_checkpoint(os.path.join(workdir, "other_vocab"))
    refusals = {}
    for name, call in (
        ("vocab", lambda: merge_checkpoints([serial_ckpt, os.path.join(workdir, "other_vocab")],
                                            os.path.join(workdir, "refused"))),
        ("count", lambda: merge_checkpoints([serial_ckpt, parallel_ckpt],
                                            os.path.join(workdir, "refused"), [1.0])),
        ("negative", lambda: merge_checkpoints([serial_ckpt, parallel_ckpt],
                                               os.path.join(workdir, "refused"), [1.5, -0.5])),
    ):
        try:
            call()
            refusals[name] = None
        except (CheckpointError, ValueError) as exc:
            refusals[name] = str(exc)
    out["refusals"] = refusals
    out["refused_written"] = os.path.exists(os.path.join(workdir, "refused"))
    return out


def _other_vocab_checkpoint(root: str) -> None:
    """A tiny-tri-7b checkpoint with another vocabulary size (for the merge refusal)."""
    import dataclasses

    from megatron_trillion.convert.importer import save_weights_only
    from megatron_trillion.models.config import build_model
    from megatron_trillion.models.presets import get_preset, model_signature

    preset = dataclasses.replace(get_preset("tiny-tri-7b"), vocab_size=640, seq_length=128)
    model = build_model(preset, attention_masking="none")
    save_weights_only(root, model, {"model": model_signature(preset), "config": {}})


def _parallel(argv: list[str]) -> dict:
    result = _train(argv)
    return {"losses": result["losses"], "lines": result["lines"]}


def _validation_values(lines: list[str], iteration: int) -> dict:
    line = next(l for l in lines if l.startswith(f" validation loss at iteration {iteration} |"))
    fields = [f.strip() for f in line.split("|")[1:] if " value: " in f]
    return {f.split(" value: ")[0]: float(f.split(" value: ")[1]) for f in fields}


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory, tokenizers):
    from megatron_trillion.data.sample_corpus import write_sample_conversations

    workdir = str(tmp_path_factory.mktemp("sft"))
    write_sample_conversations(os.path.join(workdir, "ok_en.jsonl"), 300, seed=1, kind="ok")
    write_sample_conversations(os.path.join(workdir, "valid_en.jsonl"), 20, seed=2, kind="ok")
    write_sample_conversations(os.path.join(workdir, "valid_ko.jsonl"), 20, seed=2,
                               languages=("ko",))
    with open(os.path.join(workdir, "bad_en.jsonl"), "w") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}, '
                '{"role": "assistant", "content": "hello"}]}\n{"prompt": "x"}\n')
    tokenizer = tokenizers["own"]
    parallel_ckpt = os.path.join(workdir, "parallel")
    parallel = run_distributed(
        _parallel, 8, timeout=900,
        argv=_sft_argv(workdir, tokenizer, PARALLEL_STEPS, parallel_ckpt,
                       "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                       "2", "--use-distributed-optimizer"))
    (serial,) = run_distributed(_serial_then_probe_and_merge, 1, timeout=600, workdir=workdir,
                                tokenizer=tokenizer, parallel_ckpt=parallel_ckpt)
    print(f"SFT figures: serial losses {serial['losses']}; parallel rank 0 "
          f"{parallel[0]['losses']}; probe {serial['probe']}; merge max error "
          f"{serial['merge_error']}; inputs differ by {serial['inputs_differ']:.3g}")
    return {"workdir": workdir, "parallel": parallel, "serial": serial, "tokenizer": tokenizer}


@pytest.mark.slow
def test_sft_tp2_pp2_dp2_matches_serial(sft_runs):
    serial = sft_runs["serial"]["losses"]
    for rank in sft_runs["parallel"]:
        np.testing.assert_allclose(rank["losses"], serial[:PARALLEL_STEPS], rtol=0, atol=1e-5)
    # per-language validation loss under both layouts (--eval-iters rounds of micro-batch x DP
    # samples: the two layouts evaluate different numbers of conversations)
    for lines in (sft_runs["serial"]["lines"], sft_runs["parallel"][0]["lines"]):
        values = _validation_values(lines, PARALLEL_STEPS)
        assert set(values) == {"lm loss", "lm loss [en]", "lm loss [ko]"}
        assert all(0 < v < 20 for v in values.values()), values
    assert any("SFT data en:" in line and "packed into" in line
               for line in sft_runs["serial"]["lines"])


@pytest.mark.slow
def test_sft_learns_the_responses_only(sft_runs):
    """Prompts are random words, every answer "OK": the logged loss (on answers) falls far
    below the floor any loss over all tokens has (the prompts' unpredictable entropy)."""
    from megatron_trillion.data.sample_corpus import RANDOM_PROMPT_WORDS

    chat = _chat(sft_runs["tokenizer"])
    entropy, positions = 0.0, 0
    with open(os.path.join(sft_runs["workdir"], "ok_en.jsonl")) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            ids, _ = chat.encode(messages)
            if len(ids) > 128:
                continue
            entropy += len(messages[0]["content"].split()) * math.log(len(RANDOM_PROMPT_WORDS))
            positions += len(ids) - 1  # every position with a label
    all_token_floor = entropy / positions
    losses = sft_runs["serial"]["losses"]
    assert all_token_floor > 0.5
    assert losses[-1] < 0.1 * all_token_floor, (losses, all_token_floor)
    assert sft_runs["serial"]["answer"] == "OK"  # tools/generate.py --chat's path


@pytest.mark.slow
def test_packed_conversations_do_not_attend_to_each_other(sft_runs):
    for probe in sft_runs["serial"]["probe"]:
        assert probe["outside"] == 0.0 and probe["inside"] > 1e-3, probe


@pytest.mark.slow
def test_bad_sft_data_stops_the_run_before_anything_is_written(sft_runs):
    serial = sft_runs["serial"]
    assert serial["bad_rc"] == 2
    assert not serial["bad_saved"]


@pytest.mark.slow
def test_merge_is_the_weighted_mean_across_layouts(sft_runs):
    from transformers import AutoTokenizer, GenerationConfig

    serial = sft_runs["serial"]
    assert serial["inputs_differ"] > 1e-3  # 20 vs 4 steps: a real average
    assert serial["merge_error"]["mean"] < 1e-6 and serial["merge_error"]["weighted"] < 1e-6
    assert any("--weights 3 1 sum to 4, not 1: normalised to 0.75 0.25" in line
               for line in serial["merge_log"])
    refusals = serial["refusals"]
    assert "vocab_size: 768 vs 640" in refusals["vocab"]
    assert "--weights has 1 values for 2 checkpoints" in refusals["count"]
    assert ">= 0" in refusals["negative"]
    assert not serial["refused_written"]
    # the export carries the chat template: transformers renders the training ids
    hf_dir = serial["hf_dirs"]["mean"]
    hf = AutoTokenizer.from_pretrained(hf_dir)
    chat = _chat(sft_runs["tokenizer"])
    messages = EDGE_CONVERSATIONS[1][:3]
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == \
        chat.encode(messages)[0]
    stop = GenerationConfig.from_pretrained(hf_dir).eos_token_id
    assert sorted(stop) == sorted(chat.end_of_turn_ids()) and len(stop) == 2
