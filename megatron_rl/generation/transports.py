"""Trainer-side refit transports: each moves one packed bucket into a set of engine actors, which load it
(worker_ops.py) while the next one is prepared. fanout.py drives them: one export, one pass over the buckets,
every engine served from the same packed buffer.

- shm: a fixed set of shared-memory slot files under /dev/shm, each holding one bucket as a safetensors
  file that every engine on the node maps and loads. The files live as long as the sender, so their pages
  are allocated once and reused by every refit.
- cuda_ipc: the same slots as CUDA buffers; the engines on the sender's GPU open them from one IPC handle.
- broadcast: one gloo or NCCL group (trainer rank 0 + every engine's workers) built from a TCP store,
  independent of either side's default process group; each tensor is broadcast once, straight from memory.

A sender is cached per (transport, set of engines) in the process that sends, so a policy rank that refits
every step keeps its slots and its group.
"""

from __future__ import annotations

import atexit
import datetime
import mmap
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from megatron_rl import platform
from megatron_rl.generation import buckets
from megatron_rl.generation.base import RefitSettings

TRANSPORTS = ("shm", "cuda_ipc", "broadcast")
_MB = 1 << 20


class Sender(ABC):
    """Moves buckets into `clients` (EngineClients that resolved to this transport)."""

    kind = ""

    def __init__(self, clients: list[Any], settings: RefitSettings) -> None:
        if not clients:
            raise ValueError("a refit sender needs at least one engine")
        self.clients, self.settings = list(clients), settings
        self.bucket_bytes = max(1, int(settings.bucket_mb * _MB))

    @abstractmethod
    def send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> list[Any]:
        """Packs one bucket into `slot` once and submits `method` to every engine; returns their calls
        (ObjectRefs, in `clients` order). The slot must not be refilled before all of them have returned."""

    def finish_stream(self) -> None:  # noqa: B027 - only the stage broadcast passes the turn on
        """Called once every bucket of a refit went through and every engine loaded it."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        pass


def _slot_capacity(needed: int, bucket_bytes: int) -> int:
    # Headroom for the header and the padding entry; a multiple of 2 MiB (huge-page friendly).
    want = max(needed, bucket_bytes) + _MB
    return -(-want // (2 * _MB)) * (2 * _MB)


class ShmSender(Sender):
    kind = "shm"

    def __init__(self, clients: list[Any], settings: RefitSettings) -> None:
        super().__init__(clients, settings)
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

    def send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> list[Any]:
        needed = buckets.plan(bucket).size
        path, buf = self._slot(slot, needed)
        buckets.write(buckets.plan(bucket, buf.numel()), buf)
        desc = {"path": path, "size": buf.numel()}
        return [c._submit(method, "shm", desc) for c in self.clients]

    def close(self) -> None:
        self.slots.clear()  # the mappings close when their tensors are collected
        shutil.rmtree(self.dir, ignore_errors=True)


class CudaIpcSender(Sender):
    kind = "cuda_ipc"

    def __init__(self, clients: list[Any], settings: RefitSettings) -> None:
        super().__init__(clients, settings)
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
                refs = [c._submit("forget_transport", "cuda_ipc", [cur[0]]) for c in self.clients]
                self.clients[0]._wait(refs, "refit")
            buf = torch.empty(
                _slot_capacity(needed, self.bucket_bytes), dtype=torch.uint8, device=self.device
            )
            cur = self.slots[slot] = (f"{self.uuid}/{uuid.uuid4().hex}", buf, reduce_tensor(buf))
        return cur

    def send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> list[Any]:
        layout = buckets.plan(bucket)
        key, buf, handle = self._slot(slot, layout.size)
        buckets.write(layout, buf)
        torch.cuda.current_stream(self.device).synchronize()  # the engines read on their own streams
        desc = {
            "key": key,
            "handle": handle,
            "size": layout.size,
            "header": layout.header,
            "device_uuid": self.uuid,
        }
        return [c._submit(method, "cuda_ipc", desc) for c in self.clients]

    def close(self) -> None:
        self.slots.clear()


class BroadcastSender(Sender):
    """One group for all engines: rank 0 is this process, engine k's tp workers follow engine k-1's."""

    kind = "broadcast"

    def __init__(self, clients: list[Any], settings: RefitSettings) -> None:
        super().__init__(clients, settings)
        import ray
        import torch.distributed as dist

        on_gpu = all(c.on_gpu for c in self.clients)
        self.backend = "nccl" if not platform.use_cpu() and on_gpu else "gloo"
        host = ray.util.get_node_ip_address()
        world = 1 + sum(c.settings.world for c in self.clients)
        timeout = datetime.timedelta(seconds=settings.timeout_s)
        # Port 0: the store binds a free port itself. A port probed free and bound later can be taken in
        # between (EADDRINUSE seen in CI, with Ray's processes opening connections all the time).
        self.store = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        port = self.store.port
        joined, first = [], 1
        for c in self.clients:
            joined.append(c._submit("join_group", host, port, world, self.backend, settings.timeout_s, first))
            first += c.settings.world
        if self.backend == "nccl":
            self.group = dist.ProcessGroupNCCL(self.store, 0, world, dist.ProcessGroupNCCL.Options())
        else:
            self.group = dist.ProcessGroupGloo(self.store, 0, world, timeout)
        self.clients[0]._wait(joined, "joining the weight-broadcast group")
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = 0
        self.group_key: dict[str, str] = {}  # which of the engine's groups a bucket travels by

    def send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> list[Any]:
        layout = buckets.plan(bucket)
        desc = {
            "size": layout.size,
            "capacity": _slot_capacity(layout.size, self.bucket_bytes),
            "slot": slot,
            "backend": self.backend,
            "header": layout.header,
            **self.group_key,
        }
        refs = [c._submit(method, "broadcast", desc) for c in self.clients]
        device = platform.device() if self.backend == "nccl" else torch.device("cpu")
        # Tensor by tensor, straight from the trainer's memory: no staging copy on this side, and each
        # tensor goes out once to the whole group.
        for _, t, _ in sorted(layout.offsets, key=lambda x: x[2]):
            flat = t.detach().reshape(-1).to(device).contiguous().view(torch.uint8)
            self.group.broadcast([flat], self.opts).wait()
        return refs

    def close(self) -> None:
        self.group = None
        self.store = None


class StageBroadcastSender(BroadcastSender):
    """One pipeline stage's broadcast group of several: stage i's sender is rank 0 of its own group with
    every engine's workers (ranks 1..), all groups under prefixes of one store that stage 0's sender hosts
    (`address`). Stage 0's sender asks every engine to join the groups in stage order, so no two engines
    wait for each other in different groups. In one shared group every sender would have to receive the
    other stages' tensors too. An engine runs its calls one at a time in arrival order, so the stages take
    turns: stage i sends its first broadcast bucket once stage i-1 has set its key in the store, which it
    does when every engine has loaded its last bucket."""

    def __init__(
        self,
        clients: list[Any],
        settings: RefitSettings,
        index: int,
        count: int,
        address: tuple[str, int] | None = None,
    ) -> None:
        Sender.__init__(self, clients, settings)
        import ray
        import torch.distributed as dist

        on_gpu = all(c.on_gpu for c in self.clients)
        self.backend = "nccl" if not platform.use_cpu() and on_gpu else "gloo"
        self.index, self.count, self.group, self.refits, self._turn = index, count, None, 0, True
        self.world = 1 + sum(c.settings.world for c in self.clients)
        self.timeout = datetime.timedelta(seconds=settings.timeout_s)
        self.joined: list[Any] = []
        if index == 0:
            host = ray.util.get_node_ip_address()
            stores = 1 + (count - 1) + count * (self.world - 1)
            self.store = dist.TCPStore(  # port 0: bound by the store itself (BroadcastSender)
                host, 0, stores, is_master=True, timeout=self.timeout, wait_for_workers=False
            )
            self.address = (host, self.store.port)
            for stage in range(count):
                first = 1
                for c in self.clients:
                    args = (host, self.address[1], self.world, self.backend, settings.timeout_s, first)
                    self.joined.append(c._submit("join_group", *args, _prefix(stage)))
                    first += c.settings.world
        else:
            if address is None:
                raise ValueError("a later stage's sender joins the groups at stage 0's address")
            self.address = tuple(address)
            self.store = dist.TCPStore(address[0], address[1], 1, is_master=False, timeout=self.timeout)
        self.group_store = dist.PrefixStore(_prefix(index), self.store)
        self.group_key = {"group": _prefix(index)}
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = 0

    def connect(self) -> None:
        """Builds this stage's group (blocks until every engine worker has joined it)."""
        if self.group is not None:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            self.group = dist.ProcessGroupNCCL(self.group_store, 0, self.world, options)
        else:
            self.group = dist.ProcessGroupGloo(self.group_store, 0, self.world, self.timeout)
        if self.joined:
            self.clients[0]._wait(self.joined, "joining the weight-broadcast groups")
            self.joined = []

    def start_refit(self) -> None:
        self.refits += 1
        self._turn = self.index == 0

    def _key(self, index: int) -> str:
        return f"refit{self.refits}/stage{index}/done"

    def _await_turn(self) -> None:
        """Until the stage before has finished; raises at once if a sender before failed (fail())."""
        if self._turn:
            return
        done, failed = self._key(self.index - 1), f"refit{self.refits}/failed"
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not self.store.check([done]):
            if self.store.check([failed]):
                raise RuntimeError("an earlier pipeline stage's sender failed during this refit")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the refit's pipeline stage {self.index - 1} did not finish in time")
            time.sleep(0.01)
        self._turn = True

    def fail(self) -> None:
        """Tells the later stages' senders that this refit failed, so none waits for its turn in vain."""
        try:
            self.store.set(f"refit{self.refits}/failed", b"1")
        except Exception:  # noqa: BLE001 - the store may be gone with the failure itself
            pass

    def send_bucket(self, slot: int, bucket: buckets.Bucket, method: str = "load_bucket") -> list[Any]:
        self._await_turn()
        return super().send_bucket(slot, bucket, method)

    def finish_stream(self) -> None:
        self._await_turn()
        self.store.set(self._key(self.index), b"1")


