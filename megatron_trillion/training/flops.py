"""Model FLOPs of a training step, counting attention over the actual XLDA blocks.

Per token, the forward pass costs 2 FLOPs per multiply-add of every weight matrix it touches:
``2 * active_matmul_params`` (QKV/gate/projection, the MLP or the routed top-k experts plus the
shared expert, the router, the output layer; embeddings and norms are lookups/elementwise and
not counted). Attention adds, per layer and per allowed (query, key) pair, 2 * d_attn for
Q·K^T and 2 * d_attn for P·V, where d_attn = heads x head_dim. With XLDA or document masking
the allowed pairs are the causal pairs inside each block, Σ_b L_b (L_b + 1) / 2 — not S^2 / 2
— and with a sliding window W a query sees at most W keys. Training = 3 x forward
(backward computes two products per forward product). MTP layers are counted like decoder
layers plus their 2H x H projection and a second output-layer pass.

This is "model FLOPs" (MFU): recomputation is not counted; HFU would add it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from megatron_trillion.models.presets import ModelPreset


def causal_pairs(block_lengths: Iterable[int], window: int | None = None) -> int:
    """Allowed (query, key) pairs of causal attention inside blocks, optionally windowed."""
    lengths = np.asarray(list(block_lengths), dtype=np.int64)
    full = lengths * (lengths + 1) // 2
    if window is None:
        return int(full.sum())
    w = int(window)
    capped = np.where(lengths <= w, full, w * (w + 1) // 2 + (lengths - w) * w)
    return int(capped.sum())


def _matmul_params_per_token(p: ModelPreset) -> tuple[int, int]:
    """(per decoder layer summed over layers, output layer) active matmul weights."""
    h, d = p.hidden_size, p.head_dim
    nq, nkv = p.num_attention_heads, p.query_groups
    attention = h * (nq + 2 * nkv) * d + nq * d * h
    if p.attention_output_gate:
        attention += h * nq * d
    dense_mlp = 3 * h * p.ffn_hidden_size
    layers = 0
    for i in range(p.num_layers):
        if p.num_experts and i >= p.num_dense_layers:
            mlp = (p.num_experts * h + p.moe_router_topk * 3 * h * p.moe_ffn_hidden_size
                   + 3 * h * (p.moe_shared_expert_intermediate_size or 0))
        else:
            mlp = dense_mlp
        layers += attention + mlp
    return layers, p.vocab_size * h


def training_flops(p: ModelPreset, block_lengths_per_sequence: Sequence[Sequence[int]]) -> float:
    """FLOPs of forward + backward over the given packed sequences (one list of block lengths
    per sequence; a sequence without masking is one block of its full length)."""
    layers_w, output_w = _matmul_params_per_token(p)
    mtp = p.mtp_num_layers
    per_layer_w = layers_w / max(p.num_layers, 1)
    per_token = 2 * (layers_w + output_w)
    if mtp:
        per_token += 2 * mtp * (per_layer_w + 2 * p.hidden_size * p.hidden_size + output_w)
    tokens = sum(sum(blocks) for blocks in block_lengths_per_sequence)
    d_attn = p.num_attention_heads * p.head_dim
    attention = 0
    for i in range(p.num_layers + mtp):
        local = (p.sliding_window is not None and p.global_attn_every_n_layers
                 and (i + 1) % p.global_attn_every_n_layers != 0)
        window = p.sliding_window if local else None
        pairs = sum(causal_pairs(blocks, window) for blocks in block_lengths_per_sequence)
        attention += 4 * d_attn * pairs
    return 3.0 * (per_token * tokens + attention)


def make_step_flops(preset: ModelPreset) -> Callable[[list], float]:
    """This rank's model FLOPs of a step, from its collated micro-batches' block boundaries."""

    def step_flops(batches: list) -> float:
        blocks = []
        for batch in batches:
            # Under context parallelism: the whole (unpadded) blocks, of which this rank does
            # 1/CP of the work.
            cu = batch.get("cu_seqlens_blocks", batch["packed_seq_params"].cu_seqlens_q).tolist()
            blocks.append([b - a for a, b in zip(cu[:-1], cu[1:])])
        cp = batches[0].get("context_parallel_size", 1) if batches else 1
        return training_flops(preset, blocks) / cp

    return step_flops
