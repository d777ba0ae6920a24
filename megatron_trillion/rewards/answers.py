"""Verifiers of final answers: GSM8K's number, MATH's ``\\boxed{}`` expression, and the format.

MATH equivalence is math-verify's (sympy underneath: fractions, radicals, intervals, LaTeX
spacing). Sympy can hang on short inputs (``10^{10^{10}}`` evaluates a ten-billion-digit
integer) and math-verify's own timeout is ``signal.alarm``, which raises outside the main
thread; so the comparison runs in one long-lived helper process (math_helper.py) that is killed
and restarted when it overruns. That bound holds in any thread, costs one pipe round trip per
answer, and a hung comparison never takes the caller with it.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Optional

from megatron_trillion.errors import UserError

MATH_TIMEOUT_S = 5.0


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced;
    None when there is none or it never closes."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5" (no braces) is valid LaTeX for a one-token argument
        tail = re.match(r"\\(?:boxed|fbox) +([^\s$]+)", text[start:])
        return tail.group(1) if tail else None
    if text[start:brace].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


# A number as written in prose: "-1,234.5", "$5.", "50%"; the "-" of "10-15" is a dash, not a sign.
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")


def parse_number(text: str) -> Optional[Fraction]:
    """The last number in ``text`` (thousands commas, currency and units ignored) as an exact
    fraction; None when ``text`` has no number."""
    found = _NUMBER.findall(text.replace("\\!", "").replace("{,}", ","))
    if not found:
        return None
    return Fraction(found[-1].replace(",", ""))


def gsm8k_ground_truth(answer) -> Fraction:
    """GSM8K's ``answer`` field (a solution ending ``#### N``) or a bare number, as a fraction."""
    if isinstance(answer, Fraction):
        return answer
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise UserError(f"the ground truth must be a number or GSM8K's '... #### N', got "
                        f"{answer!r}")
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    value = parse_number(text) if text.strip() else None
    if value is None or _NUMBER.sub("", text.replace("$", "")).strip(" ,.%") != "":
        raise UserError(f"the ground truth {answer!r} is not a number (GSM8K ends its answer "
                        f"with '#### N')")
    return value


def gsm8k(response: str, ground_truth) -> tuple[float, str]:
    """1 when the response's final answer - the number in its last ``\\boxed{}``, else its last
    number - equals the ground truth."""
    expected = gsm8k_ground_truth(ground_truth)
    boxed = last_boxed(response)
    source = boxed if boxed is not None and parse_number(boxed) is not None else response
    got = parse_number(source)
    if got is None:
        return 0.0, "no number in the response"
    if got == expected:
        return 1.0, f"answer {_show(got)}"
    return 0.0, f"answer {_show(got)}, expected {_show(expected)}"


def _show(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def math_ground_truth(answer) -> str:
    """A MATH answer: the ``\\boxed{}`` of a full solution, or the answer's LaTeX itself."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise UserError(f"the ground truth must be a LaTeX answer or a solution with \\boxed{{}}, "
                        f"got {answer!r}")
    if "\\boxed" in answer or "\\fbox" in answer:
        boxed = last_boxed(answer)
        if boxed is None or not boxed.strip():
            raise UserError(f"the ground truth's \\boxed{{}} does not close or is empty: "
                            f"{answer[-80:]!r}")
        return boxed
    return answer


def math(response: str, ground_truth, timeout_s: float = MATH_TIMEOUT_S) -> tuple[float, str]:
    """1 when the response's last ``\\boxed{}`` is mathematically equivalent to the ground truth
    (math-verify); 0 when it is not, has no ``\\boxed{}``, or the comparison overran
    ``timeout_s``."""
    expected = math_ground_truth(ground_truth)
    answer = last_boxed(response)
    if answer is None or not answer.strip():
        return 0.0, "no \\boxed{} answer"
    verdict = _WORKER.equivalent(expected, answer, timeout_s)
    if verdict is None:
        return 0.0, f"comparison timed out after {timeout_s:g}s"
    shown = answer if len(answer) <= 60 else answer[:57] + "..."
    return (1.0, f"answer {shown}") if verdict else (0.0, f"answer {shown}, expected {expected}")


def boxed_format(response: str, ground_truth=None) -> tuple[float, str]:
    """1 when the response puts a non-empty final answer in ``\\boxed{}`` as the report's prompt
    asks (Figure 7); the ground truth is not looked at."""
    answer = last_boxed(response)
    if answer is None:
        return 0.0, "no \\boxed{} answer"
    if not answer.strip():
        return 0.0, "empty \\boxed{}"
    return 1.0, "answer in \\boxed{}"


class _Worker:
    """One helper process (math_helper.py) comparing answers; killed and restarted after a
    timeout. Thread-safe."""

    START_TIMEOUT_S = 120.0

    def __init__(self):
        self._lock = threading.Lock()
        self._process: Optional[subprocess.Popen] = None
        self._pending = b""
        self._owner = os.getpid()

    def _start(self) -> None:
        helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_helper.py")
        self._process = subprocess.Popen([sys.executable, helper], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, bufsize=0)
        self._pending = b""
        if self._read_line(self.START_TIMEOUT_S) != b"ready":
            self._stop()
            raise RuntimeError(f"the math-verify helper ({helper}) did not start; is "
                               f"math-verify installed?")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process.stdin.close()
            self._process.stdout.close()
        self._process = None

    def _read_line(self, timeout_s: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self._process.stdout.fileno(), 4096)
            if not chunk:
                return None  # the helper died
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.strip()

    def equivalent(self, expected: str, answer: str, timeout_s: float) -> Optional[bool]:
        """True / False, or None when the comparison took longer than ``timeout_s``."""
        with self._lock:
            if self._owner != os.getpid():
                # a forked child (a data-loader worker) must not share its parent's pipes
                self._process, self._pending, self._owner = None, b"", os.getpid()
            if self._process is None or self._process.poll() is not None:
                self._stop()
                self._start()
            try:
                self._process.stdin.write(json.dumps([expected, answer]).encode() + b"\n")
            except BrokenPipeError:  # the helper died since the check above: once more
                self._stop()
                self._start()
                self._process.stdin.write(json.dumps([expected, answer]).encode() + b"\n")
            line = self._read_line(timeout_s)
            if line is None:
                self._stop()
                return None
            return json.loads(line)


_WORKER = _Worker()
