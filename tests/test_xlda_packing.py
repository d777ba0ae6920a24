"""XLDA packing: shares, rho, every token in order, blocks per mode, determinism (runs, DP
sizes), cache, resume (same and changed mixture), collate to PackedSeqParams, bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from multiprocess import run_distributed
from xlda_test_data import EOD, write_empty_dataset, write_language_dataset

SEQ = 48
SAMPLES = 240
ALPHA, BETA = 0.5, {"en": 0.3, "ko": 0.4, "ja": 0.3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("xlda_corpus")
    return {
        "dir": str(directory),
        "sources": [
            (None, write_language_dataset(str(directory), "en", 60, seed=1), "en"),
            (None, write_language_dataset(str(directory), "ko", 40, seed=2, max_len=90), "ko"),
            (None, write_language_dataset(str(directory), "ja", 30, seed=3), "ja"),
        ],
    }


def _build(corpus, tmp_path=None, **overrides):
    from megatron_trillion.data.xlda_packing import build_xlda_dataset

    kwargs = dict(sources=corpus["sources"], seq_length=SEQ, num_samples=SAMPLES,
                  masking="xlda", rho=0.5, anchor_language="en", alpha=ALPHA, beta=BETA,
                  seed=7)
    kwargs.update(overrides)
    return build_xlda_dataset(**kwargs)


def _fragments(dataset, indices):
    """Per source: the (document, tokens) fragments in sample order, from __getitem__ output."""
    out = {s: [] for s in range(len(dataset.mixture.sources))}
    for i in indices:
        sample = dataset[i]
        cu = sample["cu_seqlens_documents"]
        for (source, document), a, b in zip(sample["document_ids"], cu[:-1], cu[1:]):
            out[int(source)].append((int(document), sample["tokens"][a:b]))
    return out


def _stream_tokens(dataset, source, num_tokens):
    """The source's documents in stream order (per-epoch permutation), num_tokens of them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    reader = IndexedDataset(dataset.mixture.sources[source].path_prefix)
    stream = dataset.streams[source]
    parts, epoch, total = [], 0, 0
    while total < num_tokens:
        order, _ = stream.epoch(epoch)
        for d in order:
            parts.append(np.asarray(reader.get(int(d)), dtype=np.int64))
            total += len(parts[-1])
        epoch += 1
    return np.concatenate(parts)[:num_tokens]


def test_language_shares_follow_eq2_and_rho(corpus):
    dataset = _build(corpus)
    language = [s.language for s in dataset.mixture.sources]
    tokens = {l: 0 for l in language}
    cross = 0
    for i in range(SAMPLES):
        sample = dataset[i]
        cu = sample["cu_seqlens_documents"]
        present = set()
        for (source, _), a, b in zip(sample["document_ids"], cu[:-1], cu[1:]):
            tokens[language[source]] += int(b - a)
            present.add(language[source])
        assert sum(tokens.values()) == (i + 1) * SEQ
        if dataset.index.cross_lingual[i]:
            assert len(present) >= 2 and "en" in present, f"sample {i}: {present}"
            cross += 1
        else:
            assert len(present) == 1
    probs = dataset.mixture.language_probabilities
    total = sum(tokens.values())
    for l, p in probs.items():
        # Deficit selection: within a couple of sequences of the target.
        assert abs(tokens[l] / total - p) < 3 * SEQ / total, (l, tokens[l] / total, p)
    # rho: Bernoulli(0.5) over SAMPLES draws -> 4 standard deviations.
    assert abs(cross / SAMPLES - 0.5) < 4 * np.sqrt(0.25 / SAMPLES)


