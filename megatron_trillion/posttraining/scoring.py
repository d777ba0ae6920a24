"""Rewards of rollouts: each prompt's verifier (``megatron_trillion.rewards``, the registry the
benchmark tool scores with, so a reward and its evaluation cannot disagree) applied to each
sampled response."""

from __future__ import annotations

from typing import Any, Optional

from megatron_trillion.errors import UserError
from megatron_trillion.rewards import Verifier, get_verifier

_VERIFIERS: dict[str, Verifier] = {}
_GROUND_TRUTHS: dict[tuple[str, str], Any] = {}  # (verifier, file:line) -> parsed


def verifier(name: str) -> Verifier:
    """The registry's verifier of ``name`` (resolved once; UserError when unknown)."""
    if name not in _VERIFIERS:
        _VERIFIERS[name] = get_verifier(name)
    return _VERIFIERS[name]


def verifier_problem(name: str, ground_truth: Any) -> Optional[str]:
    """What is wrong with a prompt line's verifier name or its ground truth for that verifier
    (None: both fine), checked when the prompts are read."""
    try:
        verifier(name).parse_ground_truth(ground_truth)
    except UserError as exc:
        return str(exc)
    return None


def verifier_score(prompt, response: str) -> float:
    """The reward of ``response`` to ``prompt`` (an ``RLVRPrompt``) in [0, 1]."""
    key = (prompt.verifier, prompt.where)
    if key not in _GROUND_TRUTHS:
        _GROUND_TRUTHS[key] = verifier(prompt.verifier).parse_ground_truth(prompt.ground_truth)
    return verifier(prompt.verifier)(response, _GROUND_TRUTHS[key], sample=prompt.where).score
