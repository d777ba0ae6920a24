"""Verifiable rewards: pure functions scoring one response against its ground truth.

A verifier is named wherever one is accepted:

- a built-in: ``gsm8k`` (the final number), ``math`` (the ``\\boxed{}`` answer, equivalence by
  math-verify), ``ifeval`` / ``ko_ifeval`` (instruction following, strict prompt level; the
  ground truth is IFEval's ``{"instruction_id_list": [...], "kwargs": [...]}``), ``format``
  (the answer is in ``\\boxed{}``);
- ``module:function``, a user's own: importable (e.g. a file on ``PYTHONPATH``), called as
  ``function(response: str, ground_truth)`` and returning a float in [0, 1] or a
  ``(score, reason)`` pair;
- several joined by ``+`` (``math+format``): the mean of their scores.

``get_verifier(name)`` returns a ``Verifier``; ``verifier(response, ground_truth, sample=...)``
returns a ``Score``. A user verifier that raises or returns something else is a UserError naming
the verifier and the sample.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from megatron_trillion.errors import UserError
from megatron_trillion.rewards import answers, ifeval


class Score(NamedTuple):
    score: float
    reason: str


@dataclass(frozen=True)
class Builtin:
    function: Callable[[str, Any], tuple[float, str]]
    # checks and normalizes a ground truth once, before any response is scored (UserError)
    parse_ground_truth: Callable[[Any], Any]


BUILTINS: dict[str, Builtin] = {
    "gsm8k": Builtin(answers.gsm8k, answers.gsm8k_ground_truth),
    "math": Builtin(answers.math, answers.math_ground_truth),
    "ifeval": Builtin(ifeval.ifeval, lambda gt: ifeval.parse_instructions(gt, "ifeval")),
    "ko_ifeval": Builtin(ifeval.ko_ifeval, lambda gt: ifeval.parse_instructions(gt, "ko_ifeval")),
    "format": Builtin(answers.boxed_format, lambda gt: gt),
}


class Verifier:
    """A named verifier; call it as ``verifier(response, ground_truth, sample="file:line")``."""

    def __init__(self, name: str, parts: list[tuple[str, Callable, bool]]):
        self.name = name
        self._parts = parts  # (name, function, is the user's own)

    def parse_ground_truth(self, ground_truth):
        """The ground truth checked once (UserError when it does not parse) and normalized, so
        each response is not parsing it again; user verifiers get it as given."""
        for name, _, user in self._parts:
            if not user:
                parsed = BUILTINS[name].parse_ground_truth(ground_truth)
                if len(self._parts) == 1:
                    return parsed
        return ground_truth

    def __call__(self, response: str, ground_truth, sample: str = "") -> Score:
        scores, reasons = [], []
        for name, function, user in self._parts:
            score, reason = _checked(name, function, user, response, ground_truth, sample)
            scores.append(score)
            reasons.append(reason if len(self._parts) == 1 else f"{name}: {reason}")
        return Score(sum(scores) / len(scores), "; ".join(reasons))


def _checked(name, function, user, response, ground_truth, sample) -> tuple[float, str]:
    where = f"verifier {name!r} on sample {sample}" if sample else f"verifier {name!r}"
    if not user:
        try:
            return function(response, ground_truth)
        except UserError as exc:  # a ground truth that does not parse
            raise UserError(f"{where}: {exc}") from exc
    try:
        result = function(response, ground_truth)
    except Exception as exc:
        raise UserError(f"{where} raised {type(exc).__name__}: {exc}") from exc
    reason = ""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str):
        result, reason = result
    if isinstance(result, bool) or not isinstance(result, (int, float)) or not (
            0.0 <= result <= 1.0):
        raise UserError(f"{where} returned {result!r}; a verifier returns a float in [0, 1] or "
                        f"a (score, reason) pair")
    return float(result), reason


def _user_function(name: str) -> Callable:
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise UserError(f"verifier {name!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"verifier {name!r}: cannot import {module_name!r} ({exc}); is it on "
                        f"PYTHONPATH?") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(f"verifier {name!r}: {module_name} has no function {attribute!r}")
    return function


def get_verifier(name: str) -> Verifier:
    """The verifier a name stands for (see the module docstring); a name that does not resolve
    is a UserError."""
    parts = []
    for part in name.split("+"):
        part = part.strip()
        if part in BUILTINS:
            parts.append((part, BUILTINS[part].function, False))
        elif ":" in part:
            parts.append((part, _user_function(part), True))
        else:
            raise UserError(f"unknown verifier {part!r}: one of {sorted(BUILTINS)} or "
                            f"module:function")
    return Verifier(name, parts)
