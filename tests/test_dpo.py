"""DPO (--dpo): the loss formulas (TRL's, hand-worked numbers), preference data in both JSONL
shapes with bad lines named by file:line, the length filter, and (slow) the real entry point:
the reference cache at TP2xPP2xDP2 (and Trinity at EP2) equals one process's, the loss curve
too, --dpo-reference-load is the reference rather than --load, packed pairs give
the log-probabilities of one pair per sequence, a cache is reused or rebuilt by its key, and a
toy preference task trains."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from multiprocess import run_distributed


def _write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
                    + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE with a ChatML template, padded for TP2 (vocab 600)."""
    from megatron_trillion.data.sample_corpus import write_sample_corpus
    from megatron_trillion.data.tokenizer_training import TokenizerTrainingConfig, train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    corpus = write_sample_corpus(root / "corpus.jsonl", docs_per_lang=60)
    train_tokenizer(TokenizerTrainingConfig(inputs=(str(corpus),), output_dir=str(root / "bpe"),
                                            vocab_size=600, heldout_docs=0,
                                            tensor_model_parallel_size=2))
    return str(root / "bpe")


def _chat(tokenizer_dir: str, template=None):
    from megatron_trillion.data.chat_template import ChatFormat, resolve_chat_template
    from megatron_trillion.data.tokenizers import HuggingFaceTokenizer

    text, _ = resolve_chat_template(template, tokenizer_dir)
    return ChatFormat(text, HuggingFaceTokenizer(tokenizer_dir))


# --------------------------------------------------------------------------------------------
# the loss of given log-probabilities (TRL's DPOTrainer formulas, worked by hand)

# policy chosen/rejected, reference chosen/rejected (summed log-probs), token counts, beta
PC, PR, RC, RR, NC, NR, BETA = -10.0, -14.0, -11.0, -12.0, 4.0, 2.0, 0.5


def _losses(loss_type, sft_weight=0.0):
    from megatron_trillion.posttraining.dpo import dpo_pair_losses

    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dpo_pair_losses(t(PC), t(PR), t(RC), t(RR), t(NC), t(NR), loss_type=loss_type,
                           beta=BETA, sft_weight=sft_weight)


@pytest.mark.parametrize("loss_type,expected,chosen,rejected", [
    # sigmoid: -log sigmoid(beta ((pc - rc) - (pr - rr))) = log(1 + e^-1.5)
    ("sigmoid", 0.2014132779827524, 0.5 * 1.0, 0.5 * -2.0),
    # norm (TRL sigmoid_norm, Tulu 3 dpo_norm): per-token differences 1/4 and -2/2
    ("norm", 0.42870067827651864, 0.5 * 0.25, 0.5 * -1.0),
    # ipo: (1/4 - (-2/2) - 1/(2 beta))^2 = 0.25^2
    ("ipo", 0.0625, 0.5 * 0.25, 0.5 * -1.0),
])
def test_loss_matches_trl_formulas(loss_type, expected, chosen, rejected):
    out = _losses(loss_type)
    assert float(out["loss"]) == pytest.approx(expected, abs=1e-12)
    assert float(out["chosen_rewards"]) == pytest.approx(chosen, abs=1e-12)
    assert float(out["rejected_rewards"]) == pytest.approx(rejected, abs=1e-12)
    # the SFT term adds its weight times the chosen response's NLL per token (10 / 4)
    with_sft = _losses(loss_type, sft_weight=0.3)
    assert float(with_sft["loss"]) == pytest.approx(expected + 0.3 * 2.5, abs=1e-12)


