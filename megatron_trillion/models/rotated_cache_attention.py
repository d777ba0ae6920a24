"""Self-attention whose static KV cache holds keys with RoPE already applied.

megatron-core's ``Attention`` stores each new key in ``StaticInferenceContext``'s cache *before*
RoPE and, at every decode step, rotates the whole cache again (``k_pos_emb[:sequence_end]``
applied to ``[sequence_end, batch, groups, d]``): the work per new token grows with the length
already generated. Its rotated-key path (``config.flash_decode``) is tied to the CUDA
flash-decode kernel, and its CPU fallback ``apply_rotary_pos_emb_with_cos_sin`` reads the
model's cos/sin tables as angles, so it cannot be switched on here.

This subclass rotates only the new keys (at their cache positions, ``k_pos_emb[start:end]``)
before they are stored and hands the cached, already rotated keys to the core attention with no
key embedding left to apply. Each key gets the same rotation by the same function as before, so
the outputs are identical; only the cost changes (per step: the new tokens, not the whole
cache). Everything else (training, no inference context, flash decode, dynamic batching, layers
without RoPE) is megatron-core's path unchanged.

With the project's CPU core attention (``XLDACoreAttention``) the cache is also stored
batch-major, ``[batch, groups, seq, d]`` behind the ``[seq, batch, groups, d]`` view
megatron-core indexes: the attention reads each (row, group)'s keys as one contiguous run, where
the sequence-major layout made the CPU kernel gather them with a stride (about twice the time
per step at 1,024 cached tokens), and grows as generation goes rather than being allocated for the
longest sequence at once (``_reserve``). Other core attentions (Transformer Engine's) keep the
sequence-major cache they expect.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention

__all__ = ["RotatedCacheSelfAttention"]


class RotatedCacheSelfAttention(SelfAttention):
    """``SelfAttention`` with a static KV cache of rotated keys (see the module docstring)."""

    # positions the batch-major cache holds beyond the prompt when first allocated (_reserve)
    cache_room = 64

    def _allocate_memory(self, inference_max_sequence_length, batch_size, dim, dtype):
        from megatron_trillion.models.xlda_attention import XLDACoreAttention

        if not isinstance(self.core_attention, XLDACoreAttention):
            return super()._allocate_memory(inference_max_sequence_length, batch_size, dim,
                                            dtype)
        memory = torch.empty(batch_size, self.num_query_groups_per_partition,
                             inference_max_sequence_length, dim, dtype=dtype,
                             device=torch.cuda.current_device())
        return memory.permute(2, 0, 1, 3)

    def _adjust_key_value_for_inference(self, inference_context, query: Tensor, key: Tensor,
                                        value: Tensor, rotary_pos_emb,
                                        rotary_pos_cos: Optional[Tensor] = None,
                                        rotary_pos_sin: Optional[Tensor] = None,
                                        rotary_pos_cos_sin: Optional[Tensor] = None,
                                        sequence_len_offset: Optional[int] = None, *,
                                        inference_params=None):
        if inference_context is None:
            inference_context = inference_params
        if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                or not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos,
                rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        self._reserve(inference_context, end, key.dtype)
        if k_pos_emb is not None:
            key = self._rotate(key, k_pos_emb, start, end, inference_context)
        query, key, value, _, attn_mask_type, block_table = \
            super()._adjust_key_value_for_inference(
                inference_context, query, key, value, None, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, sequence_len_offset)
        # The keys need no embedding any more; the query gets its own here where the plain
        # rotation applies, else in the caller.
        if q_pos_emb is not None and self._plain_rotation(query, q_pos_emb):
            query = self._rotate(query, q_pos_emb, start, end, inference_context)
            q_pos_emb = None
        q_pos_emb = None if q_pos_emb is None else q_pos_emb[start:end]
        return query, key, value, (q_pos_emb, None), attn_mask_type, block_table

    def _reserve(self, context, end: int, dtype) -> None:
        """Make this layer's batch-major cache in ``context`` hold positions ``[0, end)``.

        It grows as generation goes (``cache_room`` more tokens at the prefill, then doubling, up
        to the context's maximum) instead of being allocated whole for the longest possible
        sequence: the cache read at each step is then one nearly contiguous run per (row,
        group) while the text is short (a cold strided read of a mostly empty buffer took ~1.6x
        as long at 64 tokens), and rows that stop early never pay for the longest one's length.
        Doubling keeps the copies at O(1) per token. Other core attentions keep megatron-core's
        allocation of the whole length."""
        from megatron_trillion.models.xlda_attention import XLDACoreAttention

        if not isinstance(self.core_attention, XLDACoreAttention):
            return
        memories = context.key_value_memory_dict.get(self.layer_number)
        capacity = 0 if memories is None else memories[0].size(0)
        if end <= capacity:
            return
        length = min(context.max_sequence_length, max(end + self.cache_room, 2 * capacity))
        rows = context.max_batch_size if memories is None else memories[0].size(1)
        grown = (self._allocate_memory(length, rows, self.key_hidden_size, dtype),
                 self._allocate_memory(length, rows, self.val_hidden_size, dtype))
        if memories is not None:
            for new, old in zip(grown, memories):
                new[:capacity].copy_(old)
        context.key_value_memory_dict[self.layer_number] = grown

    def _plain_rotation(self, t: Tensor, freqs: Tensor) -> bool:
        """True where megatron-core's unfused RoPE of ``t`` is ``t * cos + rotate_half(t) * sin``
        over all of ``t``'s channels (no interleaving, no MLA split, no YaRN scale)."""
        config = self.config
        return (not config.apply_rope_fusion and not config.rotary_interleaved
                and not config.multi_latent_attention and freqs.size(-1) == t.size(-1)
                and _yarn_get_concentration_factor_from_config(config) == 1.0)

    def _rotate(self, t: Tensor, freqs: Tensor, start: int, end: int, context) -> Tensor:
        """``t`` (positions ``start:end``) rotated as megatron-core's ``apply_rotary_pos_emb``
        does. Where its plain formula applies, the cos/sin of those positions are computed once
        per step and shared by every layer's keys and queries (megatron-core recomputes them in
        each call: ~20 us of a ~30 us call at decode), with the same ops, so the same bits."""
        if not self._plain_rotation(t, freqs):
            return apply_rotary_pos_emb(
                t, freqs[start:end], config=self.config,
                mscale=_yarn_get_concentration_factor_from_config(self.config),
                cp_group=self.pg_collection.cp)
        cached = getattr(context, "_rotated_cache_cos_sin", None)
        if cached is None or cached[0] is not freqs or cached[1] != (start, end, t.dtype):
            angles = freqs[start:end]
            cached = (freqs, (start, end, t.dtype), torch.cos(angles).to(t.dtype),
                      torch.sin(angles).to(t.dtype))
            context._rotated_cache_cos_sin = cached
        first, second = torch.chunk(t, 2, dim=-1)
        return t * cached[2] + torch.cat((-second, first), dim=-1) * cached[3]
