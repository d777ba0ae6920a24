"""The helper process of ``answers.math``: reads ``[expected, answer]`` JSON lines on stdin and
writes ``true`` / ``false`` lines. It is run as a script by its file path (no package import, no
multiprocessing re-import of the caller's ``__main__``), and killed by the caller when one
comparison overruns its time."""

import json
import logging
import os
import sys


def equivalent(expected: str, answer: str) -> bool:
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig()]
    gold = parse(f"${expected}$", extraction_config=config, parsing_timeout=None)
    pred = parse(f"${answer}$", extraction_config=config, parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def _die_with_parent() -> None:
    """A comparison stuck in sympy's C code never returns to Python: have Linux kill this
    process when the thread that started it goes (the caller then starts a new one), so a
    killed caller leaves no helper spinning."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            sys.exit(0)


def main() -> None:
    _die_with_parent()
    # math-verify warns that its own (signal-based) timeout is off: the caller bounds the time.
    logging.disable(logging.WARNING)
    import math_verify  # noqa: F401  (before "ready", so the first answer is timed fairly)

    print("ready", flush=True)
    for line in sys.stdin:
        expected, answer = json.loads(line)
        try:
            verdict = equivalent(expected, answer)
        except Exception:  # an answer math-verify cannot handle is simply not equivalent
            verdict = False
        print(json.dumps(verdict), flush=True)


if __name__ == "__main__":
    main()
