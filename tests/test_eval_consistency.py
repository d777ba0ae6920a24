"""tools/eval_consistency.py: the report's consistency metrics (eq. 3-4) from a transformers
model (checked against a plain per-choice loop over transformers logits), from lm-eval
--log_samples output (a committed excerpt in lm-eval's real format), and file:line errors for
bad input. The same check on a model trained and exported by the project runs in
test_xlda_ablation.py."""

from __future__ import annotations

import json
import os

import pytest

from megatron_trillion.errors import UserError
from megatron_trillion.cli.eval_consistency import main as eval_main

SAMPLES = os.path.join(os.path.dirname(__file__), "data", "lm_eval_samples")
EN_SAMPLES = os.path.join(SAMPLES, "samples_global_mmlu_en_stem_2025-06-01T12-00-00.123456.jsonl")
KO_SAMPLES = os.path.join(SAMPLES, "samples_global_mmlu_ko_stem_2025-06-01T12-00-00.123456.jsonl")


def plain_loop_metrics(model_dir: str, data: str, source: str, target: str) -> dict:
    """The metrics the slow obvious way: one unbatched forward per choice, prompt tokens then
    choice tokens (prompt's trailing spaces moved to the choice), log-softmax, sum, argmax."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = model.config.bos_token_id
    correct = {source: [], target: []}
    with open(data, encoding="utf-8") as f:
        items = [json.loads(line) for line in f]
    for item in items:
        for language in (source, target):
            question = item[language]
            prompt = question["prompt"]
            scores = []
            for choice in question["choices"]:
                context = prompt.rstrip()
                continuation = prompt[len(context):] + choice
                ids = tokenizer(context, add_special_tokens=False).input_ids or [bos]
                cont = tokenizer(continuation, add_special_tokens=False).input_ids
                full = torch.tensor([ids + cont])
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(full).logits[0].float(), dim=-1)
                scores.append(sum(float(logprobs[len(ids) - 1 + k, t])
                                  for k, t in enumerate(cont)))
            correct[language].append(scores.index(max(scores)) == question["answer"])
    s, t = correct[source], correct[target]
    n = len(s)
    frac = lambda hits: (sum(hits) / len(hits)) if hits else None  # noqa: E731
    S, T = source[0].upper(), target[0].upper()
    return {f"acc_{source}": sum(s) / n, f"acc_{target}": sum(t) / n,
            f"{S}(T)->{T}(T)": frac([b for a, b in zip(s, t) if a]),
            f"{T}(F)->{S}(T)": frac([a for a, b in zip(s, t) if not b]),
            f"{S}(F)->{T}(T)": frac([b for a, b in zip(s, t) if not a])}


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    """A random tiny LlamaForCausalLM with a byte-level BPE trained on the parallel items; its
    embedding has more rows than the tokenizer has tokens (a padded vocabulary)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_trillion.data.sample_corpus import write_parallel_items

    directory = tmp_path_factory.mktemp("random_llama")
    data = str(write_parallel_items(directory / "parallel.jsonl", num_items=12, seed=5))
    texts = []
    for line in open(data, encoding="utf-8"):
        item = json.loads(line)
        texts += [item[l]["prompt"] + c for l in ("en", "ko", "ja") for c in item[l]["choices"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model_dir = directory / "hf"
    model_dir.mkdir()
    tokenizer.save(str(model_dir / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size() + 13, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    return str(model_dir), data


@pytest.mark.parametrize("batch_size", [1, 7])
def test_tool_matches_a_plain_loop_over_transformers_logits(random_llama, tmp_path, capsys,
                                                             batch_size):
    model_dir, data = random_llama
    out = tmp_path / "results.json"
    assert eval_main(["--model", model_dir, "--data", data, "--source-language", "en",
                      "--target-language", "ja", "--output", str(out), "--batch-size",
                      str(batch_size), "--no-progress-bar"]) == 0
    results = json.loads(out.read_text())
    expected = plain_loop_metrics(model_dir, data, "en", "ja")
    assert {k: results[k] for k in expected} == expected
    assert results["num_items"] == 12
    table = capsys.readouterr().out
    assert "| E(T)->J(T) |" in table and "| acc_ja |" in table


def test_encoding_follows_lm_eval_where_it_can():
    from megatron_trillion.evaluation.consistency import encode_choice

    class Words:   # a stand-in tokenizer: one id per character, so splits are visible
        def encode(self, text, add_special_tokens):
            assert add_special_tokens is False
            return [ord(c) for c in text]

    # Trailing whitespace of the prompt moves to the choice (lm-eval's _encode_pair).
    assert encode_choice(Words(), "Answer: ", "B", 1) == ([ord(c) for c in "Answer:"],
                                                          [ord(c) for c in " B"])
    # An empty prompt conditions on the prefix token (BOS, else EOS) ...
    assert encode_choice(Words(), "", "ab", 1) == ([1], [97, 98])
    # ... unless the choice starts with it.
    assert encode_choice(Words(), "", "\x01ab", 1) == ([1], [97, 98])
    with pytest.raises(UserError, match="f.jsonl:3.*neither a BOS"):
        encode_choice(Words(), "  ", "ab", None, "f.jsonl:3")


def test_long_requests_keep_their_last_tokens(random_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_trillion.evaluation.consistency import score_requests

    model = AutoModelForCausalLM.from_pretrained(random_llama[0], dtype=torch.float32).eval()
    context, continuation = list(range(2, 80)), [5, 6, 7]          # 81 tokens > 64 + 1
    (long,) = score_requests(model, [(context, continuation)], max_length=64, progress=False)
    kept = (context + continuation)[-65:]
    (short,) = score_requests(model, [(kept[:-3], kept[-3:])], progress=False)
    assert long == short
    with pytest.raises(UserError, match="longer than the model's context"):
        score_requests(model, [([1], list(range(2, 70)))], max_length=64, progress=False)


def test_metrics_by_hand():
    from megatron_trillion.evaluation.consistency import consistency_metrics, metric_names

    source = [True, True, True, False, False, True]
    target = [True, False, True, False, True, True]
    metrics = consistency_metrics(source, target, "en", "ko")
    assert metrics["acc_en"] == 4 / 6 and metrics["acc_ko"] == 4 / 6
    assert metrics["E(T)->K(T)"] == 3 / 4     # eq. 3: ko right among en right
    assert metrics["K(F)->E(T)"] == 1 / 2     # en right among ko wrong
    assert metrics["E(F)->K(T)"] == 1 / 2     # eq. 4: ko right among en wrong
    never_wrong = consistency_metrics([True, True], [True, False], "en", "ko")
    assert never_wrong["E(F)->K(T)"] is None and never_wrong["E(T)->K(T)"] == 0.5
    assert metric_names("zh", "zu")["transfer"] == "ZH(T)->ZU(T)"  # initials would collide


def test_lm_eval_sample_logs_excerpt(tmp_path, capsys):
    expected = {"acc_en": 4 / 6, "acc_ko": 4 / 6, "E(T)->K(T)": 3 / 4, "K(F)->E(T)": 1 / 2,
                "E(F)->K(T)": 1 / 2, "num_items": 6}
    for pair_key in ("doc_id", "sample_id"):
        out = tmp_path / f"{pair_key}.json"
        assert eval_main(["--source-language", "en", "--target-language", "ko",
                          "--lm-eval-samples", f"en={EN_SAMPLES}", f"ko={KO_SAMPLES}",
                          "--pair-key", pair_key, "--output", str(out)]) == 0
        results = json.loads(out.read_text())
        assert {k: results[k] for k in expected} == expected
    # Pairing by a doc field matches questions whatever the order of the lines.
    shuffled = tmp_path / "samples_global_mmlu_ko_stem_shuffled.jsonl"
    shuffled.write_text("".join(reversed(open(KO_SAMPLES, encoding="utf-8").readlines())),
                        encoding="utf-8")
    out = tmp_path / "shuffled.json"
    assert eval_main(["--source-language", "en", "--target-language", "ko", "--lm-eval-samples",
                      f"en={EN_SAMPLES}", f"ko={shuffled}", "--pair-key", "sample_id",
                      "--output", str(out)]) == 0
    assert {k: json.loads(out.read_text())[k] for k in expected} == expected
    capsys.readouterr()

    # Errors name the file and line.
    short = tmp_path / "samples_ko_short.jsonl"
    short.write_text("".join(open(KO_SAMPLES, encoding="utf-8").readlines()[:5]),
                     encoding="utf-8")
    assert eval_main(["--source-language", "en", "--target-language", "ko", "--lm-eval-samples",
                      f"en={EN_SAMPLES}", f"ko={short}"]) == 2
    assert f"{EN_SAMPLES}:6: 1 question(s) have no counterpart" in capsys.readouterr().err
    assert eval_main(["--source-language", "en", "--target-language", "ko", "--lm-eval-samples",
                      f"en={EN_SAMPLES}", f"ko={KO_SAMPLES}", "--lm-eval-metric",
                      "exact_match"]) == 2
    assert f"{EN_SAMPLES}:1: no per-sample metric 'exact_match' (this task logs ['acc'])" in \
        capsys.readouterr().err


def _write(path, lines):
    path.write_text("\n".join(json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                    encoding="utf-8")
    return str(path)


GOOD = {"id": 1, "en": {"prompt": "Q", "choices": [" a", " b"], "answer": 1},
        "ko": {"prompt": "질문", "choices": [" 가", " 나"], "answer": 0}}


@pytest.mark.parametrize("bad, message", [
    ({"id": 2, "en": GOOD["en"]}, ":2: item '2' has no 'ko' question"),
    ({"id": 2, "en": GOOD["en"], "ko": {**GOOD["ko"], "answer": 2}},
     ":2 [ko]: answer 2 is out of range for 2 choices"),
    ({"id": 2, "en": {**GOOD["en"], "choices": []}, "ko": GOOD["ko"]},
     ":2 [en]: choices must be a non-empty list"),
    ({"id": 1, "en": GOOD["en"], "ko": GOOD["ko"]}, ":2: id '1' already used at"),
], ids=["missing-language", "answer-out-of-range", "empty-choices", "duplicate-id"])
def test_bad_parallel_items_name_file_and_line(tmp_path, capsys, bad, message):
    data = _write(tmp_path / "parallel.jsonl", [GOOD, bad])
    out = tmp_path / "results.json"
    # The model is never loaded: input is checked first.
    code = eval_main(["--model", str(tmp_path / "no-model"), "--data", data,
                      "--source-language", "en", "--target-language", "ko",
                      "--output", str(out)])
    assert code == 2
    assert f"{data}{message}" in capsys.readouterr().err
    assert not out.exists()


def test_bad_command_lines(tmp_path, capsys):
    data = _write(tmp_path / "parallel.jsonl", [GOOD])
    (tmp_path / "broken.jsonl").write_text('{"id": 1,\n')
    cases = [
        (["--data", data], "give --model and --data"),
        (["--model", "m", "--data", data, "--lm-eval-samples", f"en={EN_SAMPLES}"],
         "either --model and --data or --lm-eval-samples"),
        (["--lm-eval-samples", f"en={EN_SAMPLES}"], "--lm-eval-samples has no file for 'ko'"),
        (["--lm-eval-samples", f"en={EN_SAMPLES}", f"ja={KO_SAMPLES}"],
         "'ja' is neither --source-language nor --target-language"),
        (["--model", str(tmp_path), "--data", data], f"--model {tmp_path}: no config.json"),
        (["--model", "m", "--data", str(tmp_path / "broken.jsonl")],
         f"{tmp_path / 'broken.jsonl'}:1: not valid JSON"),
    ]
    for argv, message in cases:
        assert eval_main(argv + ["--source-language", "en", "--target-language", "ko"]) == 2
        assert message in capsys.readouterr().err, argv


def test_readme_glob_command_as_written(tmp_path):
    """The README's --lm-eval-samples command, run by a shell as written: the glob after ``en=``
    reaches the tool unexpanded, so the tool expands it; a glob matching several files is refused
    naming them."""
    import re
    import shutil
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(repo, "README.md"), encoding="utf-8").read()
    command = re.search(r"python tools/eval_consistency\.py --source-language en[^`]*"
                        r"--lm-eval-samples en=[^`]*?\n(?=```)", readme).group(0)
    command = command.replace("python tools/", f"{sys.executable} {repo}/tools/", 1)
    run_dir = tmp_path / "out" / "hf_model__"  # lm-eval writes under out/<model name>/
    run_dir.mkdir(parents=True)
    shutil.copy(EN_SAMPLES, run_dir)
    shutil.copy(KO_SAMPLES, run_dir)
    env = dict(os.environ, PYTHONPATH=repo)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "E(T)->K(T)" in done.stdout

    second = tmp_path / "out" / "other_model__"
    second.mkdir()
    shutil.copy(KO_SAMPLES, second)
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert "'ko=out/*/samples_global_mmlu_ko_*.jsonl' matches 2 files, expected one" in done.stderr
    assert "out/other_model__/samples_global_mmlu_ko_stem" in done.stderr
