"""The report's generative benchmarks (Trillion-7B, Table 3 / Appendix): GSM8K, MATH and HRM8K
(0-shot CoT, exact match) and IFEval / Ko-IFEval (the mean of prompt- and instruction-level strict
accuracy), scored with the verifiers of ``megatron_trillion.rewards``.

Data is the user's JSONL in the public datasets' own field names (nothing is downloaded):
GSM8K ``question`` / ``answer`` (ending ``#### N``), MATH ``problem`` / ``solution`` (its last
``\\boxed{}``), HRM8K ``question`` / ``answer``, IFEval and Ko-IFEval ``prompt`` /
``instruction_id_list`` / ``kwargs``. A sample's id is its ``id`` field, else IFEval's ``key``,
else its 0-based position in the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from megatron_trillion.data.jsonl import read_jsonl
from megatron_trillion.errors import UserError
from megatron_trillion.rewards import get_verifier, ifeval

# Figure 7 of the report, for GSM8K and MATH (HRM8K is scored the same way).
COT_TEMPLATE = "Q: {question}\nPut your answer within \\boxed{}. Let's think step by step."


@dataclass(frozen=True)
class Task:
    name: str
    question_field: str  # what {question} in the prompt template stands for
    truth: Callable[[dict], Any]  # the record's ground truth, as its verifier takes it
    truth_fields: tuple[str, ...]
    verifier: str  # the default; instruction-following tasks score per instruction instead
    template: str

    @property
    def instruction_following(self) -> bool:
        return self.verifier in ("ifeval", "ko_ifeval")


def _instructions(record: dict) -> dict:
    return {"instruction_id_list": record["instruction_id_list"], "kwargs": record.get("kwargs")}


TASKS = {
    "gsm8k": Task("gsm8k", "question", lambda r: r["answer"], ("answer",), "gsm8k",
                  COT_TEMPLATE),
    "math": Task("math", "problem", lambda r: r["solution"], ("solution",), "math",
                 COT_TEMPLATE),
    "hrm8k": Task("hrm8k", "question", lambda r: r["answer"], ("answer",), "math",
                  COT_TEMPLATE),
    "ifeval": Task("ifeval", "prompt", _instructions, ("instruction_id_list",), "ifeval",
                   "{question}"),
    "ko_ifeval": Task("ko_ifeval", "prompt", _instructions, ("instruction_id_list",),
                      "ko_ifeval", "{question}"),
}


@dataclass
class Sample:
    id: Any
    where: str  # file:line
    prompt: str  # the text sent to the model
    truth: Any  # parsed by the verifier (IFEval: a list of (instruction id, arguments))


def load_samples(task: Task, path: str, template: Optional[str] = None,
                 verifier: Optional[str] = None, limit: Optional[int] = None) -> list[Sample]:
    """The benchmark's items; a missing field, a ground truth that does not parse or a repeated
    id is a UserError naming ``file:line``."""
    template = task.template if template is None else template
    checker = get_verifier(verifier or task.verifier)
    samples, seen = [], {}
    for index, (where, record) in enumerate(read_jsonl(path)):
        if limit is not None and len(samples) >= limit:
            break
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object")
        missing = [f for f in (task.question_field, *task.truth_fields) if f not in record]
        if missing:
            raise UserError(f"{where}: no {', '.join(map(repr, missing))} field ({task.name} "
                            f"items have {task.question_field!r} and "
                            f"{' / '.join(task.truth_fields)})")
        question = record[task.question_field]
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{where}: {task.question_field!r} must be a non-empty string")
        sample_id = record.get("id", record.get("key", index))
        if str(sample_id) in seen:
            raise UserError(f"{where}: id {sample_id!r} repeats {seen[str(sample_id)]}")
        seen[str(sample_id)] = where
        try:
            truth = checker.parse_ground_truth(task.truth(record))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from exc
        samples.append(Sample(sample_id, where, template.replace("{question}", question), truth))
    if not samples:
        raise UserError(f"{path}: no items")
    return samples


def load_responses(path: str, samples: list[Sample],
                   skipped: tuple[Sample, ...] = ()) -> list[list[str]]:
    """Responses made elsewhere (``{"id": ..., "response": ...}`` per line, several lines per id
    for pass@k), in the samples' order. Every sample needs the same number of responses;
    responses to ``skipped`` items (past ``--limit``) are left out."""
    index = {str(s.id): i for i, s in enumerate(samples)}
    left_out = {str(s.id) for s in skipped}
    responses: list[list[str]] = [[] for _ in samples]
    for where, record in read_jsonl(path):
        if not isinstance(record, dict) or "id" not in record or not isinstance(
                record.get("response"), str):
            raise UserError(f"{where}: expected {{\"id\": ..., \"response\": \"...\"}}")
        position = index.get(str(record["id"]))
        if position is None and str(record["id"]) in left_out:
            continue
        if position is None:
            raise UserError(f"{where}: id {record['id']!r} is not in the data")
        responses[position].append(record["response"])
    missing = [s.id for s, r in zip(samples, responses) if not r]
    if missing:
        raise UserError(f"{path}: no response for {len(missing)} of {len(samples)} items "
                        f"(ids {missing[:5]}{' ...' if len(missing) > 5 else ''})")
    counts = sorted({len(r) for r in responses})
    if len(counts) > 1:
        uneven = next(s.id for s, r in zip(samples, responses) if len(r) != counts[0])
        raise UserError(f"{path}: items have {counts[0]} to {counts[-1]} responses (e.g. id "
                        f"{uneven!r}); pass@k needs the same number for every item")
    return responses


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased pass@k of n samples with ``correct`` right (Chen et al., 2021)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def score(task: Task, samples: list[Sample], responses: list[list[str]],
          verifier: Optional[str] = None) -> dict:
    """The results: ``task``, ``score`` and the task's metrics, and one entry per response in
    ``samples`` (``id``, ``score``, ``reason``, ``response``; ``sample`` numbers the responses
    of an id when there are several)."""
    n = len(responses[0])
    entries, metrics = [], {}
    if task.instruction_following:
        strict_prompt = strict_inst = loose_prompt = loose_inst = total = 0
        for sample, group in zip(samples, responses):
            for k, response in enumerate(group):
                strict = ifeval.follows(response, sample.truth, task.verifier)
                loose = ifeval.follows(response, sample.truth, task.verifier, loose=True)
                strict_prompt += all(strict)
                loose_prompt += all(loose)
                strict_inst += sum(strict)
                loose_inst += sum(loose)
                total += len(strict)
                failed = [i for (i, _), ok in zip(sample.truth, strict) if not ok]
                reason = f"followed {len(strict) - len(failed)}/{len(strict)}" + (
                    f"; failed {', '.join(failed)}" if failed else "")
                entries.append(_entry(sample, k, n, float(all(strict)), reason, response))
        responses_total = len(samples) * n
        metrics = {"prompt_level_strict_acc": strict_prompt / responses_total,
                   "inst_level_strict_acc": strict_inst / total,
                   "prompt_level_loose_acc": loose_prompt / responses_total,
                   "inst_level_loose_acc": loose_inst / total}
        value = (metrics["prompt_level_strict_acc"] + metrics["inst_level_strict_acc"]) / 2
    else:
        checker = get_verifier(verifier or task.verifier)
        right_per_item = []
        for sample, group in zip(samples, responses):
            right = 0
            for k, response in enumerate(group):
                result = checker(response, sample.truth, sample=f"{sample.where} (id "
                                 f"{sample.id!r})")
                right += result.score == 1.0
                entries.append(_entry(sample, k, n, result.score, result.reason, response))
            right_per_item.append(right)
        value = sum(e["score"] for e in entries) / len(entries)
        metrics = {"exact_match": value}
        if n > 1:
            metrics["pass@1"] = sum(pass_at_k(n, c, 1) for c in right_per_item) / len(samples)
            metrics[f"pass@{n}"] = sum(pass_at_k(n, c, n) for c in right_per_item) / len(samples)
    return {"task": task.name, "score": value, **metrics, "num_items": len(samples),
            "responses_per_item": n, "samples": entries}


def _entry(sample: Sample, k: int, n: int, value: float, reason: str, response: str) -> dict:
    entry = {"id": sample.id, "score": value, "reason": reason, "response": response}
    if n > 1:
        entry["sample"] = k
    return entry


def format_table(results: dict, title: str) -> str:
    names = [k for k, v in results.items()
             if k not in ("task", "samples") and isinstance(v, (int, float))]
    width = max(len(k) for k in names)
    lines = [title, "-" * max(len(title), width + 12)]
    for name in names:
        value = results[name]
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)
