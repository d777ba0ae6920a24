"""Transformer Engine's core attention: refusing to run a masked mode without block boundaries,
and told the padding layout the batch already knows (``pass_pad_between_seqs``).

TE's ``TEDotProductAttention`` runs XLDA / document masking as varlen attention over the
``PackedSeqParams(qkv_format="thd")`` cu_seqlens. Called without them (or with another
qkv_format) it runs plain causal attention over the whole packed row - no error, just every
document attending to the previous ones. The CPU attention (``xlda_attention``) raises in that
case; :func:`require_packed_thd` gives TE's class the same contract so the choice of backend
cannot change what the model attends to.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_trillion.data.attention_blocks import MASKED_MODES, MASKING_NONE


def check_packed_thd(packed_seq_params: Any, masking: str, who: str) -> None:
    """Raise ValueError when ``masking`` needs block boundaries that ``packed_seq_params``
    does not carry (None, or a qkv_format other than "thd")."""
    if masking not in MASKED_MODES:
        return
    if packed_seq_params is None or getattr(packed_seq_params, "qkv_format", None) != "thd":
        got = ("no packed_seq_params" if packed_seq_params is None
               else f"qkv_format={packed_seq_params.qkv_format!r}")
        raise ValueError(
            f"{who}: --attention-masking {masking} needs PackedSeqParams(qkv_format='thd') with "
            f"the attention-block cu_seqlens, got {got}: the block mask would be ignored. Pass "
            "the PackedSeqParams from megatron_trillion.data.packed_batch to the model forward, "
            f"or use --attention-masking {MASKING_NONE} for classic causal packing.")


def require_packed_thd(attention_cls: type, masking: str) -> type:
    """``attention_cls`` (TE's core attention) unchanged for masking "none", else a subclass
    whose forward first checks the packed-sequence parameters."""
    if masking not in MASKED_MODES:
        return attention_cls

    class PackedOnlyAttention(attention_cls):
        def forward(self, *args: Any, **kwargs: Any):
            # megatron-core's Attention passes packed_seq_params by keyword; positionally it is
            # the 7th argument (query, key, value, attention_mask, attn_mask_type, bias, packed).
            params = kwargs.get("packed_seq_params", args[6] if len(args) > 6 else None)
            check_packed_thd(params, masking, attention_cls.__name__)
            return super().forward(*args, **kwargs)

    PackedOnlyAttention.__name__ = f"{attention_cls.__name__}PackedOnly"
    PackedOnlyAttention.__qualname__ = PackedOnlyAttention.__name__
    return PackedOnlyAttention


def _transformer_engine_attention_base(attention_cls: type) -> Optional[type]:
    """Transformer Engine's ``DotProductAttention`` among ``attention_cls``'s bases (None for
    a class that does not derive from it)."""
    for base in attention_cls.__mro__:
        if base.__name__ == "DotProductAttention" and \
                base.__module__.startswith("transformer_engine."):
            return base
    return None


def pass_pad_between_seqs(attention_cls: type, te_base: Optional[type] = None) -> type:
    """``attention_cls`` (megatron-core's ``TEDotProductAttention`` or a subclass) handing TE
    the ``pad_between_seqs`` that the batch's packed-sequence parameters state
    (``data.context_parallel.ContextParallelPackedSeqParams``), so TE does not derive it with
    two host syncs per call.

    megatron-core's forward builds TE's arguments from its own ``PackedSeqParams`` fields and
    calls TE's ``forward`` through ``super()``; a class placed between the two in the method
    resolution order adds the argument there. Parameters that state nothing (no CP) leave TE
    to its own rule. ``te_base``: TE's ``DotProductAttention`` (found among the bases; a class
    without it has no such argument and is returned as it is)."""
    te_base = te_base or _transformer_engine_attention_base(attention_cls)
    if te_base is None:
        return attention_cls

    class AddPadBetweenSeqs(te_base):
        def forward(self, *args: Any, **kwargs: Any):
            if self._pad_between_seqs is not None:
                kwargs.setdefault("pad_between_seqs", self._pad_between_seqs)
            return super().forward(*args, **kwargs)

    class StatedPadding(attention_cls, AddPadBetweenSeqs):
        _pad_between_seqs: Optional[bool] = None

        def forward(self, *args: Any, **kwargs: Any):
            params = kwargs.get("packed_seq_params", args[6] if len(args) > 6 else None)
            self._pad_between_seqs = getattr(params, "pad_between_seqs", None)
            try:
                return super().forward(*args, **kwargs)
            finally:
                self._pad_between_seqs = None

    StatedPadding.__name__ = StatedPadding.__qualname__ = attention_cls.__name__
    return StatedPadding
