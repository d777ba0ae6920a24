"""The chunked sample index: chunked == one go (chunk sizes that do and do not divide the run,
resume mid-chunk, the anneal switch), stale data files, killed builders, and the build tool
followed by a 2-process training run that builds nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from multiprocess import run_distributed
from xlda_test_data import write_language_dataset

SEQ = 48
SAMPLES = 240
SWITCH = 123  # mid-chunk for every chunk size below
KWARGS = dict(seq_length=SEQ, num_samples=SAMPLES, masking="xlda", rho=0.5,
              anchor_language="en", alpha=0.5, beta={"en": 0.3, "ko": 0.4, "ja": 0.3}, seed=7)
ANNEAL_BETA = {"en": 0.1, "ko": 0.6, "ja": 0.3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("index_corpus"))
    return [(None, write_language_dataset(directory, "en", 60, seed=1), "en"),
            (None, write_language_dataset(directory, "ko", 40, seed=2, max_len=90), "ko"),
            (None, write_language_dataset(directory, "ja", 30, seed=3), "ja")]


def _records(dataset, indices):
    return [(tuple(map(int, s)), tuple(map(int, t)) if s[1] >= 0 else (int(t[0]),))
            for s, t in (dataset.index.record(i) for i in indices)]


def test_chunked_matches_one_go_across_resume_and_anneal_switch(sources, tmp_path):
    from megatron_trillion.data.xlda_packing import build_xlda_dataset, resume_xlda_dataset

    def phases(chunk_samples, cache):
        main = build_xlda_dataset(sources, cache_dir=str(cache), chunk_samples=chunk_samples,
                                  **KWARGS)
        annealed, changes = resume_xlda_dataset(
            main.state_dict(SWITCH), SWITCH, sources=sources, cache_dir=str(cache),
            chunk_samples=chunk_samples, **{**KWARGS, "beta": ANNEAL_BETA})
        assert changes
        return main, annealed

    one_main, one_anneal = phases(SAMPLES, tmp_path / "one-go")
    assert one_main.index.num_chunks == 1
    for chunk_samples in (40, 7):   # divides 240 / does not
        main, annealed = phases(chunk_samples, tmp_path / f"chunks-{chunk_samples}")
        assert main.index.num_chunks == -(-SAMPLES // chunk_samples)
        # The anneal phase's index starts at the switch: it holds only the anneal samples.
        assert annealed.index.first_sample == SWITCH
        assert len(annealed.index.chunk(0)) == min(chunk_samples, SAMPLES - SWITCH)
        assert _records(main, range(SAMPLES)) == _records(one_main, range(SAMPLES))
        assert _records(annealed, range(SWITCH, SAMPLES)) == \
            _records(one_anneal, range(SWITCH, SAMPLES))
        for consumed in (0, 39, 40, 41, SWITCH, SAMPLES):
            assert main.mixture_state(consumed).to_dict() == \
                one_main.mixture_state(consumed).to_dict()
        assert annealed.mixture_state(SAMPLES).to_dict() == \
            one_anneal.mixture_state(SAMPLES).to_dict()
    for i in (0, 57, SWITCH - 1):
        np.testing.assert_array_equal(main[i]["tokens"], one_main[i]["tokens"])
        np.testing.assert_array_equal(main[i]["cu_seqlens_blocks"],
                                      one_main[i]["cu_seqlens_blocks"])

    # Resume mid-chunk from a checkpoint into an empty cache: the chain up to the resumed
    # chunk is rebuilt and the run continues sample for sample.
    resumed, changes = resume_xlda_dataset(one_main.state_dict(101), 101, sources=sources,
                                           cache_dir=str(tmp_path / "resumed"),
                                           chunk_samples=40, **KWARGS)
    assert changes == []
    assert resumed.index.built == 3   # chunks 0..2: the one holding sample 101 and before
    assert _records(resumed, range(101, SAMPLES)) == _records(one_main, range(101, SAMPLES))
    assert resumed.index.built == 6


def test_longer_run_reuses_chunks_and_extends_the_last(sources, tmp_path):
    from megatron_trillion.data.sample_index import ChunkedSampleIndex
    from megatron_trillion.data.xlda_packing import build_xlda_dataset

    short = build_xlda_dataset(sources, cache_dir=str(tmp_path), chunk_samples=100,
                               **{**KWARGS, "num_samples": 150})
    short.index.prefetch = False   # count the builds of this thread only
    _records(short, range(150))
    assert short.index.built == 2
    full = build_xlda_dataset(sources, cache_dir=str(tmp_path), chunk_samples=100, **KWARGS)
    full.index.prefetch = False
    assert full.cache_path == short.cache_path   # the sample count does not key the index
    assert _records(full, range(SAMPLES)) == _records(
        build_xlda_dataset(sources, cache_dir=str(tmp_path / "fresh"), chunk_samples=100,
                           **KWARGS), range(SAMPLES))
    assert (full.index.found, full.index.built) == (1, 2)  # chunk 1 was short: extended
    assert isinstance(full.index, ChunkedSampleIndex)


def test_changed_data_file_rebuilds_in_a_new_place(sources, tmp_path):
    from megatron_trillion.data.xlda_packing import build_xlda_dataset

    before = build_xlda_dataset(sources, cache_dir=str(tmp_path), **KWARGS)
    prefix = sources[1][1]
    stat = os.stat(prefix + ".bin")
    try:
        os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        after = build_xlda_dataset(sources, cache_dir=str(tmp_path), **KWARGS)
        assert after.cache_path != before.cache_path
        assert after.index.built == 1 and after.index.found == 0
    finally:
        os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = build_xlda_dataset(sources, cache_dir=str(tmp_path), **KWARGS)
    assert again.cache_path == before.cache_path and again.index.built == 0


def test_killed_builder_leaves_nothing_readable_and_bad_chunks_are_named(sources, tmp_path,
                                                                          monkeypatch):
    from megatron_trillion.data import sample_index
    from megatron_trillion.data.xlda_packing import build_xlda_dataset

    real_save = np.save

    def killed(path, array):   # the builder dies half-way through writing the chunk
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_index.np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        build_xlda_dataset(sources, cache_dir=str(tmp_path), **KWARGS)
    monkeypatch.setattr(sample_index.np, "save", real_save)
    directory = next(p for p in tmp_path.iterdir() if p.name.startswith("xlda-index-"))
    assert not (directory / "samples-000000.npy").exists()
    assert any(".tmp" in p.name for p in directory.iterdir())   # the half-written file
    dataset = build_xlda_dataset(sources, cache_dir=str(tmp_path), **KWARGS)
    assert dataset.index.built == 1
    reference = build_xlda_dataset(sources, cache_dir=str(tmp_path / "ref"), **KWARGS)
    assert _records(dataset, range(SAMPLES)) == _records(reference, range(SAMPLES))

    np.save(directory / "samples-000000.npy", np.zeros(SAMPLES, dtype=np.int64))
    with pytest.raises(ValueError, match=r"samples-000000\.npy has dtype int64.*delete it"):
        build_xlda_dataset(sources, cache_dir=str(tmp_path), **KWARGS)


def _train_logged(argv: list[str]) -> list[str]:
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    lines: list[str] = []
    pretrain(parse_args(argv), log=lines.append)
    return lines


def _index_files(cache) -> dict:
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns
            for p in cache.glob("xlda-index-*/*")}


@pytest.mark.slow
def test_build_tool_then_two_process_training_builds_nothing(tmp_path):
    cache = tmp_path / "cache"
    data = {lang: write_language_dataset(str(tmp_path), lang, 200, seed=n, max_len=120)
            for n, lang in enumerate(("en", "ko", "ja"))}
    argv = ["--preset", "tiny-tri-7b", "--tokenizer-type", "NullTokenizer", "--vocab-size",
            "1000", "--data-path", *(f"{lang}:{prefix}" for lang, prefix in data.items()),
            "--data-cache-path", str(cache), "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "2", "--lr", "2e-3", "--min-lr",
            "2e-4", "--lr-warmup-iters", "1", "--lr-wsd-decay-fraction", "0.5", "--seed", "7",
            "--no-progress-bar", "--anneal-data-path", "0.5", f"en:{data['en']}", "0.5",
            f"ko:{data['ko']}"]
    from megatron_trillion.cli.build_data_index import main as build_data_index

    assert build_data_index(argv) == 0
    built = _index_files(cache)
    assert len([f for f in built if f.endswith("samples-000000.npy")]) == 2  # main + anneal

    logs = run_distributed(_train_logged, 2, timeout=600, argv=argv)
    index_lines = [line for line in logs[0] if "sample index" in line]
    assert len(index_lines) == 2, logs[0]   # the main mixture, then the anneal mixture
    assert all(line.endswith("1 chunk(s) read from the cache, 0 built") for line in index_lines)
    assert "samples [0, 16)" in index_lines[0] and "samples [8, 16)" in index_lines[1]
    assert _index_files(cache) == built   # nothing written, nothing added


def test_dataset_pickles_for_dataloader_workers(sources, tmp_path):
    import pickle

    from megatron_trillion.data.xlda_packing import build_xlda_dataset

    dataset = build_xlda_dataset(sources, cache_dir=str(tmp_path), chunk_samples=50, **KWARGS)
    dataset[120]   # open chunks, readers, the prefetch thread
    copy = pickle.loads(pickle.dumps(dataset))
    for i in (3, 120, 239):
        np.testing.assert_array_equal(copy[i]["tokens"], dataset[i]["tokens"])
    assert copy.index.cross_lingual[120] == dataset.index.cross_lingual[120]


def _train_each(argvs: list[list[str]]) -> list[dict]:
    """Train each run in turn in this process: what it ended at and which mixtures it read."""
    from megatron.core import parallel_state

    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    results = []
    for argv in argvs:
        lines: list[str] = []
        state, _ = pretrain(parse_args(argv), log=lines.append)
        parallel_state.destroy_model_parallel()   # the next run sets up its own
        results.append({"end": (state.iteration, state.consumed_samples),
                        "switched": [line for line in lines if " anneal: " in line],
                        "index": [line.split(": samples ")[1].split(",")[0]
                                  for line in lines if "sample index" in line]})
    return results


@pytest.mark.slow
def test_anneal_switch_at_or_past_the_end_of_the_run(tmp_path):
    """The anneal boundary crossed by the last step leaves no anneal sample to read: the run
    ends there instead of building an empty anneal mixture. With and without the ramp-up
    (2 x 4 steps, then 4 per step: 6 steps), and the cases around it."""
    data = {lang: write_language_dataset(str(tmp_path), lang, 60, seed=n, max_len=80)
            for n, lang in enumerate(("en", "ko"))}
    common = ["--preset", "tiny-tri-7b", "--tokenizer-type", "NullTokenizer", "--vocab-size",
              "1000", "--data-path", *(f"{lang}:{prefix}" for lang, prefix in data.items()),
              "--anneal-data-path", "0.5", f"en:{data['en']}", "0.5", f"ko:{data['ko']}",
              "--data-cache-path", str(tmp_path / "cache"), "--seq-length", "32",
              "--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "16",
              "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-samples", "2",
              "--lr-decay-style", "wsd", "--no-progress-bar"]
    rampup = ["--rampup-batch-size", "2", "2", "8"]
    cases = {  # flags: (the iteration the switch is logged at or None, anneal index start)
        # WSD decay from sample 14.4: crossed by the last step (12 -> 16).
        "ramp-up, last step": (rampup, 6, None),
        "no ramp-up, last step": ([], 4, None),
        # Decay from sample 16 = --train-samples: the last sample is the boundary.
        "no ramp-up, at the last sample": (
            ["--lr-decay-samples", "32", "--lr-wsd-decay-fraction", "0.5"], 4, None),
        # Decay from sample 12: the last step reads the anneal mixture.
        "ramp-up, before the last step": ([*rampup, "--lr-wsd-decay-fraction", "0.25"], 5, "12"),
        # Decay from sample 20: no anneal phase in this run.
        "no ramp-up, past the end": (
            ["--lr-decay-samples", "40", "--lr-wsd-decay-fraction", "0.5"], None, None),
    }
    (results,) = run_distributed(_train_each, 1, timeout=600,
                                 argvs=[common + flags for flags, _, _ in cases.values()])
    for (name, (flags, switched_at, anneal_from)), result in zip(cases.items(), results):
        assert result["end"] == ((6 if flags[:1] == rampup[:1] else 4), 16), name
        assert {line.split("switched at iteration ")[1].split(":")[0]
                for line in result["switched"]} == ({str(switched_at)} if switched_at else set()), \
            (name, result["switched"])
        assert result["index"] == ["[0"] + ([f"[{anneal_from}"] if anneal_from else []), \
            (name, result["index"])
