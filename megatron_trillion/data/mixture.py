"""Language-mixture sampling (Trillion report, eq. 2) over Megatron indexed datasets.

    P(l) = alpha * |D_l| / sum_j |D_j| + (1 - alpha) * beta_l

``|D_l|`` is the number of tokens of language ``l``, read from the ``.idx`` files
(``megatron.core.datasets.indexed_dataset.IndexedDataset.sequence_lengths``); ``alpha`` in
[0, 1] smooths between natural sizes and the per-language upsampling factors ``beta`` (which
sum to 1). Inside a language, its sources (language x source datasets) share ``P(l)`` by their
weights if given, else by their sizes.

Public interface::

    sources = parse_sources([DataSource(path_prefix, language, weight=None), ...])
                                   # (or the tuples (weight_or_None, path_prefix, language))
    mixture = LanguageMixture.from_sources(sources, alpha=None, beta=None)
    mixture.language_probabilities    # {language: P(l)}
    mixture.source_probabilities      # np.ndarray, one per source, sums to 1
    sampler = MixtureSampler(mixture, seed=1234)          # or start=MixtureState(...)
    sampler.state_dict() / MixtureSampler.load_state_dict(...) / describe_mixture_change(...)

Defaults when ``alpha``/``beta`` are omitted: with no weights and no beta, ``alpha = 1`` (natural
sizes); if beta is given, or derived from the source weights (beta_l = normalised sum of the
weights of language l), ``alpha = 0`` so the weights mean what they say, as in Megatron-LM's
``--data-path w1 p1 w2 p2``.

Sampling discipline. Which language fills the next packed sequence is chosen by *token deficit*
(the language furthest below its target share ``P(l) * tokens_so_far`` goes next), the
deterministic error-minimising rule of megatron-core's ``BlendedDataset`` applied to tokens
instead of samples, so realised shares track eq. 2 to within one sequence. Randomness (whether a
sequence is cross-lingual, which language comes first) is drawn per sample index from a
counter-based generator: the RNG position is simply the number of samples drawn, which makes
the state small, exact to restore, and independent of the data-parallel layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numba
import numpy as np

from megatron_trillion.data.data_path import DataSource, as_data_source

__all__ = [
    "DataSource",
    "parse_sources",
    "language_probabilities",
    "LanguageMixture",
    "MixtureState",
    "MixtureSampler",
    "describe_mixture_change",
    "sample_randoms",
    "DeficitTables",
    "pick_language_by_deficit",
    "pick_source_by_deficit",
]

_SUM_TOLERANCE = 1e-6


def parse_sources(entries: Sequence) -> tuple[DataSource, ...]:
    """``DataSource``s, or tuples ``(weight_or_None, path_prefix, language[, (first_doc,
    end_doc)])``, -> validated ``DataSource`` tuple (the optional range restricts a source to
    a --split share)."""
    if not entries:
        raise ValueError("the data mixture is empty: give at least one "
                         "(weight, path_prefix, language) entry (--data-path)")
    sources = []
    for n, entry in enumerate(entries):
        source = as_data_source(entry, f"data source #{n}")
        prefix, language, weight = source.path_prefix, source.language, source.weight
        documents = (tuple(int(d) for d in source.documents) if source.documents else None)
        if documents is not None and not 0 <= documents[0] < documents[1]:
            raise ValueError(f"data source {prefix}: empty document range {documents}")
        if not isinstance(language, str) or not language:
            raise ValueError(f"data source #{n} ({prefix}): language must be a non-empty string")
        if weight is not None:
            weight = float(weight)
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"data source {prefix}: weight must be >= 0, got {weight}")
        sources.append(DataSource(str(prefix), language, weight, documents))
    prefixes = [s.path_prefix for s in sources]
    duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if duplicates:
        raise ValueError(f"data source(s) listed twice: {duplicates}")
    if len({s.weight is None for s in sources}) > 1:
        raise ValueError("give a weight for every data source or for none "
                         f"(got {[(s.weight, s.path_prefix) for s in sources]})")
    return tuple(sources)


def language_probabilities(tokens_per_language: Mapping[str, int], alpha: float,
                           beta: Mapping[str, float]) -> dict[str, float]:
    """Eq. 2 of the Trillion report: ``alpha * |D_l| / sum_j |D_j| + (1 - alpha) * beta_l``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixture alpha must be in [0, 1], got {alpha}")
    languages = list(tokens_per_language)
    unknown = sorted(set(beta) - set(languages))
    if unknown:
        raise ValueError(f"beta names language(s) {unknown} that have no data source; "
                         f"languages with data: {sorted(languages)}")
    missing = sorted(set(languages) - set(beta))
    if missing:
        raise ValueError(f"beta has no value for language(s) {missing}; give one per language "
                         f"({sorted(languages)}), they must sum to 1")
    if any(b < 0 for b in beta.values()):
        raise ValueError(f"beta values must be >= 0, got {dict(beta)}")
    total_beta = sum(beta.values())
    if abs(total_beta - 1.0) > _SUM_TOLERANCE:
        raise ValueError(f"beta must sum to 1, got {total_beta:.6f} ({dict(beta)})")
    total_tokens = sum(tokens_per_language.values())
    if total_tokens <= 0:
        raise ValueError("the data mixture holds no tokens")
    return {l: alpha * tokens_per_language[l] / total_tokens + (1 - alpha) * beta[l]
            for l in languages}