def test_every_document_token_appears_in_order_and_labels_continue(corpus):
    dataset = _build(corpus)
    fragments = _fragments(dataset, range(SAMPLES))
    for source, pieces in fragments.items():
        got = np.concatenate([t for _, t in pieces])
        np.testing.assert_array_equal(got, _stream_tokens(dataset, source, len(got)))
        # Whole epochs are permutations of all documents: every document appears.
        assert len(got) > dataset.streams[source].total
        merged = [d for n, (d, _) in enumerate(pieces) if n == 0 or pieces[n - 1][0] != d]
        first_epoch = set(merged[:len(dataset.streams[source].sizes)])
        assert first_epoch == set(range(len(dataset.streams[source].sizes)))
    for i in range(0, SAMPLES, 7):
        sample = dataset[i]
        cu = sample["cu_seqlens_documents"]
        for a, b in zip(cu[:-1], cu[1:]):
            np.testing.assert_array_equal(sample["labels"][a:b - 1], sample["tokens"][a + 1:b])
    assert (np.concatenate([t for _, t in fragments[0]]) == EOD).any()  # EOD tokens stay


def test_blocks_per_masking_mode(corpus):
    datasets = {m: _build(corpus, masking=m) for m in ("xlda", "document", "none")}
    datasets["xlda-sequence"] = _build(corpus, masking="xlda", xlda_block_scope="sequence")
    language = [s.language for s in datasets["xlda"].mixture.sources]
    for i in range(0, SAMPLES, 5):
        samples = {m: d[i] for m, d in datasets.items()}
        for m in ("document", "none", "xlda-sequence"):   # the ablation changes only the blocks
            np.testing.assert_array_equal(samples[m]["tokens"], samples["xlda"]["tokens"])
            np.testing.assert_array_equal(samples[m]["labels"], samples["xlda"]["labels"])
        np.testing.assert_array_equal(samples["none"]["cu_seqlens_blocks"], [0, SEQ])
        np.testing.assert_array_equal(samples["document"]["cu_seqlens_blocks"],
                                      samples["document"]["cu_seqlens_documents"])
        # Sequence scope: a cross-lingual sample is one block (every document sees all
        # earlier ones); a monolingual sample keeps its per-document blocks.
        np.testing.assert_array_equal(
            samples["xlda-sequence"]["cu_seqlens_blocks"],
            [0, SEQ] if datasets["xlda"].index.cross_lingual[i]
            else samples["document"]["cu_seqlens_blocks"])
        xlda = samples["xlda"]
        docs = xlda["cu_seqlens_documents"]
        blocks = xlda["cu_seqlens_blocks"]
        assert set(blocks) <= set(docs)      # blocks are runs of whole document pieces
        doc_language = [language[s] for s, _ in xlda["document_ids"]]
        for a, b in zip(blocks[:-1], blocks[1:]):
            inside = [doc_language[j] for j in range(len(docs) - 1) if a <= docs[j] < b]
            if datasets["xlda"].index.cross_lingual[i]:
                assert len(inside) <= 2
                if len(inside) == 2:
                    assert len(set(inside)) == 2, "a cross-lingual block pairs two languages"
            else:
                assert len(inside) == 1, "monolingual samples: one document per block"
        for m, sample in samples.items():
            cu = sample["cu_seqlens_blocks"]
            expected = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
            np.testing.assert_array_equal(sample["position_ids"], expected)
    assert any(len(datasets["xlda"][i]["cu_seqlens_blocks"]) <
               len(datasets["document"][i]["cu_seqlens_blocks"]) for i in range(SAMPLES))


def test_same_seed_same_samples_other_seed_differs_and_cache_is_used(corpus, tmp_path,
                                                                     monkeypatch):
    from megatron_trillion.data.sample_index import ChunkedSampleIndex

    first = _build(corpus, cache_dir=str(tmp_path / "a"))
    assert first.cache_path and first.cache_path.startswith(str(tmp_path / "a"))
    second = _build(corpus, cache_dir=str(tmp_path / "b"))   # rebuilt from scratch
    monkeypatch.setattr(ChunkedSampleIndex, "_build",
                        lambda *a, **k: pytest.fail("cached index was rebuilt"))
    cached = _build(corpus, cache_dir=str(tmp_path / "a"))
    for i in range(0, SAMPLES, 11):
        for other in (second, cached):
            np.testing.assert_array_equal(first[i]["tokens"], other[i]["tokens"])
            np.testing.assert_array_equal(first[i]["cu_seqlens_blocks"],
                                          other[i]["cu_seqlens_blocks"])
    monkeypatch.undo()
    reseeded = _build(corpus, cache_dir=str(tmp_path / "c"), seed=8)
    assert any(not np.array_equal(first[i]["tokens"], reseeded[i]["tokens"])
               for i in range(10))


