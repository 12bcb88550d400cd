"""Refit steps that run inside a vLLM worker, sent there with `LLM.collective_rpc(fn, ...)`.

In-process (CPU, tp=1) the worker is the engine actor's own process; with tp>1 on GPU each worker is its own
process and receives the bucket itself (shared-memory file, broadcast, CUDA IPC handle), so no tensor ever
travels through vLLM's RPC queue. A refit is begin -> load_bucket* -> end, built on vLLM's layer-wise
reload: a layer is materialised, loaded and re-processed (repacked for the CPU kernels, quantised, ...) as
soon as all of its weights have arrived, so buckets stream through without a second copy of the model.
"""

from __future__ import annotations

import datetime
import mmap
import os
import time
from typing import Any

import torch

from megatron_rl import platform
from megatron_rl.generation import buckets

_STATE = "_megatron_rl_refit"


def _state(worker: Any) -> dict[str, Any]:
    if not hasattr(worker, _STATE):
        setattr(worker, _STATE, {"shm": {}, "recv": {}, "ipc": {}, "group": None})
    return getattr(worker, _STATE)


def _model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.get_model()


def device_free_bytes(worker: Any) -> int:
    """This worker's free GPU memory (sleep and wake figures); 0 on CPU."""
    return platform.device_free_bytes()


