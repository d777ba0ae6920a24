"""On-policy preference pairs (the Trillion report pairs the SFT model's own responses with
off-policy ones): sampled responses + their scores -> DPO pairs.

Input: the generation engine's ``responses.jsonl``, one line per prompt::

    {"id": ..., "prompt": ..., "prompt_token_ids": [...],
     "responses": [{"text", "token_ids", "logprobs", "finish_reason"}, ...], ...}

(``id``: the line's own, else its line number). Scores come from a user's file of an external
reward model, ``{"id", "response_index", "score"}`` per line, or from a verifier by name
(``megatron_trillion.rewards``) against each line's ground truth. Per prompt the best-scored
response is chosen and the worst rejected, or, with an off-policy response for the prompt
(``{"id", "response", "score"}`` per line), the better and the worse of it and the best sampled
one. Prompts without a strict preference (ties, fewer than two scored responses) and pairs whose
response lengths differ by more than the length-ratio filter are left out and counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_trillion.errors import UserError
from megatron_trillion.posttraining.preferences import length_ratio

_MAX_REPORTED = 20


def _read_jsonl(path: str, what: str) -> tuple[list[tuple[int, dict]], list[str]]:
    """(line number, object) of every parsed non-empty line, and a ``file:line: problem`` for
    each line that is not a JSON object."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    good, errors = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(f"{path}:{number}: invalid UTF-8 at byte {exc.start}")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                errors.append(f"{path}:{number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                errors.append(f"{path}:{number}: expected a JSON object")
                continue
            good.append((number, record))
    return good, errors


def _line_number(error: str) -> int:
    return int(error.split(": ", 1)[0].rsplit(":", 1)[1])


def _raise(errors: list[str], what: str) -> None:
    if errors:
        more = len(errors) - _MAX_REPORTED
        raise UserError(f"bad {what}:\n  " + "\n  ".join(errors[:_MAX_REPORTED])
                        + (f"\n  ... and {more} more" if more > 0 else ""))


@dataclass
class PairReport:
    prompts: int = 0
    pairs: int = 0
    dropped: dict = field(default_factory=lambda: {"ties": 0, "fewer than two responses": 0,
                                                   "length ratio": 0})

    def describe(self) -> str:
        return (f"{self.pairs} pairs from {self.prompts} prompts; left out: "
                + ", ".join(f"{n} ({why})" for why, n in self.dropped.items()))


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def read_responses(path: str) -> list[dict]:
    """The prompts of ``responses.jsonl`` with their id, checked (UserError: file:line)."""
    out = []
    lines, errors = _read_jsonl(path, "responses")
    for number, record in lines:
        responses = record.get("responses")
        if "prompt" not in record or not isinstance(responses, list) or not all(
                isinstance(r, dict) and isinstance(r.get("text"), str) for r in responses):
            errors.append(f'{path}:{number}: expected {{"prompt": ..., "responses": '
                          '[{"text": ..., "token_ids": [...], ...}, ...]}')
            continue
        out.append({**record, "id": record.get("id", number), "_line": f"{path}:{number}"})
    _raise(sorted(errors, key=_line_number), "responses")
    return out


def read_scores(path: str, prompts: list[dict]) -> dict:
    """{(id key, response index): score} of a scores file; every id and index must exist and
    be scored once."""
    sizes = {_key(p["id"]): len(p["responses"]) for p in prompts}
    scores = {}
    lines, errors = _read_jsonl(path, "scores")
    for number, record in lines:
        where = f"{path}:{number}"
        if not {"id", "response_index", "score"} <= set(record):
            errors.append(f'{where}: expected {{"id", "response_index", "score"}}')
            continue
        key, index, score = _key(record["id"]), record["response_index"], record["score"]
        if key not in sizes:
            errors.append(f"{where}: id {record['id']!r} is not in the responses")
        elif not isinstance(index, int) or not 0 <= index < sizes[key]:
            errors.append(f"{where}: response_index {index!r} is not one of the "
                          f"{sizes[key]} responses of id {record['id']!r}")
        elif not isinstance(score, (int, float)) or isinstance(score, bool):
            errors.append(f"{where}: score {score!r} is not a number")
        elif (key, index) in scores:
            errors.append(f"{where}: id {record['id']!r} response {index} is scored twice")
        else:
            scores[(key, index)] = float(score)
    _raise(sorted(errors, key=_line_number), "scores")
    return scores


def verifier_scores(name: str, prompts: list[dict], ground_truth_field: str) -> dict:
    """Scores of every response by the verifier ``name`` against each line's ground truth."""
    try:
        from megatron_trillion.rewards import get_verifier
    except ImportError:
        raise UserError("--verifier needs the verifier registry (megatron_trillion.rewards), "
                        "which this installation lacks; score the responses and give "
                        "--scores") from None
    verifier = get_verifier(name)
    scores = {}
    for prompt in prompts:
        if ground_truth_field not in prompt:
            raise UserError(f"{prompt['_line']}: no {ground_truth_field!r} field for the "
                            f"verifier {name!r} (--ground-truth-field)")
        truth = prompt[ground_truth_field]
        if hasattr(verifier, "parse_ground_truth"):  # checked once, not per response
            truth = verifier.parse_ground_truth(truth)
        for index, response in enumerate(prompt["responses"]):
            value = verifier(response["text"], truth, sample=prompt["_line"])
            scores[(_key(prompt["id"]), index)] = float(value[0] if isinstance(value, tuple)
                                                        else value)
    return scores


def make_pairs(prompts: list[dict], scores: dict, *, off_policy: Optional[dict] = None,
               max_length_ratio: Optional[float] = None,
               count_tokens: Optional[Callable[[str], int]] = None
               ) -> tuple[list[dict], PairReport]:
    """Preference pairs (TRL's shape plus ``id`` and the two scores) and what was left out.

    ``off_policy``: {id key: (response text, score)}; ``count_tokens``: a response's length
    for the length filter when it has no ``token_ids`` (off-policy responses)."""
    report = PairReport(prompts=len(prompts))
    pairs = []
    for prompt in prompts:
        key = _key(prompt["id"])
        scored = [(scores[(key, i)], response["text"], response.get("token_ids"))
                  for i, response in enumerate(prompt["responses"]) if (key, i) in scores]
        scored.sort(key=lambda item: -item[0])  # stable: the first of equal scores first
        if off_policy is not None and key in off_policy:
            text, score = off_policy[key]
            if not scored:
                report.dropped["fewer than two responses"] += 1
                continue
            candidates = sorted([scored[0], (score, text, None)], key=lambda item: -item[0])
        elif len(scored) >= 2:
            candidates = [scored[0], scored[-1]]
        else:
            report.dropped["fewer than two responses"] += 1
            continue
        (best, chosen, chosen_ids), (worst, rejected, rejected_ids) = candidates
        if best == worst or chosen == rejected:
            report.dropped["ties"] += 1
            continue
        if max_length_ratio is not None:
            lengths = []
            for text, ids in ((chosen, chosen_ids), (rejected, rejected_ids)):
                if ids is None and count_tokens is None:
                    raise UserError("the length filter needs --tokenizer-model to count the "
                                    "tokens of off-policy responses")
                lengths.append(len(ids) if ids is not None else count_tokens(text))
            if length_ratio(*lengths) > max_length_ratio:
                report.dropped["length ratio"] += 1
                continue
        pairs.append({"id": prompt["id"], "prompt": prompt["prompt"], "chosen": chosen,
                      "rejected": rejected, "chosen_score": best, "rejected_score": worst})
    report.pairs = len(pairs)
    return pairs, report


def read_off_policy(path: str, prompts: list[dict]) -> dict:
    ids = {_key(p["id"]) for p in prompts}
    out = {}
    lines, errors = _read_jsonl(path, "off-policy responses")
    for number, record in lines:
        where = f"{path}:{number}"
        if not isinstance(record.get("response"), str) or not isinstance(
                record.get("score"), (int, float)) or "id" not in record:
            errors.append(f'{where}: expected {{"id", "response": str, "score": number}}')
        elif _key(record["id"]) not in ids:
            errors.append(f"{where}: id {record['id']!r} is not in the responses")
        else:
            out[_key(record["id"])] = (record["response"], float(record["score"]))
    _raise(sorted(errors, key=_line_number), "off-policy responses")
    return out


def write_pairs(path: str, pairs: list[dict]) -> None:
    """Atomically: a failed run leaves no partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