def _sample_digest(sample) -> str:
    h = hashlib.sha256()
    for key in ("tokens", "labels", "cu_seqlens_blocks", "position_ids"):
        h.update(np.ascontiguousarray(sample[key]).tobytes())
    return h.hexdigest()


SCOPES = ("pair", "sequence")


def _dp_rank_reads(sources, cache_dir, micro_batch_size):
    import torch

    from megatron_trillion.data.xlda_packing import PretrainingIndexSampler, build_xlda_dataset

    torch.distributed.init_process_group("gloo")
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    reads = {}
    for scope in SCOPES:   # both XLDA block scopes in one spawn
        # Small chunks: both ranks build and read a chain of chunks concurrently.
        dataset = build_xlda_dataset(sources, SEQ, 40, masking="xlda", rho=0.5,
                                     anchor_language="en", alpha=ALPHA, beta=BETA, seed=7,
                                     cache_dir=cache_dir, chunk_samples=7,
                                     xlda_block_scope=scope)
        reads[scope] = []
        for indices in PretrainingIndexSampler(len(dataset), 8, micro_batch_size, rank, size):
            reads[scope].extend((i, _sample_digest(dataset[i])) for i in indices)
    return reads


@pytest.mark.slow
def test_dp2_ranks_read_the_dp1_sequence(corpus, tmp_path):
    from megatron_trillion.data.xlda_packing import PretrainingIndexSampler

    ranks = run_distributed(_dp_rank_reads, 2, sources=corpus["sources"],
                            cache_dir=str(tmp_path / "dp2"), micro_batch_size=2)
    for scope in SCOPES:
        single = _build(corpus, num_samples=40, cache_dir=str(tmp_path / "dp1"),
                        xlda_block_scope=scope)
        expected = [(i, _sample_digest(single[i]))
                    for batch in PretrainingIndexSampler(40, 8, 4, 0, 1) for i in batch]
        assert sorted(ranks[0][scope] + ranks[1][scope]) == expected
        assert {i for i, _ in ranks[0][scope]}.isdisjoint({i for i, _ in ranks[1][scope]})
    assert ranks[0]["pair"] != ranks[0]["sequence"]   # the scopes differ in their blocks


def test_resume_same_mixture_continues_exactly(corpus, tmp_path):
    from megatron_trillion.data.xlda_packing import resume_xlda_dataset

    dataset = _build(corpus, cache_dir=str(tmp_path))
    state = dataset.state_dict(100)
    kwargs = dict(sources=corpus["sources"], seq_length=SEQ, num_samples=SAMPLES,
                  masking="xlda", rho=0.5, anchor_language="en", alpha=ALPHA, beta=BETA,
                  seed=7, cache_dir=str(tmp_path))
    resumed, changes = resume_xlda_dataset(state, 100, **kwargs)
    assert changes == []
    for i in range(100, SAMPLES, 13):
        np.testing.assert_array_equal(resumed[i]["tokens"], dataset[i]["tokens"])
    assert resumed.mixture_state(SAMPLES).to_dict() == dataset.mixture_state(SAMPLES).to_dict()


