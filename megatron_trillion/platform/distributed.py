"""One entry point that brings up torch.distributed and megatron-core's parallel state."""

from __future__ import annotations

import datetime
import math
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_trillion.platform import cpu_compat
from megatron_trillion.platform.device import require_single_device_connection


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel layout. Data parallel size is whatever the world size leaves."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    expert: int = 1
    context: int = 1
    expert_tensor: Optional[int] = None

    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel()


def validate_parallel_sizes(
    sizes: ParallelSizes,
    world_size: int,
    *,
    num_layers: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    num_moe_experts: Optional[int] = None,
) -> list[str]:
    """Return every conflict between the layout and the model/world, each naming its flags.

    An empty list means the layout is valid. Callers raise with all messages at once.
    """
    errors: list[str] = []
    for flag, value in (
        ("--tensor-model-parallel-size", sizes.tensor),
        ("--pipeline-model-parallel-size", sizes.pipeline),
        ("--expert-model-parallel-size", sizes.expert),
        ("--context-parallel-size", sizes.context),
    ):
        if value < 1:
            errors.append(f"{flag} must be >= 1, got {value}")
    if errors:
        return errors
    mp = sizes.model_parallel()
    if world_size % mp != 0:
        errors.append(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size "
            f"({sizes.tensor}) x --pipeline-model-parallel-size ({sizes.pipeline}) x "
            f"--context-parallel-size ({sizes.context}) = {mp}"
        )
    else:
        dp = world_size // mp
        etp = sizes.expert_tensor or sizes.tensor
        expert_mp = etp * sizes.expert * sizes.pipeline
        if world_size % expert_mp != 0:
            errors.append(
                f"world size {world_size} is not divisible by --expert-model-parallel-size "
                f"({sizes.expert}) x expert tensor parallel ({etp}) x "
                f"--pipeline-model-parallel-size ({sizes.pipeline}) = {expert_mp}"
            )
        elif (dp * sizes.context * sizes.tensor) % (sizes.expert * etp) != 0:
            errors.append(
                f"--expert-model-parallel-size ({sizes.expert}) x expert tensor parallel ({etp}) "
                f"must divide data x context x tensor parallel ({dp}x{sizes.context}x"
                f"{sizes.tensor})"
            )
    if num_attention_heads is not None and num_attention_heads % sizes.tensor != 0:
        errors.append(
            f"--num-attention-heads ({num_attention_heads}) is not divisible by "
            f"--tensor-model-parallel-size ({sizes.tensor})"
        )
    if num_query_groups is not None and num_query_groups % sizes.tensor != 0:
        errors.append(
            f"--num-query-groups ({num_query_groups}) is not divisible by "
            f"--tensor-model-parallel-size ({sizes.tensor})"
        )
    if num_layers is not None:
        stages = sizes.pipeline * (sizes.virtual_pipeline or 1)
        if num_layers % stages != 0:
            vpp = (
                f" x virtual pipeline stages ({sizes.virtual_pipeline})"
                if sizes.virtual_pipeline else ""
            )
            errors.append(
                f"--num-layers ({num_layers}) is not divisible by "
                f"--pipeline-model-parallel-size ({sizes.pipeline}){vpp} = {stages}"
            )
    if sizes.virtual_pipeline is not None and sizes.virtual_pipeline > 1 and sizes.pipeline < 2:
        errors.append("virtual pipeline stages need --pipeline-model-parallel-size >= 2")
    if num_moe_experts is not None and num_moe_experts % sizes.expert != 0:
        errors.append(
            f"--num-experts ({num_moe_experts}) is not divisible by "
            f"--expert-model-parallel-size ({sizes.expert})"
        )
    if num_moe_experts is None and sizes.expert > 1:
        errors.append("--expert-model-parallel-size > 1 needs a MoE model (--num-experts)")
    return errors


class ParallelConfigError(ValueError):
    """Raised with every layout conflict at once."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid parallel configuration:\n  - " + "\n  - ".join(errors))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron's model-parallel RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_distributed(
    sizes: ParallelSizes,
    *,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    **model_dims,
) -> None:
    """Initialise torch.distributed (nccl on GPU, gloo on CPU) and megatron parallel_state.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK as torchrun sets them.
    ``model_dims`` (num_layers, num_attention_heads, num_query_groups, num_moe_experts) are
    validated against the layout before any process group is created.
    """
    from megatron.core import parallel_state

    cpu_compat.apply()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    errors = validate_parallel_sizes(sizes, world_size, **model_dims)
    if errors:
        raise ParallelConfigError(errors)

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        if cpu_compat.cuda_available():
            backend = "nccl"
            note = require_single_device_connection(sizes.tensor, sizes.context)
            if note and rank == 0:
                print(f" {note}", flush=True)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        else:
            backend = "gloo"
        torch.distributed.init_process_group(
            backend=backend,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=(
            sizes.virtual_pipeline if sizes.virtual_pipeline and sizes.virtual_pipeline > 1
            else None
        ),
        context_parallel_size=sizes.context,
        expert_model_parallel_size=sizes.expert,
        expert_tensor_parallel_size=sizes.expert_tensor,
        # The model-parallel subgroups get the same timeout as the default group
        # (--distributed-timeout-minutes), as in Megatron-LM.
        distributed_timeout_minutes=max(1, math.ceil(timeout_minutes)),
    )
    seed_everything(seed)


def initialize_single_process(seed: int = 1234) -> None:
    """A one-rank process group for tools (export, generation) run without torchrun."""
    import socket

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("RANK", "0")
    initialize_distributed(ParallelSizes(), seed=seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
