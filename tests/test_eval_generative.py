"""tools/eval_generative.py: the benchmark scores of small sets equal a hand computation (from
responses made elsewhere, --responses), pass@k, bad input named by file:line with nothing
written, and the transformers path (--model) end to end on a tiny random model."""

from __future__ import annotations

import json

import pytest

from megatron_trillion.cli.eval_generative import main as eval_main
from megatron_trillion.evaluation.generative import pass_at_k


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


GSM8K = [
    {"question": "Tom has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "A book costs $12. Two books?", "answer": "12 * 2 = 24\n#### 24"},
    {"question": "1,000 minus 1?", "answer": "#### 999"},
    {"question": "Half of 9?", "answer": "#### 4.5"},
]


def test_gsm8k_from_responses_equals_hand_count(tmp_path, capsys):
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K)
    responses = _write(tmp_path / "responses.jsonl", [
        {"id": 0, "response": "3 + 2 = 5 apples. \\boxed{5}"},       # right
        {"id": 1, "response": "Two books cost $24."},                 # right
        {"id": 2, "response": "The answer is 1,000."},                # wrong
        {"id": 3, "response": "It is \\boxed{4.50}"},                 # right
    ])
    out = tmp_path / "results.json"
    assert eval_main(["--task", "gsm8k", "--data", data, "--responses", responses,
                      "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["task"] == "gsm8k" and results["score"] == 3 / 4
    assert [s["score"] for s in results["samples"]] == [1.0, 1.0, 0.0, 1.0]
    assert results["samples"][2] == {"id": 2, "score": 0.0, "reason": "answer 1000, expected 999",
                                     "response": "The answer is 1,000."}
    assert "exact_match" in capsys.readouterr().out
    # --limit: the first items only; responses to the others are left out, not refused
    assert eval_main(["--task", "gsm8k", "--data", data, "--responses", responses, "--limit", "2",
                      "--output", str(out)]) == 0
    assert json.loads(out.read_text())["score"] == 1.0


def test_pass_at_k_from_several_responses_per_id(tmp_path):
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K[:2])
    responses = _write(tmp_path / "responses.jsonl", [
        {"id": 0, "response": "5"}, {"id": 0, "response": "6"}, {"id": 0, "response": "5"},
        {"id": 1, "response": "7"}, {"id": 1, "response": "8"}, {"id": 1, "response": "9"},
    ])
    out = tmp_path / "results.json"
    assert eval_main(["--task", "gsm8k", "--data", data, "--responses", responses,
                      "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["score"] == 2 / 6 and results["responses_per_item"] == 3
    assert results["pass@1"] == pytest.approx((2 / 3 + 0) / 2)
    assert results["pass@3"] == 1 / 2
    assert [s["sample"] for s in results["samples"][:3]] == [0, 1, 2]
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)


def test_math_and_hrm8k_fields(tmp_path):
    math_data = _write(tmp_path / "math.jsonl", [
        {"problem": "What is 1/2 + 0?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "Simplify sqrt(8).", "solution": "$\\boxed{2\\sqrt{2}}$"},
    ])
    responses = _write(tmp_path / "r.jsonl", [{"id": 0, "response": "\\boxed{0.5}"},
                                              {"id": 1, "response": "\\boxed{\\sqrt{2}}"}])
    out = tmp_path / "math.json"
    assert eval_main(["--task", "math", "--data", math_data, "--responses", responses,
                      "--output", str(out)]) == 0
    assert json.loads(out.read_text())["score"] == 1 / 2
    hrm = _write(tmp_path / "hrm8k.jsonl", [{"question": "2 더하기 3은?", "answer": 5.0}])
    assert eval_main(["--task", "hrm8k", "--data", hrm, "--responses",
                      _write(tmp_path / "h.jsonl", [{"id": 0, "response": "답: \\boxed{5}"}]),
                      "--output", str(out)]) == 0
    assert json.loads(out.read_text())["score"] == 1.0


def test_ifeval_scores_equal_hand_computation(tmp_path):
    """Prompt level: all of a prompt's instructions followed; instruction level: each one;
    score: their mean (the report's strict average)."""
    data = _write(tmp_path / "ifeval.jsonl", [
        {"key": 1000, "prompt": "Write without commas, in quotes.",
         "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
         "kwargs": [{}, {"num_words": None}]},
        {"key": 1001, "prompt": "Mention Paris.", "instruction_id_list": ["keywords:existence"],
         "kwargs": [{"keywords": ["Paris"]}]},
        {"key": 1002, "prompt": "Two paragraphs, a title.",
         "instruction_id_list": ["length_constraints:number_paragraphs", "detectable_format:title",
                                 "punctuation:no_comma"],
         "kwargs": [{"num_paragraphs": 2}, {}, {}]},
    ])
    responses = _write(tmp_path / "r.jsonl", [
        {"id": 1000, "response": 'Here you go:\n"No commas here."'},  # comma ok; quotes: loose only
        {"id": 1001, "response": "Paris is lovely."},                  # 1/1
        {"id": 1002, "response": "<<Title>>\nOne, two.\n***\nThree."},  # paragraphs, title; comma
    ])
    out = tmp_path / "results.json"
    assert eval_main(["--task", "ifeval", "--data", data, "--responses", responses,
                      "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["prompt_level_strict_acc"] == 1 / 3
    assert results["inst_level_strict_acc"] == 4 / 6
    assert results["prompt_level_loose_acc"] == 2 / 3
    assert results["inst_level_loose_acc"] == 5 / 6
    assert results["score"] == (1 / 3 + 4 / 6) / 2
    assert [s["score"] for s in results["samples"]] == [0.0, 1.0, 0.0]
    assert results["samples"][2]["reason"] == "followed 2/3; failed punctuation:no_comma"


@pytest.mark.parametrize("task, records, message", [
    ("ifeval", [{"prompt": "p", "instruction_id_list": ["keywords:nope"], "kwargs": [{}]}],
     "ifeval.jsonl:1: unknown ifeval instruction id 'keywords:nope'"),
    ("ifeval", [{"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
                {"prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
                 "kwargs": [{"num_words": 5, "relation": "exactly"}]}],
     "ifeval.jsonl:2: length_constraints:number_words's 'relation' must be one of"),
    ("gsm8k", [{"question": "q", "answer": "#### five"}],
     "gsm8k.jsonl:1: the ground truth '#### five' is not a number"),
    ("gsm8k", [{"question": "q", "solution": "#### 5"}], "gsm8k.jsonl:1: no 'answer' field"),
    ("math", [{"problem": "q", "solution": "no box"}, {"problem": "q", "solution": "\\boxed{1"}],
     "math.jsonl:2: the ground truth's \\boxed{} does not close"),
    ("ko_ifeval", [{"prompt": "p", "instruction_id_list": ["change_case:english_lowercase"],
                    "kwargs": [{}]}], "ko_ifeval.jsonl:1: unknown ko_ifeval instruction id"),
])
def test_bad_data_named_by_file_and_line(tmp_path, capsys, task, records, message):
    data = _write(tmp_path / f"{task}.jsonl", records)
    responses = _write(tmp_path / "r.jsonl", [{"id": i, "response": "x"}
                                              for i in range(len(records))])
    out = tmp_path / "results.json"
    assert eval_main(["--task", task, "--data", data, "--responses", responses,
                      "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_responses_and_flags(tmp_path, capsys):
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K[:2])
    cases = [
        ([{"id": 0, "response": "5"}, {"id": 7, "response": "5"}], [],
         "r.jsonl:2: id 7 is not in the data"),
        ([{"id": 0, "response": "5"}], [], "no response for 1 of 2 items (ids [1])"),
        ([{"id": 0, "response": "5"}, {"id": 0, "response": "5"}, {"id": 1, "response": "1"}],
         [], "items have 1 to 2 responses"),
        ([{"id": 0, "text": "5"}], [], 'r.jsonl:1: expected {"id": ..., "response": "..."}'),
        ([{"id": 0, "response": "5"}, {"id": 1, "response": "1"}], ["--temperature", "0.7"],
         "--temperature: generation flags, and --responses generates nothing"),
        ([{"id": 0, "response": "5"}, {"id": 1, "response": "1"}], ["--verifier", "gsm9k"],
         "unknown verifier 'gsm9k'"),
        ([{"id": 0, "response": "5"}, {"id": 1, "response": "1"}], ["--prompt-template", "Q:"],
         "--prompt-template must contain {question}"),
    ]
    out = tmp_path / "results.json"
    for responses, flags, message in cases:
        path = _write(tmp_path / "r.jsonl", responses)
        assert eval_main(["--task", "gsm8k", "--data", data, "--responses", path,
                          "--output", str(out), *flags]) == 2
        assert message in capsys.readouterr().err, message
        assert not out.exists()
    assert eval_main(["--task", "ifeval", "--data", data, "--model", "m", "--verifier",
                      "gsm8k"]) == 2
    assert "--verifier: ifeval scores each instruction" in capsys.readouterr().err
    assert eval_main(["--task", "gsm8k", "--data", data, "--model", "m",
                      "--num-samples", "4"]) == 2
    assert "set --temperature" in capsys.readouterr().err


def test_user_verifier_flag(tmp_path, monkeypatch):
    (tmp_path / "length_reward.py").write_text(
        "def short(response, truth):\n    return (float(len(response) < 5), 'short')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K[:2])
    responses = _write(tmp_path / "r.jsonl", [{"id": 0, "response": "5"},
                                              {"id": 1, "response": "twenty-four"}])
    out = tmp_path / "results.json"
    assert eval_main(["--task", "gsm8k", "--data", data, "--responses", responses,
                      "--verifier", "length_reward:short", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["score"] == 1 / 2


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A random tiny LlamaForCausalLM with a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([r["question"] + r["answer"] for r in GSM8K] * 3,
                                  trainers.BpeTrainer(
                                      vocab_size=280, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


def test_hf_model_generates_and_scores(tiny_hf_model, tmp_path):
    """The --model path end to end: greedy responses are produced for each item, and each is
    scored by the same verifier as --responses would score it (rerun from the written file)."""
    data = _write(tmp_path / "gsm8k.jsonl", GSM8K[:2])
    out = tmp_path / "results.json"
    assert eval_main(["--task", "gsm8k", "--data", data, "--model", tiny_hf_model,
                      "--max-new-tokens", "6", "--no-progress-bar", "--output", str(out)]) == 0
    generated = json.loads(out.read_text())
    assert [s["id"] for s in generated["samples"]] == [0, 1]
    assert all(s["response"] for s in generated["samples"])
    responses = _write(tmp_path / "r.jsonl", [{"id": s["id"], "response": s["response"]}
                                              for s in generated["samples"]])
    rescored = tmp_path / "rescored.json"
    assert eval_main(["--task", "gsm8k", "--data", data, "--responses", responses,
                      "--output", str(rescored)]) == 0
    assert json.loads(rescored.read_text())["samples"] == generated["samples"]
