"""The synthetic-facts probe of cross-lingual transfer (make_sample_corpus --facts / --fact-probe):
every asked fact is stated in one language only, so the other language's question can only be
answered through it."""

import json
import re

import pytest

from megatron_trillion.cli.make_sample_corpus import main as corpus_main
from megatron_trillion.data.sample_facts import (
    ATTRIBUTES,
    CHOICES,
    fact_world,
    iter_fact_documents,
    iter_fact_items,
)

PEOPLE = 40


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = tmp_path_factory.mktemp("facts")
    corpus, probes = directory / "corpus.jsonl", {}
    assert corpus_main(["--output", str(corpus), "--docs-per-lang", "30", "--seed", "5",
                        "--facts", str(PEOPLE), "--fact-mentions", "3"]) == 0
    for source, target in (("en", "ko"), ("ko", "en")):
        probes[source] = directory / f"probe_{source}.jsonl"
        assert corpus_main(["--output", str(probes[source]), "--seed", "5", "--facts",
                            str(PEOPLE), "--fact-probe", "--fact-languages", source,
                            target]) == 0
    return _read(corpus), {source: _read(path) for source, path in probes.items()}


@pytest.mark.parametrize("source,target", [("en", "ko"), ("ko", "en")])
def test_items_are_answerable_only_through_the_other_language(written, source, target):
    corpus, probes = written
    texts = {lang: [r["text"] for r in corpus if r["lang"] == lang] for lang in (source, target)}
    items = probes[source]
    assert items
    for item in items:
        assert item["told_in"] == source
        for lang in (source, target):
            question = item[lang]
            answer = question["choices"][question["answer"]]
            statement = question["prompt"] + answer
            found = [t for t in texts[lang] if statement in t]
            if lang == source:
                # Recall: the corpus states the fact in the question's own language.
                assert found, (item["id"], statement)
                continue
            # Transfer: no document of the question's language states it; the person is named
            # there (by other facts), and no document naming them holds the answer's words.
            assert not found, (item["id"], statement)
            name = re.match(r"(The favorite color of )?([^\s의은는이가]+)", question["prompt"])
            named = [t for t in texts[lang] if name.group(2) in t]
            assert named, item["id"]
            assert not any(answer.strip(" .") in t for t in named), (item["id"], answer)


def test_choices_are_four_distinct_values_of_the_asked_type(written):
    _, probes = written
    items = probes["en"]
    for item in items:
        en, ko = item["en"], item["ko"]
        assert len(en["choices"]) == len(ko["choices"]) == CHOICES
        assert len(set(en["choices"])) == CHOICES and en["answer"] == ko["answer"]
        attribute = item["id"].rsplit("-", 1)[1]
        assert attribute in ATTRIBUTES
    answers = [item["en"]["answer"] for item in items]
    assert len(set(answers)) == CHOICES


def test_the_two_directions_ask_about_the_two_halves_of_the_same_world(written):
    _, probes = written
    en_ids = {item["id"] for item in probes["en"]}
    ko_ids = {item["id"] for item in probes["ko"]}
    assert en_ids and ko_ids and not en_ids & ko_ids
    people = fact_world(PEOPLE, 5)
    assert people == fact_world(PEOPLE, 5, ("ko", "en"))
    untranslated = [p for p in people if not p.translated]
    # Two attributes per untranslated person in each language; translated people are not asked.
    assert len(en_ids) == len(ko_ids) == 2 * len(untranslated)
    assert 0 < sum(p.translated for p in people) < PEOPLE


def test_deterministic_by_seed():
    def generated(seed):
        return ([d.to_json() for d in iter_fact_documents(12, seed, mentions=2)],
                list(iter_fact_items(12, seed)))
    assert generated(3) == generated(3)
    assert generated(3) != generated(4)


@pytest.mark.parametrize("argv,message", [
    (["--fact-probe"], "--fact-probe needs the --facts"),
    (["--facts", "0"], "--facts must be >= 1"),
    (["--facts", "5", "--fact-mentions", "0"], "--fact-mentions must be >= 1"),
    (["--facts", "5", "--fact-languages", "en", "en"], "two different languages"),
    (["--facts", "5", "--languages", "en", "ja"], "add ['ko'] to --languages"),
    (["--facts", "5", "--fact-probe", "--parallel-items", "3"], "are exclusive"),
    (["--facts", "5", "--conversations", "3"], "--facts goes with a corpus"),
])
def test_flag_mistakes_are_one_error_line_and_write_nothing(tmp_path, capsys, argv, message):
    output = tmp_path / "out.jsonl"
    assert corpus_main(["--output", str(output)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()
