"""Start-up data checks through the real entry point: truncated or mismatched .bin/.idx,
damaged headers, data of another tokenizer and out-of-range ids are refused before the first
step with one line naming the file and the cause; Megatron-LM-made data (no tokenizer record)
trains with a warning; export and generation warn when the tokenizer changed since training."""

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_trillion.data.sample_corpus import iter_sample_documents, write_sample_corpus
from multiprocess import run_distributed
from megatron_trillion.cli.preprocess_data import main as preprocess_main

LANGS = ("en", "ko")


def _train_tokenizer(out: Path, vocab_size: int, seed: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in iter_sample_documents(40, seed=seed)), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


def _preprocess(corpus: Path, tokenizer: Path, prefix: Path) -> dict:
    assert preprocess_main(["--input", str(corpus), "--tokenizer-type", "HuggingFaceTokenizer",
                            "--tokenizer-model", str(tokenizer), "--append-eod", "--lang-key",
                            "lang", "--output-prefix", str(prefix), "--no-progress"]) == 0
    return {lang: f"{prefix}_{lang}_text_document" for lang in LANGS}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tokenizers (600 and 400 tokens) and the same en/ko corpus preprocessed with each."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in iter_sample_documents(30, seed=3):
            if doc.lang in LANGS:
                f.write(doc.to_json() + "\n")
    big = _train_tokenizer(root / "tok600", 600, seed=1)
    small = _train_tokenizer(root / "tok400", 400, seed=2)
    return {"root": root, "big": big, "small": small,
            "data_big": _preprocess(corpus, big, root / "big"),
            "data_small": _preprocess(corpus, small, root / "small")}


def _argv(data: dict, tokenizer: Path, cache: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny-tri-7b", "--data-path", *data.values(),
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer),
            "--data-cache-path", str(cache), "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--lr-warmup-iters", "1",
            "--lr-wsd-decay-fraction", "0.5", "--no-progress-bar", *extra]


def _copy_dataset(prefix: str, to: Path, bin_from: str = None) -> str:
    to.mkdir(parents=True, exist_ok=True)
    target = str(to / os.path.basename(prefix))
    shutil.copy(prefix + ".idx", target + ".idx")
    shutil.copy((bin_from or prefix) + ".bin", target + ".bin")
    if os.path.exists(prefix + ".dataset.json") and bin_from is None:
        shutil.copy(prefix + ".dataset.json", target + ".dataset.json")
    return target


