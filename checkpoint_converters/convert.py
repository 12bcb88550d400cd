"""Offline conversions HF <-> Megatron torch_dist, streamed tensor by tensor in one process.

A converted Megatron checkpoint directory holds:
    model/          Megatron distributed checkpoint (torch_dist), loadable at any TP/PP/EP layout
    hf_config/      the source config.json and tokenizer files (so the way back needs nothing else)
    conversion.json architecture, source, layout, dtypes
Every input is checked (architecture, layout, tensor names and shapes, file integrity) before anything is
written; outputs are assembled in `<out>.tmp` and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from checkpoint_converters.hf_io import (
    SIDE_FILES,
    HFCheckpoint,
    StreamingHFWriter,
    commit_output,
    copy_side_files,
    prepare_output,
)
from checkpoint_converters.mapping import mapping_for
from checkpoint_converters.storage import METADATA_ALLOWANCE, files_bytes, storage_error
from checkpoint_converters.transforms import to_megatron_pieces
from megatron_rl.dtypes import HF_NAMES, precision
from megatron_rl.errors import UserError


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:  # checked first: nothing else needs doing then
        raise UserError(f"Output directory {out} already exists; pass --overwrite to replace it.")


def _check_layout(hf: dict[str, Any], tp: int, pp: int, ep: int) -> dict[str, int]:
    from megatron_rl.models.hf_config import transformer_config_from_hf
    from megatron_rl.parallel import ParallelConfig

    # Raises a LayoutError naming the valid choices (e.g. tp among the divisors of the KV heads).
    transformer_config_from_hf(hf, ParallelConfig(tp=tp, pp=pp, ep=ep, etp=1 if ep > 1 else None))
    return {"tp": tp, "pp": pp, "ep": ep}


def _check_hf_tensors(ckpt: HFCheckpoint, maps: list[Any], tied: bool, arch: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected: checked before writing."""
    expected = {
        name: shape
        for m in maps
        for h, shape, copies in zip(m.hf_names, m.hf_shapes, m.copies or [()] * len(m.hf_names))
        for name in (h, *copies)
    }
    have = set(ckpt.names())
    missing = [h for h in expected if h not in have]
    if missing:
        raise UserError(
            f"Tensor {missing[0]!r} is missing from the checkpoint in {ckpt.dir} ({len(missing)} of the "
            f"{len(expected)} tensors {arch} needs are missing)."
        )
    extra = sorted(have - set(expected) - ({"lm_head.weight"} if tied else set()))
    if extra:
        raise UserError(
            f"{len(extra)} unexpected tensor(s) in {ckpt.dir} for {arch}, e.g. {extra[0]!r} in "
            f"{ckpt.info(extra[0]).file.name}: the checkpoint does not match its config.json."
        )
    for h, shape in expected.items():
        info = ckpt.info(h)
        if info.shape != shape:
            raise UserError(
                f"Tensor {h!r} in {info.file} has shape {list(info.shape)}, but config.json for {arch} "
                f"implies {list(shape)}."
            )


