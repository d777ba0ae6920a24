"""CPU cost of XLDA block attention vs full causal attention vs a dense boolean mask.

    python bench/bench_xlda_attention.py [--seq-length 4096 --heads 8 --head-dim 64 --blocks 8]

Times forward+backward of, side by side in one run:
  * full causal  - one SDPA call over the whole sequence (is_causal), the cost of no masking;
  * dense mask   - one SDPA call with an explicit S x S boolean block-causal mask;
  * XLDA         - ``XLDACoreAttention`` with the block cu_seqlens (THD layout);
and prints each time with its ratio to full causal, next to the fraction of causal query-key
pairs the blocks allow (the ratio XLDA should approach).
"""

from __future__ import annotations

import argparse
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F


def block_lengths(seq_length: int, blocks: int, seed: int, equal: bool) -> list[int]:
    """Block lengths summing to seq_length: equal, or random (each at least 1 token)."""
    if equal:
        base, rest = divmod(seq_length, blocks)
        return [base + (1 if i < rest else 0) for i in range(blocks)]
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq_length - 1, generator=gen)[:blocks - 1] + 1
    edges = [0] + sorted(cuts.tolist()) + [seq_length]
    return [b - a for a, b in zip(edges, edges[1:])]


def run(seq_length: int, heads: int, groups: int, head_dim: int, blocks: int, seed: int,
        equal: bool, repeats: int, threads: Optional[int]) -> list[tuple[str, float]]:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_trillion.models.xlda_attention import XLDACoreAttention

    if threads:
        torch.set_num_threads(threads)
    lengths = block_lengths(seq_length, blocks, seed, equal)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    pair_fraction = sum(n * (n + 1) // 2 for n in lengths) / (seq_length * (seq_length + 1) // 2)
    print(f"S={seq_length} heads={heads} groups={groups} head_dim={head_dim} blocks={lengths}")
    print(f"allowed query-key pairs: {pair_fraction:.3f} of causal; threads="
          f"{torch.get_num_threads()}; min of {repeats} interleaved fwd+bwd\n")

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_length, heads, head_dim, generator=gen, requires_grad=True)
    k = torch.randn(seq_length, groups, head_dim, generator=gen, requires_grad=True)
    v = torch.randn(seq_length, groups, head_dim, generator=gen, requires_grad=True)
    rep = heads // groups

    def to_bhsd(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != heads:
            x = x.repeat_interleave(rep, dim=1)
        return x.transpose(0, 1).unsqueeze(0)

    block_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(seq_length)
    dense_mask = (block_id[:, None] == block_id[None, :]) & (pos[None, :] <= pos[:, None])

    # The baselines get their best layout: contiguous [1, heads, S, d] leaves.
    qb, kb, vb = (to_bhsd(x).detach().contiguous().requires_grad_() for x in (q, k, v))

    def full_causal() -> None:
        F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).sum().backward()

    def dense() -> None:
        F.scaled_dot_product_attention(qb, kb, vb, attn_mask=dense_mask).sum().backward()

    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim,
                               num_attention_heads=heads, num_query_groups=groups,
                               kv_channels=head_dim, attention_dropout=0.0,
                               use_cpu_initialization=True)
    one_rank = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    attention = XLDACoreAttention(config, 1, AttnMaskType.causal, "self",
                                  pg_collection=types.SimpleNamespace(tp=one_rank))
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))

    def xlda() -> None:
        attention(q, k, v, None, packed_seq_params=packed).sum().backward()

    methods = (("full causal", full_causal), ("dense mask", dense), ("XLDA", xlda))
    for _, fn in methods:
        fn()  # warm-up
    # Interleaved rounds and the minimum: on a shared machine, load that comes and goes then
    # hits every method alike instead of whichever ran during a busy spell.
    samples: dict[str, list[float]] = {name: [] for name, _ in methods}
    for _ in range(repeats):
        for name, fn in methods:
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    results = [(name, min(samples[name])) for name, _ in methods]
    base = results[0][1]
    print(f"{'method':<14}{'ms':>10}{'x full causal':>16}")
    for name, ms in results:
        print(f"{name:<14}{ms:>10.1f}{ms / base:>16.2f}")
    print(f"{'(pair frac.)':<14}{'':>10}{pair_fraction:>16.2f}")
    return results


def main(argv: Optional[list[str]] = None) -> None:
    # Runnable from a checkout without installing the package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=None, help="query groups (default: heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--equal-blocks", action="store_true",
                        help="equal block lengths instead of random cut points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    run(args.seq_length, args.heads, args.groups or args.heads, args.head_dim, args.blocks,
        args.seed, args.equal_blocks, args.repeats, args.threads)


if __name__ == "__main__":
    main()
