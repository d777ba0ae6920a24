"""Offline rule-based sentence splitting for ``--split-sentences``.

Megatron-LM splits with NLTK's punkt model, which must be downloaded (``nltk.download``) and
knows no Korean or Japanese. This splitter needs no data and handles the scripts we train on:

- ``. ! ? …`` (and runs of them) end a sentence when followed by whitespace, so Latin-script and
  Korean text (which uses ASCII punctuation between spaced words) split as punkt would;
  decimals (``3.14``), URLs and ``e.g.x`` do not split because no whitespace follows.
- A ``.`` does not end a sentence after a known abbreviation (``Mr.``, ``e.g.``, ``etc.``), after
  a single letter (initials such as ``J. R. R.``), or when the next word starts lowercase
  (punkt's strongest orthographic cue).
- ``。 ！ ？ ．`` (CJK full-width enders) end a sentence immediately, with or without a space.
- Closing quotes and brackets right after the ender stay with the sentence (``He said "no."``);
  a Japanese quote followed by the quotative particle (``「本当？」と聞いた。``) is not split.
- A newline alone is not a boundary (as with punkt).

Like Megatron-LM's punkt setup, whitespace between sentences is dropped unless
``keep_newlines`` is set, in which case each sentence keeps its trailing whitespace, so joining
the sentences gives back the document exactly (its newlines included).
"""

from __future__ import annotations

import re

_CLOSERS = "\"'”’)]}」』）】》〉"
_BOUNDARY = re.compile(
    rf"(?P<latin>[.!?…]+[{re.escape(_CLOSERS)}]*)(?P<lspace>\s+)"
    rf"|(?P<cjk>[。！？．]+[{re.escape(_CLOSERS)}]*)(?P<cspace>\s*)"
)
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf al inc ltd co corp dept univ no vol "
    "fig figs eq approx jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k".split()
)
_LAST_WORD = re.compile(r"(\S+)$")


def _is_abbreviation(text: str, start: int, dot_end: int) -> bool:
    word_match = _LAST_WORD.search(text, 0, dot_end)
    if word_match is None:
        return False
    word = word_match.group(1)[: dot_end - word_match.start(1)].rstrip(".").lstrip("(\"'“‘")
    lowered = word.lower()
    return lowered in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str, keep_newlines: bool = False, *,
                    lowercase_continues: bool = True) -> list[str]:
    """Splits `text` into sentences (see the module docstring for the rules).
    ``lowercase_continues=False`` drops the lowercase-next-word rule: punkt applies that cue
    only to words it has seen, so on short or unusual text (IFEval's) it splits there."""
    sentences = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.group("latin") is not None:
            ender = match.group("latin")
            end_of_ender = match.end("latin")
            next_char = text[match.end() : match.end() + 1]
            if ender.rstrip(_CLOSERS).endswith(".") and ender.rstrip(_CLOSERS) == ".":
                if _is_abbreviation(text, start, match.start("latin")) or (
                    lowercase_continues and next_char.isalpha() and next_char.islower()
                ):
                    continue
            if not next_char:
                continue  # end of text: the remainder below is the last sentence
        else:
            end_of_ender = match.end("cjk")
            # a quoted sentence followed by the quotative particle と continues the sentence
            if text[match.end() : match.end() + 1] == "と" or not text[match.end() :].strip():
                continue
        cut = match.end() if keep_newlines else end_of_ender
        piece = text[start:cut]
        if piece.strip():
            sentences.append(piece if keep_newlines else piece.strip())
        start = match.end()
    tail = text[start:]
    if tail.strip():
        sentences.append(tail if keep_newlines else tail.strip())
    return sentences
