"""Cost of the verifiers per response, as GRPO would call them (thousands per step).

    python bench/bench_rewards.py [--calls 500]

Scores synthetic responses with each verifier of megatron_trillion.rewards and prints
microseconds per call. For ``math`` it also times math-verify called in this process without a
timeout (what the helper process does per answer), so the ratio ``math / in-process`` is the
price of the timeout that holds in any thread (one pipe round trip per answer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_trillion.rewards import get_verifier  # noqa: E402
from megatron_trillion.rewards.math_helper import equivalent  # noqa: E402

RESPONSE = ("Tom has 12 apples and buys 30 more, so 12 + 30 = 42. The answer is "
            "\\boxed{42}.")
IFEVAL = {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                  "language:response_language", "detectable_format:title"],
          "kwargs": [{}, {"num_words": 50, "relation": "less than"}, {"language": "en"}, {}]}
KO_IFEVAL = {"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                     "language:response_language", "detectable_format:title"],
             "kwargs": [{}, {"num_words": 50, "relation": "less than"}, {"language": "ko"}, {}]}


def _per_call_us(function, calls: int) -> float:
    function(0)  # warm: imports, helper start, language profiles
    start = time.perf_counter()
    for i in range(calls):
        function(i)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    math = get_verifier("math")
    rows = {
        "gsm8k": lambda i: get_verifier("gsm8k")(RESPONSE.replace("42", str(i)), str(i)),
        "format": lambda i: get_verifier("format")(RESPONSE, None),
        "ifeval (4 instructions)": lambda i: get_verifier("ifeval")(
            f"<<Title {i}>> A short answer in plain English.", IFEVAL),
        "ko_ifeval (4 instructions)": lambda i: get_verifier("ko_ifeval")(
            f"«제목 {i}» 한국어로 짧게 답합니다.", KO_IFEVAL),
        "math": lambda i: math(f"so \\boxed{{\\frac{{{i}}}{{2}}}}", f"{i}/2"),
        "math-verify in-process": lambda i: equivalent(f"{i}/2", f"\\frac{{{i}}}{{2}}"),
    }
    times = {name: _per_call_us(function, args.calls) for name, function in rows.items()}
    width = max(map(len, times))
    for name, value in times.items():
        print(f"{name:<{width}}  {value:10.1f} us/call")
    print(f"{'math / in-process':<{width}}  {times['math'] / times['math-verify in-process']:10.2f}x")


if __name__ == "__main__":
    main()