def test_policy_equal_to_reference_gives_log2_and_zero_margins():
    from megatron_trillion.posttraining.dpo import dpo_metrics, dpo_pair_losses

    logps = torch.tensor([-3.0, -50.0, -7.5], dtype=torch.float64)
    counts = torch.tensor([2.0, 30.0, 5.0], dtype=torch.float64)
    for loss_type in ("sigmoid", "norm"):
        out = dpo_pair_losses(logps, logps - 1, logps, logps - 1, counts, counts + 1,
                              loss_type=loss_type, beta=5.0)
        assert torch.equal(out["loss"], torch.full((3,), math.log(2), dtype=torch.float64))
        assert torch.equal(out["chosen_rewards"] - out["rejected_rewards"], torch.zeros(3))
    # the logged means: [loss, pairs, tokens, accuracy, margin, chosen, rejected, sft nll]
    values = dpo_metrics([3 * math.log(2), 3, 100, 1.5, 0.0, 0.0, 0.0, 6.0])
    assert values == {"dpo loss": math.log(2), "rewards/accuracy": 0.5, "rewards/margin": 0.0,
                      "rewards/chosen": 0.0, "rewards/rejected": 0.0, "sft nll": 2.0}


# --------------------------------------------------------------------------------------------
# preference data

PROMPT = [{"role": "user", "content": "Say hi"}]


def test_both_jsonl_shapes_give_the_same_pairs(tokenizer, tmp_path):
    from megatron_trillion.posttraining.preferences import read_pairs, tokenize_pairs

    tulu = {"chosen": PROMPT + [{"role": "assistant", "content": "hi"}],
            "rejected": PROMPT + [{"role": "assistant", "content": "no thanks"}]}
    trl_strings = {"prompt": "Say hi", "chosen": "hi", "rejected": "no thanks"}
    trl_messages = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "hi"}],
                    "rejected": [{"role": "assistant", "content": "no thanks"}]}
    path = _write_jsonl(tmp_path / "p_en.jsonl", [tulu, trl_strings, trl_messages])
    pairs = read_pairs(path)
    assert len({(json.dumps(p.prompt), p.chosen, p.rejected) for p in pairs}) == 1
    data = tokenize_pairs(path, _chat(tokenizer), 256)
    assert data.num_conversations == 6
    # the loss counts the final assistant turn only: a chosen "hi" is its own tokens + end
    chat = _chat(tokenizer)
    ids, flags = chat.encode(PROMPT + [{"role": "assistant", "content": "hi"}])
    start = data.offsets[0]
    assert data.tokens[start:data.offsets[1]].tolist() == ids
    assert data.flags[start:data.offsets[1]].tolist() == flags  # one assistant turn: the same
    multi = PROMPT + [{"role": "assistant", "content": "earlier"},
                      {"role": "user", "content": "again"}]
    path = _write_jsonl(tmp_path / "multi_en.jsonl",
                        [{"prompt": multi, "chosen": "hi", "rejected": "no"}])
    data = tokenize_pairs(path, chat, 256)
    ids, all_flags = chat.encode(multi + [{"role": "assistant", "content": "hi"}])
    final = data.flags[data.offsets[0]:data.offsets[1]]
    assert 0 < final.sum() < sum(all_flags)  # the earlier assistant turn carries no loss


def test_bad_lines_stop_with_file_and_line(tokenizer, tmp_path):
    from megatron_trillion.data.sft import SFTDataError
    from megatron_trillion.posttraining.preferences import tokenize_pairs

    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    lines = [
        good,
        "{not json",
        {"chosen": PROMPT + [{"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "other"},
                      {"role": "assistant", "content": "y"}]},  # no shared prompt
        {"prompt": "a", "chosen": "  ", "rejected": "c"},  # empty response
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"chosen": PROMPT, "rejected": PROMPT},  # final turn not the assistant's
    ]
    path = _write_jsonl(tmp_path / "bad_en.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff"}\n')
    with pytest.raises(SFTDataError) as info:
        tokenize_pairs(path, _chat(tokenizer), 256)
    text = str(info.value)
    for line, expected in ((2, "not valid JSON"), (3, "do not share their prompt"),
                           (4, "response is empty"), (5, "identical"),
                           (6, "does not end with an assistant turn"), (7, "invalid UTF-8")):
        found = [l for l in text.splitlines() if l.strip().startswith(f"{path}:{line}: ")]
        assert found and expected in found[0], text
    assert f"{path}:1:" not in text and text.startswith("bad preference data")


