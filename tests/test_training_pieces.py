"""Single-process tests of the training loop's pieces: flags, data paths, FLOPs, log format."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from megatron_trillion.data.data_path import DataSource
from megatron_trillion.training.arguments import accepted_flags, parse_args, to_flat_dict
from megatron_trillion.training.data import (
    infer_language,
    microbatch_indices,
    parse_data_path,
    parse_lang_beta,
)
from megatron_trillion.training.flops import causal_pairs, training_flops
from megatron_trillion.training.reporting import format_iteration_line, format_validation_line


# --------------------------------------------------------------------------------------------
# flags


def test_megatron_flag_names_are_accepted():
    config = parse_args([
        "--preset", "tiny-tri-21b", "--tensor-model-parallel-size", "2",
        "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
        "--sequence-parallel", "--use-distributed-optimizer", "--micro-batch-size", "2",
        "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "100",
        "--train-samples", "1000", "--lr", "1e-3", "--min-lr", "1e-4", "--bf16",
        "--recompute-granularity", "selective", "--mock-data",
    ])
    assert config.parallel.tensor_model_parallel_size == 2
    assert config.parallel.num_layers_per_virtual_pipeline_stage == 1
    assert config.parallel.sequence_parallel and config.training.bf16
    assert config.batch.rampup_batch_size == [4, 4, 100]
    assert config.optimizer.lr == 1e-3 and config.training.train_samples == 1000
    for flag in ("--tensor-model-parallel-size", "--expert-model-parallel-size",
                 "--context-parallel-size", "--fp8-format", "--save", "--load",
                 "--exit-signal-handler", "--async-save", "--ckpt-format", "--no-load-optim"):
        assert flag in accepted_flags()


def test_config_file_then_command_line_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny-tri-7b"\nlr = 0.002\nmicro-batch-size = 4\n'
                    '[anneal]\nweight-decay = 0.05\n')
    config = parse_args(["--config", str(path), "--lr", "0.003"])
    assert config.model.preset == "tiny-tri-7b"
    assert config.optimizer.lr == 0.003  # the command line wins
    assert config.batch.micro_batch_size == 4
    assert config.anneal.anneal_weight_decay == 0.05
    assert to_flat_dict(config)["micro_batch_size"] == 4


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("no-such-flag = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown keys \['no_such_flag'\]"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.toml")])


def test_pretrain_main_reports_every_conflict_before_starting(capsys, monkeypatch):
    from megatron_trillion.pretrain import main

    monkeypatch.setenv("WORLD_SIZE", "6")
    code = main(["--preset", "tiny-tri-7b", "--mock-data", "--tensor-model-parallel-size", "4",
                 "--train-iters", "10", "--sequence-parallel", "--xlda-mixing-prob", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "world size 6 is not divisible" in err
    assert "--xlda-mixing-prob must be in [0, 1]" in err
    import torch

    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------
# data paths and DP sharding


def _fake_dataset(prefix):
    for ext in (".bin", ".idx"):
        open(prefix + ext, "wb").close()
    return prefix


def test_data_path_syntax(tmp_path):
    en = _fake_dataset(str(tmp_path / "web_en_text_document"))
    ko = _fake_dataset(str(tmp_path / "web_ko_text_document"))
    other = _fake_dataset(str(tmp_path / "books"))
    assert parse_data_path([en, ko]) == [DataSource(en, "en"), DataSource(ko, "ko")]
    assert parse_data_path(["0.7", en, "0.3", f"ja:{other}"]) == [
        DataSource(en, "en", 0.7), DataSource(other, "ja", 0.3)]
    assert infer_language("/x/corpus_ko_text_document") == "ko"
    # A name that tells no language: one unnamed language (Megatron-LM's plain PREFIX form).
    assert parse_data_path([other]) == [DataSource(other, "und")]
    with pytest.raises(ValueError, match="does not exist"):
        parse_data_path([str(tmp_path / "missing_en_text_document")])
    with pytest.raises(ValueError, match="not followed by a dataset"):
        parse_data_path([en, "0.5"])
    assert parse_lang_beta(["en=0.6", "ko=0.4"]) == {"en": 0.6, "ko": 0.4}
    with pytest.raises(ValueError, match="LANG=VALUE"):
        parse_lang_beta(["en"])


def test_global_batch_is_the_same_set_of_samples_for_any_dp_size():
    for dp in (1, 2, 4):
        union = sorted(i for rank in range(dp)
                       for mb in microbatch_indices(64, 16, 2, rank, dp) for i in mb)
        assert union == list(range(64, 80))
    with pytest.raises(ValueError, match="not a multiple"):
        microbatch_indices(0, 10, 2, 0, 4)


# --------------------------------------------------------------------------------------------
# FLOPs and logs


def test_mock_data_cache_is_keyed_by_vocabulary_and_written_whole(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_trillion.training.data import write_mock_datasets

    large = write_mock_datasets(str(tmp_path), vocab_size=8000, seed=3)
    small = write_mock_datasets(str(tmp_path), vocab_size=300, seed=3)
    other_seed = write_mock_datasets(str(tmp_path), vocab_size=300, seed=4)
    assert len({source.path_prefix for source in large + small + other_seed}) == 9  # no sharing
    for sources, vocab in ((large, 8000), (small, 300)):
        assert [source.language for source in sources] == ["en", "ko", "ja"]
        # keep the mmaps open
        datasets = [IndexedDataset(source.path_prefix) for source in sources]
        top = max(int(np.max(dataset[i])) for dataset in datasets for i in range(50))
        assert top < vocab
    assert top > 150  # the small vocabulary is used, not only its bottom
    # Second call reuses the files; nothing staged is left behind.
    before = os.path.getmtime(small[0].path_prefix + ".bin")
    assert write_mock_datasets(str(tmp_path), vocab_size=300, seed=3) == small
    assert os.path.getmtime(small[0].path_prefix + ".bin") == before
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_attention_flops_follow_allowed_pairs():
    assert causal_pairs([4]) == 10
    assert causal_pairs([2, 2]) == 6  # two blocks allow fewer pairs than one
    assert causal_pairs([10], window=3) == 6 + 7 * 3
    from megatron_trillion.models.presets import get_preset

    preset = get_preset("tiny-tri-7b")
    one_block = training_flops(preset, [[128]])
    eight_blocks = training_flops(preset, [[16] * 8])
    assert eight_blocks < one_block
    # Dense part: 6 FLOPs per weight per token at least.
    assert one_block > 6 * 128 * preset.num_layers * 4 * preset.hidden_size ** 2


def test_log_lines_keep_megatron_format():
    line = format_iteration_line(
        iteration=10, train_iters=100, consumed_samples=640, elapsed_ms=123.4,
        learning_rate=1e-4, global_batch_size=64, losses={"lm loss": 1.234567},
        grad_norm=0.5, skipped_iterations=0, nan_iterations=0)
    assert line.startswith(" iteration       10/     100 |")
    assert re.search(r"\| consumed samples:\s+640 \|", line)
    assert "| learning rate: 1.000000E-04 |" in line
    assert "| lm loss: 1.234567E+00 |" in line
    assert "| grad norm: 0.500 |" in line
    valid = format_validation_line(10, {"lm loss": 2.0})
    assert valid.startswith(" validation loss at iteration 10 | lm loss value: 2.000000E+00 |")
    assert f"lm loss PPL: {np.exp(2.0):.6E}" in valid