def hf_to_megatron(
    hf_dir: str,
    out: str,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: str = "fp32",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """HF safetensors -> Megatron torch_dist. The written checkpoint is the same whatever the layout (it
    stores global tensors); tp/pp/ep are checked against the model and recorded as its intended layout."""
    from checkpoint_converters.dist_ckpt import meta_model, param_maps, single_process_world
    from checkpoint_converters.dist_writer import write_torch_dist
    from megatron_rl.models.hf_config import architecture_of, load_hf_config
    from megatron_rl.progress import byte_progress

    _refuse_existing(Path(out), overwrite)
    hf = load_hf_config(hf_dir)
    arch = architecture_of(hf)
    mapping = mapping_for(arch)
    torch_dtype = precision(dtype)
    layout = _check_layout(hf, tp, pp, ep)
    ckpt = HFCheckpoint(hf_dir)
    out_path = Path(out)
    with single_process_world():
        model, cfg, info = meta_model(hf, torch_dtype)
        maps = param_maps(model, mapping)
        _check_hf_tensors(ckpt, maps, info.tie_word_embeddings, arch)
        by_name = {m.name: m for m in maps}
        heads, groups = cfg.num_attention_heads, cfg.num_query_groups
        needed = sum(m.nbytes for m in maps) + files_bytes(hf_dir, SIDE_FILES) + METADATA_ALLOWANCE
        tmp = prepare_output(out_path, overwrite, needed)
        try:
            with byte_progress(f"hf-to-megatron {arch}", sum(m.nbytes for m in maps), progress) as advance:

                def param_pieces(name: str) -> list[torch.Tensor]:
                    m = by_name[name]
                    parts = [ckpt.mapped(h) for h in m.hf_names]
                    pieces = to_megatron_pieces(m.kind, parts, 0, 1, heads, groups)
                    return [p.to(torch.float32 if m.buffer else torch_dtype) for p in pieces]

                write_torch_dist(
                    tmp / "model", model, param_pieces, lambda name: advance(by_name[name].nbytes)
                )
            (tmp / "hf_config").mkdir()
            copy_side_files(hf_dir, tmp / "hf_config")
            source_dtype = {
                str(ckpt.info(h).dtype).removeprefix("torch.") for m in maps if not m.buffer for h in m.hf_names
            }
            meta = {
                "architecture": arch,
                "source": str(Path(hf_dir).resolve()),
                "dtype": dtype,
                "hf_dtype": source_dtype.pop() if len(source_dtype) == 1 else None,
                "layout": layout,
                "format": "torch_dist",
                "parameters": sum(int(torch.Size(m.shape).numel()) for m in maps),
            }
            (tmp / "conversion.json").write_text(json.dumps(meta, indent=2))
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if error := storage_error(exc, out_path, needed):
                raise error from None
            raise
        finally:
            ckpt.close()
    return commit_output(tmp, out_path)


def read_megatron_dir(
    megatron_dir: str, hf_config_dir: str | None = None
) -> tuple[Path, Path, dict[str, Any]]:
    """(torch_dist dir, dir with config.json + tokenizer, conversion metadata) of a converted directory,
    or of a bare torch_dist checkpoint (e.g. a training checkpoint) plus `hf_config_dir`."""
    root = Path(megatron_dir)
    if (root / "conversion.json").is_file():
        meta = json.loads((root / "conversion.json").read_text())
        ckpt, cfg = root / "model", Path(hf_config_dir) if hf_config_dir else root / "hf_config"
    elif (root / "metadata.json").is_file():
        if hf_config_dir is None:
            raise UserError(
                f"{root} is a bare Megatron checkpoint without the HF config it was made from; pass "
                f"--hf-config DIR (a directory with the model's config.json and tokenizer files)."
            )
        meta, ckpt, cfg = {}, root, Path(hf_config_dir)
    else:
        raise UserError(
            f"{root} is not a Megatron checkpoint (expected conversion.json + model/ from hf-to-megatron, or "
            f"a torch_dist directory with metadata.json)."
        )
    if not (ckpt / "metadata.json").is_file():
        raise UserError(f"{ckpt} is not a Megatron distributed checkpoint (no metadata.json).")
    return ckpt, cfg, meta


def _output_dtype(dtype: str | None, meta: dict[str, Any], hf: dict[str, Any]) -> torch.dtype | None:
    if dtype is not None:
        return precision(dtype)
    # Back to the dtype the HF model had, so HF -> Megatron -> HF is exact.
    name = meta.get("hf_dtype") or hf.get("dtype") or hf.get("torch_dtype")
    return HF_NAMES.get(name)


def megatron_to_hf(
    megatron_dir: str,
    out: str,
    hf_config_dir: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = 2 * 1024**3,
    progress: bool = True,
) -> Path:
    """Megatron torch_dist -> HF safetensors shards + index + config + tokenizer, one layer at a time."""
    from checkpoint_converters.dist_ckpt import TorchDistReader, meta_model, param_maps, single_process_world
    from checkpoint_converters.transforms import to_hf
    from megatron_rl.models.hf_config import architecture_of, load_hf_config
    from megatron_rl.progress import byte_progress

    _refuse_existing(Path(out), overwrite)
    ckpt_dir, cfg_dir, meta = read_megatron_dir(megatron_dir, hf_config_dir)
    hf = load_hf_config(cfg_dir)
    arch = architecture_of(hf)
    mapping = mapping_for(arch)
    out_dtype = _output_dtype(dtype, meta, hf)
    out_path = Path(out)
    with single_process_world():
        model, cfg, _ = meta_model(hf, torch.float32)
        reader = TorchDistReader(ckpt_dir, model)
        maps = param_maps(model, mapping)
        plan = [
            (name, shape, reader.dtypes[m.name] if m.buffer or out_dtype is None else out_dtype)
            for m in maps
            for h, shape, copies in zip(m.hf_names, m.hf_shapes, m.copies or [()] * len(m.hf_names))
            for name in (h, *copies)
        ]
        needed = sum(math.prod(shape) * dt.itemsize for _, shape, dt in plan)
        needed += files_bytes(cfg_dir, SIDE_FILES) + METADATA_ALLOWANCE
        tmp = prepare_output(out_path, overwrite, needed)
        try:
            writer = StreamingHFWriter(tmp, plan, shard_bytes)
            heads, groups = cfg.num_attention_heads, cfg.num_query_groups
            with byte_progress(f"megatron-to-hf {arch}", writer.total, progress) as advance:
                for m, tensor in _read_ahead(reader, maps):
                    copies = m.copies or [()] * len(m.hf_names)
                    for h, t, dups in zip(m.hf_names, to_hf(m.kind, [tensor], heads, groups), copies):
                        t = t.to(out_dtype) if out_dtype is not None and not m.buffer else t
                        for name in (h, *dups):
                            writer.write(name, t)
                            advance(t.numel() * t.element_size())
                    del tensor
            writer.close()
            copy_side_files(cfg_dir, tmp)
            if out_dtype is not None:
                _set_config_dtype(tmp / "config.json", out_dtype)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if error := storage_error(exc, out_path, needed):
                raise error from None
            raise
    return commit_output(tmp, out_path)


def _read_ahead(reader: Any, maps: list[Any]) -> Iterator[tuple[Any, torch.Tensor]]:
    """(ParamMap, tensor) in order, the next parameter being read in a background thread meanwhile (file
    reads release the GIL), so at most two parameters are held."""
    from concurrent.futures import ThreadPoolExecutor

    from checkpoint_converters.dist_writer import release_free_memory

    with ThreadPoolExecutor(1, thread_name_prefix="ckpt-read") as pool:
        pending = pool.submit(reader.read, [maps[0].name]) if maps else None
        for i, m in enumerate(maps):
            loaded = pending.result()[m.name]
            pending = pool.submit(reader.read, [maps[i + 1].name]) if i + 1 < len(maps) else None
            yield m, loaded
            del loaded
            release_free_memory()


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
    if any(cfg.get(k) != name for k in keys):  # untouched otherwise, so a round trip gives back the same file
        cfg.update({k: name for k in keys})
        path.write_text(json.dumps(cfg, indent=2) + "\n")