def _megatron_made(path: Path, docs: list, vocab: int = 600) -> str:
    """A dataset written by megatron-core's own builder (no tokenizer record)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(str(path) + ".idx")
    return str(path)


def _damage(world, case: str, tmp: Path) -> tuple[dict, Path, str, str]:
    """(data, tokenizer, the file the message must name, the cause it must state)."""
    data = dict(world["data_big"])
    en = data["en"]
    if case == "truncated bin":
        data["en"] = _copy_dataset(en, tmp)
        with open(data["en"] + ".bin", "r+b") as f:
            f.truncate(100)
        return data, world["big"], data["en"] + ".bin", "truncated"
    if case == "bin and idx of two datasets":
        data["en"] = _copy_dataset(en, tmp, bin_from=data["ko"])
        return data, world["big"], data["en"] + ".bin", "two different datasets"
    if case == "damaged idx header":
        data["en"] = _copy_dataset(en, tmp)
        with open(data["en"] + ".idx", "r+b") as f:
            f.seek(9)
            f.write(struct.pack("<Q", 7))  # index version 7
        return data, world["big"], data["en"] + ".idx", "header is damaged"
    if case == "data of a larger tokenizer":
        return data, world["small"], en, "vocabulary size 600 vs 400"
    if case == "data of a smaller tokenizer":
        data = dict(world["data_small"])
        return data, world["big"], data["en"], "vocabulary size 400 vs 600"
    if case == "same size, other tokenizer":
        other = _train_tokenizer(tmp / "tok600b", 600, seed=9)
        return data, other, en, "tokenizer content sha256"
    assert case == "token id out of range"
    data["en"] = _megatron_made(tmp / "made_en_text_document", [[5, 7, 650, 0]] * 3)
    return data, world["big"], data["en"] + ".bin", "token id 650"


CASES = ["truncated bin", "bin and idx of two datasets", "damaged idx header",
         "data of a larger tokenizer", "data of a smaller tokenizer",
         "same size, other tokenizer", "token id out of range"]


@pytest.mark.parametrize("case", CASES)
def test_startup_refuses_damaged_or_foreign_data_naming_file_and_cause(world, case, tmp_path,
                                                                        capsys):
    import torch

    from megatron_trillion.pretrain import main

    data, tokenizer, names, cause = _damage(world, case, tmp_path)
    code = main(_argv(data, tokenizer, tmp_path / "cache"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert not torch.distributed.is_initialized()  # refused before any process group
    line = next((l for l in err.splitlines() if names in l), None)
    assert line is not None, err
    assert cause in line and "--data-path" in line, line
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_every_rank_exits_on_a_truncated_bin(world, tmp_path):
    from megatron_trillion.pretrain import main

    data, tokenizer, _, _ = _damage(world, "truncated bin", tmp_path)
    codes = run_distributed(main, 2, timeout=300, argv=_argv(data, tokenizer, tmp_path / "c"))
    assert codes == [2, 2]


def test_unrecorded_megatron_data_trains_with_a_warning_and_tools_warn_on_tokenizer_drift(
        world, tmp_path):
    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    data = {lang: _copy_dataset(prefix, tmp_path / "made") for lang, prefix in
            world["data_big"].items()}
    for prefix in data.values():
        os.remove(prefix + ".dataset.json")  # as Megatron-LM's tool writes them
    tokenizer = tmp_path / "tok"
    shutil.copytree(world["big"], tokenizer)
    lines, losses = [], []
    ckpt = tmp_path / "ckpt"
    from megatron_trillion.inference.generate import load_for_inference
    from megatron_trillion.platform.distributed import (
        destroy_distributed,
        initialize_single_process,
    )

    try:
        pretrain(parse_args(_argv(data, tokenizer, tmp_path / "cache", "--save", str(ckpt))),
                 log=lines.append, on_step=lambda state, result: losses.append(result["lm loss"]))
    finally:
        destroy_distributed()
    warnings = [l for l in lines if "no .dataset.json record" in l]
    assert len(warnings) == 1 and "2 dataset(s)" in warnings[0], lines
    assert len(losses) == 2 and all(np.isfinite(losses))

    # The tokenizer file changes after training (same path): export and generation warn.
    # Two vocabulary entries swap ids: same size, other strings behind the ids.
    spec = json.loads((tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    initialize_single_process()
    try:
        exported, generated = [], []
        export_checkpoint(ExportConfig(load=str(ckpt), save=str(tmp_path / "hf")),
                          log=exported.append, progress=False)
        load_for_inference(str(ckpt), log=generated.append)
    finally:
        destroy_distributed()
    for logged in (exported, generated):
        assert any("WARNING" in l and "not the one this checkpoint was trained with" in l
                   and "tokenizer content sha256" in l for l in logged), logged


def test_verify_data_scans_every_token(world, tmp_path, capsys):
    from megatron_trillion.data.dataset_verify import check_training_datasets

    # one out-of-range id in a long dataset: the sample misses it, the full scan finds it
    docs = [[5, 6, 7, 0]] * 5000
    docs[2501] = [5, 599, 0]
    prefix = _megatron_made(tmp_path / "long_en_text_document", docs)
    sampled = check_training_datasets([("--data-path", prefix)], None, 400)
    full = check_training_datasets([("--data-path", prefix)], None, 400, full_scan=True)
    assert sampled.errors == [] and len(sampled.warnings) == 1
    assert len(full.errors) == 1 and "token id 599" in full.errors[0], full.errors


def test_preprocess_verify_checks_the_tokenizer_of_existing_outputs(world, capsys):
    prefix = str(world["root"] / "big")
    assert preprocess_main(["--verify", "--output-prefix", prefix]) == 0
    assert preprocess_main(["--verify", "--output-prefix", prefix, "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model",
                            str(world["big"])]) == 0
    capsys.readouterr()
    assert preprocess_main(["--verify", "--output-prefix", prefix, "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model",
                            str(world["small"])]) == 1
    out = capsys.readouterr().out
    assert "preprocessed with another tokenizer" in out and "600 vs 400" in out
