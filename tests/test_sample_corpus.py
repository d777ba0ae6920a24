"""The deterministic sample corpus: reproducible, multilingual, varied, quality-correlated."""

import gzip
import json

import pytest

from megatron_trillion.data.sample_corpus import (
    LANGUAGES,
    iter_sample_documents,
    write_sample_corpus,
)
from megatron_trillion.data.sentence_split import split_sentences


def test_deterministic_and_seed_dependent(tmp_path):
    a = write_sample_corpus(tmp_path / "a.jsonl", docs_per_lang=20, seed=1).read_bytes()
    b = write_sample_corpus(tmp_path / "b.jsonl", docs_per_lang=20, seed=1).read_bytes()
    c = write_sample_corpus(tmp_path / "c.jsonl", docs_per_lang=20, seed=2).read_bytes()
    assert a == b and a != c


def test_fields_languages_scripts_and_gzip(tmp_path):
    path = write_sample_corpus(tmp_path / "s.jsonl.gz", docs_per_lang=30)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 90
    assert [r["lang"] for r in rows[:3]] == list(LANGUAGES)
    assert len({r["id"] for r in rows}) == 90
    for r in rows:
        assert set(r) == {"id", "text", "lang", "quality"}
        assert 0.0 <= r["quality"] <= 1.0 and r["text"].strip()
    hangul = lambda t: any("\uac00" <= ch <= "\ud7a3" for ch in t)  # noqa: E731
    kana = lambda t: any("\u3040" <= ch <= "\u30ff" for ch in t)  # noqa: E731
    assert all(hangul(r["text"]) for r in rows if r["lang"] == "ko")
    assert all(kana(r["text"]) for r in rows if r["lang"] == "ja")
    assert not any(hangul(r["text"]) or kana(r["text"]) for r in rows if r["lang"] == "en")


def test_varied_text_and_quality_correlates_with_repetition():
    docs = list(iter_sample_documents(150, seed=3))
    for lang in LANGUAGES:
        texts = [d.text for d in docs if d.lang == lang]
        assert len(set(texts)) == len(texts)
        sentences = {s for t in texts for s in split_sentences(t)}
        assert len(sentences) > 500  # enough material for BPE merges and a tiny LM

    def distinct_ratio(doc):
        units = doc.text.replace("。", "。\n").replace(". ", ".\n").split("\n")
        units = [u for u in units if u.strip()]
        return len(set(units)) / len(units)

    low = [distinct_ratio(d) for d in docs if d.quality < 0.3]
    high = [distinct_ratio(d) for d in docs if d.quality >= 0.3]
    assert sum(low) / len(low) < sum(high) / len(high) - 0.2


def test_rejects_unknown_language():
    with pytest.raises(ValueError, match="fr"):
        list(iter_sample_documents(1, languages=("en", "fr")))


def test_cli_names_the_file_it_wrote(tmp_path, capsys):
    from megatron_trillion.cli.make_sample_corpus import main

    for flags in (["--conversations", "3"], ["--docs-per-lang", "1"], ["--parallel-items", "2"]):
        path = tmp_path / f"{flags[0][2:]}.jsonl"
        assert main(["--output", str(path), *flags]) == 0
        assert capsys.readouterr().out == f"wrote {path}\n"


def test_language_conversations_answer_with_the_sentence_language():
    from megatron_trillion.data.sample_corpus import iter_sample_conversations

    records = list(iter_sample_conversations(6, seed=3, kind="language"))
    assert [r["lang"] for r in records] == ["en", "ko", "ja"] * 2
    names = {"en": "English", "ko": "Korean", "ja": "Japanese"}
    for record in records:
        user, assistant = record["messages"]
        assert user["content"].startswith("Which language is this? ")
        assert assistant == {"role": "assistant", "content": names[record["lang"]]}
    assert any("\uac00" <= c <= "\ud7a3" for c in records[1]["messages"][0]["content"])
