"""IFEval's instruction checks (Zhou et al., 2023) and their Korean versions (Ko-IFEval).

A prompt's instructions come in IFEval's own layout: ``instruction_id_list`` (ids such as
``"keywords:existence"``) and ``kwargs`` (one dict per id; null-valued keys, as the published
dataset fills them, are ignored). Each check follows the rules of IFEval's reference code, with
two differences where that code needs data nothing here can download: sentences are counted by
the project's splitter (``data/sentence_split.py``) instead of nltk's punkt model, and capital
words are counted over a regex tokenization instead of nltk's Treebank tokenizer.

Ko-IFEval (Trillion-7B report, Table 15) keeps 22 of the 25 types - not the three
``change_case`` ones - under the same ids and kwargs, applied to Korean text: keywords are found
inside words (particles attach to them: 사과를), words are spacing units (eojeol), a title is in
«double angle brackets», the response language is decided by its share of the language's
script, a paragraph "starts with" its first word even with a particle attached, and
``detectable_format:constrained_response`` takes an ``options`` list (the report's "다음 옵션 중
하나로 응답하세요: {options}"; without it IFEval's English options apply).

Strict and loose accuracy are IFEval's: loose also accepts the response without its first
and/or last line and/or with ``*`` removed.
"""

from __future__ import annotations

import collections
import json
import re
import unicodedata
from typing import Callable, Optional

from megatron_trillion.data.sentence_split import split_sentences
from megatron_trillion.errors import UserError

RELATIONS = ("less than", "at least")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# kwargs of each instruction id: name -> type ("int", "str", "list", "relation")
KWARGS: dict[str, dict[str, str]] = {
    "keywords:existence": {"keywords": "list"},
    "keywords:frequency": {"keyword": "str", "frequency": "int", "relation": "relation"},
    "keywords:forbidden_words": {"forbidden_words": "list"},
    "keywords:letter_frequency": {"letter": "str", "let_frequency": "int",
                                  "let_relation": "relation"},
    "language:response_language": {"language": "str"},
    "length_constraints:number_sentences": {"num_sentences": "int", "relation": "relation"},
    "length_constraints:number_paragraphs": {"num_paragraphs": "int"},
    "length_constraints:number_words": {"num_words": "int", "relation": "relation"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": "int",
                                                    "nth_paragraph": "int", "first_word": "str"},
    "detectable_content:number_placeholders": {"num_placeholders": "int"},
    "detectable_content:postscript": {"postscript_marker": "str"},
    "detectable_format:number_bullet_lists": {"num_bullets": "int"},
    "detectable_format:constrained_response": {},
    "detectable_format:number_highlighted_sections": {"num_highlights": "int"},
    "detectable_format:multiple_sections": {"section_spliter": "str", "num_sections": "int"},
    "detectable_format:json_format": {},
    "detectable_format:title": {},
    "combination:two_responses": {},
    "combination:repeat_prompt": {"prompt_to_repeat": "str"},
    "startend:end_checker": {"end_phrase": "str"},
    "change_case:capital_word_frequency": {"capital_frequency": "int",
                                           "capital_relation": "relation"},
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "punctuation:no_comma": {},
    "startend:quotation": {},
}
# Table 15 has no case instructions: Hangul has no case.
KOREAN_IDS = tuple(i for i in KWARGS if not i.startswith("change_case:"))
_KOREAN_EXTRA_KWARGS = {"detectable_format:constrained_response": {"options": "list"}}


def _compare(count: int, relation: str, n: int) -> bool:
    return count < n if relation == "less than" else count >= n


# ---- English (IFEval's rules) ----------------------------------------------------------------

def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _detect_language(text: str) -> Optional[str]:
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed makes it deterministic
    try:
        return detect(text)
    except LangDetectException:
        return None  # IFEval counts an undetectable response as following


def _paragraphs_by_stars(text: str, separator: str) -> Optional[int]:
    paragraphs = re.split(separator, text)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return None  # an empty paragraph in the middle fails
    return count


