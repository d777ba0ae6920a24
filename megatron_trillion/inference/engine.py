"""The generation engine: batched, KV-cached sampling with log-probabilities, at any TP.

Everything that generates goes through :class:`GenerationEngine` (``tools/generate.py``, the
on-policy samplers of post-training, the generative evaluations).

How a batch runs:

* prompts of different lengths are **left-padded** to one length; an attention mask hides the
  padding keys from every real query (a padding query sees only itself, so no softmax row is
  empty). RoPE is relative, so the shift the padding gives a prompt's positions changes no score.
  (With a core attention other than ``XLDACoreAttention``, e.g. Transformer Engine's on GPU,
  rows are batched by prompt length instead, unpadded: see ``pads_prompts``.)
* the prompt is run once (prefill) and every new token once (decode) through megatron-core's
  ``StaticInferenceContext`` path of ``GPTModel``: each attention layer appends its keys and
  values to the context's per-layer cache (keys already rotated:
  ``models.rotated_cache_attention``), so nothing is recomputed over the sequence already
  there; only attention reads it. The core attention is the model's own
  (``XLDACoreAttention`` on the CPU spec, in its SBHD path: causal at prefill, the padding
  mask at decode).
* rows that finish (a stop token, a stop string, their token budget) leave the batch and its
  cache, so a long straggler does not keep paying for finished rows.
* the logits are the vocabulary-parallel ones gathered over TP (``runtime_gather_output``, as
  megatron-core's inference requires) and cut to the tokenizer's vocabulary: the rows padded for
  TP are never sampled (they are ``-inf`` anyway, ``models.vocab``).

Sampling is rank-independent: every row draws its uniforms from its own CPU generator seeded
from (seed, prompt index, sample index) and samples by inverse CDF over the full-vocabulary
distribution, which every TP rank holds identically after the gather. So the same seed gives the
same samples at TP1 and TP2 (up to float ties of the logits), on every rank, and a prompt's
samples do not depend on which other prompts share its batch.

Log-probabilities, per generated token: ``logprobs`` of the plain model (temperature 1, no
top-k/top-p: what a teacher-forced forward gives, the trainer's view) and ``sampled_logprobs`` of
the distribution actually sampled from (temperature, top-k, top-p applied; 0.0 for greedy, a
point mass).

Why megatron-core's ``StaticInferenceEngine`` / ``TextGenerationController`` are not used
whole: on this CPU layer their static-batch loop times every step with ``torch.cuda.Event`` and
seeds a CUDA generator, feeds prompts longer than the batch's shortest one token per step
(right-padded, no padding mask), and refuses top-k together with top-p; their dynamic engine
needs CUDA graphs and flash-attention kernels. Their context (``StaticInferenceContext``), which
is the KV cache, runs as is.

Pipeline parallelism is refused: generation runs at PP1 (any saved layout loads at PP1).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_trillion.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # (0, 1]
    top_k: int = 0                    # 0 = off
    num_samples: int = 1              # responses per prompt
    seed: int = 0                     # same seed -> same samples (at any TP)
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()   # added to the engine's EOS ids

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {self.num_samples}")
        if any(not s for s in self.stop_strings):
            raise UserError("a stop string is empty")


@dataclass
class Completion:
    token_ids: list[int]          # generated; a stop TOKEN that ended it is included
    text: str                     # without the stop token's text; a stop string's tail is cut
    logprobs: list[float]         # per token, of the plain model (temperature 1, no truncation)
    sampled_logprobs: list[float]  # per token, of the distribution actually sampled from
    finish_reason: str            # "stop" | "length"


@dataclass
class PromptResult:
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# sampling on a [rows, vocab] float32 logit matrix


def sampling_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution sampled from (``-inf`` where excluded), for
    ``temperature > 0``: logits / temperature, then top-k, then top-p (nucleus: the smallest
    set of most likely tokens whose mass reaches top_p), as transformers orders them."""
    scaled = logits / params.temperature
    vocab = scaled.size(-1)
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= params.top_p   # the most likely token always stays
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  uniforms: Optional[torch.Tensor],
                  plain: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, their log-probability under the sampled distribution) for each row of
    ``logits`` [rows, vocab], by inverse CDF at ``uniforms`` [rows] in [0, 1) (unused, and may
    be None, for greedy). ``plain``: ``log_softmax(logits)`` where the caller has it, which is
    the sampled distribution itself at temperature 1 without top-k/top-p (RL rollouts)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1), torch.zeros(logits.size(0), dtype=torch.float32)
    untruncated = params.temperature == 1.0 and params.top_p == 1.0 and \
        not 0 < params.top_k < logits.size(-1)
    logprobs = plain if plain is not None and untruncated else sampling_logprobs(logits, params)
    cdf = torch.cumsum(logprobs.double().exp(), dim=-1)
    # right=True: the first id whose cumulative mass exceeds the draw has mass > 0.
    target = (uniforms.double().to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.size(-1) - 1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()


def _row_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------------------------------------


class _Row:
    """One sequence being generated: a (prompt, sample) pair."""

    def __init__(self, prompt: list[int], prompt_index: int, sample_index: int,
                 budget: int, seed: int) -> None:
        self.prompt = prompt
        self.key = (prompt_index, sample_index)
        self.budget = budget
        self.generator = _row_generator(seed, prompt_index, sample_index)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sampled_logprobs: list[float] = []
        self.finish_reason: Optional[str] = None
        self.stop_at: Optional[int] = None   # character where a stop string begins


class GenerationEngine:
    """Generates from ``model`` (a megatron-core ``GPTModel`` built at PP1, any TP, eval mode,
    without MTP heads) with ``tokenizer`` (``data.tokenizers``; decodes the texts).

    ``max_sequence_length``: prompt plus generated tokens never exceed it (the model's position
    limit, its ``--seq-length``); a row that reaches it ends with ``"length"``.
    ``eos_token_ids``: stop tokens always in force (default: the tokenizer's EOS).
    ``max_batch_size``: rows (prompts x samples) run together; more are run in turns.
    ``kv_cache=False`` re-runs the whole sequence for every token (the reference the cached
    path is tested against).
    """

    def __init__(self, model, tokenizer, max_sequence_length: int,
                 eos_token_ids: Optional[Sequence[int]] = None, *, max_batch_size: int = 64,
                 kv_cache: bool = True) -> None:
        from megatron.core import parallel_state

        from megatron_trillion.models.vocab import unpadded_vocab_size
        from megatron_trillion.models.xlda_attention import XLDACoreAttention

        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise UserError("generation runs without pipeline parallelism: use "
                            "--pipeline-model-parallel-size 1 (any saved layout loads at PP1)")
        while hasattr(model, "module"):
            model = model.module
        if getattr(model, "mtp_process", False):
            raise ValueError("build the model without MTP heads for generation "
                             "(training.checkpointing.load_model does)")
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = int(max_sequence_length)
        self.vocab_size = unpadded_vocab_size(model)
        if eos_token_ids is None:
            eod = getattr(tokenizer, "eod", None)
            eos_token_ids = () if eod is None else (eod,)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch_size = max(1, int(max_batch_size))
        self.kv_cache = kv_cache
        # Left padding needs a core attention that applies an arbitrary key mask at prefill and
        # decode (ours does; TE's follows the layer's mask type, which megatron-core sets to
        # no_mask when decoding): with another one, rows only share a batch with rows of the
        # same prompt length, which need no padding.
        self.pads_prompts = all(isinstance(m, XLDACoreAttention)
                                for name, m in model.named_modules()
                                if name.endswith("core_attention"))

    # -----------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 progress: bool = False) -> list[PromptResult]:
        """``params.num_samples`` completions for each prompt (token ids), in prompt order."""
        prompts = [list(map(int, p)) for p in prompts]
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise UserError(f"prompt {index + 1} is empty (no tokens)")
            if len(prompt) >= self.max_sequence_length:
                raise UserError(
                    f"prompt {index + 1} has {len(prompt)} tokens: no room to generate within "
                    f"the model's {self.max_sequence_length}-token limit")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise UserError(f"prompt {index + 1} holds token id {bad[0]} outside the "
                                f"vocabulary (0..{self.vocab_size - 1})")
        stop_ids = frozenset(self.eos_token_ids) | frozenset(params.stop_token_ids)
        rows = [_Row(prompt, p, s, min(params.max_new_tokens,
                                       self.max_sequence_length - len(prompt)), params.seed)
                for p, prompt in enumerate(prompts) for s in range(params.num_samples)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(r.budget for r in rows), desc="generating", unit="token",
                       dynamic_ncols=True)
        try:
            groups = [rows] if self.pads_prompts else [
                [r for r in rows if len(r.prompt) == n] for n in sorted({len(r.prompt)
                                                                         for r in rows})]
            with torch.no_grad(), _automatic_gc_paused():
                for group in groups:
                    for start in range(0, len(group), self.max_batch_size):
                        self._run(group[start:start + self.max_batch_size], params, stop_ids,
                                  bar)
        finally:
            if bar is not None:
                bar.close()
        results = [PromptResult(prompt) for prompt in prompts]
        for row in rows:
            results[row.key[0]].completions.append(self._completion(row, stop_ids))
        return results

    def _completion(self, row: _Row, stop_ids: frozenset) -> Completion:
        shown = row.tokens[:-1] if row.tokens and row.tokens[-1] in stop_ids else row.tokens
        text = self.tokenizer.decode(shown) if self.tokenizer is not None else ""
        if row.stop_at is not None:
            text = text[:row.stop_at]
        return Completion(list(row.tokens), text, list(row.logprobs),
                          list(row.sampled_logprobs), row.finish_reason or "length")

    # -----------------------------------------------------------------------------------------

    def _run(self, rows: list[_Row], params: SamplingParams, stop_ids: frozenset, bar) -> None:
        from megatron_trillion.platform.device import compute_device

        device = compute_device()
        lengths = [len(r.prompt) for r in rows]
        width = max(lengths)
        steps = max(r.budget for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, width - len(row.prompt):] = torch.tensor(row.prompt)
        pad = torch.arange(width).unsqueeze(0) < torch.tensor([width - n for n in lengths])[:, None]
        positions = (torch.arange(width).unsqueeze(0) - pad.sum(1, keepdim=True)).clamp_(min=0)
        tokens, pad, positions = tokens.to(device), pad.to(device), positions.to(device)

        context = None
        if self.kv_cache:
            from megatron.core.inference.contexts import StaticInferenceContext

            context = StaticInferenceContext(len(rows), width + steps)
        # Without a padded row the attention needs no mask (the causal one is the layer's own).
        padded = min(lengths) < width
        logits = self._forward(tokens, positions, pad if padded else None, context)
        active = list(range(len(rows)))
        while True:
            plain = torch.log_softmax(logits, dim=-1)
            uniforms = None if params.temperature == 0 else torch.cat(
                [torch.rand(1, generator=rows[i].generator) for i in active])
            chosen, sampled = sample_tokens(logits, params, uniforms, plain)
            chosen_list = chosen.tolist()
            plain_chosen = plain.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
            sampled_list = sampled.tolist()
            keep = []
            for slot, i in enumerate(active):
                row = rows[i]
                token = chosen_list[slot]
                row.tokens.append(token)
                row.logprobs.append(plain_chosen[slot])
                row.sampled_logprobs.append(sampled_list[slot])
                if token in stop_ids or self._hit_stop_string(row, params.stop_strings):
                    row.finish_reason = "stop"
                elif len(row.tokens) >= row.budget:
                    row.finish_reason = "length"
                else:
                    keep.append(slot)
            if bar is not None:
                bar.update(len(active) + sum(rows[i].budget - len(rows[i].tokens)
                                             for slot, i in enumerate(active)
                                             if slot not in keep))
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                active = [active[slot] for slot in keep]
                padded = any(len(rows[i].prompt) < width for i in active)
                chosen, tokens, pad, positions = (x.index_select(0, index)
                                                  for x in (chosen, tokens, pad, positions))
                if context is not None:
                    _keep_cache_rows(context, index)
            new = chosen.unsqueeze(-1)
            pad = torch.cat([pad, torch.zeros_like(new, dtype=torch.bool)], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            if context is None:  # the uncached path re-runs the whole sequence
                tokens = torch.cat([tokens, new], dim=1)
                logits = self._forward(tokens, positions, pad if padded else None, None)
            else:
                logits = self._forward(new, positions[:, -1:], pad if padded else None, context)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                 pad: Optional[torch.Tensor], context) -> torch.Tensor:
        """Logits [rows, vocab] (fp32, the tokenizer's ids) of the last position.

        ``pad`` [rows, keys]: padding keys, hidden from every query but their own position (None
        where no row is padded); causality comes from the layer's mask type at prefill, and at
        decode the one query is the last position anyway."""
        queries = tokens.size(1)
        mask = None
        if self.pads_prompts and pad is not None:
            keys = pad.size(1)
            mask = pad[:, None, None, :].expand(-1, 1, queries, keys)
            if queries > 1:
                mask = mask & ~_diagonal(queries, keys, pad.device)
        if context is None:
            logits = self.model(tokens, positions, mask, runtime_gather_output=True)
        else:
            logits = self.model(tokens, positions, mask, inference_context=context,
                                runtime_gather_output=True)
            context.sequence_len_offset += queries
            context.enable_decode_mode()
        return logits[:, -1, :self.vocab_size].float()

    def _hit_stop_string(self, row: _Row, stop_strings: Sequence[str]) -> bool:
        if not stop_strings or self.tokenizer is None:
            return False
        # A token is at least one byte, so a stop string that ends at the new token lies in the
        # last len(stop) + a few tokens (a few: tokens that decode to part of a character).
        tail = self.tokenizer.decode(row.tokens[-(max(map(len, stop_strings)) + 4):])
        if not any(s in tail for s in stop_strings):
            return False
        text = self.tokenizer.decode(row.tokens)
        found = [text.find(s) for s in stop_strings if s in text]
        if not found:
            return False
        row.stop_at = min(found)
        return True


@contextlib.contextmanager
def _automatic_gc_paused():
    """Python's automatic garbage collection off while generating (as it was before, after).

    A decode step allocates thousands of short-lived objects (megatron-core's layers are Python),
    so the collector's thresholds trip every few steps and each full pass walks every object of
    the process (~0.5 M with megatron-core and transformers imported): ~15% of a small model's
    step time on CPU. The loop makes no reference cycles that need the collector; Megatron-LM's
    ``--manual-gc`` (here too, for training) turns it off for the same reason."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _diagonal(queries: int, keys: int, device) -> torch.Tensor:
    """[queries, keys]: True where a query meets its own key (queries are the last keys)."""
    rows = torch.arange(queries, device=device).unsqueeze(1) + (keys - queries)
    return rows == torch.arange(keys, device=device).unsqueeze(0)


def _keep_cache_rows(context, index: torch.Tensor) -> None:
    """Drop finished rows from a ``StaticInferenceContext``'s per-layer caches."""
    for layer, memories in list(context.key_value_memory_dict.items()):
        context.key_value_memory_dict[layer] = tuple(_select_rows(m, index) for m in memories)
    context.max_batch_size = int(index.numel())


def _select_rows(memory: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``memory[:, index]`` of a [seq, batch, groups, d] cache, in the same memory order (a
    batch-major one, ``models.rotated_cache_attention``, stays batch-major)."""
    if memory.stride(1) > memory.stride(0):
        return memory.permute(1, 2, 0, 3).index_select(0, index).permute(2, 0, 1, 3)
    return memory.index_select(1, index)


def load_engine(checkpoint_root: str, iteration: Optional[int] = None, log=print,
                **engine_options):
    """(engine, tokenizer, chat_format or None, run_config) for the ``--save`` directory of a
    run, built at the current process group's layout (one rank: TP1; PP must be 1).

    ``chat_format`` is ``inference.generate.chat_format`` (the template the model's SFT run
    trained with, else the tokenizer's, else the default) where the tokenizer can render one;
    ``engine_options`` go to :class:`GenerationEngine`. The position limit is the model's
    ``--seq-length``."""
    from megatron.core import parallel_state

    from megatron_trillion.inference.generate import chat_format, load_for_inference

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise UserError("generation runs without pipeline parallelism: use "
                        "--pipeline-model-parallel-size 1 (any saved layout loads at PP1)")
    model, tokenizer, run_config = load_for_inference(checkpoint_root, iteration, log=log)
    engine = GenerationEngine(model, tokenizer, model.max_sequence_length, **engine_options)
    chat = chat_format(tokenizer, run_config) if hasattr(tokenizer, "backend") else None
    return engine, tokenizer, chat, run_config
