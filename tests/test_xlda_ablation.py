"""examples/xlda_ablation.sh at a tiny size: four trainings (xlda pair/sequence, document,
none) on the same data with one seed, HF export, evaluation on the synthetic-facts probe, one
table. The exported models then
serve the exactness check of tools/eval_consistency.py against a plain transformers loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_eval_consistency import plain_loop_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("xlda-pair", "xlda-sequence", "document", "none")
SEED = 1234


def _prepare_data(directory: str) -> dict:
    """The script's own data steps (sample corpus, tokenizer, indexed datasets), run in this
    process to spare two interpreter start-ups; the script then takes them the way it takes a
    user's data at scale (ABLATION_DATA_PATH, ...)."""
    from megatron_trillion.cli.make_sample_corpus import main as corpus_main
    from megatron_trillion.cli.preprocess_data import main as preprocess_main
    from megatron_trillion.cli.train_tokenizer import main as tokenizer_main

    facts = ["--facts", "24", "--fact-mentions", "2"]
    for split, docs, seed, extra in (("train", 24, 1, facts), ("valid", 4, 2, [])):
        assert corpus_main(["--output", f"{directory}/{split}.jsonl", "--docs-per-lang",
                            str(docs), "--max-paragraphs", "1", "--seed", str(seed)] + extra) == 0
    assert corpus_main(["--output", f"{directory}/probe.jsonl", "--seed", "1", "--fact-probe",
                        *facts[:2]]) == 0
    assert tokenizer_main(["--input", f"{directory}/train.jsonl", "--output-dir",
                           f"{directory}/tokenizer", "--lang-key", "lang", "--vocab-size", "512",
                           "--budget", "en=120", "ko=67", "ja=48"]) == 0
    for split in ("train", "valid"):
        assert preprocess_main(["--input", f"{directory}/{split}.jsonl", "--output-prefix",
                                f"{directory}/{split}", "--json-keys", "text", "--lang-key",
                                "lang", "--tokenizer-type", "HuggingFaceTokenizer",
                                "--tokenizer-model", f"{directory}/tokenizer", "--append-eod",
                                "--workers", "1", "--no-progress"]) == 0
    prefixes = lambda split: " ".join(  # noqa: E731
        f"{directory}/{split}_{lang}_text_document" for lang in ("en", "ko", "ja"))
    return {"ABLATION_DATA_PATH": prefixes("train"), "ABLATION_VALID_DATA_PATH": prefixes("valid"),
            "ABLATION_TOKENIZER": f"{directory}/tokenizer",
            "ABLATION_PARALLEL_DATA": f"{directory}/probe.jsonl"}


pytestmark = pytest.mark.slow   # thirteen process launches (4 x pretrain, export, eval)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ablation"))
    data = _prepare_data(str(tmp_path_factory.mktemp("ablation_data")))
    # The script's processes start their own process groups: a MASTER_PORT left in this
    # process's environment by an in-process test must not reach them.
    inherited = {k: v for k, v in os.environ.items() if k not in (
        "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env = dict(inherited, ABLATION_OUT=out, PYTHON=sys.executable, OMP_NUM_THREADS="1",
               ABLATION_SEQ_LENGTH="96", ABLATION_ITERS="2", ABLATION_WARMUP_ITERS="1",
               ABLATION_GLOBAL_BATCH_SIZE="4", ABLATION_SEEDS="1", ABLATION_SEED=str(SEED),
               **data)
    result = subprocess.run(["bash", os.path.join(ROOT, "examples", "xlda_ablation.sh")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout, data["ABLATION_PARALLEL_DATA"]


def test_table_has_a_row_per_masking_with_loss_and_metrics(ablation):
    out, stdout, _ = ablation
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    assert table in stdout
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "val loss", "val loss [en]", "val loss [ja]", "val loss [ko]",
                      "acc_en", "acc_ko", "E(T)->K(T)", "K(F)->E(T)", "E(F)->K(T)"]
    rows = {}
    for line in lines[2:2 + len(RUNS)]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    assert list(rows) == list(RUNS)
    for name, cells in rows.items():
        assert len(cells) == len(header) - 1
        assert all(0 < float(c) < 20 for c in cells[:4]), (name, cells)   # losses
        # Neither saturated nor empty: every accuracy and conditional metric is defined, and
        # no model gets every item of a language right or wrong.
        assert all(0 < float(c) < 1 for c in cells[4:]), (name, cells)
    # Same data, steps and seed; only the masking differs, and so do the trained models.
    losses = {name: tuple(cells[:4]) for name, cells in rows.items()}
    assert len(set(losses.values())) == len(RUNS), losses


def test_eval_tool_matches_a_plain_loop_on_the_exported_models(ablation):
    out, _, probe = ablation
    for run in ("xlda-pair", "none"):
        seed_dir = os.path.join(out, "runs", run, f"seed-{SEED}")
        results = json.load(open(os.path.join(seed_dir, "consistency.json")))
        expected = plain_loop_metrics(os.path.join(seed_dir, "hf"), probe, "en", "ko")
        assert {k: results[k] for k in expected} == expected, run
