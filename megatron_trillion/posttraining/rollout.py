"""GRPO's batch source: each step samples G responses per prompt from the current weights, scores
them with the verifiers and turns them into training micro-batches.

Which prompts a step takes: the prompts of all files, in a seeded order that is reshuffled every
pass over them (``prompt_order``); step positions ``[consumed, consumed + B)`` of that endless
order, DP rank ``r`` taking the ``r``-th contiguous ``B / DP`` of them. So the position is the
consumed-prompts counter alone, and a resumed run takes the same prompts as a straight one.

How they are sampled: with the generation engine on the training model itself (its local
TP shard, no second copy that goes stale), in eval mode, at PP1. Each prompt's sampler seed is
derived from ``--seed`` and the prompt's position, so a resumed run samples the same responses
as a straight one without storing any generator state, and the samples are the same at any DP
size; the TP ranks of a DP group sample the same tokens (the engine's samples do not depend on
TP).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from megatron_trillion.errors import UserError
from megatron_trillion.posttraining.grpo import (
    GroupAdvantages,
    collate_sequences,
    group_advantages,
    pack_in_order,
    training_sequences,
)
from megatron_trillion.posttraining.rlvr_data import RLVRPrompt


def prompt_order(num_prompts: int, seed: int, position: int) -> int:
    """The prompt at ``position`` of the endless seeded order (a fresh permutation per pass)."""
    epoch, offset = divmod(int(position), num_prompts)
    return int(np.random.default_rng([seed, epoch]).permutation(num_prompts)[offset])


def sampler_seed(seed: int, position: int) -> int:
    """The generation seed of the prompt at ``position`` of the prompt order."""
    digest = hashlib.sha256(f"grpo/{seed}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class RolloutConfig:
    """How responses are sampled (``--grpo-samples-per-prompt``, ``--grpo-max-new-tokens``,
    ``--grpo-temperature``, ``--grpo-top-p``, ``--seed``, ``--system-prompt-file``)."""

    samples_per_prompt: int = 16
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 1234
    system_prompt: Optional[str] = None
    scale_rewards_by_std: bool = False  # --grpo-scale-rewards-by-std
    stop_token_ids: tuple = ()  # besides the engine's EOS: the chat template's end of turn


def encode_prompts(prompts: Sequence[RLVRPrompt], chat, system_prompt: Optional[str],
                   max_sequence_length: int) -> list[list[int]]:
    """Token ids of each prompt's conversation (with ``system_prompt``) and the generation
    prompt, through the chat template; a prompt that leaves no room for an answer within
    ``max_sequence_length`` tokens is refused with its file:line."""
    out = []
    for prompt in prompts:
        ids = chat.prompt_ids(prompt.conversation(system_prompt))
        if len(ids) >= max_sequence_length:
            raise UserError(f"{prompt.where}: the prompt is {len(ids)} tokens, no room for an "
                            f"answer within --seq-length {max_sequence_length}")
        out.append(ids)
    return out


@dataclass
class Rollout:
    """One rank's share of a step: its prompts, the engine's results, the rewards."""

    prompts: list[RLVRPrompt]
    results: list  # PromptResult per prompt
    rewards: torch.Tensor  # [prompts, G]
    advantages: GroupAdvantages
    generation_seconds: float
    scoring_seconds: float
    max_new_tokens: int

    def statistics(self) -> dict:
        """Sums (and maxima) over this rank's share, by the report's field names."""
        completions = [c for result in self.results for c in result.completions]
        lengths = [len(c.token_ids) for c in completions]
        return {"groups": len(self.prompts), "dropped groups": self.advantages.dropped,
                "responses": len(completions), "response tokens": sum(lengths),
                "cut responses": sum(c.finish_reason == "length" for c in completions),
                "length max": max(lengths, default=0),
                "generation seconds": self.generation_seconds,
                "scoring seconds": self.scoring_seconds}

    def reward_sums(self) -> dict:
        """{("verifier", name) | ("language", lang): [reward sum, responses]}."""
        out: dict = {}
        for prompt, rewards in zip(self.prompts, self.rewards.tolist()):
            for key in (("verifier", prompt.verifier), ("language", prompt.language)):
                entry = out.setdefault(key, [0.0, 0])
                entry[0] += sum(rewards)
                entry[1] += len(rewards)
        return out


def sample_and_score(engine, prompts: Sequence[RLVRPrompt], prompt_ids: Sequence[list[int]],
                     config: RolloutConfig, seeds: Sequence[int],
                     score: Callable[[RLVRPrompt, str], float]) -> Rollout:
    """G responses for each prompt from ``engine`` (``inference.engine.GenerationEngine``),
    each scored by its prompt's verifier (``score(prompt, response text) -> [0, 1]``).

    A prompt's samples come from its own seed (``seeds[i]``, one engine call per prompt, its G
    rows together), so they do not depend on which prompts share its rank: the same at any DP
    size, as the engine's are at any TP size."""
    from megatron_trillion.inference.engine import SamplingParams

    start = time.perf_counter()
    results = []
    for ids, seed in zip(prompt_ids, seeds):
        params = SamplingParams(max_new_tokens=config.max_new_tokens,
                                temperature=config.temperature, top_p=config.top_p,
                                num_samples=config.samples_per_prompt, seed=seed,
                                stop_token_ids=tuple(config.stop_token_ids))
        results += engine.generate([list(ids)], params)
    generated = time.perf_counter()
    rewards = torch.tensor([[float(score(prompt, c.text)) for c in result.completions]
                            for prompt, result in zip(prompts, results)],
                           dtype=torch.float64).reshape(len(prompts), config.samples_per_prompt)
    scored = time.perf_counter()
    advantages = (group_advantages(rewards, config.scale_rewards_by_std) if prompts else
                  GroupAdvantages(torch.zeros(0, config.samples_per_prompt),
                                  torch.zeros(0, dtype=torch.bool), 0))
    return Rollout(list(prompts), results, rewards, advantages, generated - start,
                   scored - generated, config.max_new_tokens)


