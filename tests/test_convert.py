"""Hugging Face export / import (megatron_trillion.convert, tools/convert_checkpoint.py).

Three process launches:
1. four gloo ranks train tiny-tri-7b (MHA), tiny-tri-21b (GQA) and tiny-trinity (MoE, EP2) for
   two steps at TP2 x PP2 through the real entry point and save (torch_dist);
2. one rank exports each checkpoint, compares transformers' logits
   (``AutoModelForCausalLM.from_pretrained`` on the export) with our model's (loaded by
   megatron-core at TP1), imports the export at TP2 x PP2 (x EP2), exports again (bit-exact),
   and provokes the user errors;
3. four ranks load the original and the imported checkpoint with ``pretrain --finetune`` at
   TP2 x PP2 (x EP2): the first step's loss is identical, i.e. the import is the same model and
   loads at the requested layout.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from multiprocess import run_distributed

PRESETS = ("tiny-tri-7b", "tiny-tri-21b", "tiny-trinity")
LAYOUT = {"tiny-tri-7b": [], "tiny-tri-21b": [],
          "tiny-trinity": ["--expert-model-parallel-size", "2",
                           "--expert-tensor-parallel-size", "1"]}
SEQ = 32
# Tokenizer sizes that are not a multiple of 128 x TP: trained at TP2 (8,192 rows), exported with
# the tokenizer's 8,000, imported at TP1 (8,064 rows), fine-tuned at TP2 again.
VOCAB = {"tiny-tri-7b": 8000, "tiny-tri-21b": 4096, "tiny-trinity": 8000}


def _argv(preset: str, workdir: str, *extra: str) -> list[str]:
    return ["--preset", preset, "--mock-data", "--data-cache-path", os.path.join(workdir, "cache"),
            "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--lr", "2e-2", "--min-lr", "2e-3", "--lr-warmup-iters", "1",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
            "--sequence-parallel", "--seed", "3", "--vocab-size", str(VOCAB[preset]),
            "--no-progress-bar", *LAYOUT[preset], *extra]


def _pretrain(argv: list[str]) -> list[float]:
    from megatron.core import parallel_state

    from megatron_trillion.pretrain import pretrain, quiet_known_warnings
    from megatron_trillion.training.arguments import parse_args

    quiet_known_warnings()
    losses: list[float] = []
    try:
        pretrain(parse_args(argv), log=lambda line: None,
                 on_step=lambda state, result: losses.append(result["lm loss"]))
    finally:
        parallel_state.destroy_model_parallel()  # the next run sets up its own layout
    return losses


def train_all(workdir: str) -> None:
    for preset in PRESETS:
        _pretrain(_argv(preset, workdir, "--train-iters", "2",
                        "--save", os.path.join(workdir, preset, "trained")))


def imported_first_loss(workdir: str, serial: bool = False) -> float:
    """First-step loss of ``pretrain --load <import> --finetune`` at TP2 x PP2 x EP2 (or, with
    ``serial``, in one process)."""
    argv = _argv("tiny-trinity", workdir, "--train-iters", "2", "--finetune",
                 "--load", os.path.join(workdir, "tiny-trinity", "imported"))
    if serial:
        argv = [a for a in argv if a != "--sequence-parallel"] + [
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
            "--expert-model-parallel-size", "1"]
    return _pretrain(argv)[0]


# ---------------------------------------------------------------------------------------------
# the single-rank checks


def _logits_parity(ckpt: str, hf_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_trillion.inference.generate import load_for_inference

    model, _, _ = load_for_inference(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        padded = model(tokens, torch.arange(24).unsqueeze(0).expand(2, 24), None)
        theirs = hf(input_ids=tokens).logits
    ours = padded[..., : hf.config.vocab_size]
    # transformers' own on-disk format, for the import test
    hf.save_pretrained(hf_dir + "_saved_by_transformers")
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    return {"diff": (ours - theirs).abs().max().item(), "scale": ours.abs().max().item(),
            "norm_spread": max((p - 1).abs().max().item() for p in norms),
            "hf_class": type(hf).__name__, "hf_vocab": hf.config.vocab_size,
            "padding_masked": bool((padded[..., hf.config.vocab_size:] == float("-inf")).all())}


def _tensors(hf_dir: str) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(load_file(os.path.join(hf_dir, name)))
    return out


def _same_files(a: str, b: str) -> dict:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    config = [json.load(open(os.path.join(d, "config.json"))) for d in (a, b)]
    return {"keys_equal": sorted(ta) == sorted(tb),
            "bit_exact": sorted(ta) == sorted(tb) and all(
                ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.uint8),
                                                           tb[k].view(torch.uint8))
                for k in ta),
            "config_equal": config[0] == config[1], "num_tensors": len(ta)}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return ""


def _write_tokenizer(directory: str, size: int) -> str:
    from tokenizers import Tokenizer, models

    os.makedirs(directory, exist_ok=True)
    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, size)}}
    Tokenizer(models.WordLevel(vocab, unk_token="t1")).save(
        os.path.join(directory, "tokenizer.json"))
    return directory


def _error_cases(workdir: str) -> dict:
    import contextlib
    import io

    import torch
    from safetensors.torch import load_file, save_file

    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.convert.importer import ImportConfig, import_checkpoint

    hf = os.path.join(workdir, "tiny-tri-21b", "hf")
    quiet = dict(progress=False, log=lambda line: None)
    out = {}
    out["unknown_preset"] = _error(lambda: import_checkpoint(ImportConfig(
        load=hf, save=os.path.join(workdir, "e1"), preset="tiny-nope"), **quiet))
    out["wrong_preset"] = _error(lambda: import_checkpoint(ImportConfig(
        load=hf, save=os.path.join(workdir, "e2"), preset="tiny-tri-7b"), **quiet))
    out["bad_layout"] = _error(lambda: import_checkpoint(ImportConfig(
        load=hf, save=os.path.join(workdir, "e3"), preset="tiny-tri-21b",
        tensor_model_parallel_size=3), **quiet))

    # an HF directory missing one tensor
    broken = os.path.join(workdir, "broken_hf")
    shutil.copytree(hf, broken)
    index = json.load(open(os.path.join(broken, "model.safetensors.index.json")))
    shard = os.path.join(broken, index["weight_map"]["model.layers.1.self_attn.k_proj.weight"])
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.k_proj.weight"]  # the index still lists it
    save_file(tensors, shard, metadata={"format": "pt"})
    out["missing_hf_tensor"] = _error(lambda: import_checkpoint(ImportConfig(
        load=broken, save=os.path.join(workdir, "e4"), preset="tiny-tri-21b"), **quiet))

    # a megatron checkpoint whose model claims more layers than it holds tensors for
    ckpt = os.path.join(workdir, "short_ckpt")
    shutil.copytree(os.path.join(workdir, "tiny-tri-21b", "trained"), ckpt)
    (iteration,) = [d for d in os.listdir(ckpt) if d.startswith("iter_")]
    common_path = os.path.join(ckpt, iteration, "common.pt")
    common = torch.load(common_path, weights_only=False)
    common["common"]["model"]["num_layers"] = 6
    torch.save(common, common_path)
    out["missing_ckpt_tensor"] = _error(lambda: export_checkpoint(ExportConfig(
        load=ckpt, save=os.path.join(workdir, "e5"), dtype="fp32"), **quiet))

    # a tensor of the wrong shape: the error is printed after the progress bar's line ends
    misshaped = os.path.join(workdir, "misshaped_hf")
    shutil.copytree(hf, misshaped)
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = os.path.join(misshaped, index["weight_map"][name])
    tensors = load_file(shard)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, shard, metadata={"format": "pt"})
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):
        out["misshaped"] = _error(lambda: import_checkpoint(ImportConfig(
            load=misshaped, save=os.path.join(workdir, "e9"), preset="tiny-tri-21b"),
            progress=True, log=lambda line: None))
    out["misshaped_bar"] = bar.getvalue()

    # the three writers refuse a directory that holds something (here a run's checkpoints):
    # the run's newest checkpoint stays its newest
    from megatron_trillion.convert.merge import merge_checkpoints
    from megatron_trillion.training.checkpointing import read_tracker

    run = os.path.join(workdir, "a_run")
    shutil.copytree(os.path.join(workdir, "tiny-tri-21b", "trained"), run)
    out["run_tracker"] = read_tracker(run)
    trained = os.path.join(workdir, "tiny-tri-21b", "trained")
    out["onto_a_run"] = {
        "import": _error(lambda: import_checkpoint(ImportConfig(
            load=hf, save=run, preset="tiny-tri-21b"), **quiet)),
        "merge": _error(lambda: merge_checkpoints([trained, trained], run,
                                                  log=lambda line: None)),
        "export": _error(lambda: export_checkpoint(ExportConfig(load=trained, save=run),
                                                   **quiet))}
    out["run_tracker_after"] = read_tracker(run)
    notes = os.path.join(workdir, "notes")
    os.makedirs(notes)
    open(os.path.join(notes, "readme.txt"), "w").close()
    out["into_non_empty"] = _error(lambda: import_checkpoint(ImportConfig(
        load=hf, save=notes, preset="tiny-tri-21b"), **quiet))
    out["notes_after"] = sorted(os.listdir(notes))

    # a tokenizer with more tokens than the model's vocabulary (4096)
    big = _write_tokenizer(os.path.join(workdir, "big_tokenizer"), 5000)
    out["vocab_export"] = _error(lambda: export_checkpoint(ExportConfig(
        load=os.path.join(workdir, "tiny-tri-21b", "trained"), save=os.path.join(workdir, "e6"),
        tokenizer_model=big), **quiet))
    with_big = os.path.join(workdir, "hf_big_tokenizer")
    shutil.copytree(hf, with_big)
    shutil.copy(os.path.join(big, "tokenizer.json"), with_big)
    out["vocab_import"] = _error(lambda: import_checkpoint(ImportConfig(
        load=with_big, save=os.path.join(workdir, "e7"), preset="tiny-tri-21b"), **quiet))
    # ... and one that fits is shipped with the export
    small = _write_tokenizer(os.path.join(workdir, "small_tokenizer"), 1000)
    shipped = os.path.join(workdir, "hf_with_tokenizer")
    export_checkpoint(ExportConfig(load=os.path.join(workdir, "tiny-tri-21b", "trained"),
                                   save=shipped, tokenizer_model=small), **quiet)
    out["shipped"] = sorted(os.listdir(shipped))
    out["shipped_config"] = json.load(open(os.path.join(shipped, "config.json")))
    return out


def _import_other_layouts(root: str) -> dict:
    """Import what transformers' save_pretrained wrote, and experts in transformers' fused
    in-memory layout; exporting either gives back our export's tensors bit for bit."""
    from afmoe_experts import fuse_experts
    from safetensors.torch import save_file

    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.convert.importer import ImportConfig, import_checkpoint

    quiet = dict(progress=False, log=lambda line: None)
    fused = os.path.join(root, "hf_fused")
    os.makedirs(fused)
    save_file(fuse_experts(_tensors(os.path.join(root, "hf"))),
              os.path.join(fused, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(root, "hf", "config.json"), fused)
    out = {}
    for name in ("hf_saved_by_transformers", "hf_fused"):
        ckpt, again = os.path.join(root, name + "_ckpt"), os.path.join(root, name + "_again")
        import_checkpoint(ImportConfig(load=os.path.join(root, name), save=ckpt,
                                       preset="tiny-trinity"), **quiet)
        export_checkpoint(ExportConfig(load=ckpt, save=again, dtype="fp32"), **quiet)
        out[name] = _same_files(os.path.join(root, "hf"), again)["bit_exact"]
    return out


def export_import_all(workdir: str) -> dict:
    import torch

    from megatron_trillion.convert.export import ExportConfig, export_checkpoint
    from megatron_trillion.convert.importer import ImportConfig, import_checkpoint
    from megatron_trillion.platform.distributed import ParallelSizes, initialize_distributed
    from megatron_trillion.pretrain import quiet_known_warnings

    quiet_known_warnings()
    initialize_distributed(ParallelSizes())
    quiet = dict(progress=False, log=lambda line: None)
    out = {}
    for preset in PRESETS:
        root = os.path.join(workdir, preset)
        export_checkpoint(ExportConfig(load=os.path.join(root, "trained"),
                                       save=os.path.join(root, "hf"), dtype="fp32",
                                       max_shard_bytes=2_000_000), **quiet)
        parity = _logits_parity(os.path.join(root, "trained"), os.path.join(root, "hf"))
        ep = 2 if preset == "tiny-trinity" else 1
        import_checkpoint(ImportConfig(load=os.path.join(root, "hf"),
                                       save=os.path.join(root, "imported"), preset=preset,
                                       tensor_model_parallel_size=2,
                                       pipeline_model_parallel_size=2,
                                       expert_model_parallel_size=ep), **quiet)
        export_checkpoint(ExportConfig(load=os.path.join(root, "imported"),
                                       save=os.path.join(root, "hf_again"), dtype="fp32",
                                       max_shard_bytes=2_000_000), **quiet)
        out[preset] = {"parity": parity, "round_trip": _same_files(
            os.path.join(root, "hf"), os.path.join(root, "hf_again")),
            "shards": len(set(json.load(open(os.path.join(
                root, "hf", "model.safetensors.index.json")))["weight_map"].values()))}
    out["other_layouts"] = _import_other_layouts(os.path.join(workdir, "tiny-trinity"))
    out["errors"] = _error_cases(workdir)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    out["serial_first_loss"] = imported_first_loss(workdir, serial=True)
    out["cli"] = _cli_checks(workdir)  # last: the tool tears the process group down
    return out


def _cli_checks(workdir: str) -> dict:
    """tools/convert_checkpoint.py: a bf16 export, and a user error as one line + exit 2."""
    import contextlib
    import io
    import socket

    import torch

    from megatron_trillion.cli import convert_checkpoint as tool

    root = os.path.join(workdir, "tiny-trinity")
    bf16 = os.path.join(root, "hf_bf16")
    out = {"export_status": tool.main(["export", "--load", os.path.join(root, "trained"),
                                       "--save", bf16, "--dtype", "bf16",
                                       "--max-shard-size", "1MB"])}
    fp32, half = _tensors(os.path.join(root, "hf")), _tensors(bf16)
    out["bf16_is_rounded_fp32"] = sorted(fp32) == sorted(half) and all(
        half[k].dtype == torch.bfloat16 and torch.equal(half[k], fp32[k].to(torch.bfloat16))
        for k in fp32)
    with socket.socket() as sock:  # the first call destroyed the process group
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        out["error_status"] = tool.main(["import", "--load", os.path.join(root, "hf"),
                                         "--save", os.path.join(workdir, "e8"),
                                         "--preset", "tiny-tri-21b"])
    out["error_text"] = stderr.getvalue()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import time

    workdir = str(tmp_path_factory.mktemp("convert"))
    t0 = time.monotonic()
    run_distributed(train_all, 4, timeout=600, workdir=workdir)
    t1 = time.monotonic()
    (checks,) = run_distributed(export_import_all, 1, timeout=600, workdir=workdir)
    t2 = time.monotonic()
    losses = run_distributed(imported_first_loss, 4, timeout=600, workdir=workdir)
    print(f"train {t1 - t0:.0f}s, export/import {t2 - t1:.0f}s, "
          f"finetune loads {time.monotonic() - t2:.0f}s")
    return checks, losses


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset, hf_class", [("tiny-tri-7b", "LlamaForCausalLM"),
                                              ("tiny-tri-21b", "LlamaForCausalLM"),
                                              ("tiny-trinity", "AfmoeForCausalLM")])
