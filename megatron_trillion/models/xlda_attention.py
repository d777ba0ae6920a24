"""Block-causal core attention for XLDA on the CPU path (megatron-core local layer spec).

XLDA (cross-lingual document attention) lets a token attend causally to the tokens of its own
*attention block* (a run of consecutive documents, see ``megatron_trillion.data.xlda_packing``)
and to nothing outside it. Blocks are contiguous, so their boundaries are a ``cu_seqlens`` and
megatron-core's ``PackedSeqParams(qkv_format="thd")`` carries them to the core attention. On GPU
that is Transformer Engine's ``TEDotProductAttention`` (varlen flash attention over the same
cu_seqlens). megatron-core's local ``DotProductAttention`` rejects packed sequences, so this
module is the CPU implementation; it has the same constructor and forward signature so it drops
into ``submodules.self_attention.submodules.core_attention`` of ``get_gpt_layer_local_spec``.

Layouts (as megatron-core's ``Attention`` hands them over):

* THD (``packed_seq_params.qkv_format == "thd"``, micro-batch flattened to one row):
  q ``[T, heads/TP, d]``, k/v ``[T, query_groups/TP, d]`` -> output ``[T, heads/TP * d]``
  (``Attention`` reshapes it to ``[T, 1, hidden/TP]``). RoPE was already applied per block by
  megatron-core from the same cu_seqlens, so positions restart at every block.
* SBHD (no packed params): q ``[S, B, heads/TP, d]``, k/v ``[S, B, groups/TP, d]`` -> output
  ``[S, B, heads/TP * d]``; causal (bottom-right aligned when S_q != S_k, as in KV-cache
  decoding) combined with megatron's boolean ``attention_mask`` (True = masked out) if given.

Why the cost follows the allowed query-key pairs: each block is a separate causal attention, so
the blocks are cut out as contiguous ``[n, heads, L, d]`` tensors and torch's fused CPU SDPA
kernel runs on each (blocks of similar length - within 1/8 - are zero-padded at their end and
run as one batched call: causal masking keeps the padding invisible). A dense
``S x S`` boolean mask would cost the full ``S^2`` (and more: it disables the fused causal
kernel) - measured in ``bench/bench_xlda_attention.py``.

Masking is correct by construction: a model trained with XLDA or document masking must never
silently run plain causal attention. Build the layer spec with
``xlda_core_attention_spec(masking)``; for ``masking in ("xlda", "document")`` the module is
constructed with ``require_packed_seq_params=True`` and its forward raises ``ValueError`` when
``packed_seq_params`` is missing or not THD. With ``masking == "none"`` (or the bare class) the
SBHD path is allowed - that is what inference/generation uses.

Supported: GQA (any heads/groups ratio), TP (heads split; per-partition sizes checked),
sequence parallel and pipeline parallel (transparent to core attention; note megatron-core's
local spec norm rejects sequence parallel on CPU), sliding-window
attention (``config.window_size = (left, right)`` with megatron/TE semantics: query i sees keys
``j`` with ``i - left <= j <= i + right``; with causal masking right is 0; applied to the layers
selected by ``config.window_attn_skip_freq``), ``softmax_scale``, attention dropout.
Context parallelism (THD): each CP rank holds its load-balanced share of every block (the
layout of ``megatron_trillion.data.context_parallel``, TE's); keys/values are all-gathered over
the CP group per layer with a reduce-scatter backward, causality and block boundaries as without
CP (``_forward_thd_context_parallel``).
Not supported (raises): ``softmax_type`` other than ``"vanilla"``; padded cu_seqlens that differ
from the unpadded ones without context parallelism.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from megatron_trillion.data.attention_blocks import MASKED_MODES, MASKING_MODES

__all__ = ["XLDACoreAttention", "xlda_core_attention_spec", "MASKED_MODES"]


def xlda_core_attention_spec(masking: str) -> ModuleSpec:
    """The core-attention spec for a data-pipeline masking mode ("xlda" | "document" | "none").

    In the masked modes the module refuses to run without THD ``PackedSeqParams``.
    """
    if masking not in MASKING_MODES:
        raise ValueError(f"unknown masking mode {masking!r}; expected one of {MASKING_MODES}")
    return ModuleSpec(
        module=XLDACoreAttention,
        params={"require_packed_seq_params": masking in MASKED_MODES},
    )


class XLDACoreAttention(MegatronModule):
    """Causal attention inside each packed block, none across blocks (CPU path of XLDA).

    Constructor arguments are those of megatron-core's ``DotProductAttention``, plus
    ``require_packed_seq_params`` (set by :func:`xlda_core_attention_spec` in masked modes).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        require_packed_seq_params: bool = False,
    ) -> None:
        super().__init__(config=config)
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"XLDACoreAttention supports softmax_type='vanilla' only, got "
                f"{config.softmax_type!r}."
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.require_packed_seq_params = bool(require_packed_seq_params)

        if pg_collection is None:
            required = ["tp", "cp"] if config.context_parallel_size > 1 else ["tp"]
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        self.pg_collection = pg_collection
        self.cp_group = getattr(pg_collection, "cp", None)
        cp_size = self.cp_group.size() if self.cp_group is not None else 1
        if cp_size != config.context_parallel_size:
            raise ValueError(
                f"XLDACoreAttention: context_parallel_size={config.context_parallel_size} but the "
                f"context-parallel process group has {cp_size} ranks."
            )
        tp_size = pg_collection.tp.size()
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels

        # apply_query_key_layer_scaling divides the scale by layer_number and the fused softmax
        # multiplies it back: mathematically the identity, so only the plain scale is needed.
        self.softmax_scale = (
            1.0 / math.sqrt(self.head_dim) if softmax_scale is None else float(softmax_scale)
        )
        self.dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

        self.window_left: Optional[int] = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            left, right = config.window_size
            if right not in (0, -1):
                raise ValueError(
                    f"window_size={config.window_size}: causal attention needs a right window "
                    "of 0; XLDACoreAttention has no look-ahead."
                )
            # A negative left window means unlimited (TE convention).
            self.window_left = int(left) if left >= 0 else None

    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("XLDACoreAttention does not support attention_bias.")
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            if self.require_packed_seq_params:
                got = ("no packed_seq_params" if packed_seq_params is None
                       else f"qkv_format={packed_seq_params.qkv_format!r}")
                raise ValueError(
                    "XLDACoreAttention was built for a masked data pipeline (xlda/document) but "
                    f"got {got}: the block mask would be ignored. Pass the PackedSeqParams from "
                    "megatron_trillion.data.packed_batch (qkv_format='thd') to the model forward."
                )
            if packed_seq_params is not None:
                raise ValueError(
                    f"XLDACoreAttention: packed_seq_params.qkv_format="
                    f"{packed_seq_params.qkv_format!r} is not supported; use 'thd'."
                )
            if self.config.context_parallel_size > 1:
                raise ValueError(
                    "XLDACoreAttention under context parallelism needs THD packed_seq_params "
                    "(the split of megatron_trillion.data.context_parallel); without them the "
                    "sequence chunks of the other CP ranks would be ignored."
                )
            return self._forward_sbhd(query, key, value, attention_mask,
                                      attn_mask_type or self.attn_mask_type)
        if attention_mask is not None:
            # In THD the block boundaries are the mask; a second one would be silently ignored.
            raise ValueError(
                "XLDACoreAttention: pass attention_mask=None with packed_seq_params; the "
                "attention blocks come from packed_seq_params.cu_seqlens_q."
            )
        if self.config.context_parallel_size > 1:
            return self._forward_thd_context_parallel(query, key, value, packed_seq_params)
        return self._forward_thd(query, key, value, packed_seq_params)

    # ------------------------------------------------------------------------------------------
    # THD: one causal attention per block

    def _forward_thd(self, query: Tensor, key: Tensor, value: Tensor,
                     params: PackedSeqParams) -> Tensor:
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                "XLDACoreAttention THD path expects q/k/v of shape [tokens, heads, head_dim]; got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
            )
        self._check_heads(query.shape[1], key.shape[1], value.shape[1])
        lengths = _block_lengths(params, query.shape[0])
        key, value = self._expand_groups(key, value, head_dim=1)
        # torch.split (not slicing): its backward is one cat, where per-slice backward would
        # zero-fill a full-size gradient for every block.
        parts = [torch.split(x, lengths, dim=0) for x in (query, key, value)]

        # Blocks of similar length (same 1/8-rounded bucket) run as one batched SDPA call, each
        # zero-padded at its END to the longest: under causal masking a real query never sees
        # the padded keys after it, so the result is exact and padding costs at most ~1/8.
        buckets: dict[int, list[int]] = {}
        for block, length in enumerate(lengths):
            if length > 0:
                buckets.setdefault(_bucket_length(length), []).append(block)

        outputs: list[Optional[Tensor]] = [None] * len(lengths)
        for blocks in buckets.values():
            padded = max(lengths[b] for b in blocks)
            q, k, v = (_stack_blocks(p, blocks, padded) for p in parts)  # [n, H, padded, d]
            out = self._sdpa(q, k, v, padded, padded, extra_mask=None)   # [n, H, padded, dv]
            for block, piece in zip(blocks, out.transpose(1, 2).unbind(0)):
                outputs[block] = piece[:lengths[block]]                  # [L, H, dv]
        out = torch.cat([o for o in outputs if o is not None], dim=0)    # [T, H, dv]
        return out.reshape(out.shape[0], -1)

    # ------------------------------------------------------------------------------------------
    # THD under context parallelism: this rank's two chunks of every block against the whole block

    def _forward_thd_context_parallel(self, query: Tensor, key: Tensor, value: Tensor,
                                      params: PackedSeqParams) -> Tensor:
        """Block-causal attention for the load-balanced THD split of
        ``megatron_trillion.data.context_parallel`` (TE's layout): of every padded block of
        ``P`` tokens this rank holds chunks ``r`` and ``2 CP - 1 - r`` of ``P / 2 CP`` tokens.

        The keys/values of all CP ranks are all-gathered once per layer (megatron-core's
        sequence-parallel gather: its backward reduce-scatters, so the gradients of remote keys
        and values flow back to the ranks that own them), put back in row order, and each local
        query attends to the keys of its own block at positions <= its own. Queries on padding
        (past the block's real length in ``cu_seqlens_q``) output zeros, as TE's do."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        from megatron_trillion.data.context_parallel import thd_partitioned_indices

        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(
                "XLDACoreAttention THD path expects q/k/v of shape [tokens, heads, head_dim]; got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
            )
        self._check_heads(query.shape[1], key.shape[1], value.shape[1])
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        real, padded = _context_parallel_block_lengths(params, query.shape[0], cp)
        total = sum(padded)

        key_all, value_all = (gather_from_sequence_parallel_region(x, group=self.cp_group)
                              for x in (key, value))          # [total, G, d], rank-major
        owner_order = torch.cat([thd_partitioned_indices(
            torch.tensor([0, *itertools.accumulate(padded)]), total, cp, r) for r in range(cp)])
        to_row = torch.empty_like(owner_order)
        to_row[owner_order] = torch.arange(total)
        key_all, value_all = self._expand_groups(key_all.index_select(0, to_row),
                                                 value_all.index_select(0, to_row), head_dim=1)
        local = [p // cp for p in padded]
        q_parts = torch.split(query, local, dim=0)
        k_parts = torch.split(key_all, padded, dim=0)
        v_parts = torch.split(value_all, padded, dim=0)

        # Blocks of the same padded length share the query positions, hence one mask and one
        # batched SDPA call.
        buckets: dict[int, list[int]] = {}
        for block, size in enumerate(padded):
            if size > 0:
                buckets.setdefault(size, []).append(block)
        outputs: list[Optional[Tensor]] = [None] * len(padded)
        for size, blocks in buckets.items():
            chunk = size // (2 * cp)
            positions = torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                                   torch.arange((2 * cp - 1 - rank) * chunk,
                                                (2 * cp - rank) * chunk)])
            cols = torch.arange(size).unsqueeze(0)
            allowed = cols <= positions.unsqueeze(1)
            if self.window_left is not None:
                allowed = allowed & (cols >= positions.unsqueeze(1) - self.window_left)
            q, k, v = (torch.stack([parts[b] for b in blocks]).transpose(1, 2)
                       for parts in (q_parts, k_parts, v_parts))     # [n, H, len, d]
            out = self._run_sdpa(q, k, v, allowed, False,
                                 self.dropout_p if self.training else 0.0)
            for block, piece in zip(blocks, out.transpose(1, 2).unbind(0)):
                if real[block] < size:
                    piece = piece * (positions < real[block]).to(piece.dtype)[:, None, None]
                outputs[block] = piece                                   # [2 chunk, H, dv]
        out = torch.cat([o for o in outputs if o is not None], dim=0)
        return out.reshape(out.shape[0], -1)

    # ------------------------------------------------------------------------------------------
    # SBHD: ordinary causal attention (inference, unmasked pipelines)

    def _forward_sbhd(self, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], mask_type: AttnMaskType) -> Tensor:
        if query.dim() != 4:
            raise ValueError(
                "XLDACoreAttention expects q of shape [seq, batch, heads, head_dim] without "
                f"packed_seq_params; got {tuple(query.shape)}."
            )
        self._check_heads(query.shape[2], key.shape[2], value.shape[2])
        key, value = self._expand_groups(key, value, head_dim=2)
        sq, sk = query.shape[0], key.shape[0]
        q = query.permute(1, 2, 0, 3)   # [B, H, Sq, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal,
                               AttnMaskType.causal_bottom_right)
        extra = None
        if attention_mask is not None:
            # Megatron convention: True marks a masked-out pair.
            extra = ~attention_mask.to(torch.bool)
        out = self._sdpa(q, k, v, sq, sk, extra_mask=extra, causal=causal)  # [B, H, Sq, dv]
        out = out.permute(2, 0, 1, 3)   # [Sq, B, H, dv]
        return out.reshape(sq, out.shape[1], -1)

    # ------------------------------------------------------------------------------------------

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, sq: int, sk: int,
              extra_mask: Optional[Tensor], causal: bool = True) -> Tensor:
        """SDPA over [..., H, S, d] with causal (bottom-right) + optional window/extra masks."""
        dropout_p = self.dropout_p if self.training else 0.0
        # The window also bounds a decode step's single query (no_mask: the KV-cache path).
        window = self.window_left
        needs_window = window is not None and sk > window + 1
        if causal and sq == sk and extra_mask is None and not needs_window:
            return self._run_sdpa(q, k, v, None, True, dropout_p)
        allowed = extra_mask
        if causal or needs_window:
            rows = torch.arange(sq, device=q.device).unsqueeze(1) + (sk - sq)
            cols = torch.arange(sk, device=q.device).unsqueeze(0)
            band = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
            if causal:
                band = band & (cols <= rows)
            if needs_window:
                band = band & (cols >= rows - window)
            allowed = band if allowed is None else (allowed & band)
        return self._run_sdpa(q, k, v, allowed, False, dropout_p)

    def _run_sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                  dropout_p: float) -> Tensor:
        def call() -> Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Same RNG discipline as megatron-core's DotProductAttention: heads are split over
            # TP, so each TP rank draws its dropout mask from the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return call()
        return call()

    def _check_heads(self, heads: int, key_groups: int, value_groups: int) -> None:
        if heads != self.num_heads_per_partition or key_groups != self.num_groups_per_partition \
                or value_groups != self.num_groups_per_partition:
            raise ValueError(
                f"XLDACoreAttention: expected {self.num_heads_per_partition} query heads and "
                f"{self.num_groups_per_partition} key/value groups per tensor-parallel rank "
                f"(num_attention_heads={self.config.num_attention_heads}, num_query_groups="
                f"{self.config.num_query_groups}), got {heads}, {key_groups}, {value_groups}."
            )

    def _expand_groups(self, key: Tensor, value: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
        # GQA: repeat each key/value group for its query heads. Done once on [T, G, d] (O(T*H*d))
        # because the CPU SDPA kernel's enable_gqa path is not the fused one.
        repeat = self.num_heads_per_partition // self.num_groups_per_partition
        if repeat == 1:
            return key, value
        return (key.repeat_interleave(repeat, dim=head_dim),
                value.repeat_interleave(repeat, dim=head_dim))


def _block_lengths(params: PackedSeqParams, num_tokens: int) -> list[int]:
    """Lengths of the attention blocks (some may be 0), validated against the token count."""
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    if cu_q is None:
        raise ValueError("PackedSeqParams.cu_seqlens_q is required by XLDACoreAttention.")
    if cu_kv is not None and not torch.equal(cu_q.cpu(), cu_kv.cpu()):
        raise ValueError(
            "XLDACoreAttention is self-attention: cu_seqlens_q and cu_seqlens_kv must be equal."
        )
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        padded = getattr(params, name)
        if padded is not None and not torch.equal(padded.cpu(), cu_q.cpu()):
            raise ValueError(
                f"XLDACoreAttention does not support {name} different from cu_seqlens_q "
                "(padding between blocks is only needed for context parallel, a GPU/TE feature)."
            )
    # One host sync per layer call; the GPU path (TE) takes the tensor directly.
    cu = [int(x) for x in cu_q.reshape(-1).tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != num_tokens or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(
            f"PackedSeqParams.cu_seqlens_q={cu[:8]}{'...' if len(cu) > 8 else ''} must start at "
            f"0, be non-decreasing and end at the number of tokens ({num_tokens})."
        )
    return [b - a for a, b in zip(cu, cu[1:])]


def _context_parallel_block_lengths(params: PackedSeqParams, local_tokens: int,
                                     cp: int) -> tuple[list[int], list[int]]:
    """(real, padded) block lengths of a context-parallel THD batch, validated."""
    cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
    pad_q, pad_kv = params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded
    if cu_q is None:
        raise ValueError("PackedSeqParams.cu_seqlens_q is required by XLDACoreAttention.")
    if pad_q is None:
        pad_q = cu_q
    if pad_kv is None:
        pad_kv = cu_kv if cu_kv is not None else cu_q
    if (cu_kv is not None and not torch.equal(cu_q.cpu(), cu_kv.cpu())) or \
            not torch.equal(pad_q.cpu(), pad_kv.cpu()):
        raise ValueError("XLDACoreAttention is self-attention: the q and kv cu_seqlens (and "
                         "their padded versions) must be equal.")
    cu = [int(x) for x in cu_q.reshape(-1).tolist()]
    cu_padded = [int(x) for x in pad_q.reshape(-1).tolist()]
    real = [b - a for a, b in zip(cu, cu[1:])]
    padded = [b - a for a, b in zip(cu_padded, cu_padded[1:])]
    if (len(real) != len(padded) or cu_padded[0] != 0
            or any(p % (2 * cp) or n > p or n < 0 for n, p in zip(real, padded))
            or cu_padded[-1] != local_tokens * cp):
        raise ValueError(
            f"context parallel {cp}: cu_seqlens_q_padded={cu_padded[:8]}... must start at 0, "
            f"have blocks that are multiples of 2 x CP ({2 * cp}) tokens holding the real "
            f"lengths of cu_seqlens_q={cu[:8]}..., and end at CP x the {local_tokens} local "
            "tokens (split the batch with megatron_trillion.data.context_parallel)."
        )
    return real, padded


def _bucket_length(length: int) -> int:
    """``length`` rounded up to a multiple of 1/8 of its power of two (at least 16)."""
    granularity = max(16, (1 << max(0, (length - 1).bit_length())) // 8)
    return -(-length // granularity) * granularity


def _stack_blocks(parts: Sequence[Tensor], blocks: list[int], padded: int) -> Tensor:
    """Blocks [L, H, d] -> one contiguous [n, H, padded, d] (SDPA's fast layout), each block
    zero-padded at its end."""
    if len(blocks) == 1:
        return parts[blocks[0]].transpose(0, 1).unsqueeze(0).contiguous()
    first = parts[blocks[0]]
    stacked = first.new_zeros((len(blocks), padded) + tuple(first.shape[1:]))
    for row, block in enumerate(blocks):
        stacked[row, :parts[block].shape[0]] = parts[block]
    return stacked.transpose(1, 2).contiguous()
