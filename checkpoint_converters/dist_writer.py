"""Streaming writer of Megatron torch_dist checkpoints: every tensor is produced when the writer reaches it.

Megatron's own `dist_checkpointing.save` runs with a save strategy of ours. It hands the state dict (of the
meta model, so no data) to torch.distributed.checkpoint, whose planner asks `resolve_data` for each stored
chunk in turn; we produce the parameter then (from the HF files), a background thread preparing the next
ones, and write the chunks sequentially into the usual `__0_0.distcp` + `.metadata`. Peak memory is a few
parameters, whatever the model size.

The torch/Megatron internals this needs (MCore -> PyT state dict translation, MCoreSavePlanner,
FileSystemWriter's `_StorageInfo`) are imported here only, so a change in a newer release shows up here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from checkpoint_converters.dist_ckpt import _built, _sharded_tensors


def _sequential_writer_class() -> Any:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class SequentialWriter(FileSystemWriter):
        """FileSystemWriter's file format (one `__0_0.distcp` of torch.save'd chunks + `.metadata`), written
        item by item in plan order. The stock writer also keeps the last tensor of every key alive until
        the file is closed (it collects them for its safetensors mode): an embedding-sized tensor per key."""

        def write_data(self, plan: Any, planner: Any) -> Future:
            name = f"{plan.storage_data.prefix}0.distcp"
            results = []
            with open(Path(self.path) / name, "wb") as f:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    offset = f.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        f.write(data.getbuffer())
                    else:
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.nbytes:
                            data = data.clone()  # torch.save writes a view's whole storage
                        torch.save(data, f)
                    length = f.tell() - offset
                    results.append(WriteResult(item.index, length, _StorageInfo(name, offset, length)))
                    del data
                f.flush()
                os.fsync(f.fileno())
            fut: Future = Future()
            fut.set_result(results)
            return fut

    return SequentialWriter


def _strategy(
    produce: Callable[[str, tuple[int, ...]], torch.Tensor],
    start: Callable[[list[tuple[str, tuple[int, ...]]]], None],
) -> Any:
    """A torch_dist save strategy whose tensors are produced on demand by `produce(key, global_offset)`;
    `start` is told the order in which they will be asked for (the plan order) before writing begins."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    class OnDemandPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:  # ShardedObjects (tiny, already serialised)
                return super().resolve_data(write_item)
            tensor = produce(write_item.index.fqn, tuple(write_item.index.offset))
            # Layer (and expert) axes are prepended singleton dims in the stored chunk.
            return tensor.reshape(tuple(write_item.tensor_data.chunk.sizes))

    class StreamingTorchDist(SaveShardedStrategy):
        def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, keep_only_main_replica=True
            )
            order = [
                (k, tuple(st.global_offset))
                for k, sts in flat.items()
                for st in sts
                if hasattr(st, "global_offset")
            ]
            pyt = mcore_to_pyt_state_dict(flat, False)
            start(order)
            writer = _sequential_writer_class()(str(checkpoint_dir), single_file_per_rank=True)
            dcp.save(
                pyt, storage_writer=writer, planner=OnDemandPlanner(flatten_state_dict=False), no_dist=True
            )

        def can_handle_sharded_objects(self) -> bool:
            return True

    return StreamingTorchDist("torch_dist", 1)


def write_torch_dist(
    directory: Path,
    model: Any,
    param_pieces: Callable[[str], list[torch.Tensor]],
    on_param: Callable[[str], None] = lambda name: None,
    prefetch_bytes: int = 64 * 1024**2,
) -> None:
    """Writes the checkpoint of `model` (meta) into `directory`. `param_pieces(name)` gives a parameter's full
    TP=1 tensor as pieces along dim 0 (see transforms.to_megatron_pieces); a background thread prepares the
    next parameters (at most ~`prefetch_bytes` ahead) while the current one is written, and every tensor is
    released once written."""
    from megatron.core.dist_checkpointing import save

    directory.mkdir(parents=True, exist_ok=True)
    sd = model.sharded_state_dict()
    originals = dict(sd)  # save() replaces factories in `sd` by what they build
    owner: dict[tuple[str, tuple[int, ...]], str] = {}
    for name, entry in sd.items():
        for st in _sharded_tensors(_built(entry, None)):
            owner[(st.key, tuple(st.global_offset))] = name
    ready: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    prefetch: _Prefetcher | None = None

    def start(order: list[tuple[str, tuple[int, ...]]]) -> None:
        nonlocal prefetch
        names = list(dict.fromkeys(owner[k] for k in order if k in owner))
        prefetch = _Prefetcher(names, param_pieces, prefetch_bytes)

    def produce(key: str, offset: tuple[int, ...]) -> torch.Tensor:
        if (key, offset) not in ready:
            release_free_memory()  # the previous parameter is written and dropped by now
            name = owner[(key, offset)]
            ready.update(_chunks(originals[name], prefetch.take(name)))
            on_param(name)
        return ready.pop((key, offset))

    previous = torch.serialization.get_crc32_options()
    # Each stored chunk is a torch.save archive; its zip CRC costs more than the write and torch.load never
    # checks it, so it is left out (torch's documented switch; the files load the same).
    torch.serialization.set_crc32_options(False)
    try:
        save({"model": sd}, str(directory), sharded_strategy=_strategy(produce, start))
    finally:
        torch.serialization.set_crc32_options(previous)
        if prefetch is not None:
            prefetch.close()
    if ready:
        raise RuntimeError(f"{len(ready)} tensor chunks were produced but never written")


