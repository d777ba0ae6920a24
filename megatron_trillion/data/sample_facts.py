"""Synthetic facts for a cross-lingual transfer probe (the XLDA ablation's default).

A seeded *world* of made-up people, each with four attributes (home city, job, favourite
colour, favourite food). Every fact is stated in one of two languages only, A or B: each person
has two attributes told in A and the other two in B, so both of their names are known to a model
that reads both languages. A fraction of the people (``TRANSLATED_FRACTION``) are told in full in
both languages, with the B documents translations of the A ones: the only signal that aligns the
two languages' names and words.

The probe (:func:`iter_fact_items`) asks, for every person who is not translated, about each
attribute told only in the *source* language - in the source language (recall of a fact seen in
that language) and in the target language (transfer: the target-language corpus never states
it). Four choices of the same type (chance 1/4), cloze style on the corpus' own sentence pattern,
so ``S(T)->T(T)`` is the share of recalled facts that also transfer. Everything is deterministic
in ``seed``; the world does not depend on which of the two languages is the source, so the
reverse probe (source B, target A) asks about the other half of the same facts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from megatron_trillion.data.sample_corpus import SampleDocument, _has_final_consonant

FACT_LANGUAGES = ("en", "ko")
TRANSLATED_FRACTION = 0.25
CHOICES = 4

# Name syllables with their Hangul spelling; the names are made up, so a model can only know a
# person from this corpus.
_SYLLABLES = (
    ("ka", "카"), ("ki", "키"), ("ko", "코"), ("ma", "마"), ("mi", "미"), ("mo", "모"),
    ("na", "나"), ("ni", "니"), ("no", "노"), ("ra", "라"), ("ri", "리"), ("ro", "로"),
    ("sa", "사"), ("so", "소"), ("ta", "타"), ("to", "토"), ("ha", "하"), ("ho", "호"),
    ("ya", "야"), ("yo", "요"), ("be", "베"), ("du", "두"), ("gu", "구"), ("pe", "페"),
)

# attribute -> values as (en, ko); each value appears in both languages' corpus, told about
# different people.
_VALUES = {
    "city": (("Seoul", "서울"), ("Busan", "부산"), ("Paris", "파리"), ("London", "런던"),
             ("Tokyo", "도쿄"), ("Cairo", "카이로"), ("Rome", "로마"), ("Lima", "리마")),
    "job": (("a doctor", "의사"), ("a teacher", "선생님"), ("a farmer", "농부"),
            ("a painter", "화가"), ("a scientist", "과학자"), ("an engineer", "기술자"),
            ("a singer", "가수"), ("a pilot", "조종사")),
    "color": (("red", "빨간색"), ("blue", "파란색"), ("green", "초록색"), ("yellow", "노란색"),
              ("black", "검은색"), ("white", "흰색"), ("purple", "보라색"), ("orange", "주황색")),
    "food": (("bread", "빵"), ("rice", "밥"), ("apples", "사과"), ("noodles", "국수"),
             ("fish", "생선"), ("cheese", "치즈"), ("soup", "수프"), ("cake", "케이크")),
}
ATTRIBUTES = tuple(_VALUES)


def _topic(word: str) -> str:
    return "은" if _has_final_consonant(word) else "는"


def _subject(word: str) -> str:
    return "이" if _has_final_consonant(word) else "가"


def _statement(lang: str, attribute: str, name: str, value: str) -> tuple[str, str]:
    """(prompt, rest): the fact's sentence is ``prompt + rest``; ``rest`` starts with a space and
    is what the probe's choices vary."""
    if lang == "en":
        prompt, rest = {
            "city": (f"{name} lives in", f" {value}."),
            "job": (f"{name} works as", f" {value}."),
            "color": (f"The favorite color of {name} is", f" {value}."),
            "food": (f"{name} likes to eat", f" {value}."),
        }[attribute]
    else:
        prompt, rest = {
            "city": (f"{name}{_topic(name)}", f" {value}에 삽니다."),
            "job": (f"{name}의 직업은", f" {value}입니다."),
            "color": (f"{name}{_subject(name)} 좋아하는 색은", f" {value}입니다."),
            "food": (f"{name}{_subject(name)} 좋아하는 음식은", f" {value}입니다."),
        }[attribute]
    return prompt, rest


@dataclass(frozen=True)
class Person:
    names: Mapping[str, str]          # language -> name
    values: Mapping[str, int]         # attribute -> index into _VALUES[attribute]
    told_in: Mapping[str, tuple]      # attribute -> languages its fact is stated in
    translated: bool


