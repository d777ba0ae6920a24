"""Tokenizer wrappers by Megatron-LM --tokenizer-type name: ids, EOD, vocab size, errors."""

import json

import pytest

from megatron_trillion.data.sample_corpus import iter_sample_documents
from megatron_trillion.data.tokenizer_training import bytes_to_unicode
from megatron_trillion.data.tokenizers import (
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TokenizerConfig,
    build_tokenizer,
)

TEXTS = [
    "Hello world! The  quick brown fox's 3.14 jumps.\n\nNew paragraph\twith tab.",
    "어제 산에 갔습니다. 정말 좋았어요!",
    "昨日は山へ行きました。「本当？」と聞いた。",
    "mixed 한국어 and 日本語 text <|endoftext|> after eod",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((d.text for d in iter_sample_documents(50, seed=5)), trainer)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out))  # vocab.json + merges.txt
    return out


def _reference_gpt2_bpe(text, encoder, ranks):
    """An independent pure-Python GPT-2 BPE (regex split, byte map, greedy lowest-rank merges)."""
    regex = pytest.importorskip("regex")  # \p{L} classes; installed with the dev extras
    pattern = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    byte_map = bytes_to_unicode()
    ids = []
    for piece in pattern.findall(text):
        word = [byte_map[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in
                     enumerate(zip(word, word[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            word = word[:i] + [word[i] + word[i + 1]] + word[i + 2:]
        ids.extend(encoder[w] for w in word)
    return ids


def test_gpt2_bpe_matches_reference_implementation(bpe_dir):
    tok = GPT2BPETokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))
    encoder = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in
              (bpe_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    ranks = {pair: r for r, pair in enumerate(merges)}
    texts = TEXTS[:3] + [d.text for d in iter_sample_documents(5, seed=99)]
    for text in texts:
        assert tok.encode(text) == _reference_gpt2_bpe(text, encoder, ranks)
    assert tok.eod == encoder["<|endoftext|>"]
    assert tok.vocab_size == len(encoder)
    # <|endoftext|> inside text is the EOD (as megatron-core's HF-backed GPT2 tokenizer)
    assert tok.eod in tok.encode("a <|endoftext|> b")


def test_huggingface_tokenizer_ids_eod_and_batch(bpe_dir):
    tok = HuggingFaceTokenizer(str(bpe_dir / "tokenizer.json"))
    backend = tok.backend
    assert tok.eod == backend.token_to_id("<|endoftext|>")
    assert tok.vocab_size == backend.get_vocab_size(with_added_tokens=True)
    for text in TEXTS:
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    # a directory works too and tokenizer_config.json decides the EOS
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "a"}}))
    try:
        assert HuggingFaceTokenizer(str(bpe_dir)).eod == backend.token_to_id("a")
    finally:
        (bpe_dir / "tokenizer_config.json").unlink()


def test_include_special_tokens_runs_post_processor(tmp_path, bpe_dir):
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eod)])
    tok.save(str(tmp_path / "tokenizer.json"))
    plain = HuggingFaceTokenizer(str(tmp_path))
    with_specials = build_tokenizer(TokenizerConfig(
        "HuggingFaceTokenizer", str(tmp_path), include_special_tokens=True))
    assert with_specials.encode("hello") == [eod] + plain.encode("hello")
    assert with_specials.encode_batch(["hello"]) == [with_specials.encode("hello")]


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=(d.text for d in iter_sample_documents(40, seed=2)),
        model_prefix=str(tmp_path / "sp"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, minloglevel=2)
    tok = build_tokenizer(TokenizerConfig("SentencePieceTokenizer", str(tmp_path / "sp.model")))
    assert isinstance(tok, SentencePieceTokenizer)
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.vocab_size == processor.get_piece_size() == 1000
    assert tok.eod == processor.eos_id()
    for text in TEXTS:
        assert tok.encode(text) == processor.encode_as_ids(text)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.decode(tok.encode(TEXTS[1])) == TEXTS[1]


def test_errors_name_the_flag(tmp_path, bpe_dir):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer"))
    with pytest.raises(ValueError, match="no such file"):
        build_tokenizer(TokenizerConfig("HuggingFaceTokenizer", str(tmp_path / "nope.json")))
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer(TokenizerConfig("GPT2BPETokenizer", vocab_file=str(bpe_dir / "vocab.json")))
    with pytest.raises(ValueError, match="not supported"):
        build_tokenizer(TokenizerConfig("BertWordPieceCase"))
    (tmp_path / "garbage.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path / "garbage.json"))
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SentencePieceTokenizer(str(tmp_path / "garbage.json"))


def test_from_run_config_rebuilds_the_saved_tokenizer_flags():
    from megatron_trillion.data.tokenizers import TokenizerConfig

    assert TokenizerConfig.from_run_config({}) is None
    assert TokenizerConfig.from_run_config({"tokenizer_type": "NullTokenizer"}) is None
    assert TokenizerConfig.from_run_config({"tokenizer_type": "HuggingFaceTokenizer"}) is None
    assert TokenizerConfig.from_run_config(
        {"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": "sp.model"}) == \
        TokenizerConfig("SentencePieceTokenizer", "sp.model")
    assert TokenizerConfig.from_run_config(
        {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "v.json", "merge_file": "m.txt",
         "mock_data": False}) == TokenizerConfig("GPT2BPETokenizer", None, "v.json", "m.txt")
