"""Muon for hidden-layer matrices, AdamW for the rest, exact under tensor parallelism.

Public interface (the training loop calls these)::

    get_muon_optimizer(config: OptimizerConfig, model_chunks, *, muon_lr, muon_min_lr=None,
                       tp_mode="duplicated", split_gated_fc1=True, config_overrides=None,
                       use_gloo_process_groups=True, pg_collection=None) -> MegatronOptimizer
        # ChainedOptimizer (or LayerWiseDistributedOptimizer with --use-distributed-optimizer):
        # .step() -> (update_successful, grad_norm, num_zeros), .zero_grad(), .state_dict(),
        # .load_state_dict(), .sharded_state_dict(), .param_groups -- like megatron-core's
    muon_param_kind(name, param, gated_linear_unit, split_qkv=True,
                    split_gated_fc1=True) -> "adam" | "plain" | "qkv" | "gated"
    TensorParallelMuon(params, lr, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
                       scale_mode="spectral", extra_scale_factor=1.0,
                       compute_dtype=torch.bfloat16, tp_mode="duplicated", kind="plain",
                       qkv_split=None, tp_group=None, expert_tp_group=None)
        # a torch.optim.Optimizer; kind: how its matrices split into blocks (MUON_KINDS)
    newton_schulz(x, steps=5, coefficients=NS_COEFFICIENTS, eps=1e-7,
                  compute_dtype=torch.bfloat16) -> Tensor
    muon_scale(rows, cols, mode="spectral") -> float

The update, per matrix W with gradient G (momentum mu, nesterov as in torch.optim.Muon)::

    B <- mu B + (1 - mu) G ;  U = G + mu (B - G) if nesterov else B
    O = NS5(U) * muon_scale(full rows, full cols) * extra_scale_factor
    W <- W (1 - lr wd) - lr O

Why our own optimizer class. megatron-core 0.16.1's ``TensorParallelMuon`` subclasses
``emerging_optimizers.OrthogonalizedOptimizer`` (NVIDIA's package; needs Python >= 3.12, not
installable here) and its default ``muon_tp_mode="blockwise"`` orthogonalises each TP shard on
its own, which is a different update from the unsharded one. ``torch.optim.Muon`` is the
single-device reference: its ``step`` orthogonalises ``p.grad`` of whatever tensor it holds
(the shard) and has no hook to gather. So ``TensorParallelMuon`` here is a small
``torch.optim.Optimizer`` that runs torch's algorithm (same momentum form, same quintic
Newton-Schulz coefficients and normalisation, same decoupled weight decay; the tests check it
equals ``torch.optim.Muon`` on one device) on the *full* matrix:

- ``tp_mode="duplicated"`` (default, exact): all-gather the momentum update along the
  parameter's ``partition_dim`` over its TP group (the expert-TP group for expert weights),
  orthogonalise the full matrix on every TP rank, keep the local slice. Costs one all-gather of
  each matrix per step and TP-fold redundant Newton-Schulz FLOPs; the update equals the
  unsharded one (tested at TP2 to <= 1e-5 fp32).
- ``tp_mode="blockwise"``: orthogonalise each shard alone (megatron-core's default) -- cheaper,
  but a different optimizer than unsharded Muon; available only on request.
Scale factors use the full (logical) shape of each orthogonalised block, never the shard's.

Fused matrices. ``linear_qkv`` holds Q, K and V of every query group stacked along rows
(megatron's layout: per group [q heads, k, v]); with ``config.muon_split_qkv`` (default) Q, K
and V are orthogonalised as three separate full matrices, as megatron-core's Muon does. The
gated MLP ``linear_fc1`` stacks gate and up; each TP shard holds [gate_r; up_r], so the gathered
matrix is [gate_0; up_0; gate_1; up_1; ...]: with ``split_gated_fc1`` gate and up are
re-assembled and orthogonalised separately (they are two linear maps; orthogonalising them
jointly would couple their singular values). Unsplit matrices need no layout care: Newton-Schulz
commutes with row/column permutations, so the gathered order is as good as the canonical one.

What goes to Muon: 2-D weights of hidden layers (attention / MLP / expert / MTP projections).
AdamW gets embeddings, the output layer (``is_embedding_or_output_parameter``), norms, biases,
every 1-D parameter and the MoE router (a small E x h matrix whose rows are per-expert scores,
which Muon's orthogonalisation would force to equal norms). megatron-core's legacy
``GroupedMLP`` (all experts fused into one ``weight1``/``weight2``) is rejected: orthogonalising
several experts as one matrix is not Muon; use sequential or TE grouped experts.

Integration with megatron-core's optimizer stack (mirrors megatron-core's own
``get_megatron_muon_optimizer``): the Muon part is wrapped in ``FP32Optimizer`` (or
``Float16OptimizerWithFloat16Params`` for bf16 master weights), the Adam part is
``get_megatron_optimizer`` over the remaining parameters, and both are chained in a
``ChainedOptimizer``, so grad clipping uses the global norm over both and ``step`` /
``zero_grad`` / ``state_dict`` / ``sharded_state_dict`` behave like megatron-core's. Muon params
get their own ``max_lr``/``min_lr`` in their param groups, so ``ParamScheduler`` (and
megatron-core's ``OptimizerParamScheduler``) drive both learning rates with one schedule.

Distributed optimizer. megatron-core's ZeRO-1 ``DistributedOptimizer`` shards the DDP flat
grad buffer by ranges, so a matrix is split across DP ranks mid-row and its reduce-scattered
grad is never whole anywhere; it also cannot leave buffer params out of its groups. With
``config.use_distributed_optimizer`` we therefore use megatron-core's
``LayerWiseDistributedOptimizer`` (ZeRO-1 by whole parameters: each DP rank owns the optimizer
state of a subset of whole matrices, updates them, then all-gathers the updated weights). DDP
must then be built with ``use_distributed_optimizer=False`` (grads all-reduced); a mismatch
raises. TP peers own the same parameters (the assignment depends only on the parameter list),
so the TP gathers above stay matched.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, Iterable, List, Optional

import torch

logger = logging.getLogger(__name__)

# Keller Jordan's quintic coefficients, as torch.optim.Muon uses them.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SCALE_MODES = ("spectral", "shape_scaling", "unit_rms_norm")
TP_MODES = ("duplicated", "blockwise")
MUON_KINDS = ("plain", "qkv", "gated")


# --------------------------------------------------------------------------------------------
# the math


def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS,
                  eps: float = 1e-7, compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T of x = U S V^T (torch.optim.Muon's iteration, in ``compute_dtype``).

    bf16 is the reference implementations' choice on GPUs; fp32 is for exact comparisons.
    Returns a tensor of x's dtype.
    """
    if x.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a 2-D matrix, got shape {tuple(x.shape)}")
    a, b, c = coefficients
    out = x.to(compute_dtype)
    transposed = out.size(0) > out.size(1)
    if transposed:
        out = out.T
    out = out / out.norm().clamp(min=eps)
    for _ in range(steps):
        gram = out @ out.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        out = torch.addmm(out, poly, out, beta=a)
    if transposed:
        out = out.T
    return out.to(x.dtype)


