"""Make megatron-core 0.16.1 run on a machine without CUDA (CPU tensors, gloo collectives).

megatron-core assumes a CUDA device in a handful of places. Without CUDA each of those places
raises, so this layer only changes behaviour that would otherwise be an error:

1. ``torch.cuda`` device/stream/RNG functions -> the CPU equivalents (the "device" is the CPU,
   streams and events are no-ops, the device RNG is the CPU RNG).
2. ``Tensor.cuda()`` -> the tensor itself (it already lives on the only device there is).
3. Hard-coded ``device='cuda'`` tensor factories in a few megatron-core modules -> CPU, by giving
   exactly those modules a ``torch`` whose factories map ``cuda`` to ``cpu``.
4. ``tensor.type() == 'torch.cuda.FloatTensor'`` checks (grad clipping, the distributed
   optimizer's param sorting) -> answered for the CPU tensor's dtype inside those functions only.
5. Megatron's CUDA RNG tracker helpers -> the CPU generator.
6. MoE: ``te_general_gemm`` is referenced but undefined without Transformer Engine (0.16.1 bug),
   and ``maybe_move_tensor_to_cpu(as_numpy=True)`` converts only CUDA tensors, so gloo's
   ``all_to_all_single`` would get tensors as split sizes.

Every target is looked up before anything is changed; a missing one raises ``RuntimeError``
naming the installed megatron-core version, so a megatron-core upgrade cannot silently turn the
layer into a no-op. :func:`apply` is idempotent and does nothing when CUDA is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, Callable

import torch

SUPPORTED_MEGATRON_CORE = "0.16.1"

_applied = False

# Modules that create tensors with a hard-coded ``device='cuda'``.
_CUDA_FACTORY_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.rerun_state_machine",
    "megatron.core.transformer.utils",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (grad norm without apex)
)

# Functions whose body checks ``tensor.type() == 'torch.cuda.FloatTensor'``.
_TYPE_CHECK_FUNCTIONS = (
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    # optimizer.py binds its own name at import (MegatronOptimizer / ChainedOptimizer clipping)
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer",
     "_build_model_and_main_param_groups"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
)


def cuda_available() -> bool:
    """The one place that decides whether the CPU layer is needed."""
    return torch.cuda.is_available()


def is_applied() -> bool:
    return _applied


def apply(force: bool = False) -> bool:
    """Apply the CPU layer once. Returns True if it is (now or already) in effect.

    ``force`` applies it even when CUDA is present; only tests use that.
    """
    global _applied
    if _applied:
        return True
    if cuda_available() and not force:
        return False
    targets = _resolve_targets()
    _patch_torch_cuda()
    _patch_tensor_cuda()
    for module in targets["factory_modules"]:
        module.torch = _CpuTorch(torch)
    for owner, name in targets["type_checks"]:
        setattr(owner, name, _with_cpu_type_names(_raw_attr(owner, name)))
    _patch_rng(targets["random"])
    _patch_moe(targets["moe_utils"], targets["token_dispatcher"])
    _applied = True
    return True


# --------------------------------------------------------------------------------------------
# target lookup


def _megatron_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except ImportError:  # pragma: no cover - every release has package_info
        return "unknown"
    return __version__


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"megatron_trillion CPU layer: {what} not found in megatron-core {_megatron_version()}; "
        f"this layer is written for megatron-core {SUPPORTED_MEGATRON_CORE}. "
        "Install megatron-core==" + SUPPORTED_MEGATRON_CORE + " or update "
        "megatron_trillion/platform/cpu_compat.py."
    )


def _import(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise _missing(f"module {name}") from exc


def _raw_attr(owner: Any, name: str) -> Any:
    # Keep staticmethod/classmethod wrappers intact when re-binding class attributes.
    if isinstance(owner, type):
        return owner.__dict__[name]
    return getattr(owner, name)


def _resolve_targets() -> dict:
    factory_modules = []
    for name in _CUDA_FACTORY_MODULES:
        module = _import(name)
        if getattr(module, "torch", None) is not torch:
            raise _missing(f"the module-level 'torch' of {name}")
        factory_modules.append(module)

    type_checks = []
    for module_name, *path in _TYPE_CHECK_FUNCTIONS:
        where = f"{module_name}.{'.'.join(path)}"
        owner: Any = _import(module_name)
        for part in path[:-1]:
            owner = getattr(owner, part, None)
            if owner is None:
                raise _missing(where)
        name = path[-1]
        found = name in owner.__dict__ if isinstance(owner, type) else hasattr(owner, name)
        if not found:
            raise _missing(where)
        type_checks.append((owner, name))

    random = _import("megatron.core.tensor_parallel.random")
    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(random, name):
            raise _missing(f"megatron.core.tensor_parallel.random.{name}")

    moe_utils = _import("megatron.core.transformer.moe.moe_utils")
    token_dispatcher = _import("megatron.core.transformer.moe.token_dispatcher")
    for module in (moe_utils, token_dispatcher):
        if not hasattr(module, "maybe_move_tensor_to_cpu"):
            raise _missing(f"{module.__name__}.maybe_move_tensor_to_cpu")
    return {
        "factory_modules": factory_modules,
        "type_checks": type_checks,
        "random": random,
        "moe_utils": moe_utils,
        "token_dispatcher": token_dispatcher,
    }


# --------------------------------------------------------------------------------------------
# 1. torch.cuda


class _NoStream:
    """Stands in for a CUDA stream or event: work on the CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NoStream":
        return event if event is not None else _NoStream()

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_DEFAULT_STREAM = _NoStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _NoStream
    cuda.Event = _NoStream
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (a lazy no-op here): seed the
    # CPU generator directly to avoid recursing.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))


