"""The XLDA ablation table over seeds: mean ± standard deviation per cell, the seeds a
conditional metric is undefined in, n/a where no seed defines it."""

import json

import pytest

from megatron_trillion.errors import UserError
from megatron_trillion.evaluation.ablation import format_ablation_table, read_run


def _seed(directory, loss, acc_en, transfer):
    directory.mkdir(parents=True)
    (directory / "train.log").write_text(
        "iteration 1\nvalidation loss at iteration 60 | lm loss value: "
        f"{loss:E} | lm loss PPL: 9 | lm loss [en] value: {loss - 0.1:E} | "
        f"lm loss [ko] value: {loss + 0.1:E} |\n", encoding="utf-8")
    (directory / "consistency.json").write_text(json.dumps({
        "acc_en": acc_en, "acc_ko": 0.25, "E(T)->K(T)": transfer, "K(F)->E(T)": 0.5,
        "E(F)->K(T)": None, "num_items": 60, "source_language": "en",
        "target_language": "ko"}), encoding="utf-8")


def test_mean_and_spread_over_seed_directories(tmp_path):
    _seed(tmp_path / "xlda-pair" / "seed-1234", 2.0, 0.5, 0.3)
    _seed(tmp_path / "xlda-pair" / "seed-1235", 2.2, 0.7, None)
    _seed(tmp_path / "xlda-pair" / "seed-1236", 2.4, 0.6, 0.5)
    run = read_run(str(tmp_path / "xlda-pair"))
    assert run["name"] == "xlda-pair" and len(run["seeds"]) == 3
    table = format_ablation_table([run]).splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells == ["xlda-pair", "2.200 ± 0.200", "2.100 ± 0.200", "2.300 ± 0.200",
                     "0.600 ± 0.100", "0.250 ± 0.000", "0.400 ± 0.141 (2/3)",
                     "0.500 ± 0.000", "n/a"]
    assert "over 3 seeds" in table[-1]


def test_one_seed_directory(tmp_path):
    _seed(tmp_path / "none", 2.0, 0.5, 0.3)
    row = format_ablation_table([read_run(str(tmp_path / "none"))]).splitlines()[2]
    assert row.startswith("| none | 2.0000 | 1.9000 | 2.1000 | 0.5000 |")
    with pytest.raises(UserError, match="no such run directory"):
        read_run(str(tmp_path / "missing"))


def test_a_seed_without_results_is_named(tmp_path):
    _seed(tmp_path / "document" / "seed-1", 2.0, 0.5, 0.3)
    (tmp_path / "document" / "seed-2").mkdir()
    with pytest.raises(UserError, match="seed-2: train.log is missing"):
        read_run(str(tmp_path / "document"))
