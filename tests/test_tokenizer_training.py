"""tools/train_tokenizer.py: per-language budgets, fixed special ids, padding, outputs usable
by the Megatron tokenizer types, fertility."""

import json

import pytest

from megatron_trillion.data.sample_corpus import iter_sample_documents, write_sample_corpus
from megatron_trillion.data.tokenizer_training import (
    NUM_BYTES,
    NUM_SPECIAL_SLOTS,
    SPECIAL_TOKENS,
    TokenizerTrainingConfig,
    interleave_merges,
    parse_budgets,
    train_tokenizer,
)
from megatron_trillion.data.tokenizers import GPT2BPETokenizer, HuggingFaceTokenizer
from megatron_trillion.cli.train_tokenizer import main as train_main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_sample_corpus(tmp_path_factory.mktemp("c") / "c.jsonl", docs_per_lang=200)


def _config(corpus, out, **kwargs):
    return TokenizerTrainingConfig(inputs=(str(corpus),), output_dir=str(out), **kwargs)


def test_bigger_korean_budget_lowers_korean_fertility(tmp_path, corpus):
    small = train_tokenizer(_config(corpus, tmp_path / "s",
                                    budgets={"en": 500, "ko": 100, "ja": 300}))
    big = train_tokenizer(_config(corpus, tmp_path / "b",
                                  budgets={"en": 500, "ko": 900, "ja": 300}))
    fert = lambda r: {f.lang: f for f in r.fertility}  # noqa: E731
    assert fert(big)["ko"].tokens_per_char < 0.8 * fert(small)["ko"].tokens_per_char
    assert fert(big)["ko"].tokens_per_word < fert(small)["ko"].tokens_per_word
    # English had the same budget and text: its tokenization is unchanged
    assert fert(big)["en"].tokens == fert(small)["en"].tokens
    assert big.merges_per_language["ko"] > 5 * small.merges_per_language["ko"]


def test_layout_padding_special_ids_and_megatron_usable_files(tmp_path, corpus):
    out = tmp_path / "tok"
    result = train_tokenizer(_config(corpus, out, vocab_size=1500, budgets={"en": 500, "ko": 400},
                                     tensor_model_parallel_size=3))
    assert result.vocab_size % (128 * 3) == 0 and result.vocab_size >= 1500
    assert result.special_token_ids == {"pad": 0, "bos": 1, "eos": 2, "chat_start": 3,
                                        "chat_end": 4}
    # ja had no budget: it shares what --vocab-size leaves
    assert result.merges_per_language["ja"] > 0
    hf = HuggingFaceTokenizer(str(out))
    assert (hf.vocab_size, hf.eod, hf.bos, hf.pad) == (result.vocab_size, 2, 1, 0)
    gpt2 = GPT2BPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    assert gpt2.vocab_size == result.vocab_size and gpt2.eod == 2
    texts = [d.text for d in iter_sample_documents(10, seed=77)] + ["English, 한국어, 日本語 ✓ 🙂"]
    for text in texts:
        ids = hf.encode(text)
        assert hf.decode(ids) == text
        assert gpt2.encode(text) == ids
        assert max(ids) < NUM_SPECIAL_SLOTS + NUM_BYTES + result.learned_tokens
    # special tokens are atomic in text; byte tokens sit at fixed ids after the special slots
    assert hf.encode("<|im_start|>user")[0] == 3
    assert hf.backend.token_to_id("!") == NUM_SPECIAL_SLOTS + ord("!")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == SPECIAL_TOKENS["eos"] and "chat_template" in config


def test_training_is_deterministic(tmp_path, corpus):
    budgets = {"ko": 200, "en": 300}
    train_tokenizer(_config(corpus, tmp_path / "a", budgets=budgets, vocab_size=900))
    train_tokenizer(_config(corpus, tmp_path / "b", budgets=budgets, vocab_size=900))
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json").read_bytes()


def test_interleave_keeps_each_language_order_and_dedups():
    merges, contributed = interleave_merges({
        "en": [("t", "h"), ("th", "e"), ("1", "0")],
        "ko": [("1", "0"), ("a", "b")],
    })
    assert merges == [("t", "h"), ("1", "0"), ("th", "e"), ("a", "b")]
    assert contributed == {"en": 2, "ko": 2}


def test_cli_prints_fertility_and_errors(tmp_path, corpus, capsys):
    assert train_main(["--input", str(corpus), "--output-dir", str(tmp_path / "o"),
                       "--budget", "en=300", "ko=300", "ja=300", "--heldout-docs", "20"]) == 0
    out = capsys.readouterr().out
    assert "tokens/char" in out and "ko" in out and "special token ids: pad=0" in out
    assert train_main(["--input", str(corpus), "--output-dir", str(tmp_path / "o"),
                       "--budget", "en=300", "fr=10"]) == 2
    assert "fr" in capsys.readouterr().err
    assert train_main(["--input", str(corpus), "--output-dir", str(tmp_path / "o"),
                       "--budget", "en:300"]) == 2
    assert "LANG=TOKENS" in capsys.readouterr().err
    assert train_main(["--input", str(corpus), "--output-dir", str(tmp_path / "o"),
                       "--budget", "en=300"]) == 2  # ko, ja lack a budget and no --vocab-size
    assert "--vocab-size" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "lang": "en"}\n{"text": 5, "lang": "en"}\n')
    assert train_main(["--input", str(bad), "--output-dir", str(tmp_path / "o"),
                       "--vocab-size", "400"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--budget", "en=3000", "ko=3000", "--vocab-size", "1000"], "--vocab-size"),
    (["--budget", "en=300", "xx=300", "--vocab-size", "1000"], "xx"),
    (["--vocab-size", "400", "--input", "EMPTY"], "EMPTY"),
], ids=["budgets over the vocabulary", "unknown language", "empty input"])
def test_a_refused_input_leaves_no_output_directory(tmp_path, corpus, capsys, flags, message):
    (tmp_path / "EMPTY").write_text("")
    flags = [str(tmp_path / "EMPTY") if flag == "EMPTY" else flag for flag in flags]
    message = message.replace("EMPTY", str(tmp_path / "EMPTY"))
    out = tmp_path / "new" / "tokenizer"
    assert train_main(["--input", str(corpus), "--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err
    assert "Traceback" not in err and not out.exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path, corpus, capsys):
    (tmp_path / "o").write_text("a file")
    assert train_main(["--input", str(corpus), "--output-dir", str(tmp_path / "o"),
                       "--vocab-size", "400"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: --output-dir {tmp_path / 'o'} is a file, not a " \
                                   "directory" and "Traceback" not in err


def test_parse_budgets():
    assert parse_budgets(["en=100000", "ko=24552"]) == {"en": 100000, "ko": 24552}
    with pytest.raises(ValueError, match="twice"):
        parse_budgets(["en=1", "en=2"])


def test_sentencepiece_option(tmp_path, corpus):
    from megatron_trillion.data.tokenizers import SentencePieceTokenizer

    result = train_tokenizer(_config(corpus, tmp_path / "sp", model_type="sentencepiece",
                                     vocab_size=1000))
    assert result.vocab_size == 1024
    tok = SentencePieceTokenizer(str(tmp_path / "sp" / "tokenizer.model"))
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (1024, 2, 1, 0)
    assert {f.lang for f in result.fertility} == {"en", "ko", "ja"}
    with pytest.raises(ValueError, match="--budget works with --model bpe"):
        _config(corpus, tmp_path / "x", model_type="sentencepiece", budgets={"en": 10})