def test_changed_mixture_neither_repeats_nor_skips(corpus, tmp_path):
    from megatron_trillion.data.xlda_packing import resume_xlda_dataset

    switch = 120
    before = _build(corpus, cache_dir=str(tmp_path))
    state = before.state_dict(switch)
    annealed_beta = {"en": 0.1, "ko": 0.6, "ja": 0.3}
    after, changes = resume_xlda_dataset(
        state, switch, sources=corpus["sources"], seq_length=SEQ, num_samples=SAMPLES,
        masking="xlda", rho=0.5, anchor_language="en", alpha=ALPHA, beta=annealed_beta, seed=7,
        cache_dir=str(tmp_path))
    assert any("ko_text_document: p" in c for c in changes), changes
    with pytest.raises(IndexError, match="earlier mixture phase"):
        after[switch - 1]
    old = _fragments(before, range(switch))
    new = _fragments(after, range(switch, SAMPLES))
    for source in old:
        got = np.concatenate([t for _, t in old[source] + new[source]])
        np.testing.assert_array_equal(got, _stream_tokens(before, source, len(got)))
    # The new shares apply after the switch.
    ko_before = sum(len(t) for _, t in old[1]) / (switch * SEQ)
    ko_after = sum(len(t) for _, t in new[1]) / ((SAMPLES - switch) * SEQ)
    assert ko_after > ko_before + 0.1


def test_collate_flattens_to_thd_with_block_cu_seqlens(corpus):
    import torch

    from megatron_trillion.data.packed_batch import collate_packed

    dataset = _build(corpus)
    samples = [dataset[i] for i in (3, 4, 5)]
    batch = collate_packed(samples)
    assert batch["tokens"].shape == (1, 3 * SEQ) and batch["tokens"].dtype == torch.long
    for key in ("labels", "loss_mask", "position_ids"):
        assert batch[key].shape == (1, 3 * SEQ)
    params = batch["packed_seq_params"]
    assert params.qkv_format == "thd"
    expected = [0] + [int(c) + b * SEQ for b, s in enumerate(samples)
                      for c in s["cu_seqlens_blocks"][1:]]
    assert params.cu_seqlens_q.tolist() == expected
    assert params.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv)
    assert params.max_seqlen_q == max(np.diff(expected))
    np.testing.assert_array_equal(batch["tokens"][0, SEQ:2 * SEQ].numpy(), samples[1]["tokens"])
    assert batch["indices"] == [3, 4, 5]


def test_eod_loss_mask(corpus):
    dataset = _build(corpus, eod_token=EOD, mask_eod_loss=True)
    sample = dataset[0]
    np.testing.assert_array_equal(sample["loss_mask"] == 0, sample["tokens"] == EOD)


def test_bad_input_raises(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq-length must be >= 2"):
        _build(corpus, seq_length=1)
    with pytest.raises(ValueError, match="unknown masking mode"):
        _build(corpus, masking="dense")
    with pytest.raises(ValueError, match="unknown XLDA block scope"):
        _build(corpus, xlda_block_scope="block")
    with pytest.raises(ValueError, match="anchor language 'de' has no data source"):
        _build(corpus, anchor_language="de")
    with pytest.raises(ValueError, match="beta must sum to 1"):
        _build(corpus, beta={"en": 0.5, "ko": 0.5, "ja": 0.5})
    with pytest.raises(ValueError, match=r"no data source"):
        _build(corpus, beta={"en": 0.5, "ko": 0.2, "ja": 0.2, "de": 0.1})
    with pytest.raises(ValueError, match="rho must be in"):
        _build(corpus, rho=1.5)
    empty = write_empty_dataset(str(tmp_path), "ko")
    with pytest.raises(ValueError, match="is empty"):
        _build(corpus, sources=[corpus["sources"][0], (None, empty, "ko")], beta=None,
               alpha=None)
    with pytest.raises(ValueError, match="non-anchor language"):
        _build(corpus, sources=[corpus["sources"][0]], beta=None, alpha=None)


def test_block_scope_flag_needs_xlda_masking(capsys):
    from megatron_trillion.pretrain import main

    code = main(["--preset", "tiny-tri-7b", "--mock-data", "--train-iters", "2",
                 "--attention-masking", "document", "--xlda-block-scope", "sequence"])
    assert code == 2
    assert "--xlda-block-scope sequence applies to --attention-masking xlda only (got " \
           "document)" in capsys.readouterr().err
