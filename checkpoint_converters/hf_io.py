"""Hugging Face safetensors checkpoints, read and written tensor by tensor.

Reading uses positioned reads (os.pread) of exactly the bytes a tensor (or one rank's slice of it) needs,
or (`mapped`, for streaming conversion) a private mapping of just one tensor's pages that goes away with the
tensor; never a mapping of the whole file: pages touched through it stay in the process's resident set, so
converting a model through safe_open grows RSS to the checkpoint size. The safetensors header is validated
up front, so a truncated or corrupted file fails before anything is written, naming the file and tensor.

Writing (`StreamingHFWriter`) plans the shards from the tensor shapes first, so each file's header is
written before its data and every tensor goes to disk as soon as it exists.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint_converters.transforms import Slice
from megatron_rl.dtypes import SAFETENSORS, SAFETENSORS_CODES
from megatron_rl.errors import UserError

# Buffers some exporters write that are not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
_SIDE_FILES = SIDE_FILES  # old name, still imported elsewhere


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid safetensors file: {why}; it may be truncated or corrupted.")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise bad(f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, stop = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"tensor {name!r} has a malformed entry {meta!r}") from exc
        numel = 1
        for s in shape:
            numel *= s
        if stop - begin != numel * dtype.itemsize:
            raise bad(f"tensor {name!r} claims {stop - begin} bytes for shape {list(shape)} {meta['dtype']}")
        if 8 + n + stop > size:
            raise bad(f"tensor {name!r} ends at byte {8 + n + stop} but the file has {size} bytes")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, 8 + n + stop)
    return out


class HFCheckpoint:
    """A safetensors checkpoint (model.safetensors or a sharded index): names, shapes, and reads of whole
    tensors or of one slice, without holding more than the tensor asked for."""

    def __init__(self, directory: str | Path) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads may come from a prefetch thread too
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is not a valid safetensors index ({exc}).") from exc
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [single.name]
        else:
            raise UserError(f"No model.safetensors or model.safetensors.index.json in {self.dir}.")
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise UserError(f"{index} lists {f}, which does not exist in {self.dir}.")
            for name, info in _read_header(path).items():
                if name in self.tensors:
                    raise UserError(f"Tensor {name!r} appears in both {self.tensors[name].file} and {path}.")
                self.tensors[name] = info
        if weight_map:
            for n, f in weight_map.items():
                if n not in self.tensors or self.tensors[n].file.name != f:
                    raise UserError(f"{index} maps tensor {n!r} to {f}, but that file does not contain it.")

    def names(self) -> list[str]:
        return [n for n in self.tensors if not n.endswith(IGNORED_SUFFIXES)]

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise UserError(f"Tensor {name!r} is missing from the checkpoint in {self.dir}.")
        return self.tensors[name]

    def nbytes(self) -> int:
        return sum(i.end - i.start for i in self.tensors.values())

    def get(self, name: str, piece: Slice = None) -> torch.Tensor:
        """The tensor, or its slice (dim, start, stop); dim-0 slices read only their own bytes."""
        info = self.info(name)
        if piece is not None and piece[0] == 0:
            row = (info.end - info.start) // max(1, info.shape[0])
            out = torch.empty((piece[2] - piece[1], *info.shape[1:]), dtype=info.dtype)
            self._pread(info, out, info.start + piece[1] * row)
            return out
        out = torch.empty(info.shape, dtype=info.dtype)
        self._pread(info, out, info.start)
        if piece is None:
            return out
        # Other dims are strided on disk; read the tensor and keep a compact copy of the slice.
        return out.narrow(piece[0], piece[1], piece[2] - piece[1]).clone()

    def mapped(self, name: str) -> torch.Tensor:
        """The whole tensor as a zero-copy view of the file (a private mapping of just its pages, unmapped
        when the tensor is freed), with the kernel asked to read it ahead. Writing such a tensor to another
        file copies page cache to page cache once; reading it into fresh memory first (`get`) costs a
        second copy plus faulting in new anonymous pages, the slow part of converting (docs/conversion.md)."""
        info = self.info(name)
        size = info.end - info.start
        if size == 0 or info.start % info.dtype.itemsize:
            return self.get(name)  # nothing to map / misaligned for a typed view
        fd = self._fd(info.file)
        if os.fstat(fd).st_size < info.end:  # touching a mapped page past the end would be SIGBUS
            raise UserError(
                f"Cannot read tensor {name!r} from {info.file}: the file is shorter than its header says."
            )
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(fd, info.end - start, access=mmap.ACCESS_COPY, offset=start)
        mapping.madvise(mmap.MADV_WILLNEED)
        raw = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=info.start - start)
        return torch.from_numpy(raw).view(info.dtype).reshape(info.shape)

    def _fd(self, file: Path) -> int:
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def _pread(self, info: TensorInfo, out: torch.Tensor, offset: int) -> None:
        fd = self._fd(info.file)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise UserError(
                    f"Cannot read tensor from {info.file}: the file ended early; it may be truncated."
                )
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def __del__(self) -> None:
        self.close()


def _header_bytes(entries: dict[str, dict]) -> bytes:
    raw = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data (and so every tensor of one dtype) 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


class StreamingHFWriter:
    """Writes tensors whose names, shapes and dtypes are known in advance into safetensors shards of at most
    `shard_bytes`, in the given order, one tensor at a time; `close()` adds the index for several shards."""

    def __init__(
        self,
        directory: Path,
        plan: Sequence[tuple[str, Sequence[int], torch.dtype]],
        shard_bytes: int = 2 * 1024**3,
    ) -> None:
        self.dir = directory
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _numel(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        n = len(shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        self.expected = [
            (name, shape, dtype, i) for i, shard in enumerate(shards) for name, shape, dtype in shard
        ]
        self.shards = shards
        self.total = sum(_numel(s) * d.itemsize for _, s, d, _ in self.expected)
        self._next = 0
        self._open: int | None = None
        self._f = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.expected):
            raise ValueError(f"unexpected extra tensor {name!r}")
        want, shape, dtype, shard = self.expected[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"expected {want} {list(shape)} {dtype}, got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        if self._open != shard:
            self._start(shard)
        self._f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def _start(self, shard: int) -> None:
        self._finish_file()
        entries, offset = {}, 0
        for name, shape, dtype in self.shards[shard]:
            nbytes = _numel(shape) * dtype.itemsize
            entries[name] = {
                "dtype": SAFETENSORS_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self._f = open(self.dir / self.files[shard], "wb")
        self._f.write(_header_bytes(entries))
        self._open = shard

    def _finish_file(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def close(self) -> None:
        if self._next != len(self.expected):
            raise ValueError(f"{len(self.expected) - self._next} planned tensors were never written")
        self._finish_file()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total},
                "weight_map": {name: self.files[s] for name, _, _, s in self.expected},
            }
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def copy_side_files(src: str | Path, dst: Path) -> None:
    """config.json, generation config and tokenizer files (whatever of them exists)."""
    for f in SIDE_FILES:
        if (Path(src) / f).is_file():
            shutil.copy2(Path(src) / f, dst / f)


class ShardedWriter:
    """Writes (name, tensor) pairs arriving one by one (shapes not known ahead) into numbered safetensors
    shards of at most `shard_bytes` each, then an index. Holds at most one shard in memory: used for refit
    buckets, where a bucket is meant to be held anyway."""

    def __init__(self, directory: Path, shard_bytes: int = 2 * 1024**3) -> None:
        self.dir, self.shard_bytes = directory, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.files: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        idx = len(self.shards) + 1
        save_file(self.pending, str(self.dir / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        for i, names in enumerate(self.shards, start=1):
            final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.safetensors", self.dir / final)
            for name in names:
                self.weight_map[name] = final
        self.files = [self.dir / f for f in dict.fromkeys(self.weight_map.values())]
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def prepare_output(out: Path, overwrite: bool, needed: int = 0) -> Path:
    """A fresh `<out>.tmp` to assemble into; refuses an existing `out` unless overwriting, and a read-only
    filesystem or one with less than `needed` bytes free (0: unknown)."""
    from checkpoint_converters.storage import check_output_room

    if out.exists() and not overwrite:
        raise UserError(f"Output directory {out} already exists; pass --overwrite to replace it.")
    check_output_room(out, needed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_output(tmp: Path, out: Path) -> Path:
    """Renames the finished `tmp` into place (the old output, if any, is removed only now)."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def write_hf_checkpoint(
    items: Iterable[tuple[str, torch.Tensor]],
    template_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Writes (name, tensor) pairs into sharded safetensors plus config/tokenizer files copied from
    `template_dir`. Written to `<out>.tmp` and renamed into place only when complete."""
    out = Path(out_dir)
    tmp = prepare_output(out, overwrite)
    try:
        writer = ShardedWriter(tmp, shard_bytes)
        for name, tensor in items:
            writer.add(name, tensor)
        writer.close()
        copy_side_files(template_dir, tmp)
    except BaseException as exc:
        from checkpoint_converters.storage import storage_error

        shutil.rmtree(tmp, ignore_errors=True)
        if error := storage_error(exc, out, 0):
            raise error from None
        raise
    return commit_output(tmp, out)