def test_length_ratio_filter_is_counted_per_language(tokenizer, tmp_path):
    from megatron_trillion.posttraining.preferences import build_preference_dataset

    short, long = "yes", " ".join(["word"] * 40)
    en = _write_jsonl(tmp_path / "p_en.jsonl", [{"prompt": "q", "chosen": short, "rejected": long},
                                               {"prompt": "q", "chosen": "ok", "rejected": "no"}])
    ko = _write_jsonl(tmp_path / "p_ko.jsonl", [{"prompt": "q", "chosen": "네", "rejected": "아니"}])
    lines: list = []
    dataset = build_preference_dataset([(None, en, "en"), (None, ko, "ko")], _chat(tokenizer),
                                       256, 4, max_length_ratio=3.0, log=lines.append)
    assert dataset.num_pairs == 2
    assert "DPO data en:" in lines[0] and "1 removed by the length-ratio filter" in lines[0]
    assert "DPO data ko:" in lines[1] and "0 removed by the length-ratio filter" in lines[1]


def test_packed_sample_keeps_pairs_whole_and_blocks_separate(tokenizer, tmp_path):
    from megatron_trillion.data.sample_corpus import write_sample_preferences
    from megatron_trillion.posttraining.dpo import collate_pairs
    from megatron_trillion.posttraining.preferences import build_preference_dataset

    path = write_sample_preferences(tmp_path / "p_en.jsonl", 30, languages=("en", "ko"))
    dataset = build_preference_dataset([(None, str(path), "en")], _chat(tokenizer), 128, 20)
    seen = []
    for s, pairs in dataset.bins():
        sample = dataset.pack(s, pairs)
        cu = sample["cu_seqlens_blocks"].tolist()
        ids = sample["response_ids"]
        # two blocks per pair (+ padding): each response lies inside its own block
        assert len(cu) - 1 in (2 * len(pairs), 2 * len(pairs) + 1)
        for k in range(2 * len(pairs)):
            where = np.nonzero(ids == k + 1)[0]
            assert len(where) and cu[k] <= where.min() and where.max() < cu[k + 1]
        seen += pairs.tolist()
    assert sorted(seen) == list(range(dataset.num_pairs))  # every pair once
    batch = collate_pairs([dataset[0], dataset[1]])
    assert int(batch["response_ids"].max()) == 2 * len(batch["pair_keys"])


# --------------------------------------------------------------------------------------------
# the real entry point (slow)

STEPS = 3


def _dpo_argv(workdir: str, tokenizer: str, steps: int, cache: str, *extra: str) -> list[str]:
    return [
        "--preset", "tiny-tri-7b", "--dpo", "--tokenizer-model", tokenizer,
        "--data-path", os.path.join(workdir, "prefs_en.jsonl"),
        os.path.join(workdir, "prefs_ko.jsonl"),
        "--valid-data-path", os.path.join(workdir, "valid_en.jsonl"),
        os.path.join(workdir, "valid_ko.jsonl"),
        "--data-cache-path", cache, "--seq-length", "256",
        "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", str(steps),
        "--lr", "1e-3", "--dpo-loss", "sigmoid", "--dpo-beta", "0.5",
        "--eval-interval", str(steps), "--eval-iters", "1", "--seed", "7",
        "--no-progress-bar", *extra,
    ]


def _train(argv: list[str]) -> dict:
    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    values: list = []
    lines: list = []
    _, run = pretrain(parse_args(argv), log=lines.append,
                      on_step=lambda state, result: values.append(
                          {k: v for k, v in result.items() if isinstance(v, float)}))
    reference = run.train_batches.dataset.reference
    return {"values": values, "lines": lines, "run": run, "reference": reference}


def _parallel(argv: list[str]) -> dict:
    out = _train(argv)
    return {"values": out["values"], "lines": out["lines"], "reference": out["reference"]}


