"""Megatron-LM users bring their launch scripts: flags, data paths, workflows, config files.

The flag lists below are the flags (with the scripts' values) of Megatron-LM's own example
launch scripts, as data: every one must be recognised, and at least 90% accepted; the rest are
refused with one line saying why and what to use instead.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_trillion.errors import UserError
from megatron_trillion.training.arguments import REFUSED_FLAGS, parse_args

REPO = Path(__file__).resolve().parent.parent

# Megatron-LM's two Llama-3 8B FP8 scripts (the plain one and the Megatron-FSDP one) share
# their model, schedule, FP8 / parallelism and data / logging flags; each script's list below
# is these pieces with its own flags in between, in the script's order.
_LLAMA3_8B_MODEL_AND_SCHEDULE = [
    '--use-mcore-models', ('--num-layers', '32'), ('--hidden-size', '4096'),
    ('--ffn-hidden-size', '14336'), ('--num-attention-heads', '32'), '--group-query-attention',
    ('--num-query-groups', '8'), ('--kv-channels', '128'), ('--seq-length', '8192'),
    ('--max-position-embeddings', '8192'), ('--position-embedding-type', 'rope'),
    ('--rotary-base', '1000000'), ('--rotary-percent', '1.0'), ('--attention-dropout', '0.0'),
    ('--hidden-dropout', '0.0'), '--swiglu', ('--normalization', 'RMSNorm'),
    ('--init-method-std', '0.0134'), ('--attention-backend', 'fused'), '--apply-layernorm-1p',
    '--untie-embeddings-and-output-weights', '--disable-bias-linear',
    ('--micro-batch-size', '1'), ('--global-batch-size', '128'),
    ('--train-samples', '1953125000'), ('--lr-decay-samples', '1949218748'),
    ('--lr-warmup-samples', '3906252'), ('--lr', '0.00015'), ('--min-lr', '0.00001'),
    ('--decoupled-lr', '5.0e-4'), ('--decoupled-min-lr', '4.5e-5'),
    ('--lr-decay-style', 'cosine'), ('--clip-grad', '1.0'), ('--weight-decay', '0.1'),
    ('--adam-beta1', '0.9'), ('--adam-beta2', '0.95'), '--bf16',
]
_LLAMA3_8B_FP8_AND_PARALLELISM = [
    ('--fp8-format', 'hybrid'), ('--fp8-amax-history-len', '1024'),
    ('--fp8-amax-compute-algo', 'max'), '--fp8-param-gather',
    ('--tensor-model-parallel-size', '1'), ('--context-parallel-size', '1'),
    '--sequence-parallel', '--use-distributed-optimizer', '--overlap-grad-reduce',
    '--overlap-param-gather',
]
_LLAMA3_8B_DATA_AND_LOGGING = [
    '--mock-data', ('--tokenizer-type', 'NullTokenizer'), ('--vocab-size', '128256'),
    ('--data-cache-path', '/cache'), ('--tiktoken-pattern', 'v2'), ('--split', "'99,1,0'"),
    '--no-create-attention-mask-in-dataloader', '--no-mmap-bin-files', ('--num-workers', '1'),
    ('--data-path', '/data/corpus_text_document'), ('--tokenizer-model', '/data/tokenizer'),
    ('--log-interval', '1'), ('--eval-iters', '32'), ('--eval-interval', '100'),
    ('--save-interval', '1000'), '--log-throughput',
]

# Megatron-LM (github.com/NVIDIA/Megatron-LM) examples/*: each flag as (flag, value...) or a
# bare flag, the torchrun and nsys options left out.
MEGATRON_LM_SCRIPT_FLAGS = {
    "examples/gpt3/train_gpt3_175b_distributed.sh": [
        ('--num-layers', '96'), ('--hidden-size', '12288'), ('--num-attention-heads', '96'),
        ('--seq-length', '2048'), ('--max-position-embeddings', '2048'),
        ('--attention-backend', 'auto'), ('--micro-batch-size', '1'),
        ('--global-batch-size', '1536'),
        ('--step-batch-size-schedule', '0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536'),
        ('--train-iters', '500000'), ('--weight-decay', '0.1'), ('--adam-beta1', '0.9'),
        ('--adam-beta2', '0.95'), ('--init-method-std', '0.006'), ('--clip-grad', '1.0'), '--fp16',
        ('--lr', '6.0e-5'), ('--lr-decay-style', 'cosine'), ('--min-lr', '6.0e-6'),
        ('--lr-warmup-fraction', '.001'), ('--lr-decay-iters', '430000'),
        ('--tensor-model-parallel-size', '8'), ('--pipeline-model-parallel-size', '16'),
        ('--data-path', '/data/corpus_text_document'), ('--vocab-file', '/data/gpt2-vocab.json'),
        ('--merge-file', '/data/gpt2-merges.txt'), ('--split', '949,50,1'),
        ('--log-interval', '100'), ('--save-interval', '10000'), ('--eval-interval', '1000'),
        ('--save', '/ckpt'), ('--load', '/ckpt'), ('--eval-iters', '10'),
        ('--tensorboard-dir', '/tb'),
    ],
    "examples/llama/train_llama3_8b_h100_fp8.sh": [
        *_LLAMA3_8B_MODEL_AND_SCHEDULE, '--grad-reduce-in-bf16', '--cross-entropy-loss-fusion',
        '--calculate-per-token-loss', '--manual-gc', ('--empty-unused-memory-level', '1'),
        ('--exit-duration-in-mins', '235'), *_LLAMA3_8B_FP8_AND_PARALLELISM,
        *_LLAMA3_8B_DATA_AND_LOGGING, '--profile', ('--profile-step-start', '4'),
        ('--profile-step-end', '6'), ('--ckpt-format', 'torch_dist'),
        ('--distributed-timeout-minutes', '60'), ('--save', '/ckpt'), ('--load', '/ckpt'),
        ('--tensorboard-dir', '/tb'),
    ],
    "examples/megatron_fsdp/train_llama3_8b_fsdp_h100_fp8.sh": [
        *_LLAMA3_8B_MODEL_AND_SCHEDULE, '--cross-entropy-loss-fusion',
        '--no-check-for-nan-in-loss-and-grad', '--manual-gc', ('--empty-unused-memory-level', '1'),
        ('--exit-duration-in-mins', '235'), '--use-megatron-fsdp',
        ('--data-parallel-sharding-strategy', 'optim_grads_params'),
        '--no-gradient-accumulation-fusion', '--calculate-per-token-loss',
        '--init-model-with-meta-device', ('--ckpt-format', 'fsdp_dtensor'), '--use-nccl-ub',
        '--fsdp-double-buffer', '--fsdp-manual-registration', *_LLAMA3_8B_FP8_AND_PARALLELISM,
        *_LLAMA3_8B_DATA_AND_LOGGING, ('--logging-level', '20'),
        ('--distributed-timeout-minutes', '60'), ('--save', '/ckpt'), ('--load', '/ckpt'),
        ('--tensorboard-dir', '/tb'), '--profile', ('--profile-step-start', '8'),
        ('--profile-step-end', '12'), ('--profile-ranks', '0'), '--record-memory-history',
    ],
    "examples/mixtral/train_mixtral_8x7b_distributed.sh": [
        '--use-mcore-models', '--disable-bias-linear', ('--seq-length', '4096'),
        ('--max-position-embeddings', '32768'), ('--num-layers', '32'), ('--hidden-size', '4096'),
        ('--ffn-hidden-size', '14336'), ('--num-attention-heads', '32'),
        ('--init-method-std', '0.01'), ('--attention-dropout', '0.0'), ('--hidden-dropout', '0.0'),
        ('--normalization', 'RMSNorm'), ('--position-embedding-type', 'rope'), '--swiglu',
        '--untie-embeddings-and-output-weights', '--group-query-attention',
        ('--num-query-groups', '8'), '--no-masked-softmax-fusion', '--no-position-embedding',
        ('--rotary-base', '1000000'), ('--num-experts', '8'), ('--moe-router-topk', '2'),
        ('--moe-router-load-balancing-type', 'aux_loss'), ('--moe-aux-loss-coeff', '1e-2'),
        '--moe-grouped-gemm', ('--moe-token-dispatcher-type', 'alltoall'),
        '--overlap-param-gather', '--overlap-grad-reduce', ('--tokenizer-type', 'Llama2Tokenizer'),
        ('--tokenizer-model', '/data/tokenizer.model'),
        ('--data-path', '/data/corpus_text_document'), ('--split', '99990,8,2'),
        ('--micro-batch-size', '1'), ('--global-batch-size', '256'), ('--lr', '1e-4'),
        ('--train-iters', '500000'), ('--lr-decay-iters', '320000'),
        ('--lr-decay-style', 'cosine'), ('--min-lr', '1.0e-5'), ('--weight-decay', '0.1'),
        ('--lr-warmup-iters', '500'), ('--clip-grad', '1.0'), '--bf16',
        ('--tensor-model-parallel-size', '1'), ('--pipeline-model-parallel-size', '4'),
        ('--expert-model-parallel-size', '8'), '--use-distributed-optimizer',
        '--sequence-parallel', ('--log-interval', '1'), ('--save-interval', '10000'),
        ('--eval-interval', '1000'), ('--eval-iters', '10'), ('--save', '/ckpt'),
        ('--load', '/ckpt'), ('--tensorboard-dir', '/ckpt/tensorboard'), '--no-load-optim',
        '--no-load-rng', ('--wandb-project', 'Mixtral'), ('--wandb-exp-name', 'Mixtral_8x7B'),
    ],
}


def _classify(item) -> str:
    argv = [item] if isinstance(item, str) else list(item)
    try:
        parse_args(argv)
    except UserError as exc:
        assert "refused" in str(exc) and argv[0] in str(exc)
        return "refused"
    except SystemExit:
        return "unrecognized"
    return "accepted"


def test_megatron_lm_script_flags_are_recognised_and_mostly_accepted():
    verdicts = {}
    for script, items in MEGATRON_LM_SCRIPT_FLAGS.items():
        for item in items:
            flag = item if isinstance(item, str) else item[0]
            verdict = _classify(item)
            # A flag counts as accepted only if every value the scripts give it is.
            if verdicts.get(flag) in (None, "accepted"):
                verdicts[flag] = verdict
    unrecognized = sorted(f for f, v in verdicts.items() if v == "unrecognized")
    assert unrecognized == []
    refused = sorted(f for f, v in verdicts.items() if v == "refused")
    accepted = len(verdicts) - len(refused)
    assert len(verdicts) == 110
    assert accepted / len(verdicts) >= 0.90, refused
    assert set(refused) <= set(REFUSED_FLAGS) | {"--ckpt-format"}  # fsdp_dtensor


def test_refused_flag_says_why_and_what_instead(capsys):
    from megatron_trillion.pretrain import main

    assert main(["--fp16", "--mock-data", "--train-iters", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: refused flag:", f"  --fp16: {REFUSED_FLAGS['--fp16'][1]}"]
    assert "use --bf16" in err[-1]


def test_model_shape_flags_contradicting_the_preset_are_errors():
    from megatron_trillion.training.model_flags import resolve_model

    config = parse_args(["--preset", "tiny-tri-7b", "--normalization", "LayerNorm",
                         "--group-query-attention", "--rotary-percent", "0.5"])
    with pytest.raises(UserError) as info:
        resolve_model(config.model)
    message = str(info.value)
    assert "--normalization LayerNorm contradicts --preset tiny-tri-7b (RMSNorm)" in message
    assert "--group-query-attention, but --preset tiny-tri-7b" in message
    assert "--rotary-percent 0.5" in message
    # Agreeing flags (a Llama script's) are fine and override sizes.
    model = resolve_model(parse_args([
        "--preset", "tiny-tri-21b", "--swiglu", "--normalization", "RMSNorm",
        "--disable-bias-linear", "--position-embedding-type", "rope", "--group-query-attention",
        "--untie-embeddings-and-output-weights", "--num-layers", "2"]).model)
    assert model.num_layers == 2 and model.query_groups == 2


def test_without_preset_the_flags_define_the_model():
    from megatron_trillion.training.model_flags import resolve_model

    llama = ["--num-layers", "2", "--hidden-size", "4096", "--num-attention-heads", "32",
             "--seq-length", "8192", "--swiglu", "--normalization", "RMSNorm",
             "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "8"]
    model = resolve_model(parse_args(llama).model, vocab_size=128256)
    assert (model.ffn_hidden_size, model.query_groups, model.rotary_base) == (10880, 8, 10000.0)
    assert not model.untie_embeddings_and_output_weights  # Megatron-LM: tied unless untied
    with pytest.raises(UserError, match="pass --swiglu"):
        resolve_model(parse_args([a for a in llama if a != "--swiglu"]).model, vocab_size=8)
    with pytest.raises(UserError, match="give --num-layers"):
        resolve_model(parse_args(["--hidden-size", "64"]).model)


# --------------------------------------------------------------------------------------------
# config files


def test_config_file_values_get_command_line_types(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({
        "bf16": "false", "tensor-model-parallel-size": "2", "lr": "1e-4",
        "no-progress-bar": "true", "rampup_batch_size": "16 8 1000", "no-rope-fusion": True,
        "--use-checkpoint-opt_param-scheduler": "yes"}))
    config = parse_args(["--config", str(path), "--preset", "tiny-tri-7b"])
    assert config.training.bf16 is False
    assert config.parallel.tensor_model_parallel_size == 2
    assert config.optimizer.lr == 1e-4
    assert config.logging.no_progress_bar is True
    assert config.batch.rampup_batch_size == [16, 8, 1000]
    assert config.kernels.apply_rope_fusion is False
    assert config.schedule.use_checkpoint_opt_param_scheduler is True
    toml = tmp_path / "run.toml"
    for text, expected in (('tensor-model-parallel-size = "two"', "'tensor-model-parallel-size' "
                            "must be a int, got 'two'"),
                           ('bf16 = "maybe"', "'bf16' must be true or false"),
                           ('lr-decay-style = "exp"', "'lr-decay-style' must be one of"),
                           ('fp16 = true', "key 'fp16': fp16 training is not supported"),
                           ('no-such-flag = 1', "unknown keys ['no_such_flag']")):
        toml.write_text(text + "\n")
        with pytest.raises(UserError) as info:
            parse_args(["--config", str(toml)])
        assert expected in str(info.value), str(info.value)


# --------------------------------------------------------------------------------------------
# --help of every entry point


def _tool_mains():
    """The main of every megatron_trillion.cli module, which tools/<name>.py runs as it is."""
    import pkgutil

    import megatron_trillion.cli

    names = sorted(m.name for m in pkgutil.iter_modules(megatron_trillion.cli.__path__))
    assert names == sorted(path.stem for path in (REPO / "tools").glob("*.py"))
    for name in names:
        spec = importlib.util.spec_from_file_location(f"help_{name}", REPO / "tools" / f"{name}.py")
        wrapper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(wrapper)
        main = importlib.import_module(f"megatron_trillion.cli.{name}").main
        assert wrapper.main is main, name
        yield f"tools/{name}.py", main


def test_help_of_every_entry_point(capsys):
    from megatron_trillion.pretrain import main as pretrain_main

    entry_points = [("megatron_trillion.pretrain", pretrain_main), *_tool_mains()]
    assert len(entry_points) >= 8
    for name, main in entry_points:
        with pytest.raises(SystemExit) as info:
            main(["--help"])
        assert info.value.code == 0, name
        out = capsys.readouterr().out
        assert "usage:" in out, name
    # The pretraining help lists every accepted and every refused flag.
    with pytest.raises(SystemExit):
        pretrain_main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--lr-decay-iters", "--override-opt_param-scheduler", "--no-rope-fusion",
                 "--fp16"):
        assert flag in out


# --------------------------------------------------------------------------------------------
# workflows through the real entry point


def _write_untagged_corpus(directory: Path, num_docs: int = 300, vocab: int = 1000) -> str:
    """A Megatron dataset whose name tells no language (corpus_text_document)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(directory / "corpus_text_document")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(num_docs):
        length = int(rng.integers(8, 60))
        doc = np.append(rng.integers(1, vocab, size=length - 1), 0).astype(np.int32)
        builder.add_document(torch.from_numpy(doc), [length])
    builder.finalize(prefix + ".idx")
    return prefix


