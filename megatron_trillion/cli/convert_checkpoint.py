"""Convert between megatron-trillion checkpoints and Hugging Face directories (CPU, one process).

    python tools/convert_checkpoint.py export --load checkpoints/ --save hf_model/ [--dtype bf16]
    python tools/convert_checkpoint.py import --load hf_model/ --save checkpoints_ft/ \\
        --preset tri-7b --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Export writes a Llama (dense presets) or AFMoE (Trinity) model that transformers, vLLM and
SGLang load, from a checkpoint saved at any TP/PP/EP; the MTP layer is dropped. Import writes a
checkpoint that ``pretrain --load DIR --finetune`` continues from at the given layout.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_trillion.platform.single_process import run_tool


def _size(text: str) -> int:
    units = {"KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
             "GIB": 2 ** 30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[:-len(unit)]) * factor)
    return int(upper)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_checkpoint.py",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="megatron-trillion checkpoint -> Hugging Face directory")
    exp.add_argument("--load", required=True, help="checkpoint directory (--save of a run)")
    exp.add_argument("--save", required=True, help="new Hugging Face directory")
    exp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    exp.add_argument("--ckpt-step", type=int, default=None,
                     help="iteration to export (default: the newest)")
    exp.add_argument("--tokenizer-model", default=None,
                     help="ship this tokenizer instead of the run's --tokenizer-model")
    exp.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    exp.add_argument("--max-shard-size", type=_size, default="2GiB",
                     help="largest safetensors file, e.g. 5GB (default 2GiB)")
    exp.add_argument("--no-progress-bar", action="store_true")

    imp = sub.add_parser("import", help="Hugging Face directory -> megatron-trillion checkpoint")
    imp.add_argument("--load", required=True, help="Hugging Face directory (safetensors)")
    imp.add_argument("--save", required=True, help="new (or empty) checkpoint directory")
    imp.add_argument("--preset", required=True, help="model preset of the weights")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1)
    imp.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    imp.add_argument("--expert-model-parallel-size", type=int, default=1)
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument("--seed", type=int, default=1234,
                     help="initialises the weights HF lacks (MTP layer)")
    imp.add_argument("--no-progress-bar", action="store_true")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def convert() -> None:
        from megatron_trillion.convert.export import ExportConfig, export_checkpoint
        from megatron_trillion.convert.importer import ImportConfig, import_checkpoint

        if args.command == "export":
            export_checkpoint(ExportConfig(
                load=args.load, save=args.save, dtype=args.dtype, iteration=args.ckpt_step,
                tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                max_shard_bytes=args.max_shard_size), progress=not args.no_progress_bar)
        else:
            import_checkpoint(ImportConfig(
                load=args.load, save=args.save, preset=args.preset,
                tensor_model_parallel_size=args.tensor_model_parallel_size,
                pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                expert_model_parallel_size=args.expert_model_parallel_size,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                seed=args.seed), progress=not args.no_progress_bar)

    from megatron_trillion.training.checkpointing import CheckpointError

    return run_tool(convert, process_group=True, user_errors=(CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