def muon_scale(rows: int, cols: int, mode: str = "spectral") -> float:
    """Update scale for a (rows x cols) matrix; megatron-core's ``muon_scale_mode`` names.

    spectral: sqrt(max(rows, cols)) (Kimi/Scion); shape_scaling: sqrt(max(1, rows/cols))
    (Keller Jordan, torch.optim.Muon's default); unit_rms_norm: sqrt(rows/cols).
    """
    if mode == "spectral":
        return math.sqrt(max(rows, cols))
    if mode == "shape_scaling":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "unit_rms_norm":
        return math.sqrt(rows / cols)
    raise ValueError(f"muon scale mode must be one of {SCALE_MODES}, got {mode!r}")


def _qkv_blocks(full: torch.Tensor, split: tuple[int, int, int]) -> list[torch.Tensor]:
    per_group = sum(split)
    if full.size(0) % per_group:
        raise ValueError(f"linear_qkv has {full.size(0)} rows, not a multiple of the per-group "
                         f"q/k/v rows {split}; check num_query_groups / kv_channels")
    groups = full.size(0) // per_group
    parts = torch.split(full.view(groups, per_group, -1), list(split), dim=1)
    return [p.reshape(-1, full.size(1)) for p in parts]


def _qkv_merge(blocks: list[torch.Tensor], split: tuple[int, int, int], cols: int) -> torch.Tensor:
    groups = blocks[0].size(0) // split[0]
    return torch.cat([b.view(groups, -1, cols) for b in blocks], dim=1).reshape(-1, cols)