def rollout_micro_batches(rollout: Rollout, capacity: int, pad_token: int) -> list[dict]:
    """The kept groups' responses packed in order into rows of ``capacity`` tokens. A rank
    whose groups were all dropped gets one micro-batch without loss tokens: it still takes part
    in the step's gradient reduction."""
    sequences = training_sequences(
        [r.prompt_token_ids for r in rollout.results],
        [[c.token_ids for c in r.completions] for r in rollout.results],
        [[c.logprobs for c in r.completions] for r in rollout.results],
        rollout.advantages)
    rows = pack_in_order([len(s) for s in sequences], capacity) or [[]]
    batches = []
    for row in rows:
        batch = collate_sequences([sequences[i] for i in row], capacity, pad_token)
        batch["groups"] = sorted({sequences[i].group for i in row})  # rollout prompt slots
        batches.append(batch)
    return batches


class GRPOBatches:
    """``Run.train_batches`` for GRPO: ``for_step(consumed, global_batch)`` makes this rank's
    rollout micro-batches of the step (collective: every rank of the run calls it at the same
    step). With ``epochs`` > 1 a rollout serves that many consecutive steps (its old
    log-probabilities are the first epoch's); a checkpoint saved between the epochs of a
    rollout keeps each rank's batches of it (``rank_state``, ``restore``), so the resumed run
    trains its remaining epochs on the same rollout."""

    def __init__(self, model, engine, prompts: Sequence[RLVRPrompt],
                 prompt_ids: Sequence[list[int]], config: RolloutConfig,
                 score: Callable[[RLVRPrompt, str], float], fields: Sequence[str],
                 capacity: int, pad_token: int, reference=None, epochs: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, state: Optional[dict] = None) -> None:
        self.model = model
        self.engine = engine
        self.prompts = list(prompts)
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.score = score
        self.fields = list(fields)
        self.capacity = capacity
        self.pad_token = pad_token
        self.reference = reference
        self.epochs = epochs
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.state = dict(state or {})  # what a checkpoint records beside the position
        self.dataset = self  # the loop reads train_batches.dataset (checkpoints, bad steps)
        self.last_rollout: Optional[Rollout] = None
        self._cached: Optional[tuple[int, list[dict]]] = None  # (rollout index, batches)
        self._global_batch: Optional[int] = None

    def share(self, rollout_index: int, global_batch: int) -> range:
        """This rank's positions (in the endless prompt order) of a rollout's prompts."""
        if global_batch % self.dp_size:
            raise UserError(f"{global_batch} prompts per step do not split over "
                            f"{self.dp_size} data-parallel ranks")
        per_rank = global_batch // self.dp_size
        first = rollout_index * global_batch + self.dp_rank * per_rank
        return range(first, first + per_rank)

    def for_step(self, consumed: int, global_batch: int) -> list[dict]:
        self._global_batch = global_batch
        step = consumed // global_batch
        index, epoch = divmod(step, self.epochs)
        if epoch and self._cached is not None and self._cached[0] == index:
            batches = self._cached[1]
            # the rollout's statistics were reported with its first epoch
            batches[0]["rollout_report"] = torch.zeros_like(batches[0]["rollout_report"])
            return batches
        batches = self._rollout(self.share(index, global_batch))
        self._cached = (index, batches)
        return batches

    def _rollout(self, positions: range) -> list[dict]:
        from megatron_trillion.posttraining.grpo_objective import score_rollout_batches

        chosen = [prompt_order(len(self.prompts), self.config.seed, p) for p in positions]
        with _generating(self.model):
            rollout = sample_and_score(self.engine, [self.prompts[i] for i in chosen],
                                       [self.prompt_ids[i] for i in chosen], self.config,
                                       [sampler_seed(self.config.seed, p) for p in positions],
                                       self.score)
        self.last_rollout = rollout
        batches = rollout_micro_batches(rollout, self.capacity, self.pad_token)
        for batch in batches:  # which prompts a micro-batch holds (reports of a bad step)
            batch["indices"] = [positions[g] for g in batch["groups"]]
            batch["document_ids"] = [torch.tensor([[0, chosen[g]]]) for g in batch["groups"]]
        start = time.perf_counter()
        drift = score_rollout_batches(self.model, batches, self.reference)
        passes = time.perf_counter() - start
        batches[0]["rollout_report"] = self._report(rollout, drift, passes)
        return batches

    def _report(self, rollout: Rollout, drift: torch.Tensor, passes: float) -> torch.Tensor:
        """This rank's rollout statistics in the report's layout (after the token sums);
        maxima are reduced over DP here and carried by DP rank 0 alone."""
        from megatron.core import parallel_state as ps

        from megatron_trillion.platform.device import compute_device
        from megatron_trillion.posttraining.grpo import TOKEN_SUM_FIELDS

        values = dict(rollout.statistics())
        values.update({"drift sum": float(drift[0]), "drift tokens": float(drift[2]),
                       "logprob pass seconds": passes})
        for (kind, name), (total, count) in rollout.reward_sums().items():
            values[f"reward sum [{kind} {name}]"] = total
            values[f"responses [{kind} {name}]"] = count
        maxima = torch.tensor([float(values["length max"]), float(drift[1]),
                               values["generation seconds"], values["scoring seconds"],
                               passes], dtype=torch.float64, device=compute_device())
        # The slowest rank sets the step's time, as the largest drift and length are the max.
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX,
                                     group=ps.get_data_parallel_group(with_context_parallel=True))
        first = self.dp_rank == 0
        for name, value in zip(("length max", "drift max", "generation seconds",
                                "scoring seconds", "logprob pass seconds"), maxima.tolist()):
            values[name] = value if first else 0.0
        values["steps"] = 1.0 if first else 0.0
        names = self.fields[len(TOKEN_SUM_FIELDS):]
        unknown = set(values) - set(names)
        if unknown:
            raise ValueError(f"rollout statistics without a report field: {sorted(unknown)}")
        return torch.tensor([float(values.get(name, 0.0)) for name in names])

    def state_dict(self, consumed_samples: int) -> dict:
        """What the checkpoint stores under "data": the position is the consumed-prompts count
        (the prompt order and the sampler's seeds follow from it and --seed)."""
        return {"kind": "grpo", "consumed_samples": int(consumed_samples), **self.state}

    def rank_state(self, consumed_samples: int) -> Optional[dict]:
        """This rank's batches of the rollout whose next epoch is the step after
        ``consumed_samples`` (None at a rollout boundary): the resumed run trains on them, as
        the stopped one would have. Plain tensors and lists (the attention blocks as their
        bounds)."""
        if self._cached is None or self._global_batch is None:
            return None
        index, epoch = divmod(consumed_samples // self._global_batch, self.epochs)
        if not epoch:
            return None
        if self._cached[0] != index:
            raise RuntimeError(f"the rollout of step {consumed_samples // self._global_batch} "
                               "is not the one this rank holds")
        batches = []
        for batch in self._cached[1]:
            plain = {k: v for k, v in batch.items() if k != "packed_seq_params"}
            plain["block bounds"] = batch["packed_seq_params"].cu_seqlens_q.clone()
            batches.append(plain)
        return {"rollout": index, "batches": batches}

    def restore(self, rank_state: dict) -> None:
        """Takes back a ``rank_state`` of a checkpoint saved inside a rollout."""
        from megatron_trillion.data.packed_batch import packed_seq_params_from_blocks

        batches = []
        for plain in rank_state["batches"]:
            batch = {k: v for k, v in plain.items() if k != "block bounds"}
            batch["packed_seq_params"] = packed_seq_params_from_blocks(plain["block bounds"])
            batches.append(batch)
        self._cached = (int(rank_state["rollout"]), batches)

    def close(self) -> None:
        """The loop's batch-source interface (nothing runs in the background)."""


class _generating:
    """The training model set up for sampling, restored afterwards: eval mode; without its MTP
    heads (they only serve training); and the CPU core attention of a masked run (which
    refuses input without packed-sequence blocks, so a block mask is never ignored by
    mistake) takes the engine's explicit padding mask."""

    def __init__(self, model) -> None:
        chunk = model[0] if isinstance(model, (list, tuple)) else model
        self.chunk = chunk
        while hasattr(chunk, "module"):
            chunk = chunk.module
        self.core = chunk

    def __enter__(self):
        self.training = self.chunk.training
        self.mtp = getattr(self.core, "mtp_process", False)
        self.mtp_layers = self.core.config.mtp_num_layers
        self.chunk.eval()
        if self.mtp:
            self.core.mtp_process = False
        self.core.config.mtp_num_layers = None  # the output step reads the config's
        self.guarded = [m for m in self.core.modules()
                        if getattr(m, "require_packed_seq_params", False)]
        for module in self.guarded:
            module.require_packed_seq_params = False
        return self

    def __exit__(self, *exc) -> None:
        for module in self.guarded:
            module.require_packed_seq_params = True
        self.core.config.mtp_num_layers = self.mtp_layers
        if self.mtp:
            self.core.mtp_process = True
        self.chunk.train(self.training)
