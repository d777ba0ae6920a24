"""RLVR prompts (``pretrain --grpo``, prompt selection): JSONL, one prompt per line::

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...],
     "ground_truth": ..., "verifier": "gsm8k"}
    {"prompt": "What is 2 + 3?", "ground_truth": "5", "verifier": "mypkg.rewards:exact"}

open-instruct's RLVR layout: each line names its verifier, so one file can mix math and
instruction following; ``module:function`` is a user's own verifier. ``messages`` end with a
user turn (the model answers it); ``prompt`` is a single user turn. ``ground_truth`` is whatever
the verifier reads (a string, a number, a dict of instruction arguments...), but it must be
there. Every file is read and checked whole before anything starts; the first bad line stops
the run with its ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from megatron_trillion.data.chat_template import ROLES
from megatron_trillion.data.jsonl import read_jsonl
from megatron_trillion.errors import UserError

_LAYOUT = ('expected {"messages": [...] | "prompt": "...", "ground_truth": ..., '
           '"verifier": "name" | "module:function"}')


@dataclass(frozen=True)
class RLVRPrompt:
    messages: tuple  # of {"role", "content"} dicts, ending with a user turn
    ground_truth: Any
    verifier: str
    language: str
    where: str  # file:line
    record: dict = field(default_factory=dict, compare=False, repr=False)  # the line as read

    def conversation(self, system_prompt: Optional[str] = None) -> list[dict]:
        """The messages to generate from: ``system_prompt`` (``--system-prompt-file``) goes
        first unless the line brings its own system turn, which is more specific."""
        messages = [dict(m) for m in self.messages]
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages


def _messages(record: dict) -> tuple:
    has_messages, has_prompt = "messages" in record, "prompt" in record
    if has_messages == has_prompt:
        raise ValueError('give exactly one of "messages" and "prompt"; ' + _LAYOUT)
    if has_prompt:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError('"prompt" must be a non-empty string')
        return ({"role": "user", "content": prompt},)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    out = []
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ValueError(f"message {k} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {k}: unknown role {role!r} (expected one of "
                             f"{', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f'message {k} ({role}): "content" must be a string')
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ValueError(f'the last message is a {out[-1]["role"]} turn; a prompt ends with '
                         "the user turn the model answers")
    return tuple(out)


def parse_rlvr_record(record: Any, where: str, language: str,
                      check: Callable[[str, Any], Optional[str]]) -> RLVRPrompt:
    """One parsed line -> RLVRPrompt, or UserError naming ``where`` and the problem.
    ``check(verifier, ground_truth)`` says what is wrong with the verifier name or the ground
    truth for it (None: nothing)."""
    try:
        if not isinstance(record, dict):
            raise ValueError(f"not a JSON object; {_LAYOUT}")
        messages = _messages(record)
        truth = record.get("ground_truth")
        if truth is None or (isinstance(truth, str) and not truth.strip()):
            raise ValueError('no "ground_truth" (the verifier has nothing to check against)')
        name = record.get("verifier")
        if not isinstance(name, str) or not name.strip():
            raise ValueError('"verifier" must be a non-empty string (a verifier name or '
                             'module:function)')
        problem = check(name, truth)
        if problem:
            raise ValueError(problem)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from exc
    return RLVRPrompt(messages, truth, name, language, where, record)


def _registry_check(name: str, ground_truth: Any) -> Optional[str]:
    from megatron_trillion.posttraining.scoring import verifier_problem

    return verifier_problem(name, ground_truth)


def read_rlvr_file(path: str, language: str,
                   check: Callable[[str, Any], Optional[str]] = _registry_check
                   ) -> list[RLVRPrompt]:
    """Every prompt of one RLVR JSONL file (UserError at the first bad line, or when the file
    has no prompt); verifier names and ground truths are checked by the verifier registry."""
    prompts = [parse_rlvr_record(record, where, language, check)
               for where, record in read_jsonl(path, f"; {_LAYOUT}")]
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def read_rlvr_prompts(files: Sequence[tuple[str, str]],
                      check: Callable[[str, Any], Optional[str]] = _registry_check
                      ) -> list[RLVRPrompt]:
    """``[(path, language), ...]`` -> all their prompts, file after file."""
    out: list[RLVRPrompt] = []
    for path, language in files:
        out.extend(read_rlvr_file(path, language, check))
    return out
