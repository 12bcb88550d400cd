"""Trainer-side refit transports: they cut a (hf_name, tensor) stream into buckets and move each bucket into
the engine actor, which loads it (worker_ops.py) while the next one is prepared.

- shm: a fixed set of shared-memory slot files under /dev/shm, each holding one bucket as a safetensors
  file. The files live as long as the sender, so their pages are allocated once and reused by every refit.
- cuda_ipc: the same slots as CUDA buffers; the engine (same GPU) opens them from IPC handles, no host copy.
- broadcast: a two-party (trainer rank 0 + engine workers) gloo or NCCL group built from a TCP store,
  independent of either side's default process group; each tensor is broadcast straight from its memory.

A sender is cached per (engine, transport) in the process that sends, so a policy rank that refits every
step keeps its slots and its group.
"""

from __future__ import annotations

import atexit
import datetime
import mmap
import os
import shutil
import socket
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megatron_rl import platform
from megatron_rl.generation import buckets
from megatron_rl.generation.base import RefitSettings

TRANSPORTS = ("shm", "cuda_ipc", "broadcast")
_MB = 1 << 20


class Sender(ABC):
    kind = ""

    def __init__(self, client: Any, settings: RefitSettings) -> None:
        self.client, self.settings = client, settings
        self.bucket_bytes = max(1, int(settings.bucket_mb * _MB))

    def send(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        version: int,
        reset_prefix_cache: bool = True,
        probe: bool = False,
    ) -> dict[str, Any]:
        """begin -> one load call per bucket (at most `slots` in flight) -> end; returns figures. With
        `probe` the engine only receives and copies each bucket (the transport's own cost; no reload)."""
        client = self.client
        start = time.perf_counter()
        if probe:
            return self._probe(weights, start)
        client._wait([client._submit("begin_refit", version)], "refit start")
        in_flight: dict[int, Any] = {}
        stage_s = 0.0
        try:
            for i, bucket in enumerate(buckets.iter_buckets(weights, self.bucket_bytes)):
                slot = i % max(1, self.settings.slots)
                if slot in in_flight:  # the engine must be done with a slot before it is refilled
                    client._wait([in_flight.pop(slot)], "refit bucket load")
                t0 = time.perf_counter()
                in_flight[slot] = self._send_bucket(slot, bucket)
                stage_s += time.perf_counter() - t0
            client._wait(list(in_flight.values()), "refit bucket load")
        except BaseException:
            client._abort_refit()
            raise
        stats = client._wait([client._submit("end_refit", version, reset_prefix_cache)], "refit end")[0]
        total = time.perf_counter() - start
        return {
            **stats,
            "transport": self.kind,
            "refit_s": total,
            "stage_s": stage_s,
            "gb_per_s": stats["bytes"] / total / 1e9 if total else 0.0,
        }

    def _probe(self, weights: Iterable[tuple[str, torch.Tensor]], start: float) -> dict[str, Any]:
        in_flight: dict[int, Any] = {}
        total = 0
        for i, bucket in enumerate(buckets.iter_buckets(weights, self.bucket_bytes)):
            slot = i % max(1, self.settings.slots)
            if slot in in_flight:
                total += self.client._wait([in_flight.pop(slot)], "refit probe")[0]
            in_flight[slot] = self._send_bucket(slot, bucket, "probe_bucket")
        total += sum(self.client._wait(list(in_flight.values()), "refit probe"))
        seconds = time.perf_counter() - start
        return {"transport": self.kind, "bytes": total, "refit_s": seconds, "gb_per_s": total / seconds / 1e9}

    @abstractmethod
    def _send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> Any:
        """Moves one bucket and returns the engine's load call (an ObjectRef)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        pass


def _slot_capacity(needed: int, bucket_bytes: int) -> int:
    # Headroom for the header and the padding entry; a multiple of 2 MiB (huge-page friendly).
    want = max(needed, bucket_bytes) + _MB
    return -(-want // (2 * _MB)) * (2 * _MB)


class ShmSender(Sender):
    kind = "shm"

    def __init__(self, client: Any, settings: RefitSettings) -> None:
        super().__init__(client, settings)
        root = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
        self.dir = Path(tempfile.mkdtemp(prefix=f"megatron_rl_refit_{os.getpid()}_", dir=root))
        self.slots: dict[int, tuple[str, mmap.mmap, torch.Tensor]] = {}

    def _slot(self, slot: int, needed: int) -> tuple[str, torch.Tensor]:
        cur = self.slots.get(slot)
        if cur is None or cur[2].numel() < needed:
            path = str(self.dir / f"slot{slot}.safetensors")
            cap = _slot_capacity(needed, self.bucket_bytes)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, cap)
                mm = mmap.mmap(fd, cap, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            cur = self.slots[slot] = (path, mm, torch.frombuffer(mm, dtype=torch.uint8))
        return cur[0], cur[2]

    def _send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> Any:
        needed = buckets.plan(bucket).size
        path, buf = self._slot(slot, needed)
        buckets.write(buckets.plan(bucket, buf.numel()), buf)
        return self.client._submit(method, "shm", {"path": path, "size": buf.numel()})

    def close(self) -> None:
        self.slots.clear()  # the mappings close when their tensors are collected
        shutil.rmtree(self.dir, ignore_errors=True)


class CudaIpcSender(Sender):
    kind = "cuda_ipc"

    def __init__(self, client: Any, settings: RefitSettings) -> None:
        super().__init__(client, settings)
        uuid = platform.gpu_uuid()
        if uuid is None:
            raise RuntimeError("the cuda_ipc refit transport needs a CUDA GPU in the sending process")
        self.device, self.uuid = platform.device(), uuid
        self.slots: dict[int, tuple[str, torch.Tensor, Any]] = {}

    def _slot(self, slot: int, needed: int) -> tuple[str, torch.Tensor, Any]:
        from torch.multiprocessing.reductions import reduce_tensor

        cur = self.slots.get(slot)
        if cur is None or cur[1].numel() < needed:
            if cur is not None:
                self.client._wait([self.client._submit("forget_transport", "cuda_ipc", [cur[0]])], "refit")
            buf = torch.empty(
                _slot_capacity(needed, self.bucket_bytes), dtype=torch.uint8, device=self.device
            )
            cur = self.slots[slot] = (f"{self.uuid}/{uuid.uuid4().hex}", buf, reduce_tensor(buf))
        return cur

    def _send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> Any:
        layout = buckets.plan(bucket)
        key, buf, handle = self._slot(slot, layout.size)
        buckets.write(layout, buf)
        torch.cuda.current_stream(self.device).synchronize()  # the engine reads on its own stream
        desc = {
            "key": key,
            "handle": handle,
            "size": layout.size,
            "header": layout.header,
            "device_uuid": self.uuid,
        }
        return self.client._submit(method, "cuda_ipc", desc)

    def close(self) -> None:
        self.slots.clear()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BroadcastSender(Sender):
    kind = "broadcast"

    def __init__(self, client: Any, settings: RefitSettings) -> None:
        super().__init__(client, settings)
        import ray
        import torch.distributed as dist

        self.backend = "nccl" if not platform.use_cpu() and client.on_gpu else "gloo"
        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        world = 1 + client.settings.tp
        timeout = datetime.timedelta(seconds=settings.timeout_s)
        self.store = dist.TCPStore(host, port, world, is_master=True, timeout=timeout, wait_for_workers=False)
        joined = client._submit("join_group", host, port, world, self.backend, settings.timeout_s)
        if self.backend == "nccl":
            self.group = dist.ProcessGroupNCCL(self.store, 0, world, dist.ProcessGroupNCCL.Options())
        else:
            self.group = dist.ProcessGroupGloo(self.store, 0, world, timeout)
        client._wait([joined], "joining the weight-broadcast group")
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = 0

    def _send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> Any:
        layout = buckets.plan(bucket)
        desc = {
            "size": layout.size,
            "capacity": _slot_capacity(layout.size, self.bucket_bytes),
            "slot": slot,
            "backend": self.backend,
            "header": layout.header,
        }
        ref = self.client._submit(method, "broadcast", desc)
        device = platform.device() if self.backend == "nccl" else torch.device("cpu")
        # Tensor by tensor, straight from the trainer's memory: no staging copy on this side.
        for _, t, _ in sorted(layout.offsets, key=lambda x: x[2]):
            flat = t.detach().reshape(-1).to(device).contiguous().view(torch.uint8)
            self.group.broadcast([flat], self.opts).wait()
        return ref

    def close(self) -> None:
        self.group = None
        self.store = None


_SENDERS: dict[tuple[str, str], Sender] = {}
_CLASSES = {"shm": ShmSender, "cuda_ipc": CudaIpcSender, "broadcast": BroadcastSender}


def sender_for(client: Any, kind: str, settings: RefitSettings) -> Sender:
    """The cached sender of this process for `client`'s engine (created on first use)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown refit transport {kind!r}; choose one of {', '.join(TRANSPORTS)} or auto")
    key = (client.actor_id, kind)
    sender = _SENDERS.get(key)
    if sender is None or sender.settings != settings:
        if sender is not None:
            sender.close()
        sender = _SENDERS[key] = _CLASSES[kind](client, settings)
    sender.client = client
    return sender


def discard(sender: Sender) -> None:
    """Forgets a sender after a failed refit (a broadcast group may be half-used): the next one starts clean."""
    for key in [k for k, v in _SENDERS.items() if v is sender]:
        del _SENDERS[key]
    sender.close()


def close_senders(actor_id: str) -> None:
    for key in [k for k in _SENDERS if k[0] == actor_id]:
        _SENDERS.pop(key).close()


@atexit.register
def _close_all() -> None:
    for sender in _SENDERS.values():
        sender.close()
    _SENDERS.clear()
