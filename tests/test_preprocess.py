"""tools/preprocess_data.py: Megatron-LM flags, token ids per document, language and quality
splits, bad input, atomic output, resume."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_trillion.data.preprocess import PreprocessConfig, preprocess
from megatron_trillion.data.sample_corpus import iter_sample_documents, write_sample_corpus
from megatron_trillion.data.sentence_split import split_sentences
from megatron_trillion.data.tokenizers import HuggingFaceTokenizer, TokenizerConfig
from megatron_trillion.cli.preprocess_data import main as preprocess_main


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer.json (+ tokenizer_config.json) trained on the sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((d.text for d in iter_sample_documents(60, seed=7)), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_sample_corpus(tmp_path_factory.mktemp("corpus") / "c.jsonl", docs_per_lang=40)


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _load(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)


def _docs(dataset) -> list[list[int]]:
    """Token ids per document (documents may span several sequences)."""
    doc_index = dataset.document_indices
    out = []
    for d in range(len(doc_index) - 1):
        seqs = [dataset[i].tolist() for i in range(doc_index[d], doc_index[d + 1])]
        out.append([t for s in seqs for t in s])
    return out


def _hf_args(tokenizer_dir):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir)]


def _outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".idx"))


def test_megatron_flags_give_megatron_names_and_per_document_ids(tmp_path, corpus, tokenizer_dir):
    prefix = tmp_path / "out"
    rc = preprocess_main([
        "--input", str(corpus), "--json-keys", "text", *_hf_args(tokenizer_dir),
        "--append-eod", "--output-prefix", str(prefix), "--workers", "2", "--partitions", "1",
        "--log-interval", "10", "--keep-sequential-samples", "--no-progress",
    ])
    assert rc == 0
    assert _outputs(tmp_path) == ["out_text_document.bin", "out_text_document.idx"]
    assert not (tmp_path / "out.preprocess-work").exists()
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    records = _read_jsonl(corpus)
    dataset = _load(str(prefix) + "_text_document")
    assert dataset.index.dtype == np.uint16  # vocab 1200 < 65500, as Megatron-LM chooses
    got = _docs(dataset)
    assert len(got) == len(records)
    # what Megatron-LM writes: encode(text) (no post-processor) + EOD, one sequence per doc
    expected = [tok.backend.encode(r["text"], add_special_tokens=False).ids + [tok.eod]
                for r in records]
    assert got == expected
    assert len(dataset.sequence_lengths) == len(records)
    summary = json.loads((tmp_path / "out_summary.json").read_text())
    assert summary["docs"] == len(records)
    assert summary["tokens"] == sum(map(len, expected))


def test_in_process_and_pool_agree_and_gzip_glob_order(tmp_path, tokenizer_dir):
    docs = list(iter_sample_documents(12, seed=3))
    for i, part in enumerate((docs[:20], docs[20:])):
        with gzip.open(tmp_path / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(d.to_json() for d in part) + "\n\n")  # trailing blank line
    results = []
    for workers in (1, 2):
        config = PreprocessConfig(
            inputs=(str(tmp_path / "part0.jsonl.gz"), str(tmp_path / "part1.jsonl.gz")),
            output_prefix=str(tmp_path / f"w{workers}"),
            tokenizer=TokenizerConfig("HuggingFaceTokenizer", str(tokenizer_dir)),
            workers=workers, chunk_bytes=2000,  # many small chunks through the pool
        )
        summary = preprocess(config)
        assert summary.docs == len(docs)
        results.append(_docs(_load(str(tmp_path / f"w{workers}_text_document"))))
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    assert results[0] == results[1] == [tok.encode(d.text) for d in docs]


def test_glob_input_and_several_json_keys(tmp_path, tokenizer_dir):
    for i in range(2):
        with open(tmp_path / f"in{i}.jsonl", "w", encoding="utf-8") as f:
            for j in range(5):
                f.write(json.dumps({"text": f"document {i} {j} text.", "title": f"T{i}{j}"}) + "\n")
    rc = preprocess_main([
        "--input", str(tmp_path / "in*.jsonl"), "--json-keys", "text", "title",
        *_hf_args(tokenizer_dir), "--output-prefix", str(tmp_path / "o"), "--no-progress",
    ])
    assert rc == 0
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    for key, make in (("text", lambda i, j: f"document {i} {j} text."),
                      ("title", lambda i, j: f"T{i}{j}")):
        got = _docs(_load(str(tmp_path / f"o_{key}_document")))
        assert got == [tok.encode(make(i, j)) for i in range(2) for j in range(5)]


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_writes_sentence_level(tmp_path, corpus, tokenizer_dir, keep_newlines):
    args = ["--input", str(corpus), *_hf_args(tokenizer_dir), "--split-sentences",
            "--append-eod", "--output-prefix", str(tmp_path / "s"), "--no-progress"]
    assert preprocess_main(args + (["--keep-newlines"] if keep_newlines else [])) == 0
    assert _outputs(tmp_path) == ["s_text_sentence.bin", "s_text_sentence.idx"]
    dataset = _load(str(tmp_path / "s_text_sentence"))
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    records = _read_jsonl(corpus)[:30]
    for d, record in enumerate(records):
        sentences = split_sentences(record["text"], keep_newlines=keep_newlines)
        seq_ids = [dataset[i].tolist()
                   for i in range(dataset.document_indices[d], dataset.document_indices[d + 1])]
        expected = [tok.encode(s) for s in sentences]
        expected[-1] = expected[-1] + [tok.eod]
        assert seq_ids == expected
        if keep_newlines:  # the sentences give back the whole document, newlines included
            assert "".join(sentences) == record["text"]


def test_language_and_quality_tiers(tmp_path, corpus, tokenizer_dir):
    prefix = tmp_path / "ml"
    rc = preprocess_main([
        "--input", str(corpus), *_hf_args(tokenizer_dir), "--append-eod", "--workers", "2",
        "--output-prefix", str(prefix), "--lang-key", "lang", "--quality-key", "quality",
        "--quality-tiers", "4", "--no-progress",
    ])
    assert rc == 0
    records = _read_jsonl(corpus)
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    summary = json.loads((tmp_path / "ml_summary.json").read_text())
    assert set(summary["languages"]) == {"en", "ko", "ja"}
    for lang in ("en", "ko", "ja"):
        mine = [r for r in records if r["lang"] == lang]
        stats = summary["languages"][lang]
        assert stats["docs"] == len(mine)
        assert stats["text_bytes"] == sum(len(r["text"].encode()) for r in mine)
        by_tier = []
        for tier in range(4):
            prefix_t = f"{prefix}_{lang}_tier{tier}_text_document"
            by_tier.append(_docs(_load(prefix_t)))
        # documents keep corpus order inside a tier; every document lands in exactly one tier
        encoded = {tuple(tok.encode(r["text"]) + [tok.eod]): r["quality"] for r in mine}
        all_docs = [tuple(d) for tier_docs in by_tier for d in tier_docs]
        assert sorted(all_docs) == sorted(encoded)
        assert stats["tokens"] == sum(map(len, all_docs))
        # tiers are ordered by score: every score in tier t >= every score in tier t+1
        scores = [[encoded[tuple(d)] for d in tier_docs] for tier_docs in by_tier]
        for better, worse in zip(scores, scores[1:]):
            assert min(better) >= max(worse)
        assert all(8 <= len(s) <= 12 for s in scores)  # quartiles of 40 distinct scores
        tier_entries = [d for d in summary["datasets"] if d["lang"] == lang]
        assert [d["docs"] for d in tier_entries] == [len(s) for s in scores]
        assert [d["top_fraction"] for d in tier_entries] == pytest.approx(
            np.cumsum([len(s) for s in scores]) / len(mine))
        assert sum(d["text_bytes"] for d in tier_entries) == stats["text_bytes"]
        assert len(summary["quality_cut_points"][lang]) == 3


def test_language_split_without_tiers_names(tmp_path, corpus, tokenizer_dir):
    assert preprocess_main([
        "--input", str(corpus), *_hf_args(tokenizer_dir), "--output-prefix", str(tmp_path / "x"),
        "--lang-key", "lang", "--no-progress",
    ]) == 0
    assert _outputs(tmp_path) == sorted(
        f"x_{lang}_text_document.{ext}" for lang in ("en", "ja", "ko") for ext in ("bin", "idx")
    )
    records = _read_jsonl(corpus)
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    got = _docs(_load(str(tmp_path / "x_ko_text_document")))
    assert got == [tok.encode(r["text"]) for r in records if r["lang"] == "ko"]


_BAD_LINES = {
    "malformed JSON": b'{"text": "unterminated\n',
    "missing key 'text'": b'{"body": "no text key"}\n',
    "invalid UTF-8": b'{"text": "bad \xff\xfe bytes"}\n',
    "empty document": b'{"text": "   "}\n',
}


@pytest.mark.parametrize("reason", sorted(_BAD_LINES))
def test_bad_line_fails_with_file_and_line_and_leaves_nothing(
    tmp_path, tokenizer_dir, capsys, reason
):
    good = b'{"text": "a good line."}\n'
    path = tmp_path / "in.jsonl"
    path.write_bytes(good * 3 + _BAD_LINES[reason] + good)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = preprocess_main(["--input", str(path), *_hf_args(tokenizer_dir),
                          "--output-prefix", str(out_dir / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert f"{path}:4:" in err and reason in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []  # no .bin/.idx, no work dir, no temporaries

    rc = preprocess_main(["--input", str(path), *_hf_args(tokenizer_dir), "--skip-bad-lines",
                          "--output-prefix", str(out_dir / "o"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "skipped 1 bad line" in out and f"{path}:4:" in out
    assert len(_load(str(out_dir / "o_text_document"))) == 4


def test_unreadable_input_and_bad_flags_exit_non_zero(tmp_path, tokenizer_dir, capsys):
    rc = preprocess_main(["--input", str(tmp_path / "missing.jsonl"), *_hf_args(tokenizer_dir),
                          "--output-prefix", str(tmp_path / "o")])
    assert rc != 0 and "missing.jsonl: no such file" in capsys.readouterr().err
    unreadable = tmp_path / "locked.jsonl"
    unreadable.write_text('{"text": "x"}\n')
    unreadable.chmod(0)
    try:
        if not os.access(unreadable, os.R_OK):  # root can read anything
            rc = preprocess_main(["--input", str(unreadable), *_hf_args(tokenizer_dir),
                                  "--output-prefix", str(tmp_path / "o")])
            assert rc != 0 and "cannot be read" in capsys.readouterr().err
    finally:
        unreadable.chmod(0o644)
    broken_gz = tmp_path / "broken.jsonl.gz"
    payload = "".join(json.dumps({"text": f"line {i} {i * i}"}) + "\n" for i in range(5000))
    compressed = gzip.compress(payload.encode())
    broken_gz.write_bytes(compressed[: len(compressed) // 2])  # truncated download
    rc = preprocess_main(["--input", str(broken_gz), *_hf_args(tokenizer_dir),
                          "--output-prefix", str(tmp_path / "o"), "--no-progress"])
    assert rc != 0 and "broken.jsonl.gz:" in capsys.readouterr().err
    rc = preprocess_main(["--input", str(unreadable), "--tokenizer-type", "SentencePieceTokenizer",
                          "--output-prefix", str(tmp_path / "o")])
    assert rc != 0 and "--tokenizer-model" in capsys.readouterr().err
    rc = preprocess_main(["--input", str(unreadable), *_hf_args(tokenizer_dir),
                          "--quality-tiers", "4", "--output-prefix", str(tmp_path / "o")])
    assert rc != 0 and "--quality-key" in capsys.readouterr().err
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["0 bytes", "blank lines"])
def test_an_input_without_documents_is_refused_unless_allowed(tmp_path, tokenizer_dir, capsys,
                                                              content):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(content)
    argv = ["--input", str(empty), *_hf_args(tokenizer_dir), "--output-prefix",
            str(tmp_path / "o"), "--no-progress"]
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty}: no documents (") and "--allow-empty-inputs" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # nothing written
    assert preprocess_main(argv + ["--allow-empty-inputs"]) == 0
    assert "0 documents" in capsys.readouterr().out


def test_unwritable_output_directory_and_json_messages(tmp_path, tokenizer_dir, capsys,
                                                       monkeypatch):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a good line."}\n{"text": "tab\tinside"}\n')
    argv = ["--input", str(path), *_hf_args(tokenizer_dir), "--output-prefix",
            str(tmp_path / "ro" / "o"), "--no-progress"]
    (tmp_path / "ro").mkdir()
    real_access = os.access
    # a read-only file system (root ignores permission bits, so access() is what is faked)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro")
                        else real_access(p, mode))
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --output-prefix {tmp_path / 'ro' / 'o'}: directory {tmp_path / 'ro'} "
                   "is not writable: a read-only file system or no permission\n")
    monkeypatch.undo()
    assert preprocess_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON (Invalid control character at column 14)" in err


_INTERRUPT = """
import os, signal, sys
from megatron_trillion.cli import preprocess_data as cli
real = cli.preprocess
def preprocess(config, progress):
    def hook(p):
        progress(p)
        if p.input_index == 1:  # the first input is finished, the second under way
            os.kill(os.getpid(), signal.SIGTERM)
    return real(config, progress=hook)