def fact_world(num_people: int, seed: int,
               languages: tuple[str, str] = FACT_LANGUAGES) -> list[Person]:
    """The seeded people; the same for ``(A, B)`` and ``(B, A)``."""
    if sorted(languages) != sorted(FACT_LANGUAGES):
        raise ValueError(f"synthetic facts exist for {list(FACT_LANGUAGES)}, not "
                         f"{list(languages)}")
    if num_people < 1:
        raise ValueError(f"the number of people must be >= 1, got {num_people}")
    if num_people > len(_SYLLABLES) ** 3:
        raise ValueError(f"at most {len(_SYLLABLES) ** 3} people have distinct names")
    a, b = FACT_LANGUAGES
    rng = random.Random(f"{seed}-facts")
    spellings = rng.sample(range(len(_SYLLABLES) ** 3), num_people)
    translated = set(rng.sample(range(num_people), round(num_people * TRANSLATED_FRACTION)))
    people = []
    for index, spelling in enumerate(spellings):
        parts = [_SYLLABLES[spelling // len(_SYLLABLES) ** k % len(_SYLLABLES)] for k in range(3)]
        names = {a: "".join(p[0] for p in parts).capitalize(), b: "".join(p[1] for p in parts)}
        values = {attribute: rng.randrange(len(_VALUES[attribute])) for attribute in ATTRIBUTES}
        in_a = set(rng.sample(ATTRIBUTES, len(ATTRIBUTES) // 2))
        if index in translated:
            told_in = {attribute: (a, b) for attribute in ATTRIBUTES}
        else:
            told_in = {attribute: (a,) if attribute in in_a else (b,) for attribute in ATTRIBUTES}
        people.append(Person(names, values, told_in, index in translated))
    return people


def _sentence(lang: str, person: Person, attribute: str) -> str:
    value = _VALUES[attribute][person.values[attribute]][FACT_LANGUAGES.index(lang)]
    prompt, rest = _statement(lang, attribute, person.names[lang], value)
    return prompt + rest


def iter_fact_documents(num_people: int, seed: int, mentions: int = 4,
                        languages: tuple[str, str] = FACT_LANGUAGES
                        ) -> Iterator[SampleDocument]:
    """``mentions`` short documents per person and language, each stating that person's facts
    told in the language in a shuffled order (a translated person's documents in the two
    languages are translations of each other)."""
    if mentions < 1:
        raise ValueError(f"mentions must be >= 1, got {mentions}")
    people = fact_world(num_people, seed, languages)
    rng = random.Random(f"{seed}-fact-documents")
    for mention in range(mentions):
        for index, person in enumerate(people):
            order = list(ATTRIBUTES)
            rng.shuffle(order)
            for lang in FACT_LANGUAGES:
                told = [attribute for attribute in order if lang in person.told_in[attribute]]
                text = " ".join(_sentence(lang, person, attribute) for attribute in told)
                yield SampleDocument(id=f"fact-{lang}-{mention}-{index:05d}", text=text,
                                     lang=lang, quality=1.0)


def iter_fact_items(num_people: int, seed: int,
                    languages: tuple[str, str] = FACT_LANGUAGES) -> Iterator[dict]:
    """Parallel multiple-choice items ``{"id", "<source>": {...}, "<target>": {...},
    "told_in": source}`` (``languages`` = (source, target)) about the facts told only in the
    source language."""
    source, _ = languages
    people = fact_world(num_people, seed, languages)
    rng = random.Random(f"{seed}-fact-items-{source}")
    for index, person in enumerate(people):
        for attribute in ATTRIBUTES:
            if person.told_in[attribute] != (source,):
                continue
            right = person.values[attribute]
            wrong = rng.sample([v for v in range(len(_VALUES[attribute])) if v != right],
                               CHOICES - 1)
            answer = rng.randrange(CHOICES)
            options = wrong[:answer] + [right] + wrong[answer:]
            item = {"id": f"fact-{index:05d}-{attribute}", "told_in": source}
            for lang in languages:
                column = FACT_LANGUAGES.index(lang)
                prompt, _ = _statement(lang, attribute, person.names[lang], "")
                item[lang] = {"prompt": prompt, "answer": answer, "choices": [
                    _statement(lang, attribute, person.names[lang],
                               _VALUES[attribute][v][column])[1] for v in options]}
            yield item


def write_fact_items(path: str | Path, num_people: int, seed: int,
                     languages: tuple[str, str] = FACT_LANGUAGES) -> Path:
    """Writes :func:`iter_fact_items` as JSONL (for tools/eval_consistency.py); returns path."""
    items = list(iter_fact_items(num_people, seed, languages))
    if not items:
        raise ValueError(f"{num_people} people leave no fact told only in {languages[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path