def _read_token_count(path_prefix: str, documents: Optional[tuple[int, int]] = None) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not IndexedDataset.exists(path_prefix):
        raise ValueError(f"data source {path_prefix}: {path_prefix}.bin/.idx not found "
                         "(build it with tools/preprocess_data.py)")
    # An empty .bin cannot be memory-mapped (megatron-core then fails obscurely): check first.
    if os.path.getsize(path_prefix + ".bin") == 0:
        raise ValueError(f"data source {path_prefix} is empty (0 documents/tokens)")
    dataset = IndexedDataset(path_prefix, mmap=False)
    # Copy: the lengths view dies with the dataset's .idx memory map (a segfault otherwise).
    lengths = np.array(dataset.sequence_lengths, dtype=np.int64)
    del dataset
    if documents is not None:
        lengths = lengths[documents[0]:documents[1]]
    tokens = int(lengths.sum(dtype=np.int64))
    if len(lengths) == 0 or tokens == 0:
        raise ValueError(f"data source {path_prefix} is empty (0 documents/tokens)")
    return tokens


@dataclass(frozen=True)
class LanguageMixture:
    """A resolved mixture: sources, their token sizes, P(l) and per-source probabilities."""

    sources: tuple[DataSource, ...]
    source_tokens: tuple[int, ...]
    alpha: float
    beta: tuple[tuple[str, float], ...]
    language_probabilities: Mapping[str, float] = field(compare=False)
    source_probabilities: np.ndarray = field(compare=False, repr=False)

    @classmethod
    def from_sources(cls, sources: Sequence[DataSource], alpha: Optional[float] = None,
                     beta: Optional[Mapping[str, float]] = None,
                     source_tokens: Optional[Sequence[int]] = None) -> "LanguageMixture":
        """Resolve eq. 2. ``source_tokens`` defaults to the sizes read from the .idx files."""
        sources = tuple(sources)
        if not sources:
            raise ValueError("the data mixture is empty")
        if source_tokens is None:
            source_tokens = [_read_token_count(s.path_prefix, s.documents) for s in sources]
        source_tokens = tuple(int(t) for t in source_tokens)
        for s, t in zip(sources, source_tokens):
            if t <= 0:
                raise ValueError(f"data source {s.path_prefix} is empty (0 tokens)")
        languages = list(dict.fromkeys(s.language for s in sources))
        tokens_per_language = {l: 0 for l in languages}
        for s, t in zip(sources, source_tokens):
            tokens_per_language[s.language] += t
        weighted = sources[0].weight is not None
        if beta is None and weighted:
            weight_per_language = {l: 0.0 for l in languages}
            for s in sources:
                weight_per_language[s.language] += s.weight
            total = sum(weight_per_language.values())
            if total <= 0:
                raise ValueError("data source weights sum to 0")
            beta = {l: w / total for l, w in weight_per_language.items()}
        if alpha is None:
            alpha = 1.0 if beta is None else 0.0
        if beta is None:
            beta = {l: 1.0 / len(languages) for l in languages}  # unused when alpha == 1
        probs = language_probabilities(tokens_per_language, float(alpha), dict(beta))

        # Inside a language: by weight if weighted, else by size.
        per_source = np.zeros(len(sources))
        for l in languages:
            members = [i for i, s in enumerate(sources) if s.language == l]
            share = np.array([sources[i].weight if weighted else source_tokens[i]
                              for i in members], dtype=np.float64)
            if share.sum() <= 0:
                # Language weighted to 0 inside: spread by size so P(l)=0 stays consistent.
                share = np.array([source_tokens[i] for i in members], dtype=np.float64)
            per_source[members] = probs[l] * share / share.sum()
        return cls(sources, source_tokens, float(alpha), tuple(sorted(dict(beta).items())),
                   probs, per_source)

    @property
    def languages(self) -> list[str]:
        return list(self.language_probabilities)

    def source_index(self, language: str) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s.language == language]

    def describe(self) -> dict:
        """JSON-able summary (used in the cache key and in logs)."""
        return {
            "alpha": self.alpha,
            "beta": dict(self.beta),
            "sources": [
                {"path_prefix": s.path_prefix, "language": s.language, "weight": s.weight,
                 "tokens": t, "probability": float(p),
                 **({"documents": list(s.documents)} if s.documents else {})}
                for s, t, p in zip(self.sources, self.source_tokens, self.source_probabilities)
            ],
        }