# --------------------------------------------------------------------------------------------
# 2. Tensor.cuda()


def _patch_tensor_cuda() -> None:
    def cuda(self: torch.Tensor, device: Any = None, non_blocking: bool = False, **kwargs: Any):
        return self

    torch.Tensor.cuda = cuda


# --------------------------------------------------------------------------------------------
# 3. device='cuda' factories, per module


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, int):
        return torch.device("cpu")
    return device


def _factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by one megatron-core module, with CUDA factories mapped to the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
                  "empty_like", "full_like")

    def __init__(self, real: types.ModuleType) -> None:
        super().__init__("torch")
        self.__dict__["_real"] = real
        for name in self._FACTORIES:
            self.__dict__[name] = _factory(getattr(real, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_real"], name)


# --------------------------------------------------------------------------------------------
# 4. tensor.type() checks


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
_real_tensor_type = torch.Tensor.type


def _type_as_on_device(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False,
                       **kwargs: Any):
    if dtype is None:
        name = _real_tensor_type(self)
        return _CPU_TO_CUDA_TYPE.get(name, name)
    return _real_tensor_type(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cpu_type_names():
    # Only while a wrapped megatron-core function runs: it asks whether a tensor is an fp32
    # *device* tensor, and on this platform the CPU is the device.
    previous = torch.Tensor.type
    torch.Tensor.type = _type_as_on_device
    try:
        yield
    finally:
        torch.Tensor.type = previous


def _with_cpu_type_names(raw: Any) -> Any:
    descriptor = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if descriptor else raw

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        with _cpu_type_names():
            return fn(*args, **kwargs)

    return descriptor(wrapper) if descriptor else wrapper


# --------------------------------------------------------------------------------------------
# 5. RNG tracker


class _SameGeneratorFilter(logging.Filter):
    """The tracker warns when the CPU RNG moves inside a device-RNG fork; here the device RNG
    *is* the CPU RNG, so it always moves and the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_rng(random: types.ModuleType) -> None:
    logging.getLogger(random.__name__).addFilter(_SameGeneratorFilter())
    random._get_cuda_rng_state = lambda device=-1, clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )


# --------------------------------------------------------------------------------------------
# 6. MoE


def _patch_moe(moe_utils: types.ModuleType, token_dispatcher: types.ModuleType) -> None:
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.detach().cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
