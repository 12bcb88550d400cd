"""Weight buckets: a stream of (hf_name, tensor) cut into groups of about `bucket_bytes`, each packed into
one flat byte buffer laid out as a safetensors file (8-byte header length, JSON header, data).

Every transport moves the same flat buffer (a shared-memory file, a broadcast, a CUDA IPC allocation), and
the engine side finds names, dtypes and shapes in the buffer's own header, so control messages stay tiny.
A buffer may be longer than its content: the tail is declared as one `__padding__` U8 tensor, which keeps a
fixed-size shared-memory slot a valid safetensors file that `safetensors.safe_open` can read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from megatron_rl.dtypes import SAFETENSORS, SAFETENSORS_CODES

PADDING = "__padding__"
ALIGN = 64  # data section start; tensors are ordered so each stays aligned to its element size


Bucket = list[tuple[str, torch.Tensor]]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Groups a (name, tensor) stream into buckets of at most `bucket_bytes` (a larger tensor gets a bucket
    of its own). Pulls lazily, so a policy can export the next bucket while the engine loads this one."""
    bucket: Bucket = []
    size = 0
    for name, tensor in weights:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"refit weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        n = nbytes(tensor)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += n
    if bucket:
        yield bucket


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a bucket goes in the flat buffer."""

    header: bytes  # the 8-byte length prefix and the JSON header, padded to ALIGN
    offsets: list[tuple[str, torch.Tensor, int]]  # (name, tensor, absolute byte offset)
    size: int  # bytes of header + data (without padding)


def _header(entries: dict[str, dict], pad: int) -> bytes:
    if pad:
        end = max((e["data_offsets"][1] for e in entries.values()), default=0)
        entries = {**entries, PADDING: {"dtype": "U8", "shape": [pad], "data_offsets": [end, end + pad]}}
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % ALIGN)  # spaces are valid JSON padding; data starts aligned
    return len(raw).to_bytes(8, "little") + raw


def plan(bucket: Bucket, capacity: int | None = None) -> Layout:
    """Lays a bucket out; with `capacity`, a padding tensor fills the buffer up to exactly that size."""
    # Widest dtypes first: with an aligned data start every offset is then a multiple of its element size.
    order = sorted(bucket, key=lambda item: -item[1].element_size())
    entries: dict[str, dict] = {}
    pos = 0
    for name, t in order:
        if t.dtype not in SAFETENSORS_CODES:
            raise TypeError(f"refit weight {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        if name in entries or name == PADDING:
            raise ValueError(f"refit weight {name!r} appears twice in one bucket")
        entries[name] = {
            "dtype": SAFETENSORS_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [pos, pos + nbytes(t)],
        }
        pos += nbytes(t)
    header = _header(entries, 0)
    if capacity is not None and capacity != len(header) + pos:
        # The padding entry lengthens the header, which shrinks the padding: settle in a few rounds.
        pad = capacity - pos - len(header)
        for _ in range(4):
            if pad <= 0:
                break
            header = _header(entries, pad)
            if capacity - pos - len(header) == pad:
                break
            pad = capacity - pos - len(header)
        if pad <= 0 or len(header) + pos + pad != capacity:
            raise ValueError(f"a bucket of {len(header) + pos} bytes does not fit a {capacity}-byte buffer")
    offsets = [(name, t, len(header) + entries[name]["data_offsets"][0]) for name, t in order]
    return Layout(header, offsets, len(header) + pos)


def write(layout: Layout, buf: torch.Tensor) -> int:
    """Copies header and tensors into `buf` (a flat uint8 tensor on any device); returns the bytes used."""
    head = torch.frombuffer(bytearray(layout.header), dtype=torch.uint8)
    buf[: len(layout.header)].copy_(head)
    for _, t, off in layout.offsets:
        flat = t.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        buf[off : off + nbytes(t)].copy_(flat.view(torch.uint8), non_blocking=True)
    return layout.size


def header_length(prefix: bytes | bytearray | memoryview) -> int:
    return 8 + int.from_bytes(bytes(prefix[:8]), "little")


def parse_header(head: bytes | bytearray | memoryview) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """(name, dtype, shape, absolute start, absolute end) of every tensor but the padding."""
    n = int.from_bytes(bytes(head[:8]), "little")
    entries = json.loads(bytes(head[8 : 8 + n]))
    out = []
    for name, e in entries.items():
        if name in (PADDING, "__metadata__"):
            continue
        start, end = e["data_offsets"]
        out.append((name, SAFETENSORS[e["dtype"]], e["shape"], 8 + n + start, 8 + n + end))
    return out


def read(buf: torch.Tensor, head: bytes | bytearray | memoryview | None = None) -> Bucket:
    """Views (no copy) of the tensors in a flat uint8 buffer. `head`: the header bytes when the buffer is
    not on the CPU (a device tensor cannot be parsed in place)."""
    if head is None:
        head = memoryview(buf[: header_length(buf[:8].numpy().tobytes())].numpy())
    out: Bucket = []
    for name, dtype, shape, start, end in parse_header(head):
        raw = buf[start:end]
        if start % dtype.itemsize:
            raw = raw.clone()  # a file from another writer may misalign a dtype: copy that one tensor
        out.append((name, raw.view(dtype).view(shape)))
    return out