@dataclass
class MixtureState:
    """Everything needed to continue sampling: the checkpointed data state.

    ``consumed_tokens`` is each source's stream cursor (tokens taken from it, over epochs);
    ``tokens_per_language`` the tokens drawn per language (the deficit counters);
    ``samples`` the RNG position (samples drawn so far, globally).
    """

    seed: int
    samples: int = 0
    consumed_tokens: dict[str, int] = field(default_factory=dict)       # by path_prefix
    tokens_per_language: dict[str, int] = field(default_factory=dict)
    source_probabilities: dict[str, float] = field(default_factory=dict)  # by path_prefix

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "samples": self.samples,
            "consumed_tokens": dict(self.consumed_tokens),
            "tokens_per_language": dict(self.tokens_per_language),
            "source_probabilities": dict(self.source_probabilities),
        }

    @classmethod
    def from_dict(cls, state: Mapping) -> "MixtureState":
        try:
            return cls(int(state["seed"]), int(state["samples"]),
                       {k: int(v) for k, v in state["consumed_tokens"].items()},
                       {k: int(v) for k, v in state["tokens_per_language"].items()},
                       {k: float(v) for k, v in state["source_probabilities"].items()})
        except KeyError as exc:
            raise ValueError(f"mixture state in the checkpoint lacks {exc}; it was not written "
                             "by megatron_trillion.data.mixture") from exc


def describe_mixture_change(previous: MixtureState, mixture: LanguageMixture) -> list[str]:
    """Human-readable differences between a checkpointed mixture and a new one (empty = same)."""
    changes = []
    new = {s.path_prefix: float(p) for s, p in zip(mixture.sources, mixture.source_probabilities)}
    for prefix in sorted(set(previous.source_probabilities) | set(new)):
        old_p, new_p = previous.source_probabilities.get(prefix), new.get(prefix)
        if old_p is None:
            changes.append(f"added source {prefix} (p={new_p:.4f})")
        elif new_p is None:
            changes.append(f"removed source {prefix} (was p={old_p:.4f}; its position "
                           f"{previous.consumed_tokens.get(prefix, 0)} tokens is kept)")
        elif abs(old_p - new_p) > 1e-9:
            changes.append(f"source {prefix}: p {old_p:.4f} -> {new_p:.4f}")
    return changes


