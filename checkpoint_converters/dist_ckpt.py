"""Megatron distributed checkpoints (torch_dist) in one process: the model description and the reader.

A torch_dist checkpoint stores every parameter by its *global* shape (layers stacked on a leading axis,
experts on the next), so it does not depend on the TP/PP/EP layout that wrote it. We therefore describe it
with Megatron's own `sharded_state_dict()` of the model at TP=PP=EP=1, built on the meta device (no
memory). Writing is in dist_writer.py (Megatron's `dist_checkpointing.save`, tensors produced on demand);
reading here fetches one layer's region of each stored global tensor at a time, through
torch.distributed.checkpoint's resharding reads, whatever layout wrote the chunks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoint_converters.mapping import ArchMapping, named_weights, resolve
from checkpoint_converters.transforms import to_hf
from megatron_rl.errors import UserError


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """A world-1 torch.distributed group with TP=PP=EP=1 (what the meta model and dist_checkpointing need);
    torn down on exit if this call created it."""
    import torch.distributed as dist

    from megatron_rl import distributed, platform
    from megatron_rl.parallel import ParallelConfig

    if not platform.use_cpu():
        raise RuntimeError(
            "offline conversion runs on the CPU with Megatron's local layer spec; use the checkpoint-converters "
            "CLI (it hides GPUs) or set CUDA_VISIBLE_DEVICES='' before importing torch"
        )
    created = not dist.is_initialized()
    if not created and dist.get_world_size() != 1:
        raise RuntimeError("offline conversion runs in a single process (world size 1)")
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        yield
    finally:
        if created:
            distributed.teardown()
        else:
            distributed.destroy_model_parallel()


def meta_model(hf_config: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """The whole model at TP=PP=EP=1 on the meta device: (GPTModel, TransformerConfig, ArchInfo).

    Mirrors megatron_rl.models.builder with pre/post-process both on; parameters take no memory."""
    from megatron_rl.models.builder import gpt_model, mtp_built
    from megatron_rl.models.hf_config import transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig

    cfg, info = transformer_config_from_hf(hf_config, ParallelConfig(), dtype, perform_initialization=False)
    with torch.device("meta"):
        model = gpt_model(cfg, info, pre_process=True, post_process=True)
    mtp_built(cfg)
    return model, cfg, info


@dataclass(frozen=True)
class ParamMap:
    """One Megatron parameter (TP=1, global name) and the HF tensors it is made of."""

    name: str
    kind: str
    hf_names: tuple[str, ...]
    shape: tuple[int, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    nbytes: int
    buffer: bool = False  # kept in its own dtype (fp32)
    copies: tuple[tuple[str, ...], ...] = ()  # per HF name, the HF tensors that duplicate it (MTP's)


def param_maps(model: Any, mapping: ArchMapping) -> list[ParamMap]:
    cfg = model.config
    out = []
    for name, p in named_weights(model, mapping):
        res = resolve(mapping, name, 0, 0, model.share_embeddings_and_output_weights, cfg.num_layers)
        if res is None:
            continue
        hf = to_hf(res.rule.kind, [p], cfg.num_attention_heads, cfg.num_query_groups)
        copies = tuple(tuple(mapping.copies_of(h, cfg.num_layers, model.mtp_layers)) for h in res.hf_names)
        out.append(
            ParamMap(
                name,
                res.rule.kind,
                res.hf_names,
                tuple(p.shape),
                tuple(tuple(t.shape) for t in hf),
                p.numel() * p.element_size(),
                res.rule.buffer,
                copies,
            )
        )
    return out


# What a torch.distributed.checkpoint `.metadata` pickle may reference: its own metadata dataclasses and
# enums, torch sizes/dtypes and paths. Anything else (a callable smuggled into the pickle) is refused.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "WriteItem",
        "WriteItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "megatron.core.dist_checkpointing.strategies.torch": {"MCoreMetadata", "MCoreSavePlan"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def checkpoint_metadata(directory: Path) -> Any:
    """torch.distributed.checkpoint metadata (keys, global shapes, dtypes, where each chunk is stored) of a
    torch_dist checkpoint. The file is a pickle; it is read with an allowlist of the classes it may hold."""
    path = directory / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except Exception as exc:  # missing, truncated or tampered files raise several types
        raise UserError(
            f"Cannot read the checkpoint metadata {path} ({type(exc).__name__}: {exc}); the checkpoint is "
            f"incomplete or corrupted."
        ) from exc


class TorchDistReader:
    """Reads whole parameters of `model` (meta, TP=1) from a torch_dist checkpoint, a few at a time.

    Each parameter's region of the stored global tensor (its layer/expert slot) is read with
    torch.distributed.checkpoint's own resharding reads, whatever layout wrote the chunks."""

    def __init__(self, directory: Path, model: Any) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = directory
        self.sd = {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
        self.metadata = checkpoint_metadata(directory)
        self.storage = FileSystemReader(str(directory))
        self.storage.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.dtypes: dict[str, torch.dtype] = {}
        stored = self.metadata.state_dict_metadata
        for name in self.sd:
            for st in _sharded_tensors(_built(self.sd[name], None)):
                meta = stored.get(st.key)
                if meta is None or not hasattr(meta, "size"):
                    raise UserError(
                        f"The checkpoint in {directory} has no tensor {st.key!r} (needed for {name}): it was "
                        f"written for another model or architecture."
                    )
                if tuple(meta.size) != tuple(st.global_shape):
                    raise UserError(
                        f"Tensor {st.key!r} in {directory} has global shape {list(meta.size)}, but the model in "
                        f"its config needs {list(st.global_shape)}."
                    )
                self.dtypes[name] = meta.properties.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        out, merges, targets, items = {}, {}, {}, []
        for name in names:
            entry = self.sd[name]
            full = torch.empty(entry.data.shape, dtype=self.dtypes[name])
            built = _built(entry, full)
            for st in _sharded_tensors(built):
                # The stored chunk carries the prepended layer/expert axes as leading singleton dims.
                region = ChunkStorageMetadata(
                    offsets=torch.Size(st.global_offset),
                    sizes=torch.Size((1,) * st.prepend_axis_num + tuple(st.local_shape)),
                )
                reads = create_read_items_for_chunk_list(
                    st.key, self.metadata.state_dict_metadata[st.key], [region]
                )
                whole = st.data.view(tuple(region.sizes))
                for item in reads:
                    targets[id(item)] = whole
                    if not self._read_stored_chunk(item, _Targets(targets).resolve_tensor(item)):
                        items.append(item)
            out[name] = full
            if not isinstance(entry, ShardedTensor):
                merges[name] = (entry, built)
        try:
            if items:  # parts of stored chunks (another layout wrote them): torch's resharding reads
                self.storage.read_data(LoadPlan(items), _Targets(targets)).wait()
        except Exception as exc:
            raise UserError(
                f"Cannot read {names[0]}{' and others' if len(names) > 1 else ''} from {self.dir} "
                f"({type(exc).__name__}: {exc}); the checkpoint files may be truncated or corrupted."
            ) from exc
        for name, (entry, built) in merges.items():
            # A factory (SwiGLU fc1) stores its tensor as several chunks. When they are views tiling the
            # buffer they were read into, that buffer is the tensor; otherwise merge the way Megatron does.
            chunks = [st.data for st in _sharded_tensors(built)]
            full = out[name]
            tiled = sum(c.numel() for c in chunks) == full.numel() and all(
                c.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() for c in chunks
            )
            if not tiled:
                dict_list_map_inplace(lambda st: st.data, built)
                out[name] = entry.merge_fn(built)
        return out

    def _read_stored_chunk(self, item: Any, target: torch.Tensor) -> bool:
        """Reads a whole stored chunk straight into `target` when that is what the item asks for: from the
        torch.save archive it is stored as, its tensor's metadata (loaded onto the meta device, so no data)
        and the position of its one storage record. torch's reader would load the chunk into a new tensor
        and copy it over, holding it twice. False: not that case, use the general path."""
        stored = self.metadata.state_dict_metadata[item.storage_index.fqn]
        chunk = next((c for c in stored.chunks if tuple(c.offsets) == tuple(item.storage_index.offset)), None)
        if (
            chunk is None
            or any(item.storage_offsets)
            or tuple(item.lengths) != tuple(chunk.sizes)
            or not target.is_contiguous()
        ):
            return False
        info = self.metadata.storage_data[item.storage_index]
        if getattr(info, "transform_descriptors", None):
            return False
        try:
            with open(self.dir / info.relative_path, "rb") as f:
                meta = torch.load(
                    _FileSlice(f, info.offset, info.length), map_location="meta", weights_only=True
                )
                archive = zipfile.ZipFile(_FileSlice(f, info.offset, info.length))
                records = [r for r in archive.infolist() if "/data/" in r.filename]
                order = [r for r in archive.infolist() if r.filename.endswith("/byteorder")]
                if (
                    not isinstance(meta, torch.Tensor)
                    or meta.dtype != target.dtype
                    or meta.shape != target.shape
                    or not meta.is_contiguous()
                    or meta.storage_offset() != 0
                    or len(records) != 1
                    or records[0].compress_type != zipfile.ZIP_STORED
                    or records[0].file_size != target.nbytes
                    or (
                        order
                        and os.pread(f.fileno(), 6, _record_start(f, info.offset, order[0])) != b"little"
                    )
                ):
                    return False
                start = _record_start(f, info.offset, records[0])
                view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
                done = 0
                while done < len(view):
                    n = os.preadv(f.fileno(), [view[done:]], start + done)
                    if n <= 0:
                        raise EOFError(
                            f"{self.dir / info.relative_path} ends inside {item.storage_index.fqn}"
                        )
                    done += n
        except Exception as exc:
            raise UserError(
                f"Cannot read {item.storage_index.fqn} from {self.dir / info.relative_path} "
                f"({type(exc).__name__}: {exc}); the checkpoint files may be truncated or corrupted."
            ) from exc
        return True


def _record_start(f: Any, base: int, record: zipfile.ZipInfo) -> int:
    """File position of a stored zip record's data: after its 30-byte local header, name and extra field.
    (Read raw: the chunks are written without zip CRCs, which zipfile.read would insist on.)"""
    header = os.pread(f.fileno(), 30, base + record.header_offset)
    return base + record.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window [offset, offset+length) of an open file."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = max(0, min(len(buf), self.length - self.pos))
        data = os.pread(self.f.fileno(), n, self.offset + self.pos)
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


class _Targets:
    """The part of torch.distributed.checkpoint's LoadPlanner interface FileSystemReader.read_data calls."""

    def __init__(self, targets: dict[int, torch.Tensor]) -> None:
        self.targets = targets

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        target = self.targets[id(item)]
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        pass

    def load_bytes(self, item: Any, value: Any) -> None:
        pass


def _built(entry: Any, data: torch.Tensor | None) -> Any:
    """What a state-dict entry stores (a factory builds its chunks), on `data` (None: the meta data)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    entry = copy.copy(entry)
    if data is not None:
        entry.data = data
        if isinstance(entry, ShardedTensor):
            entry.dtype = data.dtype
    return entry.build() if isinstance(entry, ShardedTensorFactory) else entry


def _sharded_tensors(built: Any) -> list[Any]:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [st for st in nested_values({"x": built}) if isinstance(st, ShardedTensor)]