cli.preprocess = preprocess
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["Ctrl-C", "SIGTERM"])
def test_interrupted_run_says_how_to_resume_and_resumes(tmp_path, tokenizer_dir, capsys,
                                                        monkeypatch, how):
    """Ctrl-C in this process (as KeyboardInterrupt); SIGTERM, the signal a job's time limit
    sends, to a separate process (its default action would end this one)."""
    import subprocess
    import sys

    from megatron_trillion.cli import preprocess_data as cli

    docs = list(iter_sample_documents(4, seed=11))
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path, part in zip(inputs, (docs[:6], docs[6:])):
        path.write_text("".join(d.to_json() + "\n" for d in part), encoding="utf-8")
    prefix = tmp_path / "out" / "r"
    prefix.parent.mkdir()
    argv = ["--input", ",".join(map(str, inputs)), *_hf_args(tokenizer_dir),
            "--output-prefix", str(prefix), "--no-progress", "--workers", "2"]
    if how == "SIGTERM":
        run = subprocess.run([sys.executable, "-c", _INTERRUPT, *argv], capture_output=True,
                             text=True, timeout=300)
        status, err = run.returncode, run.stderr
    else:
        def preprocess(config, progress):
            def hook(p):
                progress(p)
                if p.input_index == 1:
                    raise KeyboardInterrupt
            return real(config, progress=hook)

        real = cli.preprocess
        monkeypatch.setattr(cli, "preprocess", preprocess)
        status, err = cli.main(argv), capsys.readouterr().err
        monkeypatch.undo()
    assert status == (130 if how == "Ctrl-C" else 143), err
    assert err.strip().splitlines() == [
        f"interrupted ({how}): 1 finished input(s) are kept in {prefix}.preprocess-work/; "
        "rerunning the same command resumes from them (remove that directory to start over)"]
    assert _outputs(prefix.parent) == []
    assert preprocess_main(argv) == 0
    assert "resumed 1 finished input(s)" in capsys.readouterr().out
    assert _load(str(prefix) + "_text_document").document_indices.size - 1 == len(docs)
    assert not (prefix.parent / "r.preprocess-work").exists()