# One Philox4x64 counter step yields 4 uint64 = 4 doubles: sample k's numbers are exactly the
# block at counter k, so any sample's draws are computable directly (no replay).
RANDOMS_PER_SAMPLE = 4


def sample_randoms(seed: int, first_sample: int, count: int = 1) -> np.ndarray:
    """Uniform numbers of samples ``first_sample..+count`` -> [count, 4] (same on every rank
    and for any DP layout)."""
    bitgen = np.random.Philox(key=int(seed))
    bitgen.advance(int(first_sample))
    return np.random.Generator(bitgen).random((int(count), RANDOMS_PER_SAMPLE))


# The deficit rules, compiled: the sample-index builder (``sample_index``) calls them from its
# compiled loop and ``MixtureSampler`` from Python, so the rules exist once.


@numba.njit(cache=True, nogil=True)
def pick_language_by_deficit(language_tokens, language_probabilities, name_rank, candidates,
                             upcoming_tokens):
    """Index of the candidate language furthest below its share after ``upcoming_tokens``
    more (ties: the larger language name); -1 when no candidate has a positive probability."""
    total = language_tokens.sum() + upcoming_tokens
    best, best_value = -1, 0.0
    for language in range(len(language_tokens)):
        if not candidates[language] or language_probabilities[language] <= 0:
            continue
        value = language_probabilities[language] * total - language_tokens[language]
        if best < 0 or value > best_value or (value == best_value
                                              and name_rank[language] > name_rank[best]):
            best, best_value = language, value
    return best


@numba.njit(cache=True, nogil=True)
def pick_source_by_deficit(source_tokens, source_probabilities, members, language_probability):
    """Index of the source (of ``members``, one language's sources in mixture order) furthest
    below its share of the language's tokens drawn in this phase (ties: the first)."""
    total = 1
    for i in members:
        total += source_tokens[i]
    best, best_value = -1, 0.0
    for i in members:
        value = source_probabilities[i] / language_probability * total - source_tokens[i]
        if best < 0 or value > best_value:
            best, best_value = i, value
    return best


@dataclass(frozen=True)
class DeficitTables:
    """A mixture as the arrays the compiled deficit rules take (languages in mixture order)."""

    language_probabilities: np.ndarray   # float64 [languages]
    name_rank: np.ndarray                # int64 [languages]: rank of the name, the tie-break
    source_language: np.ndarray          # int64 [sources]
    source_probabilities: np.ndarray     # float64 [sources]
    members: tuple                       # per language: int64 array of its sources
    language_source_probability: np.ndarray  # float64 [languages]: sum of its sources' p

    @classmethod
    def of(cls, mixture: LanguageMixture) -> "DeficitTables":
        languages = mixture.languages
        ranks = {name: rank for rank, name in enumerate(sorted(languages))}
        members = tuple(np.asarray(mixture.source_index(l), dtype=np.int64) for l in languages)
        probs = mixture.source_probabilities
        return cls(
            np.asarray([mixture.language_probabilities[l] for l in languages], dtype=np.float64),
            np.asarray([ranks[l] for l in languages], dtype=np.int64),
            np.asarray([languages.index(s.language) for s in mixture.sources], dtype=np.int64),
            np.asarray(probs, dtype=np.float64),
            members,
            # Summed in member order, as the sampler always has (the float result matters).
            np.asarray([sum(probs[i] for i in m) for m in members], dtype=np.float64))


