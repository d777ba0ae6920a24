"""The reference model's log-probabilities of every preference pair, computed once and cached.

Before the first DPO step, one forward pass of the reference model (the ``--load`` weights, or
``--dpo-reference-load``'s) over every packed sample of one pass over the data, at the run's own
TP/PP/DP/CP layout, gives per response the summed log-probability; the table (``[pairs, 2]``:
chosen, rejected) is stored under ``--data-cache-path`` (``dpo-reference-<key>.npy``), keyed by
hashes of the reference checkpoint, the tokenizer, the chat template, the data files, the
length filter and ``--seq-length``; it is reused when all match and rebuilt when any changes.
Training then reads it as data: no reference model sits in memory.

Nothing is missing or duplicated whatever the data size, batch size or rank count: the samples
of the pass are dealt round-robin to the DP ranks (a rank short of a full micro-batch repeats a
sample whose results are discarded), each pair's values are summed into a zero table together
with a count of how often it was seen, and the build fails unless every pair was seen exactly
once.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import numpy as np
import torch

from megatron_trillion.platform.device import compute_device, to_device

_VERSION = 1


def checkpoint_identity(directory: str, iteration: Optional[int] = None) -> dict:
    """What identifies a checkpoint's weights: the loaded directory and the names, sizes and
    times of its files (a re-saved checkpoint is another reference)."""
    from megatron_trillion.training.checkpointing import resolve_checkpoint

    path = resolve_checkpoint(directory, iteration, log=lambda line: None)
    path = os.path.abspath(path if path is not None else directory)
    files = []
    for root, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            stat = os.stat(os.path.join(root, name))
            files.append((os.path.relpath(os.path.join(root, name), path), stat.st_size,
                          stat.st_mtime_ns))
    return {"path": path, "files": files}


def reference_cache_key(reference: dict, tokenizer_fingerprint, chat_template: str,
                        dataset) -> str:
    sources = [(os.path.abspath(s.path), s.language, s.data.tokens.size,
                hashlib.sha256(s.data.tokens.tobytes() + s.data.flags.tobytes()).hexdigest())
               for s in dataset.sources]
    text = json.dumps({"version": _VERSION, "reference": reference,
                       "tokenizer": tokenizer_fingerprint, "template": chat_template,
                       "sources": sources, "seq_length": dataset.seq_length},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _pass_batches(dataset, micro_batch: int, dp_rank: int, dp_size: int, collate,
                  context_parallel=None) -> list:
    """This rank's micro-batches of one pass over every packed sample (each sample once over
    all ranks; padding samples carry pair key -1)."""
    bins = dataset.bins()
    per_step = micro_batch * dp_size
    rounds = -(-len(bins) // per_step)
    batches = []
    for r in range(rounds):
        samples = []
        for m in range(micro_batch):
            i = r * per_step + dp_rank * micro_batch + m
            sample = dataset.pack(*bins[min(i, len(bins) - 1)])
            if i >= len(bins):  # a repeat to fill the micro-batch: its results are dropped
                sample = dict(sample, pair_keys=np.full_like(sample["pair_keys"], -1))
            samples.append(sample)
        batch = collate(samples)
        batches.append(context_parallel(batch) if context_parallel is not None else batch)
    return batches


def _collect(batch: dict, output_tensor: torch.Tensor):
    from megatron.core import parallel_state as ps

    from megatron_trillion.posttraining.dpo import response_sums

    keys = batch["pair_keys"].to(output_tensor.device)
    sums, _ = response_sums(-output_tensor.float().detach(), batch["loss_mask"],
                            batch["response_ids"], len(keys))
    first_cp = ps.get_context_parallel_rank() == 0
    seen = torch.full((len(keys), 1), 1.0 if first_cp else 0.0, device=sums.device)
    rows = torch.cat([keys.double().unsqueeze(1), sums.double(), seen.double()], dim=1)
    zero = output_tensor.float().sum() * 0.0
    return zero, torch.tensor(0, dtype=torch.int), {"reference": rows}


def _forward(data_iterator, model):
    import functools

    batch = to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   packed_seq_params=batch["packed_seq_params"])
    return output, functools.partial(_collect, batch)


def compute_reference_logps(model: list, dataset, micro_batch: int, dp_size: int,
                            tokens_per_microbatch: int, collate,
                            context_parallel=None) -> np.ndarray:
    """``[pairs, 2]`` summed log-probabilities of every pair's chosen and rejected response
    under ``model`` (collective over every rank; every rank returns the whole table)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_rank = ps.get_data_parallel_rank(with_context_parallel=False)
    batches = _pass_batches(dataset, micro_batch, dp_rank, dp_size, collate, context_parallel)
    for chunk in model:
        chunk.eval()
    try:
        with torch.no_grad():
            iterators = [iter(batches) for _ in model]
            outputs = get_forward_backward_func()(
                forward_step_func=_forward,
                data_iterator=iterators if len(iterators) > 1 else iterators[0],
                model=model, num_microbatches=len(batches),
                seq_length=tokens_per_microbatch, micro_batch_size=1, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    table = torch.zeros(dataset.num_pairs, 3, dtype=torch.float64, device=compute_device())
    for out in outputs:
        rows = out["reference"]
        rows = rows[rows[:, 0] >= 0]
        table.index_add_(0, rows[:, 0].long(), rows[:, 1:])
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        torch.distributed.all_reduce(table, group=ps.get_data_parallel_group(
            with_context_parallel=True))
    torch.distributed.broadcast(table, ps.get_pipeline_model_parallel_last_rank(),
                                group=ps.get_pipeline_model_parallel_group())
    table = table.cpu().numpy()
    seen = table[:, 2]
    if not np.all(seen == 1):
        missing, repeated = int((seen == 0).sum()), int((seen > 1).sum())
        raise RuntimeError(f"reference log-probabilities: {missing} pair(s) missing and "
                           f"{repeated} seen more than once in the pass over the data")
    return table[:, :2].copy()


def load_or_build_reference(cache_dir: str, key: str, build: Callable[[], np.ndarray],
                            log: Callable[[str], None]) -> np.ndarray:
    """The cached table for ``key``, else ``build()`` (collective) written atomically by
    global rank 0."""
    path = os.path.join(cache_dir, f"dpo-reference-{key}.npy")
    found = os.path.isfile(path)
    flags = torch.tensor([1 if found else 0], dtype=torch.int32, device=compute_device())
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)  # all see it
    if int(flags) == 1:
        log(f" DPO reference log-probabilities: read from {path}")
        return np.load(path)
    table = build()
    if torch.distributed.get_rank() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, table)
        os.replace(tmp, path)  # atomic: a reader never sees a partial table
    torch.distributed.barrier()
    log(f" DPO reference log-probabilities: computed for {len(table)} pairs, cached in {path}")
    return table