def test_transformers_logits_match_ours(results, preset, hf_class):
    r = results[0][preset]["parity"]
    print(f"{preset}: max |logits ours - transformers {r['hf_class']}| = {r['diff']:.2e} "
          f"(logit scale {r['scale']:.2f}; trained norms deviate from 1 by {r['norm_spread']:.3f})")
    assert r["hf_class"] == hf_class
    # the tokenizer's size, not the 8,192 rows TP2 trained with; our padded ids are -inf
    assert r["hf_vocab"] == VOCAB[preset] and r["padding_masked"]
    # The norms moved away from 1 in training, so a swapped norm mapping would show.
    assert r["norm_spread"] > 1e-2
    assert r["diff"] <= 1e-5 * max(1.0, r["scale"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_export_import_export_is_bit_exact(results, preset):
    r = results[0][preset]
    print(preset, r["round_trip"], "shards:", r["shards"])
    assert r["round_trip"]["bit_exact"] and r["round_trip"]["config_equal"]
    assert r["shards"] > 1  # the 2 MB limit splits the ~7 MB export; the index joins them


@pytest.mark.slow
def test_import_reads_transformers_files_and_fused_experts(results):
    assert results[0]["other_layouts"] == {"hf_saved_by_transformers": True, "hf_fused": True}


@pytest.mark.slow
def test_cli_exports_bf16_and_reports_user_errors_in_one_line(results):
    cli = results[0]["cli"]
    print(cli)
    assert cli["export_status"] == 0 and cli["bf16_is_rounded_fp32"]
    assert cli["error_status"] == 2
    assert cli["error_text"].startswith("error: ") and "model_type 'afmoe'" in cli["error_text"]
    assert "Traceback" not in cli["error_text"]


@pytest.mark.slow
def test_import_trains_at_the_requested_layout(results):
    """pretrain --finetune from the tiny-trinity import at TP2 x PP2 x EP2 (the layout asked of
    the import) starts from the same loss as in one process: megatron-core resharded it."""
    serial, parallel = results[0]["serial_first_loss"], results[1]
    print(f"first loss: one process {serial:.7f}, TP2xPP2xEP2 {parallel}")
    for loss in parallel:
        assert abs(loss - serial) <= 1e-5


@pytest.mark.slow
def test_bad_input_errors_name_the_problem(results):
    e = results[0]["errors"]
    print(json.dumps({k: v for k, v in e.items() if k.endswith("_config") is False}, indent=1))
    assert "tiny-nope" in e["unknown_preset"] and "--preset" in e["unknown_preset"]
    assert "num_key_value_heads" in e["wrong_preset"]
    assert "--tensor-model-parallel-size" in e["bad_layout"]
    assert "model.layers.1.self_attn.k_proj.weight" in e["missing_hf_tensor"]
    assert "decoder.layers.4." in e["missing_ckpt_tensor"]
    assert "vocab_size" in e["vocab_export"] and "5000" in e["vocab_export"]
    assert "vocab_size" in e["vocab_import"] and "5000" in e["vocab_import"]
    assert "decoder.layers.1.self_attention.linear_proj.weight" in e["misshaped"]
    assert e["misshaped_bar"].endswith("\n")  # the bar's line ended before the error


@pytest.mark.slow
def test_writers_refuse_a_directory_that_holds_something(results):
    """import, merge and export alike: into a run's --save directory they would have moved its
    latest_checkpointed_iteration.txt back to their own iteration 0."""
    e = results[0]["errors"]
    print(json.dumps(e["onto_a_run"], indent=1))
    run = e["run_tracker"]
    assert run and e["run_tracker_after"] == run
    for tool, error in [*e["onto_a_run"].items(), ("import", e["into_non_empty"])]:
        assert "exists and is not empty" in error and "choose a new directory" in error, tool
    assert e["notes_after"] == ["readme.txt"]


@pytest.mark.slow
def test_tokenizer_is_shipped(results):
    e = results[0]["errors"]
    assert "tokenizer.json" in e["shipped"] and "generation_config.json" in e["shipped"]
    assert e["shipped_config"]["eos_token_id"] == 0
