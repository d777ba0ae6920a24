"""Language mixture (eq. 2): probabilities, sizes from .idx, validation, sampler state."""

from __future__ import annotations

import numpy as np
import pytest

from xlda_test_data import write_empty_dataset, write_language_dataset


def test_eq2_values():
    from megatron_trillion.data.mixture import language_probabilities

    probs = language_probabilities({"en": 600, "ko": 300, "ja": 100}, alpha=0.5,
                                   beta={"en": 0.4, "ko": 0.3, "ja": 0.3})
    assert probs == pytest.approx({"en": 0.5, "ko": 0.3, "ja": 0.2})
    assert language_probabilities({"en": 3, "ko": 1}, 1.0, {"en": 0.0, "ko": 1.0}) == \
        pytest.approx({"en": 0.75, "ko": 0.25})
    assert language_probabilities({"en": 3, "ko": 1}, 0.0, {"en": 0.1, "ko": 0.9}) == \
        pytest.approx({"en": 0.1, "ko": 0.9})


@pytest.mark.parametrize("alpha,beta,message", [
    (0.5, {"en": 0.5, "ko": 0.6}, "beta must sum to 1"),
    (1.5, {"en": 0.5, "ko": 0.5}, r"alpha must be in \[0, 1\]"),
    (-0.1, {"en": 0.5, "ko": 0.5}, r"alpha must be in \[0, 1\]"),
    (0.5, {"en": 0.5, "ko": 0.25, "xx": 0.25}, r"language\(s\) \['xx'\] that have no data"),
    (0.5, {"en": 1.0}, r"no value for language\(s\) \['ko'\]"),
    (0.5, {"en": 1.5, "ko": -0.5}, "must be >= 0"),
])
def test_eq2_validation(alpha, beta, message):
    from megatron_trillion.data.mixture import language_probabilities

    with pytest.raises(ValueError, match=message):
        language_probabilities({"en": 10, "ko": 5}, alpha, beta)