def _serial_and_probes(workdir: str, tokenizer: str, argv: list[str]) -> dict:
    from megatron_trillion.posttraining.dpo import collate_pairs, response_sums

    result = _train(argv)
    out = {"values": result["values"], "lines": result["lines"],
           "reference": result["reference"]}
    run = result["run"]
    dataset = run.train_batches.dataset
    out["bins"] = len(dataset.bins())
    out["pairs"] = dataset.num_pairs

    # packed pairs == one pair per sequence
    model = run.model[0]
    model.eval()
    s, pairs = next((s, p) for s, p in dataset.bins() if len(p) >= 2)

    def sums(batch):
        with torch.no_grad():
            nll = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                        packed_seq_params=batch["packed_seq_params"])
        return response_sums(-nll.double(), batch["loss_mask"], batch["response_ids"],
                             len(batch["pair_keys"]))[0]

    packed = sums(collate_pairs([dataset.pack(s, pairs)]))
    alone = torch.cat([sums(collate_pairs([dataset.pack(s, pairs[k:k + 1])]))
                       for k in range(len(pairs))])
    out["packed_vs_alone"] = float((packed - alone).abs().max())
    out["packed_pairs"] = len(pairs)

    # the output is an ordinary checkpoint: the HF export carries the chat template
    from megatron_trillion.convert.export import ExportConfig, export_checkpoint

    save = argv[argv.index("--save") + 1]
    export_checkpoint(ExportConfig(load=save, save=os.path.join(workdir, "hf"), dtype="fp32"),
                      progress=False, log=lambda line: None)
    with open(os.path.join(workdir, "hf", "tokenizer_config.json")) as f:
        out["exported_template"] = json.load(f).get("chat_template")
    out["template"] = _chat(tokenizer).template

    # resuming reads the cache the checkpoint's reference made (what changes its key: see the
    # unit test), one more step
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    steps = argv.index("--train-iters") + 1
    again = _train(argv[:steps] + [str(STEPS + 1)] + argv[steps + 1:]
                   + ["--load", save, "--use-checkpoint-opt_param-scheduler"])
    out["again"] = [l for l in again["lines"] if "reference log-probabilities" in l]
    out["resumed_values"] = again["values"]
    return out


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, tokenizer):
    from megatron_trillion.data.sample_corpus import write_sample_preferences

    workdir = str(tmp_path_factory.mktemp("dpo"))
    # Chosen answers repeat the prompt's (en or ko) sentence, rejected ones answer in Japanese.
    # 37 + 22 pairs in 47 packed samples: a multiple of neither micro-batch x DP nor the batch.
    for name, count, seed, language in (("prefs_en", 37, 1, "en"), ("prefs_ko", 22, 2, "ko"),
                                        ("valid_en", 8, 3, "en"), ("valid_ko", 8, 4, "ko")):
        write_sample_preferences(os.path.join(workdir, f"{name}.jsonl"), count, seed=seed,
                                 languages=(language, "ja"))
    parallel = run_distributed(
        _parallel, 8, timeout=900,
        argv=_dpo_argv(workdir, tokenizer, STEPS, os.path.join(workdir, "cache_parallel"),
                       "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                       "2", "--num-layers-per-virtual-pipeline-stage", "1",  # interleaved
                       "--use-distributed-optimizer",
                       # the interleaved schedule takes no fewer micro-batches than PP stages
                       "--eval-iters", "2"))
    context = run_distributed(
        _parallel, 2, timeout=600,
        argv=_dpo_argv(workdir, tokenizer, STEPS, os.path.join(workdir, "cache_cp"),
                       "--context-parallel-size", "2"))
    (serial,) = run_distributed(
        _serial_and_probes, 1, timeout=600, workdir=workdir, tokenizer=tokenizer,
        argv=_dpo_argv(workdir, tokenizer, STEPS, os.path.join(workdir, "cache_serial"),
                       "--save", os.path.join(workdir, "serial_ckpt")))
    print(f"DPO figures: serial {serial['values']}; parallel rank 0 {parallel[0]['values']}; "
          f"packed vs alone {serial['packed_vs_alone']:.3g}; bins {serial['bins']}")
    return {"parallel": parallel, "context": context, "serial": serial}