def _prefix(stage: int) -> str:
    return f"stage{stage}/"


_SENDERS: dict[tuple[str, tuple[str, ...]], Sender] = {}
_CLASSES = {"shm": ShmSender, "cuda_ipc": CudaIpcSender, "broadcast": BroadcastSender}


def sender_for(clients: list[Any], kind: str, settings: RefitSettings) -> Sender:
    """This process's cached sender of transport `kind` for exactly these engines (created on first use).
    A cached sender for another set that shares an engine is closed first: the set changed (an engine
    was restarted or left), and a broadcast group whose member is gone cannot be used again."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown refit transport {kind!r}; choose one of {', '.join(TRANSPORTS)} or auto")
    ids = tuple(sorted(c.actor_id for c in clients))
    key = (kind, ids)
    for other in [k for k in _SENDERS if k[0] == kind and k != key and set(k[1]) & set(ids)]:
        _SENDERS.pop(other).close()
    sender = _SENDERS.get(key)
    if sender is None or sender.settings != settings or type(sender) is not _CLASSES[kind]:
        if sender is not None:
            sender.close()
        sender = _SENDERS[key] = _CLASSES[kind](clients, settings)
    by_id = {c.actor_id: c for c in clients}
    sender.clients = [by_id[c.actor_id] for c in sender.clients]  # the caller's handles (refit settings)
    return sender


def cached_stage_groups() -> dict[tuple[str, ...], tuple[int, tuple[str, int]]]:
    """This process's stage broadcast groups: engine ids -> (stage count, stage 0's address)."""
    return {k[1]: (v.count, v.address) for k, v in _SENDERS.items() if isinstance(v, StageBroadcastSender)}


def stage_broadcast_sender(
    clients: list[Any], settings: RefitSettings, index: int, count: int, address: tuple[str, int] | None
) -> StageBroadcastSender:
    """This process's stage group for these engines: the cached one when it is the group at `address`
    (stage 0: when `address` is its own), else a new one (stage 0: `address` None asks for a new one)."""
    key = ("broadcast", tuple(sorted(c.actor_id for c in clients)))
    for other in [k for k in _SENDERS if k[0] == "broadcast" and k != key and set(k[1]) & set(key[1])]:
        _SENDERS.pop(other).close()
    sender = _SENDERS.get(key)
    reuse = (
        isinstance(sender, StageBroadcastSender)
        and sender.settings == settings
        and (sender.index, sender.count) == (index, count)
        and address is not None
        and sender.address == tuple(address)
    )
    if not reuse:
        if sender is not None:
            sender.close()
        sender = _SENDERS[key] = StageBroadcastSender(clients, settings, index, count, address)
    by_id = {c.actor_id: c for c in clients}
    sender.clients = [by_id[c.actor_id] for c in sender.clients]
    return sender  # type: ignore[return-value]


def discard(sender: Sender) -> None:
    """Forgets a sender after a failed refit (a broadcast group may be half-used): the next one starts clean."""
    for key in [k for k, v in _SENDERS.items() if v is sender]:
        del _SENDERS[key]
    sender.close()


def close_senders(actor_id: str) -> None:
    """Closes this process's senders that serve the engine `actor_id`."""
    for key in [k for k in _SENDERS if actor_id in k[1]]:
        _SENDERS.pop(key).close()


@atexit.register
def _close_all() -> None:
    for sender in _SENDERS.values():
        sender.close()
    _SENDERS.clear()