def test_failure_keeps_old_outputs_and_resume_skips_finished_inputs(tmp_path, tokenizer_dir):
    docs = list(iter_sample_documents(5, seed=11))
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(d.to_json() + "\n" for d in docs[:8]), encoding="utf-8")
    second.write_text("".join(d.to_json() + "\n" for d in docs[8:]) + "{broken\n",
                      encoding="utf-8")
    prefix = tmp_path / "out" / "r"
    prefix.parent.mkdir()
    (prefix.parent / "r_text_document.bin").write_bytes(b"previous run")
    config = PreprocessConfig(
        inputs=(str(first), str(second)), output_prefix=str(prefix),
        tokenizer=TokenizerConfig("HuggingFaceTokenizer", str(tokenizer_dir)), append_eod=True,
    )
    with pytest.raises(ValueError, match=r"b\.jsonl:8: malformed JSON"):
        preprocess(config)
    # the earlier output is untouched, no .idx appeared, the finished input's shard is kept
    assert (prefix.parent / "r_text_document.bin").read_bytes() == b"previous run"
    assert _outputs(prefix.parent) == ["r_text_document.bin"]
    shards = sorted((prefix.parent / "r.preprocess-work").iterdir())
    assert len(shards) == 1 and (shards[0] / "done.json").is_file()

    second.write_text("".join(d.to_json() + "\n" for d in docs[8:]), encoding="utf-8")
    summary = preprocess(config)
    assert summary.resumed_inputs == 1
    tok = HuggingFaceTokenizer(str(tokenizer_dir))
    assert _docs(_load(str(prefix) + "_text_document")) == [
        tok.encode(d.text) + [tok.eod] for d in docs
    ]
    assert not (prefix.parent / "r.preprocess-work").exists()