class MixtureSampler:
    """Chooses the source of each packed sequence or document by token deficit; owns the state.

    Usage by the packer: ``begin_sample()`` gives the sample's uniform random numbers;
    ``pick_language(...)``/``pick_source(language)`` choose; ``record(source, tokens)`` books
    what was taken. ``state`` is the checkpointable :class:`MixtureState`.
    """

    RANDOMS_PER_SAMPLE = RANDOMS_PER_SAMPLE
    _BLOCK = 4096

    def __init__(self, mixture: LanguageMixture, seed: int,
                 start: Optional[MixtureState] = None) -> None:
        self.mixture = mixture
        self.seed = int(seed)
        prefixes = [s.path_prefix for s in mixture.sources]
        if start is not None and start.seed != self.seed:
            raise ValueError(f"resuming a data mixture with --seed {self.seed} but the "
                             f"checkpoint was written with seed {start.seed}")
        start = start or MixtureState(self.seed)
        # Sources no longer in the mixture keep their cursors (so re-adding resumes them).
        self._carried_tokens = {k: v for k, v in start.consumed_tokens.items()
                                if k not in prefixes}
        self.cursor = np.array([start.consumed_tokens.get(p, 0) for p in prefixes],
                               dtype=np.int64)
        self.language_tokens = {l: int(start.tokens_per_language.get(l, 0))
                                for l in mixture.languages}
        self._carried_language_tokens = {k: v for k, v in start.tokens_per_language.items()
                                         if k not in self.language_tokens}
        self.samples = int(start.samples)
        self._source_tokens = np.zeros(len(prefixes), dtype=np.int64)  # this phase's draws
        self._block_start, self._block = 0, None  # cache of upcoming random numbers
        self.tables = DeficitTables.of(mixture)

    def randoms(self, first_sample: int, count: int = 1) -> np.ndarray:
        """Uniform numbers of samples ``first_sample..+count`` -> [count, 4] (same on every
        rank and for any DP layout)."""
        return sample_randoms(self.seed, first_sample, count)

    def begin_sample(self) -> np.ndarray:
        """The next sample's random numbers; advances the RNG position by one sample."""
        offset = self.samples - self._block_start
        if self._block is None or not 0 <= offset < len(self._block):
            self._block_start, self._block = self.samples, self.randoms(self.samples,
                                                                        self._BLOCK)
            offset = 0
        self.samples += 1
        return self._block[offset]

    # -- deficit choices ----------------------------------------------------------------------

    def pick_language(self, candidates: Sequence[str], upcoming_tokens: int) -> str:
        """The candidate language furthest below its share after ``upcoming_tokens`` more."""
        languages = self.mixture.languages
        wanted = set(candidates)
        picked = pick_language_by_deficit(
            np.asarray([self.language_tokens[l] for l in languages], dtype=np.int64),
            self.tables.language_probabilities, self.tables.name_rank,
            np.asarray([l in wanted for l in languages]), int(upcoming_tokens))
        if picked < 0:
            raise ValueError("no language with a positive mixture probability to sample from")
        return languages[picked]

    def pick_source(self, language: str) -> int:
        n = self.mixture.languages.index(language)
        return int(pick_source_by_deficit(self._source_tokens, self.tables.source_probabilities,
                                          self.tables.members[n],
                                          self.tables.language_source_probability[n]))

    def record(self, source: int, tokens: int) -> None:
        self.cursor[source] += tokens
        self._source_tokens[source] += tokens
        self.language_tokens[self.mixture.sources[source].language] += tokens

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> MixtureState:
        consumed = dict(self._carried_tokens)
        consumed.update({s.path_prefix: int(c)
                         for s, c in zip(self.mixture.sources, self.cursor)})
        language_tokens = dict(self._carried_language_tokens)
        language_tokens.update(self.language_tokens)
        return MixtureState(
            self.seed, self.samples, consumed, language_tokens,
            {s.path_prefix: float(p)
             for s, p in zip(self.mixture.sources, self.mixture.source_probabilities)})

    def state_dict(self) -> dict:
        return self.state.to_dict()

    @classmethod
    def load_state_dict(cls, mixture: LanguageMixture, state: Mapping,
                        seed: Optional[int] = None) -> tuple["MixtureSampler", list[str]]:
        """Continue from a checkpointed state with (possibly) a new mixture.

        Returns the sampler and the list of mixture changes (empty if unchanged), which the
        caller logs.
        """
        previous = MixtureState.from_dict(state)
        sampler = cls(mixture, previous.seed if seed is None else seed, start=previous)
        return sampler, describe_mixture_change(previous, mixture)
