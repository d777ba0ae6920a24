"""Cross-lingual consistency (Trillion-7B report, section 7.1, eq. 3-4) of a Hugging Face model.

On parallel multiple-choice questions (the same question in a source language S and a target
language T), with ``S(T)`` / ``S(F)`` for a correct / wrong prediction in S:

* ``S(T)->T(T)`` = P(correct in T | correct in S) - eq. 3, higher is better;
* ``T(F)->S(T)`` = P(correct in S | wrong in T) - lower is better;
* ``S(F)->T(T)`` = P(correct in T | wrong in S) - eq. 4, lower is better,

as fractions in [0, 1], ``None`` where the condition never occurs. The letters are the
languages' initials (E, K for en, ko). Problems with the input raise ``UserError`` naming
``file:line``.

Prediction is lm-evaluation-harness's multiple-choice log-likelihood "acc": each choice is
scored by the sum of its tokens' log-probabilities after the prompt, the best-scoring choice
(the first on ties) is the prediction. Tokenization follows lm-eval where they can agree:

* trailing whitespace of the prompt moves to the front of every choice (lm-eval's
  ``_encode_pair``), so ``"Answer: "`` + ``"A"`` is scored as ``"Answer:"`` + ``" A"``;
* an empty prompt is replaced by the BOS token (EOS without a BOS), as lm-eval's
  ``prefix_token_id``;
* a prompt + choice longer than the model's context keeps its last tokens (left truncation);
* the log-softmax runs over all of the model's logits, padded vocabulary rows included.

Deliberate differences: the prompt and each choice are tokenized *separately* and without
special tokens, and the choice's tokens are appended to the prompt's. lm-eval tokenizes
prompt + choice as one string (plus the tokenizer's default special tokens, e.g. a Llama BOS)
and splits it at the prompt's token count, so a merge across the boundary can move characters
between prompt and choice; here every choice is conditioned on exactly the same prompt tokens.
lm-eval also inserts its task's ``target_delimiter`` (" ") before each choice: write the choices
(or the prompt's end) with that space to reproduce a task. Predictions from lm-eval itself are
read by :func:`read_lm_eval_samples`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from megatron_trillion.data.jsonl import read_jsonl
from megatron_trillion.errors import UserError

__all__ = [
    "Question",
    "ParallelItem",
    "load_parallel_items",
    "load_hf_model",
    "encode_choice",
    "score_requests",
    "predict",
    "consistency_metrics",
    "metric_names",
    "read_lm_eval_samples",
    "pair_lm_eval_samples",
    "format_table",
]


# ---------------------------------------------------------------------------------------------
# parallel items


@dataclass(frozen=True)
class Question:
    prompt: str
    choices: tuple[str, ...]
    answer: int
    where: str  # "file:line", for messages


@dataclass(frozen=True)
class ParallelItem:
    id: str
    questions: Mapping[str, Question] = field(default_factory=dict)


def load_parallel_items(path: str, languages: Sequence[str]) -> list[ParallelItem]:
    """Read ``{"id", "<lang>": {"prompt", "choices", "answer"}, ...}`` lines; every problem is
    a ``UserError`` naming ``file:line``. Languages other than ``languages`` are ignored."""
    if not os.path.isfile(path):
        raise UserError(f"--data {path}: no such file")
    items: list[ParallelItem] = []
    seen: dict[str, str] = {}
    for where, record in read_jsonl(path):
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object per line")
        if "id" not in record:
            raise UserError(f"{where}: item has no \"id\"")
        item_id = str(record["id"])
        if item_id in seen:
            raise UserError(f"{where}: id {item_id!r} already used at {seen[item_id]}")
        seen[item_id] = where
        questions = {}
        for language in languages:
            if language not in record:
                present = sorted(k for k, v in record.items() if isinstance(v, dict))
                raise UserError(f"{where}: item {item_id!r} has no {language!r} question "
                                 f"(it has {present})")
            questions[language] = _question(record[language], f"{where} [{language}]")
        items.append(ParallelItem(item_id, questions))
    if not items:
        raise UserError(f"--data {path}: no items")
    return items


def _question(raw, where: str) -> Question:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected an object with prompt, choices, answer")
    missing = [k for k in ("prompt", "choices", "answer") if k not in raw]
    if missing:
        raise UserError(f"{where}: missing {missing}")
    prompt, choices, answer = raw["prompt"], raw["choices"], raw["answer"]
    if not isinstance(prompt, str):
        raise UserError(f"{where}: prompt must be a string")
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: choices must be a non-empty list of strings, got {choices!r}")
    for n, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise UserError(f"{where}: choice {n} must be a non-empty string, got {choice!r}")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where}: answer must be the index of the right choice, got {answer!r}")
    if not 0 <= answer < len(choices):
        raise UserError(f"{where}: answer {answer} is out of range for {len(choices)} choices "
                         f"(0..{len(choices) - 1})")
    return Question(prompt, tuple(choices), answer, where)


# ---------------------------------------------------------------------------------------------
# scoring with a transformers model


def load_hf_tokenizer(model_dir: str):
    """The tokenizer of a Hugging Face directory (also one whose tokenizer_config.json names no
    tokenizer class, as a tokenizer.json-only export)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"{model_dir} has no tokenizer (tokenizer.json); export with "
                             "--tokenizer-model") from None
        return PreTrainedTokenizerFast(tokenizer_file=path)