def test_large_vocabulary_uses_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<|endoftext|>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "w1 w65535 w69999 w4"}) + "\n")
    assert preprocess_main(["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type",
                            "HuggingFaceTokenizer", "--tokenizer-model",
                            str(tmp_path / "tokenizer.json"), "--append-eod", "--output-prefix",
                            str(tmp_path / "big"), "--no-progress"]) == 0
    dataset = _load(str(tmp_path / "big_text_document"))
    assert dataset.index.dtype == np.int32
    assert dataset[0].tolist() == [1, 65535, 69999, 4, 70000]


def test_verify_reports_counts_duplicates_and_damage(tmp_path, tokenizer_dir, capsys):
    path = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": t}) for t in ("one doc.", "two docs.", "one doc.", "three.",
                                                "one doc.")]
    path.write_text("\n".join(lines) + "\n")
    prefix = tmp_path / "v"
    assert preprocess_main(["--input", str(path), *_hf_args(tokenizer_dir), "--append-eod",
                            "--output-prefix", str(prefix), "--no-progress"]) == 0
    capsys.readouterr()
    assert preprocess_main(["--verify", "--output-prefix", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "5 docs" in out and "2 exact-duplicate docs" in out and "all ok" in out
    assert "document 2 repeats document 0" in out and "document 4 repeats document 0" in out

    # a vocabulary above 65,535 needs int32: uint16 output is flagged
    assert preprocess_main(["--verify", "--output-prefix", str(prefix),
                            "--vocab-size", "128256"]) == 1
    assert "needs int32" in capsys.readouterr().out
    # a truncated .bin (e.g. a copy cut short) is caught by the index consistency check
    bin_path = Path(f"{prefix}_text_document.bin")
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    assert preprocess_main(["--verify", "--output-prefix", str(prefix)]) == 1
    assert "the index describes" in capsys.readouterr().out
    assert preprocess_main(["--verify", "--output-prefix", str(tmp_path / "none")]) == 2


_MEMORY_PROBE = r"""
import json, resource, sys
from megatron_trillion.data.preprocess import PreprocessConfig, preprocess
from megatron_trillion.data.tokenizers import TokenizerConfig
peaks = []
for path, prefix in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    config = PreprocessConfig(inputs=(path,), output_prefix=prefix,
                              tokenizer=TokenizerConfig("HuggingFaceTokenizer", sys.argv[5]),
                              workers=2, chunk_bytes=256 * 1024)
    docs = preprocess(config).docs
    peaks.append((docs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
print(json.dumps(peaks))
"""


def test_memory_stays_bounded_on_inputs_larger_than_the_limit(tmp_path):
    """Main-process peak memory may grow by at most LIMIT_MB however large the input; the big
    input is several times that limit, so reading it whole (or letting the reader run ahead of
    the workers) fails the test."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers

    limit_mb = 12
    vocab = {f"w{i}": i for i in range(1000)}
    vocab["<|endoftext|>"] = 1000
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # cheap tokens: the test is about memory
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(1000)])
    line = json.dumps({"text": " ".join(rng.choice(words, 4000))}) + "\n"  # ~19.5 KB per doc
    copies = {"small": 20, "big": 2600}  # big: ~51 MB, over 4x the limit
    for name, count in copies.items():
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write(line * count)
    assert copies["big"] * len(line) / 1e6 > 4 * limit_mb
    # small first: its peak is the baseline (imports, worker pool); big may add only LIMIT_MB
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "small.jsonl"), str(tmp_path / "s"),
         str(tmp_path / "big.jsonl"), str(tmp_path / "b"), str(tmp_path / "tokenizer.json")],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )
    (small_docs, small_kb), (big_docs, big_kb) = json.loads(result.stdout.strip().splitlines()[-1])
    assert (small_docs, big_docs) == (copies["small"], copies["big"])
    growth_mb = (big_kb - small_kb) / 1024
    assert growth_mb < limit_mb, f"peak memory grew {growth_mb:.0f} MB for a ~51 MB input"


def test_accepted_flags_are_pinned():
    """Megatron-LM's preprocess_data.py flags are all accepted; changes here are on purpose."""
    from megatron_trillion.cli.preprocess_data import build_parser

    flags = {s for a in build_parser()._actions for s in a.option_strings}
    megatron_lm = {"--input", "--json-keys", "--split-sentences", "--keep-newlines", "--lang",
                   "--tokenizer-type", "--tokenizer-model", "--vocab-file", "--merge-file",
                   "--append-eod", "--output-prefix", "--workers", "--partitions",
                   "--log-interval", "--keep-sequential-samples",
                   "--tokenizer-hf-include-special-tokens"}
    ours = {"--lang-key", "--quality-key", "--quality-tiers", "--skip-bad-lines",
            "--keep-work-dir", "--no-progress", "--verify", "--vocab-size",
            "--allow-empty-inputs"}
    assert flags == megatron_lm | ours | {"-h", "--help"}