def _nth_paragraph(text: str, nth: int, num: int) -> Optional[str]:
    paragraphs = re.split(r"\n\n", text)
    count = sum(1 for p in paragraphs if p.strip())
    if count != num or nth > count:
        return None
    paragraph = paragraphs[nth - 1].strip()
    return paragraph or None


def _first_word_en(text: str, a: dict) -> bool:
    paragraph = _nth_paragraph(text, a["nth_paragraph"], a["num_paragraphs"])
    if paragraph is None:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for letter in word:
        if letter in {".", ",", "?", "!", "'", '"'}:
            break
        first += letter.lower()
    return first == a["first_word"].lower()


def _postscript(text: str, a: dict) -> bool:
    marker = a["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def _bullets(text: str, a: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == a["num_bullets"]


def _highlights(text: str, a: dict) -> bool:
    found = re.findall(r"\*[^\n\*]*\*", text) + re.findall(r"\*\*[^\n\*]*\*\*", text)
    return sum(1 for h in found if h.strip("*").strip()) >= a["num_highlights"]


def _sections(text: str, a: dict) -> bool:
    pattern = r"\s?" + re.escape(a["section_spliter"]) + r"\s?\d+\s?"
    return len(re.split(pattern, text)) - 1 >= a["num_sections"]


def _json(text: str, a: dict) -> bool:
    text = text.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(prefix)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _two_responses(text: str, a: dict) -> bool:
    parts = text.split("******")
    valid = []
    for index, part in enumerate(parts):
        if not part.strip():
            if index not in (0, len(parts) - 1):
                return False
        else:
            valid.append(part)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _constrained(text: str, a: dict) -> bool:
    text = text.strip()
    return any(option in text for option in a.get("options") or CONSTRAINED_OPTIONS)


def _capital_words(text: str, a: dict) -> bool:
    words = re.findall(r"\w+|[^\w\s]+", text)
    return _compare(sum(1 for w in words if w.isupper()), a["capital_relation"],
                    a["capital_frequency"])


def _quotation(text: str, a: dict, quotes=(('"', '"'),)) -> bool:
    text = text.strip()
    return len(text) > 1 and any(text[0] == o and text[-1] == c for o, c in quotes)


Check = Callable[[str, dict], bool]

ENGLISH: dict[str, Check] = {
    "keywords:existence": lambda t, a: all(
        re.search(k, t, flags=re.IGNORECASE) for k in a["keywords"]),
    "keywords:frequency": lambda t, a: _compare(
        len(re.findall(a["keyword"].strip(), t, flags=re.IGNORECASE)), a["relation"],
        a["frequency"]),
    "keywords:forbidden_words": lambda t, a: not any(
        re.search(r"\b" + w + r"\b", t, flags=re.IGNORECASE) for w in a["forbidden_words"]),
    "keywords:letter_frequency": lambda t, a: _compare(
        collections.Counter(t.lower())[a["letter"].lower()], a["let_relation"],
        a["let_frequency"]),
    "language:response_language": lambda t, a: _detect_language(t) in (None, a["language"]),
    "length_constraints:number_sentences": lambda t, a: _compare(
        len(split_sentences(t, lowercase_continues=False)), a["relation"], a["num_sentences"]),
    "length_constraints:number_paragraphs": lambda t, a: _paragraphs_by_stars(
        t, r"\s?\*\*\*\s?") == a["num_paragraphs"],
    "length_constraints:number_words": lambda t, a: _compare(
        _words(t), a["relation"], a["num_words"]),
    "length_constraints:nth_paragraph_first_word": _first_word_en,
    "detectable_content:number_placeholders": lambda t, a: len(
        re.findall(r"\[.*?\]", t)) >= a["num_placeholders"],
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:constrained_response": _constrained,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:json_format": _json,
    "detectable_format:title": lambda t, a: any(
        m.lstrip("<").rstrip(">").strip() for m in re.findall(r"<<[^\n]+>>", t)),
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda t, a: t.strip().lower().startswith(
        a["prompt_to_repeat"].strip().lower()),
    "startend:end_checker": lambda t, a: t.strip().strip('"').lower().endswith(
        a["end_phrase"].strip().lower()),
    "change_case:capital_word_frequency": _capital_words,
    "change_case:english_capital": lambda t, a: t.isupper() and _detect_language(t) in (
        None, "en"),
    "change_case:english_lowercase": lambda t, a: t.islower() and _detect_language(t) in (
        None, "en"),
    "punctuation:no_comma": lambda t, a: "," not in t,
    "startend:quotation": _quotation,
}


# ---- Korean (Ko-IFEval) ----------------------------------------------------------------------

def _script(char: str) -> Optional[str]:
    if not char.isalpha():
        return None
    code = ord(char)
    if 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if 0x3040 <= code <= 0x30FF:
        return "kana"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF:
        return "han"
    if "LATIN" in unicodedata.name(char, ""):
        return "latin"
    return "other"


# The script(s) a response in each language is written in; the share of its letters in them
# must reach SCRIPT_SHARE (names, acronyms and code in another script are allowed).
_LANGUAGE_SCRIPTS = {"ko": {"hangul"}, "ja": {"kana", "han"}, "zh": {"han"}}
SCRIPT_SHARE = 0.8


def _korean_language(text: str, a: dict) -> bool:
    language = a["language"]
    scripts = [s for s in map(_script, text) if s is not None]
    if not scripts:
        return False
    wanted = _LANGUAGE_SCRIPTS.get(language)
    if wanted is None:  # a Latin-script language: its script, then which one (langdetect)
        share = sum(1 for s in scripts if s == "latin") / len(scripts)
        return share >= SCRIPT_SHARE and _detect_language(text) in (None, language)
    # Japanese mixes kana into its Han characters; Chinese has none
    if (language == "zh") == ("kana" in scripts) and language in ("zh", "ja"):
        return False
    return sum(1 for s in scripts if s in wanted) / len(scripts) >= SCRIPT_SHARE


def _eojeol(text: str) -> int:
    """Korean words: the units between spaces (a noun and its particle are one)."""
    return sum(1 for token in text.split() if re.search(r"\w", token))


def _first_word_ko(text: str, a: dict) -> bool:
    paragraph = _nth_paragraph(text, a["nth_paragraph"], a["num_paragraphs"])
    if paragraph is None:
        return False
    return paragraph.lstrip("'\"“‘*#> ").lower().startswith(a["first_word"].strip().lower())


def _contains(text: str, word: str) -> int:
    return len(re.findall(re.escape(word.strip()), text, flags=re.IGNORECASE))


KOREAN: dict[str, Check] = {
    **{i: ENGLISH[i] for i in KOREAN_IDS},
    "keywords:existence": lambda t, a: all(_contains(t, k) for k in a["keywords"]),
    "keywords:frequency": lambda t, a: _compare(
        _contains(t, a["keyword"]), a["relation"], a["frequency"]),
    "keywords:forbidden_words": lambda t, a: not any(
        _contains(t, w) for w in a["forbidden_words"]),
    "language:response_language": _korean_language,
    "length_constraints:number_sentences": lambda t, a: _compare(
        len(split_sentences(t)), a["relation"], a["num_sentences"]),
    "length_constraints:number_paragraphs": lambda t, a: _paragraphs_by_stars(
        t, r"\s?(?:\*\*\*|\* \* \*)\s?") == a["num_paragraphs"],
    "length_constraints:number_words": lambda t, a: _compare(
        _eojeol(t), a["relation"], a["num_words"]),
    "length_constraints:nth_paragraph_first_word": _first_word_ko,
    "detectable_format:title": lambda t, a: any(
        m.strip("«»<>").strip() for m in re.findall(r"«[^\n«»]+»|<<[^\n]+>>", t)),
    "punctuation:no_comma": lambda t, a: "," not in t and "，" not in t,
    "startend:quotation": lambda t, a: _quotation(t, a, quotes=(('"', '"'), ("“", "”"))),
}

CHECKS = {"ifeval": ENGLISH, "ko_ifeval": KOREAN}


# ---- instructions: validation and scoring ----------------------------------------------------

def _argument(instruction_id: str, name: str, kind: str, value):
    where = f"{instruction_id}'s {name!r}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise UserError(f"{where} must be an integer, got {value!r}")
        if value < 0:
            raise UserError(f"{where} must be >= 0, got {value!r}")
        return int(value)
    if kind == "relation":
        if value not in RELATIONS:
            raise UserError(f"{where} must be one of {list(RELATIONS)}, got {value!r}")
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v.strip() for v in value):
            raise UserError(f"{where} must be a list of non-empty strings, got {value!r}")
        return value
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} must be a non-empty string, got {value!r}")
    if name == "letter" and len(value) != 1:
        raise UserError(f"{where} must be one character, got {value!r}")
    return value