def test_sizes_are_read_from_idx_and_sources_share_their_language(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_trillion.data.mixture import LanguageMixture, parse_sources

    en = write_language_dataset(str(tmp_path), "en", 20, seed=1)
    ko = write_language_dataset(str(tmp_path), "ko", 10, seed=2)
    readers = [IndexedDataset(p) for p in (en, ko)]
    sizes = [int(r.sequence_lengths.sum()) for r in readers]
    mixture = LanguageMixture.from_sources(parse_sources([(None, en, "en"), (None, ko, "ko")]))
    assert mixture.source_tokens == tuple(sizes)
    assert mixture.alpha == 1.0
    assert mixture.language_probabilities["en"] == pytest.approx(sizes[0] / sum(sizes))

    # Weights given: beta comes from them, alpha defaults to 0 (weights mean what they say).
    weighted = LanguageMixture.from_sources(parse_sources([(3, en, "en"), (1, ko, "ko")]))
    assert weighted.language_probabilities == pytest.approx({"en": 0.75, "ko": 0.25})
    # Two sources of one language split its probability by weight.
    en2 = write_language_dataset(str(tmp_path), "en2", 5, seed=3)
    split = LanguageMixture.from_sources(
        parse_sources([(2, en, "en"), (1, en2, "en"), (1, ko, "ko")]), alpha=0.0,
        beta={"en": 0.6, "ko": 0.4})
    assert split.source_probabilities == pytest.approx([0.4, 0.2, 0.4])


def test_bad_sources_raise(tmp_path):
    from megatron_trillion.data.mixture import LanguageMixture, parse_sources

    en = write_language_dataset(str(tmp_path), "en", 5, seed=1)
    empty = write_empty_dataset(str(tmp_path), "ko")
    with pytest.raises(ValueError, match="is empty"):
        LanguageMixture.from_sources(parse_sources([(None, en, "en"), (None, empty, "ko")]))
    with pytest.raises(ValueError, match="not found"):
        LanguageMixture.from_sources(parse_sources([(None, str(tmp_path / "nope"), "en")]))
    with pytest.raises(ValueError, match="mixture is empty"):
        parse_sources([])
    with pytest.raises(ValueError, match="for every data source or for none"):
        parse_sources([(1.0, en, "en"), (None, empty, "ko")])
    with pytest.raises(ValueError, match="weight must be >= 0"):
        parse_sources([(-1.0, en, "en")])


def _toy_mixture():
    from megatron_trillion.data.mixture import DataSource, LanguageMixture

    sources = (DataSource("/d/en", "en"), DataSource("/d/ko", "ko"), DataSource("/d/ja", "ja"))
    return LanguageMixture.from_sources(sources, alpha=0.5, beta={"en": 0.2, "ko": 0.4,
                                                                  "ja": 0.4},
                                        source_tokens=[5000, 3000, 2000])


def _draw(sampler, n):
    picks = []
    for _ in range(n):
        draws = sampler.begin_sample()
        language = sampler.pick_language(sampler.mixture.languages, 10)
        source = sampler.pick_source(language)
        sampler.record(source, 10 + int(draws[0] * 5))
        picks.append((language, source, float(draws[0])))
    return picks


def test_deficit_sampling_tracks_eq2_and_state_round_trips():
    from megatron_trillion.data.mixture import MixtureSampler

    mixture = _toy_mixture()
    sampler = MixtureSampler(mixture, seed=5)
    uninterrupted = _draw(sampler, 400)
    shares = {l: t / sum(sampler.language_tokens.values())
              for l, t in sampler.language_tokens.items()}
    # P = 0.5*{.5,.3,.2} + 0.5*{.2,.4,.4}
    assert shares == pytest.approx({"en": 0.35, "ko": 0.35, "ja": 0.30}, abs=0.01)

    first = MixtureSampler(mixture, seed=5)
    head = _draw(first, 150)
    state = first.state_dict()
    resumed, changes = MixtureSampler.load_state_dict(mixture, state)
    assert changes == []
    assert head + _draw(resumed, 250) == uninterrupted
    assert resumed.state_dict() == sampler.state_dict()


def test_changed_mixture_is_reported_and_keeps_cursors():
    from megatron_trillion.data.mixture import DataSource, LanguageMixture, MixtureSampler

    sampler = MixtureSampler(_toy_mixture(), seed=5)
    _draw(sampler, 50)
    state = sampler.state_dict()
    annealed = LanguageMixture.from_sources(
        (DataSource("/d/en", "en"), DataSource("/d/ko", "ko")), alpha=0.0,
        beta={"en": 0.5, "ko": 0.5}, source_tokens=[5000, 3000])
    resumed, changes = MixtureSampler.load_state_dict(annealed, state)
    assert any(c.startswith("source /d/en: p 0.3500 -> 0.5000") for c in changes)
    assert any(c.startswith("removed source /d/ja") for c in changes)
    assert resumed.cursor.tolist() == [state["consumed_tokens"]["/d/en"],
                                       state["consumed_tokens"]["/d/ko"]]
    # The removed source's position survives into the next checkpoint.
    assert resumed.state_dict()["consumed_tokens"]["/d/ja"] == state["consumed_tokens"]["/d/ja"]
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler.load_state_dict(annealed, state, seed=6)
    assert np.isclose(sum(annealed.source_probabilities), 1.0)


def test_random_numbers_are_addressed_by_sample_index():
    from megatron_trillion.data.mixture import MixtureSampler

    sampler = MixtureSampler(_toy_mixture(), seed=3)
    block = sampler.randoms(0, 10)
    for k in (0, 1, 7, 9):
        np.testing.assert_array_equal(sampler.randoms(k)[0], block[k])
    drawn = np.stack([sampler.begin_sample() for _ in range(10)])
    np.testing.assert_array_equal(drawn, block)
    assert not np.array_equal(MixtureSampler(_toy_mixture(), seed=4).randoms(0, 10), block)
    assert 0.4 < block.mean() < 0.6