def _gated_blocks(full: torch.Tensor, shards: int) -> list[torch.Tensor]:
    # Gathered rows are [gate_0; up_0; gate_1; up_1; ...] (one pair per TP shard).
    if full.size(0) % (2 * shards):
        raise ValueError(f"gated linear_fc1 has {full.size(0)} rows, not divisible by 2 x "
                         f"{shards} TP shards")
    pairs = full.view(shards, 2, full.size(0) // (2 * shards), full.size(1))
    return [pairs[:, 0].reshape(-1, full.size(1)), pairs[:, 1].reshape(-1, full.size(1))]


def _gated_merge(blocks: list[torch.Tensor], shards: int) -> torch.Tensor:
    gate, up = (b.view(shards, -1, b.size(1)) for b in blocks)
    return torch.stack([gate, up], dim=1).reshape(-1, gate.size(-1))


# --------------------------------------------------------------------------------------------
# the optimizer


class TensorParallelMuon(torch.optim.Optimizer):
    """Muon whose orthogonalisation sees the full (TP-gathered) matrix; see the module doc.

    One instance handles one ``kind`` of matrix (MUON_KINDS: ``plain``, ``qkv`` with
    ``qkv_split`` = (q, k, v) rows per query group, ``gated``), so param groups keep exactly
    megatron-core's keys (its checkpoint loader matches groups by (wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr) and would confuse same-keyed groups of different
    kinds). ``is_expert_parallel`` groups use ``expert_tp_group``. Parameters carry megatron's
    ``tensor_model_parallel`` / ``partition_dim`` attributes (megatron-core copies them to bf16
    master weights). Process groups live on the optimizer, not in param groups, so state
    dicts pickle.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.1, ns_steps: int = 5,
                 scale_mode: str = "spectral", extra_scale_factor: float = 1.0,
                 compute_dtype: torch.dtype = torch.bfloat16, tp_mode: str = "duplicated",
                 kind: str = "plain", qkv_split: Optional[tuple[int, int, int]] = None,
                 tp_group: Any = None, expert_tp_group: Any = None) -> None:
        if lr < 0 or weight_decay < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon needs lr >= 0, weight decay >= 0 and 0 <= momentum < 1, got "
                             f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        if ns_steps < 1:
            raise ValueError(f"--muon-num-ns-steps must be >= 1, got {ns_steps}")
        if tp_mode not in TP_MODES:
            raise ValueError(f"Muon tp_mode must be one of {TP_MODES}, got {tp_mode!r}")
        muon_scale(2, 1, scale_mode)  # validates the mode name
        if kind not in MUON_KINDS:
            raise ValueError(f"Muon kind must be one of {MUON_KINDS}, got {kind!r}")
        if kind == "qkv" and (qkv_split is None or len(qkv_split) != 3):
            raise ValueError("Muon kind 'qkv' needs qkv_split=(q, k, v) rows per query group")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, scale_mode=scale_mode,
                        extra_scale_factor=extra_scale_factor, is_expert_parallel=False)
        super().__init__(params, defaults)
        self.compute_dtype = compute_dtype
        self.tp_mode = tp_mode
        self.kind = kind
        self.qkv_split = tuple(qkv_split) if qkv_split is not None else None
        self.tp_group = tp_group
        self.expert_tp_group = expert_tp_group
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape "
                                     f"{tuple(p.shape)}; route it to Adam")

    def _group_for(self, group: dict) -> Any:
        return self.expert_tp_group if group["is_expert_parallel"] else self.tp_group

    def orthogonalized_update(self, param: torch.Tensor, update: torch.Tensor,
                              group: dict) -> torch.Tensor:
        """The scaled orthogonalised local slice for ``param`` given its local ``update``."""
        tp_group = self._group_for(group)
        tp_size = torch.distributed.get_world_size(tp_group) if tp_group is not None else 1
        partition_dim = getattr(param, "partition_dim", -1)
        sharded = (self.tp_mode == "duplicated" and tp_size > 1
                   and getattr(param, "tensor_model_parallel", False) and partition_dim in (0, 1))
        if sharded:
            pieces = [torch.empty_like(update) for _ in range(tp_size)]
            torch.distributed.all_gather(pieces, update.contiguous(), group=tp_group)
            full = torch.cat(pieces, dim=partition_dim)
        else:
            full = update
        # Shards whose rows are [gate_r; up_r]: only row-split (column-parallel) fc1 weights.
        shards = tp_size if sharded and partition_dim == 0 else 1

        kind = self.kind
        if kind == "qkv":
            blocks = _qkv_blocks(full, self.qkv_split)
        elif kind == "gated":
            blocks = _gated_blocks(full, shards)
        else:
            blocks = [full]
        scale = group["extra_scale_factor"]
        blocks = [
            newton_schulz(b, group["ns_steps"], compute_dtype=self.compute_dtype)
            * (muon_scale(b.size(0), b.size(1), group["scale_mode"]) * scale)
            for b in blocks
        ]
        if kind == "qkv":
            full = _qkv_merge(blocks, self.qkv_split, full.size(1))
        elif kind == "gated":
            full = _gated_merge(blocks, shards)
        else:
            full = blocks[0]
        if sharded:
            rank = torch.distributed.get_rank(tp_group)
            return full.chunk(tp_size, dim=partition_dim)[rank]
        return full

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                ortho = self.orthogonalized_update(p, update, group)
                p.mul_(1 - lr * wd)
                p.add_(ortho.to(p.dtype), alpha=-lr)
        return loss


# --------------------------------------------------------------------------------------------
# megatron-core integration


def muon_param_kind(name: str, param: torch.Tensor, gated_linear_unit: bool,
                    split_qkv: bool = True, split_gated_fc1: bool = True) -> str:
    """Which optimizer (and Muon block layout) a parameter gets; see the module docstring."""
    if param.ndim != 2 or getattr(param, "is_embedding_or_output_parameter", False):
        return "adam"
    if "embedding" in name or "output_layer" in name or ".router." in f".{name}":
        return "adam"
    if name.endswith(("experts.weight1", "experts.weight2")):
        raise ValueError(
            f"{name}: megatron-core's legacy GroupedMLP fuses all experts into one matrix, which "
            "Muon cannot orthogonalise per expert; use --moe-grouped-gemm with Transformer "
            "Engine (TEGroupedMLP) or sequential experts"
        )
    *_, layer, weight = [""] + name.split(".")
    if layer == "linear_qkv" and weight == "weight" and split_qkv:
        return "qkv"
    if layer == "linear_fc1" and weight.startswith("weight") and gated_linear_unit \
            and split_gated_fc1:
        return "gated"
    return "plain"


def _qkv_split(config: Any) -> tuple[int, int, int]:
    kv = config.kv_channels
    groups = config.num_query_groups or config.num_attention_heads
    return (config.num_attention_heads // groups * kv, kv, kv)


def _compute_dtype(precision: str) -> torch.dtype:
    # megatron-core's muon_fp32_matmul_prec: "medium" runs the iteration in bf16.
    if precision == "medium":
        return torch.bfloat16
    if precision in ("high", "highest"):
        return torch.float32
    raise ValueError(f"--muon-fp32-matmul-prec must be medium, high or highest, got {precision!r}")


def _layer_wise_optimizer_class():
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    class EvenLayerWiseDistributedOptimizer(LayerWiseDistributedOptimizer):
        """megatron-core's layer-wise ZeRO-1 with the weight all-gather padded to equal sizes.

        megatron-core gathers each rank's updated weights with an uneven ``all_gather``, which
        NCCL accepts and gloo rejects ("invalid tensor size"); padding every rank's flat
        buffer to the largest costs at most one rank's share of extra bytes and works on both.
        """

        @torch.no_grad()
        def allgather_params(self) -> None:
            for params_list, group in ((self.dp_cp_params_list, self.pg_collection.dp_cp),
                                       (self.expt_dp_params_list, self.pg_collection.expt_dp)):
                if not params_list:
                    continue
                ref = next(p for params in params_list for p in params)
                sizes = [sum(p.numel() for p in params) for params in params_list]
                rank = torch.distributed.get_rank(group)
                local = (_flatten_dense_tensors(params_list[rank]) if params_list[rank]
                         else torch.empty(0, dtype=ref.dtype, device=ref.device))
                padded = torch.zeros(max(sizes), dtype=ref.dtype, device=ref.device)
                padded[: local.numel()].copy_(local)
                gathered = [torch.empty_like(padded) for _ in params_list]
                torch.distributed.all_gather(gathered, padded, group=group)
                for i, (flat, params) in enumerate(zip(gathered, params_list)):
                    if i == rank or not params:
                        continue
                    for new, param in zip(_unflatten_dense_tensors(flat[: sizes[i]], params),
                                          params):
                        param.data.copy_(new)

        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False,
                               **kwargs):
            """megatron-core's layer-wise sharded state dict, for fp32 and bf16 parts alike.

            megatron-core's version reads ``sd["optimizer"]``, the key of a
            ``Float16OptimizerWithFloat16Params`` state dict; an ``FP32Optimizer`` (no
            ``--bf16``) returns torch's ``{"state", "param_groups"}`` itself, and saving died
            with ``KeyError: 'optimizer'``. Same steps otherwise: every DP rank holds the state
            of the whole parameters it owns, so it is the main replica of exactly those keys;
            param-group hyper-parameters come from a rank that owns some of the group. The
            per-parameter keys are model-space keys (``optimizer.state.exp_avg.<param>``), so
            another DP size (another ownership) loads them as they are.
            """
            from megatron.core.dist_checkpointing.dict_utils import nested_values
            from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
            from megatron.core.optimizer.optimizer import ChainedOptimizer

            sharded = ChainedOptimizer.sharded_state_dict(self, model_sharded_state_dict,
                                                          is_loading, **kwargs)
            for sh_base in nested_values(sharded):
                if hasattr(sh_base, "replica_id"):
                    sh_base.replica_id = (0 if isinstance(sh_base.replica_id, int)
                                          else (*sh_base.replica_id[:2], 0))
            parts = [sharded] if len(self.chained_optimizers) == 1 else sharded.values()
            for part in parts:
                if "fp32_from_fp16_params" in part:
                    part["fp32_from_fp16_params"] = {
                        i: group if group else LocalNonpersistentObject(group)
                        for i, group in enumerate(part["fp32_from_fp16_params"])}
                torch_state = part["optimizer"] if "optimizer" in part else part
                if not torch_state["state"]:
                    torch_state["state"] = LocalNonpersistentObject(torch_state["state"])
                for i, group in enumerate(torch_state["param_groups"]):
                    local_params = group.pop("params")
                    group["params"] = bool(local_params.unwrap())
                    every_rank = [None] * torch.distributed.get_world_size()
                    torch.distributed.all_gather_object(every_rank, group)
                    chosen = next((g for g in every_rank if g["params"]), group)
                    chosen["params"] = local_params
                    torch_state["param_groups"][i] = chosen
            return sharded

    return EvenLayerWiseDistributedOptimizer


def get_muon_optimizer(config: Any, model_chunks: List[Any], *, muon_lr: float,
                       muon_min_lr: Optional[float] = None, tp_mode: str = "duplicated",
                       split_gated_fc1: bool = True,
                       config_overrides: Optional[Dict[Any, Any]] = None,
                       use_gloo_process_groups: bool = True, pg_collection: Any = None):
    """Muon (matrices) + AdamW (the rest) as one megatron-core optimizer.

    ``config`` is megatron-core's ``OptimizerConfig``: ``lr``/``min_lr``/``adam_*``/
    ``weight_decay``/``clip_grad``/``bf16`` drive the Adam part and the shared clipping;
    ``muon_momentum``, ``muon_use_nesterov``, ``muon_num_ns_steps``, ``muon_scale_mode``,
    ``muon_extra_scale_factor``, ``muon_split_qkv`` and ``muon_fp32_matmul_prec`` drive Muon.
    ``muon_lr`` is Muon's peak (Trinity: 8e-4 next to Adam's 2e-4); ``muon_min_lr`` defaults to
    the same fraction of it as ``min_lr`` is of ``lr``. ``tp_mode`` is ours, not
    ``config.muon_tp_mode`` (whose megatron-core default is the per-shard approximation).
    Collective over the world (megatron-core aligns param groups across ranks): call on all
    ranks.
    """
    from megatron.core.optimizer import _get_param_groups, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection

    if config.fp16:
        raise ValueError("Muon with --fp16 is not supported (no loss-scaled Muon); use --bf16")
    if muon_lr <= 0:
        raise ValueError(f"--muon-lr must be positive, got {muon_lr}")
    layer_wise = bool(config.use_distributed_optimizer)
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    if layer_wise and ddp_config is not None and ddp_config.use_distributed_optimizer:
        raise ValueError(
            "--use-distributed-optimizer with Muon shards optimizer state by whole parameters "
            "(megatron-core's LayerWiseDistributedOptimizer), which needs all-reduced grads: "
            "build DistributedDataParallelConfig(use_distributed_optimizer=False)"
        )
    if muon_min_lr is None:
        muon_min_lr = muon_lr * (config.min_lr or 0.0) / config.lr if config.lr else 0.0
    given_pg_collection = pg_collection  # None: megatron-core's global parallel_state groups
    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
        given_pg_collection, model_chunks, use_gloo_process_groups)
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()

    # The Adam part is plain megatron-core; ZeRO-1 (if asked) is applied layer-wise on top, and
    # LayerWiseDistributedOptimizer adds the bf16 master weights itself after sharding.
    build_config = dataclasses.replace(
        config, optimizer="adam", use_distributed_optimizer=False,
        bf16=config.bf16 and not layer_wise)

    kinds: dict[torch.nn.Parameter, str] = {}
    for chunk in model_chunks:
        mcfg = chunk.config
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                kinds[param] = muon_param_kind(name, param, mcfg.gated_linear_unit,
                                               config.muon_split_qkv, split_gated_fc1)
    qkv_split = _qkv_split(model_chunks[0].config)
    muon_params = [p for p, k in kinds.items() if k != "adam"]
    adam_params = [p for p, k in kinds.items() if k == "adam"]

    # megatron-core's grouping (wd_mult, is_expert_parallel, world-aligned keys) over the Muon
    # params only: hide the others by requires_grad, as megatron-core's own Muon does.
    try:
        for p in adam_params:
            p.requires_grad_(False)
        base_groups = _get_param_groups(model_chunks, build_config, config_overrides)
    finally:
        for p in adam_params:
            p.requires_grad_(True)

    def muon_groups(expert: bool, kind: str) -> list[dict]:
        # megatron-core's groups restricted to one kind; empty groups are kept so every rank
        # (and every pipeline stage) has the same groups, as checkpoints require.
        return [{**base, "params": [p for p in base["params"] if kinds[p] == kind],
                 "max_lr": muon_lr, "min_lr": muon_min_lr, "default_config": False}
                for base in base_groups if base["is_expert_parallel"] == expert]

    muon_kwargs = dict(qkv_split=qkv_split,
        lr=muon_lr, momentum=config.muon_momentum, nesterov=config.muon_use_nesterov,
        weight_decay=config.weight_decay, ns_steps=config.muon_num_ns_steps,
        scale_mode=config.muon_scale_mode, extra_scale_factor=config.muon_extra_scale_factor,
        compute_dtype=_compute_dtype(config.muon_fp32_matmul_prec), tp_mode=tp_mode,
        tp_group=pg_collection.tp, expert_tp_group=pg_collection.expt_tp)

    def init_muon_state(opt, _config=None):
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)

    def wrap(opt, stats_group):
        if build_config.bf16:
            wrapped = Float16OptimizerWithFloat16Params(opt, build_config, None, init_muon_state)
        else:
            wrapped = FP32Optimizer(opt, build_config, init_muon_state)
        wrapped.grad_stats_parallel_group = stats_group
        wrapped.tp_group = pg_collection.tp
        return wrapped

    # One Muon optimizer per (dense/expert, kind). Which ones exist depends only on the model
    # config, so all ranks build the same list.
    mcfg = model_chunks[0].config
    used_kinds = ["plain"] + (["qkv"] if config.muon_split_qkv else []) + (
        ["gated"] if mcfg.gated_linear_unit and split_gated_fc1 else [])
    has_experts = bool(getattr(mcfg, "num_moe_experts", None))
    optimizers, init_fns = [], []
    for expert in ([False, True] if has_experts else [False]):
        stats_group = groups["expt_tp_pp_group"] if expert else groups["mp_group"]
        for kind in used_kinds:
            param_groups = muon_groups(expert, kind)
            if not param_groups:  # no base group of this flavour anywhere
                continue
            optimizers.append(wrap(TensorParallelMuon(param_groups, kind=kind, **muon_kwargs),
                                   stats_group))
            init_fns.append(init_muon_state)

    try:
        for p in muon_params:
            p.requires_grad_(False)
        adam = get_megatron_optimizer(build_config, model_chunks,
                                      config_overrides=config_overrides,
                                      use_gloo_process_groups=use_gloo_process_groups,
                                      pg_collection=given_pg_collection)
    finally:
        for p in muon_params:
            p.requires_grad_(True)
    adam_parts = adam.chained_optimizers if isinstance(adam, ChainedOptimizer) else [adam]
    optimizers += adam_parts
    init_fns += [getattr(o, "init_state_fn", None) for o in adam_parts]

    logger.info("Muon: %d matrices (%d split q/k/v, %d split gate/up), AdamW: %d params",
                len(muon_params), sum(kinds[p] == "qkv" for p in muon_params),
                sum(kinds[p] == "gated" for p in muon_params), len(adam_params))
    if layer_wise:
        # ChainedOptimizer requires one config object value across its parts.
        return _layer_wise_optimizer_class()(
            optimizers, dataclasses.replace(build_config, bf16=config.bf16), pg_collection,
            init_state_fn_list=init_fns)
    return ChainedOptimizer(optimizers)