class ReferenceTables:
    """Gives every DPO dataset of a run (training and validation) its reference table.

    ``identity``: the reference weights' identity (``checkpoint_identity``, or the initial
    weights of a run without ``--load``). The model holds the reference weights when ``attach``
    first needs to compute: it is the ``--load`` model itself unless ``load_reference`` (which
    loads other weights) is given, in which case ``finish`` puts the policy's weights back
    with ``restore``."""

    def __init__(self, identity: dict, tokenizer_fingerprint, chat_template: str,
                 cache_dir: str, compute: Callable, log: Callable[[str], None],
                 load_reference: Optional[Callable[[], None]] = None,
                 restore: Optional[Callable[[], None]] = None) -> None:
        self.identity = identity
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.chat_template = chat_template
        self.cache_dir = cache_dir
        self.compute = compute  # dataset -> table (collective)
        self.log = log
        self.load_reference = load_reference
        self.restore = restore
        self._swapped = False

    def attach(self, dataset) -> None:
        key = reference_cache_key(self.identity, self.tokenizer_fingerprint,
                                  self.chat_template, dataset)

        def build() -> np.ndarray:
            if self.load_reference is not None and not self._swapped:
                self.load_reference()
                self._swapped = True
            return self.compute(dataset)

        dataset.reference = load_or_build_reference(self.cache_dir, key, build, self.log)
        dataset.reference_identity = self.identity  # a resume reads the same tables

    def finish(self) -> None:
        if self._swapped and self.restore is not None:
            self.restore()
        self._swapped = False