@pytest.mark.slow
def test_reference_cache_at_tp2_pp2_dp2_and_cp2_equals_one_process(dpo_runs):
    serial = dpo_runs["serial"]
    assert serial["bins"] % 2 and serial["bins"] % 8  # not a multiple of micro x DP or batch
    table = serial["reference"]
    assert table.shape == (serial["pairs"], 2) and np.all(table < 0)
    for rank in dpo_runs["parallel"] + dpo_runs["context"]:
        np.testing.assert_allclose(rank["reference"], table, rtol=0, atol=1e-6 * max(
            1.0, float(np.abs(table).max())))


@pytest.mark.slow
def test_tp2_pp2_dp2_and_cp2_dpo_match_one_process(dpo_runs):
    serial = dpo_runs["serial"]["values"]
    # step 1: policy == reference, so the sigmoid loss is log 2 and the margins 0
    assert serial[0]["dpo loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert serial[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    for rank in dpo_runs["parallel"] + dpo_runs["context"]:  # TP2xPP2xDP2, and CP2
        got = [v["dpo loss"] for v in rank["values"]]
        np.testing.assert_allclose(got, [v["dpo loss"] for v in serial], rtol=0, atol=1e-5)
        np.testing.assert_allclose([v["rewards/margin"] for v in rank["values"]],
                                   [v["rewards/margin"] for v in serial], rtol=0, atol=1e-4)
    lines = dpo_runs["serial"]["lines"]
    assert any(" schedule (dpo): lr 0.001 -> 0 by linear decay" in l and "no anneal switch" in l
               for l in lines), lines[:10]
    line = next(l for l in lines if l.startswith(f" validation loss at iteration {STEPS} |"))
    for key in ("dpo loss [en]", "dpo loss [ko]", "rewards/accuracy [en]",
                "rewards/margin [ko]", "rewards/chosen [en]", "rewards/rejected [ko]"):
        assert f"| {key} value: " in line, line
    iteration = next(l for l in lines if l.startswith(" iteration        1/"))
    assert "| dpo loss: " in iteration and "| rewards/accuracy: " in iteration


@pytest.mark.slow
def test_packed_pairs_give_the_logprobs_of_one_pair_per_sequence(dpo_runs):
    serial = dpo_runs["serial"]
    assert serial["packed_pairs"] >= 2
    assert serial["packed_vs_alone"] < 1e-4


@pytest.mark.slow
def test_output_is_a_checkpoint_the_export_carries_the_template_of(dpo_runs):
    serial = dpo_runs["serial"]
    assert serial["exported_template"] and serial["exported_template"] == serial["template"]


@pytest.mark.slow
def test_a_resumed_run_reuses_the_reference_cache(dpo_runs):
    again = dpo_runs["serial"]["again"]
    assert len(again) == 3 and all("read from" in l for l in again), again  # train + 2 valid
    assert len(dpo_runs["serial"]["resumed_values"]) == 1  # iteration STEPS + 1 only


@pytest.mark.slow
def test_toy_preference_task_trains(dpo_runs):
    """Chosen answers repeat the prompt's sentence, rejected ones answer in Japanese: held-out
    reward accuracy goes from 0.5 (policy == reference: every reward 0) to >= 0.9."""
    serial = dpo_runs["serial"]
    assert serial["values"][0]["rewards/accuracy"] == 0.5
    values = _validation_values(serial["lines"], STEPS)
    assert values["rewards/accuracy [en]"] >= 0.9 and values["rewards/accuracy [ko]"] >= 0.9
    assert values["rewards/margin"] > 0


def _trinity_serial_and_reference_load(argv: list[str], save: str) -> dict:
    """One process on tiny-trinity (saving iterations 1 and 2), then a run whose policy starts
    from iteration 1 (``--load``) and whose reference is iteration 2 (``--dpo-reference-load``)."""
    from megatron.core import parallel_state as ps

    serial = _train(argv + ["--save", save, "--save-interval", "1"])
    ps.destroy_model_parallel()
    steps = argv.index("--train-iters") + 1
    other = _train(argv[:steps] + ["1"] + argv[steps + 1:]
                   + ["--load", save, "--ckpt-step", "1", "--finetune",
                      "--dpo-reference-load", save])
    return {"values": serial["values"], "reference": serial["reference"],
            "other": {"values": other["values"], "reference": other["reference"],
                      "lines": [l for l in other["lines"] if "reference log-prob" in l]}}


@pytest.mark.slow
def test_ep2_dpo_matches_one_process_and_a_reference_other_than_load(tokenizer, tmp_path):
    """Trinity (MoE) at EP2 gives the reference cache and loss curve of one process; with
    --dpo-reference-load the reference is that checkpoint, not --load's weights."""
    from megatron_trillion.data.sample_corpus import write_sample_preferences

    workdir = str(tmp_path)
    for name, count, seed, language in (("prefs_en", 9, 1, "en"), ("prefs_ko", 7, 2, "ko"),
                                        ("valid_en", 2, 3, "en"), ("valid_ko", 2, 4, "ko")):
        write_sample_preferences(os.path.join(workdir, f"{name}.jsonl"), count, seed=seed,
                                 languages=(language, "ja"))
    argv = lambda cache, *extra: _dpo_argv(workdir, tokenizer, 2, os.path.join(  # noqa: E731
        workdir, cache), "--preset", "tiny-trinity", "--global-batch-size", "4", *extra)
    (serial,) = run_distributed(_trinity_serial_and_reference_load, 1, timeout=600,
                                argv=argv("cache_serial"), save=os.path.join(workdir, "ckpt"))
    expert = run_distributed(_parallel, 2, timeout=600,
                             argv=argv("cache_ep", "--expert-model-parallel-size", "2"))
    table = serial["reference"]
    for rank in expert:
        np.testing.assert_allclose(rank["reference"], table, rtol=0, atol=1e-6 * max(
            1.0, float(np.abs(table).max())))
        np.testing.assert_allclose([v["dpo loss"] for v in rank["values"]],
                                   [v["dpo loss"] for v in serial["values"]], rtol=0, atol=1e-5)
    assert serial["values"][0]["dpo loss"] == pytest.approx(math.log(2), abs=1e-5)

    other = serial["other"]
    # a new cache (its key is the reference checkpoint's), other values than the initial
    # weights', and the policy (iteration 1) is not the reference (iteration 2) at step 1
    assert other["lines"] and not any("read from" in l for l in other["lines"]), other["lines"]
    assert other["reference"].shape == table.shape
    assert float(np.abs(other["reference"] - table).max()) > 1e-3
    assert abs(other["values"][0]["dpo loss"] - math.log(2)) > 1e-4
    assert abs(other["values"][0]["rewards/margin"]) > 1e-4


def _validation_values(lines: list, iteration: int) -> dict:
    line = next(l for l in lines if l.startswith(f" validation loss at iteration {iteration} |"))
    fields = [f.strip() for f in line.split("|")[1:] if " value: " in f]
    return {f.split(" value: ")[0]: float(f.split(" value: ")[1]) for f in fields}


def test_reference_cache_key_changes_with_what_made_it(tokenizer, tmp_path):
    """Checkpoint, tokenizer, chat template, data and sequence length each change the key."""
    from megatron_trillion.data.sample_corpus import write_sample_preferences
    from megatron_trillion.posttraining.preferences import build_preference_dataset
    from megatron_trillion.posttraining.reference import (
        checkpoint_identity,
        reference_cache_key,
    )

    path = str(write_sample_preferences(tmp_path / "p_en.jsonl", 6, languages=("en", "ko")))
    chat = _chat(tokenizer)
    dataset = lambda seq=256: build_preference_dataset([(None, path, "en")], chat, seq, 4)  # noqa
    ckpt = tmp_path / "ckpt" / "iter_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "common.pt").write_bytes(b"1")
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("1")
    identity = checkpoint_identity(str(tmp_path / "ckpt"))
    base = reference_cache_key(identity, {"tok": 1}, chat.template, dataset())
    assert base == reference_cache_key(identity, {"tok": 1}, chat.template, dataset())
    os.utime(ckpt / "common.pt", ns=(1, 1))  # the checkpoint was written again
    keys = {
        "checkpoint": reference_cache_key(checkpoint_identity(str(tmp_path / "ckpt")),
                                          {"tok": 1}, chat.template, dataset()),
        "tokenizer": reference_cache_key(identity, {"tok": 2}, chat.template, dataset()),
        "template": reference_cache_key(identity, {"tok": 1}, chat.template + " ",
                                        dataset()),
        "seq_length": reference_cache_key(identity, {"tok": 1}, chat.template, dataset(200)),
    }
    write_sample_preferences(path, 7, languages=("en", "ko"))
    keys["data"] = reference_cache_key(identity, {"tok": 1}, chat.template, dataset())
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys


# --------------------------------------------------------------------------------------------
# on-policy pairs (tools/make_preference_pairs.py)


def _responses(tmp_path) -> str:
    def line(pid, prompt, texts, **extra):
        return {"id": pid, "prompt": prompt, "prompt_token_ids": [1, 2], **extra,
                "responses": [{"text": t, "token_ids": list(range(n)), "logprobs": [-1.0] * n,
                               "finish_reason": "stop"} for t, n in texts]}

    return _write_jsonl(tmp_path / "responses.jsonl", [
        line("a", "Say hi", [("hi", 2), ("hello there", 3), ("no", 1)]),
        line("b", "Count", [("one two", 2), ("one", 1)]),  # a tie below
        line("c", "Long", [("x", 1), ("x " * 10, 10)]),  # too different in length
    ])


def test_preference_pairs_from_a_scores_file(tmp_path):
    from megatron_trillion.cli.make_preference_pairs import main
    from megatron_trillion.posttraining.preferences import read_pairs

    responses = _responses(tmp_path)
    scores = _write_jsonl(tmp_path / "scores.jsonl", [
        {"id": "a", "response_index": 0, "score": 0.2},
        {"id": "a", "response_index": 1, "score": 0.9},
        {"id": "a", "response_index": 2, "score": -1},
        {"id": "b", "response_index": 0, "score": 1}, {"id": "b", "response_index": 1, "score": 1},
        {"id": "c", "response_index": 0, "score": 1}, {"id": "c", "response_index": 1, "score": 0},
    ])
    out = str(tmp_path / "pairs_en.jsonl")
    assert main(["--responses", responses, "--scores", scores, "--output", out,
                 "--max-length-ratio", "3"]) == 0
    pairs = [json.loads(l) for l in open(out, encoding="utf-8")]
    assert [(p["id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "hello there", "no")]
    assert len(read_pairs(out)) == 1  # --dpo reads what the tool writes
    # against an off-policy response: the better of it and the best sampled one is chosen
    off = _write_jsonl(tmp_path / "off.jsonl", [{"id": "a", "response": "hey", "score": 2.0},
                                                {"id": "b", "response": "1 2", "score": 0.0}])
    assert main(["--responses", responses, "--scores", scores, "--off-policy", off,
                 "--output", out]) == 0
    pairs = {p["id"]: p for p in map(json.loads, open(out, encoding="utf-8"))}
    assert (pairs["a"]["chosen"], pairs["a"]["rejected"]) == ("hey", "hello there")
    assert (pairs["b"]["chosen"], pairs["b"]["rejected"]) == ("one two", "1 2")


def test_bad_scores_are_named_and_nothing_is_written(tmp_path, capsys):
    from megatron_trillion.cli.make_preference_pairs import main

    responses = _responses(tmp_path)
    scores = _write_jsonl(tmp_path / "scores.jsonl", [
        {"id": "a", "response_index": 0, "score": 0.2},
        {"id": "zz", "response_index": 0, "score": 1},
        {"id": "a", "response_index": 7, "score": 1},
        {"id": "a", "response_index": 0, "score": 0.3},
        "{broken",
    ])
    out = tmp_path / "pairs.jsonl"
    assert main(["--responses", responses, "--scores", scores, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    for line, text in ((2, "'zz' is not in the responses"), (3, "response_index 7"),
                       (4, "scored twice"), (5, "not valid JSON")):
        assert f"{scores}:{line}: " in err and text in err, err
    assert not out.exists()


def test_preference_pairs_from_a_verifier(tmp_path):
    rewards = pytest.importorskip("megatron_trillion.rewards")  # the verifier registry
    from megatron_trillion.posttraining.onpolicy import make_pairs, verifier_scores

    assert hasattr(rewards, "get_verifier")
    prompts = [{"id": 1, "prompt": "2+2?", "answer": "4", "_line": "r.jsonl:1",
                "responses": [{"text": "The answer is 5."}, {"text": "The answer is 4."}]}]
    scores = verifier_scores("gsm8k", prompts, "answer")
    pairs, report = make_pairs(prompts, scores)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("The answer is 4.",
                                                             "The answer is 5.")]


# --------------------------------------------------------------------------------------------
# post-training defaults


def test_post_training_runs_default_to_their_recipes_schedule():
    from megatron_trillion.training.arguments import parse_args

    pretraining = parse_args([])
    assert pretraining.schedule.lr_decay_style == "wsd"
    assert (pretraining.optimizer.weight_decay, pretraining.anneal.anneal_weight_decay) == (
        0.1, 0.033)
    sft = parse_args(["--sft"])
    assert (sft.schedule.lr_decay_style, sft.schedule.lr_warmup_fraction, sft.optimizer.min_lr) \
        == ("linear", 0.03, 0.0)
    assert sft.anneal.anneal_weight_decay == sft.optimizer.weight_decay  # no switch
    dpo = parse_args(["--dpo"])
    assert (dpo.schedule.lr_decay_style, dpo.schedule.lr_warmup_fraction,
            dpo.optimizer.weight_decay, dpo.anneal.anneal_weight_decay) == ("linear", 0.1, 0, 0)
    # a flag given wins; a pretraining switch applies only when asked for
    asked = parse_args(["--dpo", "--lr-decay-style", "wsd", "--weight-decay", "0.1",
                        "--lr-warmup-iters", "5"])
    assert (asked.schedule.lr_decay_style, asked.optimizer.weight_decay,
            asked.anneal.anneal_weight_decay) == ("wsd", 0.1, 0.1)
    assert (asked.schedule.lr_warmup_iters, asked.schedule.lr_warmup_fraction) == (5, None)
    assert parse_args(["--sft", "--anneal-weight-decay", "0.05"]).anneal.anneal_weight_decay \
        == 0.05


def test_dpo_flags_are_validated_up_front(tokenizer, tmp_path):
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.validation import ConfigError, validate

    data = _write_jsonl(tmp_path / "p_en.jsonl", [{"prompt": "a", "chosen": "b",
                                                   "rejected": "c"}])
    config = parse_args(["--dpo", "--sft", "--data-path", data, "--tokenizer-model", tokenizer,
                         "--dpo-beta", "0", "--dpo-max-length-ratio", "0.5",
                         "--dpo-reference-load", str(tmp_path / "missing"),
                         "--train-iters", "2"])
    with pytest.raises(ConfigError) as info:
        validate(config, get_preset("tiny-tri-7b"), 1, False)
    for expected in ("--sft and --dpo are two runs", "--dpo-beta must be > 0",
                     "--dpo-max-length-ratio", "missing: no such directory"):
        assert expected in str(info.value), str(info.value)
    config = parse_args(["--dpo-loss", "ipo", "--mock-data", "--train-iters", "2"])
    with pytest.raises(ConfigError, match="--dpo-loss need --dpo"):
        validate(config, get_preset("tiny-tri-7b"), 1, False)
