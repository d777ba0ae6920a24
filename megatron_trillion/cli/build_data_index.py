"""Build the XLDA sample index a pretraining run will use, before the run and off the GPUs.

    python tools/build_data_index.py <the run's pretrain flags> [--world-size N]
    megatron-trillion-build-data-index <the run's pretrain flags>

Takes the same flags as ``megatron_trillion.pretrain`` (every one is accepted; those that
shape the data matter: ``--data-path``/``--mock-data``, ``--seq-length``, ``--train-samples``/
``--train-iters`` and the batch flags incl. ``--rampup-batch-size``, ``--xlda-mixing-prob``,
``--anchor-language``, ``--lang-alpha``/``--lang-beta``, ``--seed``, ``--data-cache-path``, the
WSD schedule and ``--anneal-data-path``, ``--valid-data-path``/``--eval-*``) and builds exactly the
chunks training will read: the main mixture up to the anneal switch, then the anneal mixture
from the mixture state at the switch, and the validation sets. Training on the same flags finds
them (its log says "0 built"). ``--world-size`` only sizes the validation sets (their sample
count is eval-iters x micro-batch x data-parallel size); default: one data-parallel rank.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from megatron_trillion.platform.single_process import run_tool


def main(argv: Optional[Sequence[str]] = None) -> int:
    own = argparse.ArgumentParser(prog="build_data_index.py", allow_abbrev=False,
                                  description=__doc__.splitlines()[0],
                                  epilog="Every flag of `python -m megatron_trillion.pretrain "
                                  "--help` is accepted too: give the run's own flags.")
    own.add_argument("--world-size", type=int, default=None,
                     help="GPUs of the run (sizes the validation sets; default: DP 1)")
    own_args, rest = own.parse_known_args(argv)
    return run_tool(lambda: build_index(rest, own_args.world_size))


def build_index(pretrain_argv: Sequence[str], world_size: Optional[int]) -> int:
    """Builds the main (and anneal) mixture's chunks and the validation sets of the run."""
    from tqdm import tqdm

    from megatron_trillion.data.tokenizers import tokenizer_fingerprint
    from megatron_trillion.data.xlda_packing import resume_xlda_dataset
    from megatron_trillion.training.arguments import parse_args
    from megatron_trillion.training.build import (
        build_tokenizer,
        resolve_model_preset,
        tokenizer_config,
    )
    from megatron_trillion.training.data import check_data_files
    from megatron_trillion.training.datasets import DatasetBuilder, data_sources, data_workdir
    from megatron_trillion.training.validation import validate

    config = parse_args(pretrain_argv)
    tokenizer = build_tokenizer(config)
    base_vocab = (tokenizer.vocab_size if tokenizer is not None
                  else config.data.vocab_size
                  or resolve_model_preset(config, check=False).vocab_size)
    # The tokenizer's size, as pretrain uses it (the model pads it for TP on its own).
    preset = resolve_model_preset(config, base_vocab, check=False)
    par = config.parallel
    world = world_size or (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                           * par.context_parallel_size)
    # The index does not depend on the model or the devices: validate as if they exist.
    shape = validate(config, preset, world, transformer_engine_available=True)
    # The start-up data checks of training, so a bad file fails here, not on the GPUs.
    fingerprint = (tokenizer_fingerprint(tokenizer_config(config), tokenizer)
                   if tokenizer is not None else None)
    check_data_files(config, fingerprint, base_vocab, print)
    workdir = data_workdir(config)
    eod = tokenizer.eod if tokenizer is not None else 0
    data = DatasetBuilder(config, shape, data_sources(config, base_vocab, workdir), eod,
                          workdir)
    sources = data.splits.train
    switch = data.anneal_switch_sample()
    anneal_sources = data.anneal_sources() if switch is not None else None

    def build(dataset, end: int, what: str) -> None:
        index = dataset.index
        began = time.perf_counter()
        last = (end - 1 - index.first_sample) // index.chunk_samples
        with tqdm(total=last + 1, desc=what, unit="chunk") as bar:
            for chunk in range(last + 1):
                index.chunk(chunk)
                bar.update(1)
        print(f"{what}: samples [{index.first_sample}, {end}) in {index.directory}: "
              f"{index.found} chunk(s) already there, {index.built} built, "
              f"{time.perf_counter() - began:.1f} s")

    if switch == 0:  # the anneal boundary is at step 0: training reads only the anneal mixture
        sources, switch = anneal_sources, None
    main_data = data.build(sources)
    main_data.index.prefetch = False
    build(main_data, switch if switch is not None else shape.train_samples, "main mixture")
    if switch is not None:
        anneal_data, changes = resume_xlda_dataset(
            main_data.state_dict(switch), switch,
            **data.dataset_kwargs(anneal_sources))
        anneal_data.index.prefetch = False
        for change in changes:
            print(f"anneal data mixture at sample {switch}: {change}")
        build(anneal_data, shape.train_samples, "anneal mixture")
    if data.eval_batches(dp_rank=0):  # the validation sets training reads
        print("validation sets: built")
    return 0


if __name__ == "__main__":
    sys.exit(main())