def begin_reload(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    st = _state(worker)
    st["refit"] = {
        "names": set(),
        "received": set(),
        "tensors": 0,
        "bytes": 0,
        "receive_s": 0.0,
        "load_s": 0.0,
        "load_cpu_s": 0.0,
    }
    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(_model(worker))


def load_bucket(worker: Any, kind: str, desc: dict[str, Any]) -> dict[str, float]:
    """Receives one bucket through transport `kind` and loads it; returns its bytes and the seconds spent
    receiving and loading it (the sender attributes its own waits with them, fanout.py)."""
    from vllm.config import set_current_vllm_config

    st = _state(worker)
    if "refit" not in st:
        raise RuntimeError("load_bucket called outside begin_reload/end_reload")
    start, cpu = time.perf_counter(), time.process_time()
    tensors = _RECEIVERS[kind](worker, st, desc)
    if kind == "cuda_ipc" or (kind == "broadcast" and desc.get("backend") == "nccl"):
        torch.cuda.synchronize()
    received = time.perf_counter()
    r = st["refit"]
    names = [n for n, _ in tensors]
    # With one sender per pipeline stage, a tensor two stages both exported would silently win by arrival
    # order: every tensor must arrive exactly once per refit (end_reload checks that none is missing).
    twice = sorted(r["received"].intersection(names))
    if not twice and len(set(names)) < len(names):
        twice = sorted({n for i, n in enumerate(names) if n in names[:i]})
    if twice:
        raise ValueError(f"the refit received {twice[0]!r} twice{' (and more)' if len(twice) > 1 else ''}")
    r["received"].update(names)
    model = _model(worker)
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        try:
            loaded = model.load_weights(iter(tensors))
        except (KeyError, ValueError, AssertionError, RuntimeError) as exc:
            names = ", ".join(n for n, _ in tensors[:3])
            raise ValueError(
                f"the engine's model rejected a refit bucket holding {names}{'...' if len(tensors) > 3 else ''}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if kind != "inline":
            _release_buffered(model)
        if kind == "cuda_ipc":
            torch.cuda.synchronize()  # the sender refills this buffer as soon as the call returns
    r["names"].update(loaded or ())
    r["tensors"] += len(tensors)
    size = sum(buckets.nbytes(t) for _, t in tensors)
    r["bytes"] += size
    receive_s, load_s = received - start, time.perf_counter() - received
    r["receive_s"] += receive_s
    r["load_s"] += load_s
    # CPU seconds of the whole engine process: on a shared machine wall time also counts other people's work.
    r["load_cpu_s"] += time.process_time() - cpu
    return {"bytes": size, "receive_s": receive_s, "load_s": load_s}


def probe_bucket(worker: Any, kind: str, desc: dict[str, Any]) -> int:
    """Receives a bucket and copies its bytes once into a scratch buffer, without touching the model: the
    cost of the transport itself plus one copy, i.e. a refit into an engine whose load is a plain copy."""
    st = _state(worker)
    tensors = _RECEIVERS[kind](worker, st, desc)
    total = sum(buckets.nbytes(t) for _, t in tensors)
    scratch = st.get("scratch")
    device = tensors[0][1].device if tensors else torch.device("cpu")
    if scratch is None or scratch.numel() < total or scratch.device != device:
        scratch = st["scratch"] = torch.empty(total, dtype=torch.uint8, device=device)
    pos = 0
    for _, t in tensors:
        n = buckets.nbytes(t)
        scratch[pos : pos + n].copy_(t.reshape(-1).view(torch.uint8))
        pos += n
    return total


def _release_buffered(model: torch.nn.Module) -> None:
    """A layer whose weights straddle two buckets keeps the first bucket's tensors (views of a transport
    buffer the sender is about to reuse) until the rest arrive: give those tensors their own memory."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    for info in list(LAYERWISE_INFO.values()):
        for _, bound in getattr(info, "loaded_weights", ()):
            for key, value in bound.arguments.items():
                if key != "param" and isinstance(value, torch.Tensor):
                    bound.arguments[key] = value.clone()


def end_reload(worker: Any) -> dict[str, Any]:
    """Finishes the reload; returns figures and the parameters no bucket touched."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    st = _state(worker)
    r = st.pop("refit", None)
    if r is None:
        raise RuntimeError("end_reload called without begin_reload")
    model = _model(worker)
    start, cpu = time.perf_counter(), time.process_time()
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.model_config)
        platform.repack_cpu_moe_after_reload(model)
        _refresh_tied_head(model)
    runner = worker.model_runner
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if hasattr(runner, reset):
            getattr(runner, reset)()
    platform.synchronize()
    finalized = time.perf_counter()
    missing = sorted({n for n, _ in model.named_parameters()} - r["names"] - _derived_parameters(model))
    return {
        "tensors": r["tensors"],
        "bytes": r["bytes"],
        "receive_s": r["receive_s"],
        "load_s": r["load_s"] + finalized - start,
        "finalize_s": finalized - start,
        "check_s": time.perf_counter() - finalized,
        "load_cpu_s": r["load_cpu_s"] + time.process_time() - cpu,
        "missing": missing,
    }


# Parameters an engine computes from loaded ones instead of loading them: vLLM's multi-latent attention absorbs
# kv_b_proj into W_UK_T and W_UV when a reload is finalized (process_weights_after_loading).
_DERIVED = ("mla_attn.W_UK_T", "mla_attn.W_UV")


def _derived_parameters(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith(_DERIVED)}


def _refresh_tied_head(model: torch.nn.Module) -> None:
    """With tied embeddings the checkpoint has no lm_head tensor, so the layer-wise reload leaves the head
    "not loaded" and restores it as it was. Its weight is the embedding's storage, updated in place, but the
    head's kernel was built from the old values (on CPU, a oneDNN handle over a prepacked copy): rebuild it,
    or the engine keeps sampling from the first weights' output layer."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta or weight.numel() == 0:
        return
    tied = any(
        m is not head
        and isinstance(getattr(m, "weight", None), torch.Tensor)
        and m.weight.data_ptr() == weight.data_ptr()
        for m in model.modules()
    )
    if not tied:
        return
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def read_weights(worker: Any) -> dict[str, torch.Tensor]:
    """The weights this worker computes with, by vLLM parameter name (fused and sharded as vLLM holds
    them), copied to the CPU. On CPU a linear layer's weight is repacked for the GEMM kernels and its
    parameter emptied: it is read back by applying the layer to the identity, i.e. from the packed copy
    the engine really multiplies with."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, module in _model(worker).named_modules():
            for name, p in module.named_parameters(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                packed = name == "weight" and p.numel() == 0 and hasattr(module, "input_size_per_partition")
                if packed:
                    eye = torch.eye(module.input_size_per_partition, dtype=p.dtype, device=p.device)
                    out[key] = module.quant_method.apply(module, eye).t().cpu().clone()
                else:
                    out[key] = p.detach().cpu().clone()
    return out


def reload_from_path(worker: Any, path: str) -> None:
    """The naive path: vLLM reads a checkpoint directory from disk (its own loader)."""
    worker.reload_weights(weights_path=path)


# Receivers: each returns [(hf_name, tensor)] for one bucket.


def _inline(worker: Any, st: dict[str, Any], desc: dict[str, Any]) -> buckets.Bucket:
    return desc["tensors"]


def _shm(worker: Any, st: dict[str, Any], desc: dict[str, Any]) -> buckets.Bucket:
    """Maps the sender's shared-memory slot file (once; the mapping is kept across refits so its pages stay
    mapped) and views the bucket's tensors in place."""
    path, size = desc["path"], desc["size"]
    cached = st["shm"].get(path)
    if cached is None or cached[1].numel() != size:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        # read-only mapping: torch warns that the tensor is not writable; nothing ever writes to it.
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.frombuffer(mm, dtype=torch.uint8)
        st["shm"][path] = cached = (mm, tensor)
    return buckets.read(cached[1])


def _file(worker: Any, st: dict[str, Any], desc: dict[str, Any]) -> buckets.Bucket:
    """A one-off safetensors file (written by the policy ranks for this refit only): mapped, not cached."""
    import warnings

    with open(desc["path"], "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return buckets.read(torch.frombuffer(mm, dtype=torch.uint8))


def forget_shm(worker: Any, paths: list[str] | None = None) -> None:
    """Drops cached mappings (all, or of the given files) and deletes the files: the engine is the last user."""
    st = _state(worker)
    for path in list(st["shm"]) if paths is None else paths:
        st["shm"].pop(path, None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def join_group(
    worker: Any, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float, prefix: str = ""
) -> None:
    """Joins the trainer's weight-broadcast group as `rank` (the trainer's senders come first). The group is
    built from a TCP store directly, never as torch.distributed's default group, which the in-process
    engine already owns. With `prefix` it is one pipeline stage's group of several (one per stage's
    sender, under that prefix of one store), kept beside the others; a bucket names its group."""
    import torch.distributed as dist

    st = _state(worker)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    if prefix:
        store = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        group = dist.ProcessGroupNCCL(store, rank, world, dist.ProcessGroupNCCL.Options())
    else:
        group = dist.ProcessGroupGloo(store, rank, world, timeout)
    if prefix:
        st.setdefault("groups", {})[prefix] = (group, store)
    else:
        st["group"], st["store"] = group, store
    st["recv"] = {}


def _broadcast(worker: Any, st: dict[str, Any], desc: dict[str, Any]) -> buckets.Bucket:
    import torch.distributed as dist

    group = st["groups"][desc["group"]][0] if desc.get("group") else st["group"]
    if group is None:
        raise RuntimeError("broadcast refit before the engine joined the trainer's group")
    size, slot = desc["size"], desc["slot"]
    device = platform.device() if desc["backend"] == "nccl" else torch.device("cpu")
    buf = st["recv"].get(slot)
    if buf is None or buf.numel() < size:
        # Kept across refits: a fresh receive buffer each time would pay for page faults / allocations.
        buf = st["recv"][slot] = torch.empty(
            max(size, desc.get("capacity", size)), dtype=torch.uint8, device=device
        )
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    # The sender broadcasts tensor by tensor in offset order, straight from its own memory.
    header = desc["header"]
    for _, _, _, begin, end in sorted(buckets.parse_header(header), key=lambda e: e[3]):
        group.broadcast([buf[begin:end]], opts).wait()
    return buckets.read(buf[:size], header)


def _cuda_ipc(worker: Any, st: dict[str, Any], desc: dict[str, Any]) -> buckets.Bucket:
    """Opens the trainer's CUDA allocation (same GPU) from its IPC handle and views the bucket in place."""
    key = desc["key"]
    buf = st["ipc"].get(key)
    if buf is None:
        func, args = desc["handle"]
        args = list(args)
        # args[6] is the device ordinal in the sender's numbering; find the same GPU here by UUID.
        index = platform.gpu_index(desc["device_uuid"])
        if index is None:
            raise RuntimeError(
                f"CUDA IPC refit: the trainer's GPU {desc['device_uuid']} is not visible to the engine worker"
            )
        args[6] = index
        buf = st["ipc"][key] = func(*args)
    return buckets.read(buf[: desc["size"]], desc["header"])


def forget_ipc(worker: Any, keys: list[str] | None = None) -> None:
    st = _state(worker)
    for key in list(st["ipc"]) if keys is None else keys:
        st["ipc"].pop(key, None)


_RECEIVERS = {"inline": _inline, "file": _file, "shm": _shm, "broadcast": _broadcast, "cuda_ipc": _cuda_ipc}