def load_hf_model(model_dir: str, device: Optional[str] = None, dtype: str = "auto"):
    """(model in eval mode on ``device`` - CUDA when present -, tokenizer) of an HF directory
    such as an export of tools/convert_checkpoint.py (Llama or AFMoE)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"--model {model_dir}: no config.json (a Hugging Face model directory, "
                         "e.g. from tools/convert_checkpoint.py export)")
    dtypes = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16,
              "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_hf_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtypes[dtype]).to(device)
    return model.eval(), tokenizer


def encode_choice(tokenizer, prompt: str, choice: str, prefix_token_id: Optional[int],
                  where: str = "") -> tuple[list[int], list[int]]:
    """(context token ids, continuation token ids) of one choice, as described above."""
    stripped = prompt.rstrip()
    if len(stripped) < len(prompt):
        choice = prompt[len(stripped):] + choice
    context = tokenizer.encode(stripped, add_special_tokens=False) if stripped else []
    continuation = tokenizer.encode(choice, add_special_tokens=False)
    if not continuation:
        raise UserError(f"{where}: choice {choice!r} has no tokens")
    if not context:
        if prefix_token_id is None:
            raise UserError(f"{where}: the prompt is empty and the tokenizer has neither a BOS "
                             "nor an EOS token to condition the choices on")
        if continuation[0] == prefix_token_id:  # lm-eval: a choice that starts with it
            context, continuation = continuation[:1], continuation[1:]
        else:
            context = [prefix_token_id]
    return context, continuation


def score_requests(model, requests: Sequence[tuple[list[int], list[int]]], *,
                   batch_size: int = 16, max_length: Optional[int] = None,
                   progress: bool = True) -> list[float]:
    """Sum of continuation-token log-probabilities of each (context, continuation) request.

    Requests run longest first in right-padded batches (padding masked out); a request longer
    than ``max_length`` + 1 tokens keeps its last ones. Returns scores in request order.
    """
    import torch

    device = next(model.parameters()).device
    inputs = []
    for context, continuation in requests:
        if max_length is not None and len(continuation) > max_length:
            raise UserError(f"a choice of {len(continuation)} tokens is longer than the model's "
                             f"context ({max_length})")
        whole = context + continuation
        if max_length is not None:
            whole = whole[-(max_length + 1):]
        inputs.append(whole[:-1])  # the last token is only ever a target
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    scores = [0.0] * len(requests)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = _progress(len(requests)) if progress else None
    with torch.no_grad():
        for batch in batches:
            width = max(len(inputs[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
                mask[row, :len(inputs[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(batch):
                continuation = requests[i][1]
                end = len(inputs[i])
                # Positions end-len .. end-1 predict the continuation's tokens.
                rows = logits[row, end - len(continuation):end].float()
                logprobs = torch.log_softmax(rows, dim=-1)
                target = torch.tensor(continuation, device=logprobs.device).unsqueeze(1)
                scores[i] = float(logprobs.gather(1, target).sum())
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return scores


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="scoring choices", unit="choice", dynamic_ncols=True)


def predict(model, tokenizer, items: Sequence[ParallelItem], languages: Sequence[str], *,
            batch_size: int = 16, progress: bool = True) -> dict[str, list[bool]]:
    """Per language, whether each item's best-scoring choice is its answer."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    requests, owners = [], []
    for n, item in enumerate(items):
        for language in languages:
            question = item.questions[language]
            for choice in question.choices:
                requests.append(encode_choice(tokenizer, question.prompt, choice, prefix,
                                              question.where))
                owners.append((language, n))
    vocab = model.get_output_embeddings().weight.shape[0]
    largest = max(max(c + k) for c, k in requests)
    if largest >= vocab:
        raise UserError(f"the tokenizer produced token id {largest} but the model has only "
                         f"{vocab} output rows: model and tokenizer do not belong together")
    max_length = getattr(model.config, "max_position_embeddings", None)
    scores = score_requests(model, requests, batch_size=batch_size, max_length=max_length,
                            progress=progress)
    grouped: dict[tuple[str, int], list[float]] = {}
    for owner, score in zip(owners, scores):
        grouped.setdefault(owner, []).append(score)
    correct = {language: [] for language in languages}
    for n, item in enumerate(items):
        for language in languages:
            choice_scores = grouped[(language, n)]
            best = max(range(len(choice_scores)), key=lambda c: (choice_scores[c], -c))
            correct[language].append(best == item.questions[language].answer)
    return correct