def release_free_memory() -> None:
    """Hands freed heap memory back to the OS (glibc malloc_trim). Tensors below glibc's mmap threshold
    come from per-thread heaps, which keep freed blocks: with a reader thread allocating and the writer
    freeing, the resident set would creep up by a few hundred MB over a conversion."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


def _chunks(entry: Any, pieces: list[torch.Tensor]) -> dict[tuple[str, tuple[int, ...]], torch.Tensor]:
    """The stored chunks of one parameter, keyed by (checkpoint key, global offset).

    A factory (SwiGLU fc1) stores row blocks of the parameter; when a block is exactly one of the pieces it
    is written from that piece directly, instead of concatenating the pieces and copying the block out."""
    from megatron.core.dist_checkpointing import ShardedTensor

    if isinstance(entry, ShardedTensor):
        data = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return {(entry.key, tuple(entry.global_offset)): data}
    shape = (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:])
    starts, row = {}, 0
    for p in pieces:
        starts[row] = p
        row += p.shape[0]
    row_numel = max(1, torch.Size(shape[1:]).numel())
    out = {}
    for st in _sharded_tensors(_built(entry, torch.empty(shape, dtype=pieces[0].dtype, device="meta"))):
        piece = starts.get(st.data.storage_offset() // row_numel)
        if piece is None or piece.shape != st.data.shape or not st.data.is_contiguous():
            break
        out[(st.key, tuple(st.global_offset))] = piece
    else:
        return out
    full = torch.cat(pieces)  # the general case: build the factory on the real tensor
    return {(st.key, tuple(st.global_offset)): st.data for st in _sharded_tensors(_built(entry, full))}


class _Prefetcher:
    """Computes `fn(name)` for names in the order the writer will ask for them, in a background thread, at
    most ~`budget` bytes ahead. File reads and tensor copies release the GIL, so this overlaps reading and
    converting with writing. A name asked for out of order is computed on the spot."""

    def __init__(self, order: list[str], fn: Callable[[str], list[torch.Tensor]], budget: int) -> None:
        self.fn, self.budget = fn, budget
        self.queued = set(order)
        self.done: dict[str, Any] = {}
        self.buffered = 0
        self.stopped = False
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(order,), daemon=True, name="ckpt-prefetch")
        self.thread.start()

    def _run(self, order: list[str]) -> None:
        for name in order:
            with self.cv:
                while self.buffered > self.budget and not self.stopped:
                    self.cv.wait()
                if self.stopped:
                    return
            try:
                value: Any = self.fn(name)
                size = sum(t.numel() * t.element_size() for t in value)
            except BaseException as exc:  # handed to the writer thread, which raises it
                value, size = exc, 0
            with self.cv:
                self.done[name] = (value, size)
                self.buffered += size
                self.cv.notify_all()

    def take(self, name: str) -> list[torch.Tensor]:
        with self.cv:
            if name not in self.queued:
                value: Any = None
            else:
                self.queued.discard(name)
                while name not in self.done:
                    self.cv.wait()
                value, size = self.done.pop(name)
                self.buffered -= size
                self.cv.notify_all()
        if value is None:
            return self.fn(name)
        if isinstance(value, BaseException):
            raise value
        return value

    def close(self) -> None:
        with self.cv:
            self.stopped = True
            self.done.clear()
            self.cv.notify_all()
        self.thread.join(timeout=60)