def parse_instructions(ground_truth, benchmark: str = "ifeval") -> list[tuple[str, dict]]:
    """``{"instruction_id_list": [...], "kwargs": [...]}`` (IFEval's layout) as validated
    (id, arguments) pairs; an unknown id, or kwargs that do not fit it, is a UserError."""
    if not isinstance(ground_truth, dict) or "instruction_id_list" not in ground_truth:
        raise UserError(f"{benchmark} needs IFEval's 'instruction_id_list' and 'kwargs', got "
                        f"{type(ground_truth).__name__}")
    ids = ground_truth["instruction_id_list"]
    kwargs = ground_truth.get("kwargs")
    if kwargs is None:
        kwargs = [{} for _ in ids] if isinstance(ids, list) else None
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list):
        raise UserError("'instruction_id_list' must be a non-empty list, and 'kwargs' a list")
    if len(kwargs) != len(ids):
        raise UserError(f"'kwargs' has {len(kwargs)} entries for {len(ids)} instructions")
    checks = CHECKS[benchmark]
    parsed = []
    for instruction_id, given in zip(ids, kwargs):
        if instruction_id not in checks:
            known = ("; Ko-IFEval has Table 15's 22 types, no change_case"
                     if instruction_id in ENGLISH else "")
            raise UserError(f"unknown {benchmark} instruction id {instruction_id!r}{known}")
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise UserError(f"{instruction_id}'s kwargs must be an object, got {given!r}")
        spec = dict(KWARGS[instruction_id])
        if benchmark == "ko_ifeval":
            spec.update(_KOREAN_EXTRA_KWARGS.get(instruction_id, {}))
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(spec))
        if unknown:
            raise UserError(f"{instruction_id} takes {sorted(spec) or 'no kwargs'}, not {unknown}")
        required = set(KWARGS[instruction_id])
        missing = sorted(required - set(given))
        if missing:
            raise UserError(f"{instruction_id} needs kwargs {missing}")
        arguments = {k: _argument(instruction_id, k, spec[k], v) for k, v in given.items()}
        if instruction_id == "length_constraints:nth_paragraph_first_word" and not (
                1 <= arguments["nth_paragraph"] <= arguments["num_paragraphs"]):
            raise UserError(f"{instruction_id}: nth_paragraph must be in 1..num_paragraphs")
        parsed.append((instruction_id, arguments))
    return parsed


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    variants = [response, without_first, without_last, without_both]
    return variants + [v.replace("*", "") for v in variants]


def follows(response: str, instructions: list[tuple[str, dict]], benchmark: str = "ifeval",
            loose: bool = False) -> list[bool]:
    """Whether ``response`` follows each instruction (strict, or IFEval's loose)."""
    checks = CHECKS[benchmark]
    variants = _loose_variants(response) if loose else [response]
    return [any(v.strip() and checks[i](v, a) for v in variants) for i, a in instructions]


def _verifier(benchmark: str):
    def verify(response: str, ground_truth) -> tuple[float, str]:
        instructions = (ground_truth if isinstance(ground_truth, list)  # already parsed
                        else parse_instructions(ground_truth, benchmark))
        followed = follows(response, instructions, benchmark)
        failed = [i for (i, _), ok in zip(instructions, followed) if not ok]
        reason = f"followed {len(followed) - len(failed)}/{len(followed)}"
        return (0.0, f"{reason}; failed {', '.join(failed)}") if failed else (1.0, reason)

    verify.__doc__ = (f"1 when the response follows every instruction ({benchmark}, strict: "
                      f"prompt-level accuracy of one sample), else 0.")
    return verify


ifeval = _verifier("ifeval")
ko_ifeval = _verifier("ko_ifeval")