# ---------------------------------------------------------------------------------------------
# the metrics


def metric_names(source: str, target: str) -> dict[str, str]:
    """Key names: ``acc_<lang>`` and the three consistency metrics with language initials."""
    s, t = source[:1].upper(), target[:1].upper()
    if s == t:  # e.g. zh / zu: initials would be ambiguous
        s, t = source.upper(), target.upper()
    return {"acc_source": f"acc_{source}", "acc_target": f"acc_{target}",
            "transfer": f"{s}(T)->{t}(T)", "target_wrong": f"{t}(F)->{s}(T)",
            "source_wrong": f"{s}(F)->{t}(T)"}


def consistency_metrics(source_correct: Sequence[bool], target_correct: Sequence[bool],
                        source: str, target: str) -> dict:
    """Per-language accuracy and the three conditional metrics (``None`` when undefined)."""
    if len(source_correct) != len(target_correct):
        raise ValueError("source and target predictions must be for the same items")
    names = metric_names(source, target)

    def fraction(hits: Iterable[bool]) -> Optional[float]:
        hits = list(hits)
        return sum(hits) / len(hits) if hits else None

    pairs = list(zip(source_correct, target_correct))
    return {
        names["acc_source"]: fraction(s for s, _ in pairs),
        names["acc_target"]: fraction(t for _, t in pairs),
        names["transfer"]: fraction(t for s, t in pairs if s),
        names["target_wrong"]: fraction(s for s, t in pairs if not t),
        names["source_wrong"]: fraction(t for s, t in pairs if not s),
        "num_items": len(pairs),
        "source_language": source,
        "target_language": target,
    }


