"""A micro-batch of packed samples -> megatron-core model inputs in the THD layout.

    batch = collate_packed([dataset[i] for i in indices])
    output = model(batch["tokens"], batch["position_ids"], None,
                   labels=batch["labels"], packed_seq_params=batch["packed_seq_params"])
    loss = (output * batch["loss_mask"]).sum() / batch["loss_mask"].sum()

The B samples of S tokens are flattened into one row of B*S tokens (megatron-core's THD layout
for packed sequences has micro-batch 1), and ``PackedSeqParams.cu_seqlens_q/kv`` are the
*attention block* boundaries over that whole row: every sample contributes its own blocks
(mode "none": the sample; "document": each document; "xlda": each cross-lingual block), so no
block ever spans two samples. The same parameters drive RoPE (positions restart per block) and
attention - ``XLDACoreAttention`` on CPU, Transformer Engine's varlen kernels on GPU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["collate_packed", "packed_seq_params_from_blocks"]


def packed_seq_params_from_blocks(cu_seqlens: torch.Tensor):
    """``PackedSeqParams(qkv_format="thd")`` for self-attention over the given blocks."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = cu_seqlens.to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def collate_packed(samples: Sequence[dict]) -> dict:
    """Samples from ``XLDAPackedDataset`` -> tokens/labels/loss_mask/position_ids of shape
    ``[1, B*S]``, ``packed_seq_params`` (block cu_seqlens, int32), ``cu_seqlens_documents``
    over the row, ``document_ids`` ([docs, 2] = (source, document), for bad-batch reports) and
    ``indices`` (the global sample indices)."""
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    seq = len(samples[0]["tokens"])
    if any(len(s["tokens"]) != seq for s in samples):
        raise ValueError("all samples of a micro-batch must have the same --seq-length")
    blocks, documents = [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)]
    for b, sample in enumerate(samples):
        blocks.append(np.asarray(sample["cu_seqlens_blocks"][1:], dtype=np.int64) + b * seq)
        documents.append(np.asarray(sample["cu_seqlens_documents"][1:], dtype=np.int64) + b * seq)

    def row(key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([s[key] for s in samples])).to(dtype).unsqueeze(0)

    return {
        "tokens": row("tokens", torch.long),
        "labels": row("labels", torch.long),
        "loss_mask": row("loss_mask", torch.float32),
        "position_ids": row("position_ids", torch.long),
        "packed_seq_params": packed_seq_params_from_blocks(
            torch.from_numpy(np.concatenate(blocks))),
        "cu_seqlens_documents": torch.from_numpy(np.concatenate(documents)).to(torch.int32),
        "document_ids": [torch.from_numpy(np.asarray(s["document_ids"])) for s in samples],
        "indices": [int(s["index"]) for s in samples],
    }