def test_plain_untagged_prefix_trains_a_flags_defined_model(tmp_path, capsys):
    """A Megatron-LM Llama-style command line, unchanged: one untagged prefix, --split, model
    defined by flags (no --preset), validation on the split's held-out share."""
    from megatron_trillion.pretrain import main

    prefix = _write_untagged_corpus(tmp_path)
    common = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
              "--max-position-embeddings", "64", "--swiglu", "--normalization", "RMSNorm",
              "--disable-bias-linear", "--position-embedding-type", "rope",
              "--untie-embeddings-and-output-weights", "--tokenizer-type", "NullTokenizer",
              "--vocab-size", "1000", "--data-path", prefix, "--split", "90,10,0",
              "--data-cache-path", str(tmp_path / "cache"), "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3",
              "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1",
              "--eval-interval", "3", "--log-interval", "1", "--no-progress-bar",
              "--manual-gc", "--manual-gc-interval", "2", "--num-workers", "1"]
    assert main(common + ["--eval-iters", "1"]) == 0
    out = capsys.readouterr().out
    assert "data has one language (und)" in out
    assert "model-from-flags: 2 layers, hidden 64" in out
    assert len(re.findall(r"^ iteration +\d+/ +3 \|", out, re.M)) == 3
    assert "validation" in out.lower()
    # --eval-iters 0 turns evaluation off (Megatron-LM's way); the same blend given through
    # --data-args-path; the PyTorch profiler traces iteration 2.
    args_file = tmp_path / "blend.txt"
    args_file.write_text(prefix + "\n")
    again = [a for a in common if a not in ("--data-path", prefix)]
    tensorboard = tmp_path / "tb"
    assert main(again + ["--data-args-path", str(args_file), "--eval-iters", "0", "--profile",
                         "--use-pytorch-profiler", "--profile-step-start", "1",
                         "--profile-step-end", "2", "--tensorboard-dir", str(tensorboard)]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^ iteration +\d+/ +3 \|", out, re.M)) == 3
    assert "validation" not in out.lower()
    assert list((tensorboard / "profile").glob("*.pt.trace.json"))


def test_data_path_forms(tmp_path):
    from megatron_trillion.data.data_path import DataSource
    from megatron_trillion.training.data import resolve_data_splits

    prefix = _write_untagged_corpus(tmp_path, num_docs=100)
    splits = resolve_data_splits(parse_args(["--data-path", prefix, "--split", "'98,1,1'"]).data)
    assert splits.train == [DataSource(prefix, "und", None, (0, 98))]
    assert splits.valid == [DataSource(prefix, "und", None, (98, 99))]
    assert splits.test == [DataSource(prefix, "und", None, (99, 100))]
    whole = resolve_data_splits(parse_args(["--train-data-path", prefix,
                                            "--valid-data-path", prefix]).data)
    assert whole.train == whole.valid == [DataSource(prefix, "und")] and whole.test is None
    for argv, expected in (
            (["--data-path", prefix, "--train-data-path", prefix], "--train-data-path replaces"),
            (["--data-path", prefix, "--split", "90,10,0", "--valid-data-path", prefix],
             "use one"),
            (["--data-path", prefix, "--split", "0,1,0"], "leaves no training documents"),
            (["--data-path", prefix, "--split", "a,b"], "comma-separated proportions"),
            (["--data-args-path", str(tmp_path / "none.txt")], "no such file")):
        with pytest.raises(UserError, match=expected):
            resolve_data_splits(parse_args(argv).data)


def _run(argv, losses):
    import torch

    from megatron_trillion.platform.distributed import destroy_distributed
    from megatron_trillion.pretrain import pretrain

    try:
        pretrain(parse_args(argv), log=lambda line: None,
                 on_step=lambda state, result: losses.append(result["lm loss"]))
    finally:
        if torch.distributed.is_initialized():
            destroy_distributed()


def test_extending_a_run_with_a_fixed_schedule_equals_the_straight_run(tmp_path):
    base = ["--preset", "tiny-tri-7b", "--mock-data", "--data-cache-path", str(tmp_path / "c"),
            "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--lr", "3e-3",
            "--min-lr", "3e-4", "--lr-decay-iters", "6", "--no-progress-bar"]
    straight: list = []
    # Read in the loop (no prefetch thread) and with the wall-clock exit armed: same numbers.
    _run(base + ["--train-iters", "6", "--num-workers", "0", "--exit-duration-in-mins", "600"],
         straight)
    extended: list = []
    ckpt = str(tmp_path / "ckpt")
    _run(base + ["--train-iters", "3", "--save", ckpt], extended)
    _run(base + ["--train-iters", "6", "--save", ckpt, "--load", ckpt], extended)
    assert len(straight) == len(extended) == 6
    np.testing.assert_allclose(extended, straight, rtol=0, atol=1e-6)


def test_kernel_flags_refused_without_their_kernel_and_no_effect_said():
    from megatron_trillion.models.presets import get_preset
    from megatron_trillion.training.validation import kernel_errors, platform_notes

    config = parse_args(["--moe-grouped-gemm", "--tp-comm-overlap", "--apply-rope-fusion",
                         "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te",
                         "--fp8-param-gather"])
    errors = "\n".join(kernel_errors(config, te_available=False))
    for flag in ("--moe-grouped-gemm", "--tp-comm-overlap", "--apply-rope-fusion",
                 "--cross-entropy-fusion-impl te", "--fp8-param-gather needs --fp8-format",
                 "--fp8-param-gather needs --use-distributed-optimizer"):
        assert flag in errors
    # megatron-core's own cross entropy fusion runs anywhere.
    assert kernel_errors(parse_args(["--cross-entropy-loss-fusion"]), te_available=False) == []
    notes = platform_notes(parse_args(["--empty-unused-memory-level", "1", "--moe-grouped-gemm",
                                       "--no-masked-softmax-fusion"]),
                           get_preset("tiny-tri-7b"), te_available=False, cuda=False)
    assert len(notes) == 3 and "--moe-grouped-gemm has no effect: the model is dense" in notes


def test_save_and_load_in_one_directory_start_a_chain_before_it_exists(tmp_path, capsys):
    """Megatron-LM's `--save X --load X` on a first job whose X does not exist yet trains from
    iteration 0; the next job resumes there. A --load to start from that is missing is refused
    before anything is built."""
    from megatron_trillion.pretrain import main

    ckpt = str(tmp_path / "new" / "ckpt")
    common = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
              "--seq-length", "32", "--swiglu", "--normalization", "RMSNorm",
              "--disable-bias-linear", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
              "--mock-data", "--data-cache-path", str(tmp_path / "cache"),
              "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
              "--lr-decay-style", "constant", "--lr-decay-iters", "3", "--eval-iters", "0",
              "--log-interval", "1", "--no-progress-bar", "--save", ckpt, "--save-interval", "2"]
    assert main(common + ["--load", ckpt, "--train-iters", "2"]) == 0
    out = capsys.readouterr().out
    assert f"no checkpoint in {ckpt} (not created yet): starting from iteration 0" in out
    assert len(re.findall(r"^ iteration +\d+/ +2 \|", out, re.M)) == 2
    assert main(common + ["--load", ckpt, "--train-iters", "3"]) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^ iteration +(\d+)/ +3 \|", out, re.M) == ["3"]  # resumed after 2

    typo = str(tmp_path / "ckpt-typo")
    assert main(common + ["--load", typo, "--train-iters", "3"]) == 2
    assert f"--load {typo}: no such directory" in capsys.readouterr().err
    assert main(common + ["--load", ckpt + "-missing", "--save", ckpt + "-missing",
                          "--finetune", "--train-iters", "3"]) == 2
    assert "no such directory" in capsys.readouterr().err