def format_table(metrics: Mapping, title: str = "") -> str:
    """The metrics as a Markdown-style table (``n/a`` where undefined)."""
    names = metric_names(metrics["source_language"], metrics["target_language"])
    direction = {"transfer": "higher is better", "target_wrong": "lower is better",
                 "source_wrong": "lower is better", "acc_source": "", "acc_target": ""}
    lines = [title] if title else []
    lines += ["| metric | value | |", "|---|---|---|"]
    for role in ("acc_source", "acc_target", "transfer", "target_wrong", "source_wrong"):
        value = metrics[names[role]]
        text = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"| {names[role]} | {text} | {direction[role]} |")
    lines.append(f"({metrics['num_items']} parallel items)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness --log_samples output


@dataclass(frozen=True)
class LoggedSample:
    correct: bool
    where: str


def read_lm_eval_samples(path: str, metric: str = "acc",
                         pair_key: str = "doc_id") -> dict:
    """``{key: LoggedSample}`` of one ``samples_<task>_<date>.jsonl`` file written by
    ``lm_eval --log_samples``: one JSON object per document with ``doc_id``, ``doc`` and the
    per-document metric values (``"acc": 1.0``). ``pair_key`` is ``doc_id`` or a field of
    ``doc`` (e.g. Global-MMLU's ``sample_id``) that names the same question in every language.
    """
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    samples: dict = {}
    for where, record in read_jsonl(path, "; expected lm-eval --log_samples output"):
        if not isinstance(record, dict) or "doc_id" not in record:
            raise UserError(f"{where}: no \"doc_id\"; expected lm-eval --log_samples "
                             "output (samples_<task>_<date>.jsonl)")
        if metric not in record:
            logged = [k for k in record.get("metrics", []) if k in record]
            raise UserError(f"{where}: no per-sample metric {metric!r} (this task logs "
                             f"{logged}); choose one with --lm-eval-metric")
        value = record[metric]
        if not isinstance(value, (int, float)) or value not in (0, 1):
            raise UserError(f"{where}: metric {metric!r} is {value!r}, not 0/1 correctness")
        if pair_key == "doc_id":
            key = record["doc_id"]
        else:
            doc = record.get("doc")
            if not isinstance(doc, dict) or pair_key not in doc:
                raise UserError(f"{where}: the doc has no field {pair_key!r} to pair "
                                 "languages by (--pair-key)")
            key = doc[pair_key]
        key = json.dumps(key, sort_keys=True)
        if key in samples:
            raise UserError(f"{where}: {pair_key} {key} already at {samples[key].where} "
                             "(several filters or repeats in one file are ambiguous)")
        samples[key] = LoggedSample(bool(value), where)
    if not samples:
        raise UserError(f"{path}: no samples")
    return samples


def pair_lm_eval_samples(source_paths: Sequence[str], target_paths: Sequence[str],
                         metric: str = "acc", pair_key: str = "doc_id"
                         ) -> tuple[list[bool], list[bool]]:
    """Correctness of the same questions in both languages from lm-eval sample logs.

    With ``pair_key="doc_id"`` the i-th source file is paired with the i-th target file (the
    same task in two languages, e.g. ``global_mmlu_en_stem`` and ``global_mmlu_ko_stem``);
    with a ``doc`` field all files of a language are pooled and matched by that field.
    """
    if not source_paths or not target_paths:
        raise UserError("lm-eval samples are needed for both languages")
    if pair_key == "doc_id" and len(source_paths) != len(target_paths):
        raise UserError(f"pairing by doc_id needs one target file per source file (the same "
                         f"task in both languages), got {len(source_paths)} and "
                         f"{len(target_paths)}; or pair by a doc field with --pair-key")
    sides = []
    for paths in (source_paths, target_paths):
        pooled: dict = {}
        for n, path in enumerate(paths):
            for key, sample in read_lm_eval_samples(path, metric, pair_key).items():
                key = (n, key) if pair_key == "doc_id" else key
                if key in pooled:
                    raise UserError(f"{sample.where}: {pair_key} {key} already at "
                                     f"{pooled[key].where}")
                pooled[key] = sample
        sides.append(pooled)
    source, target = sides
    for here, there in ((source, target), (target, source)):
        unmatched = [k for k in here if k not in there]
        if unmatched:
            raise UserError(f"{here[unmatched[0]].where}: {len(unmatched)} question(s) have no "
                             f"counterpart in the other language (first: {pair_key} "
                             f"{unmatched[0]}); the two runs must cover the same questions")
    keys = sorted(source, key=str)
    return [source[k].correct for k in keys], [target[k].correct for k in keys]

