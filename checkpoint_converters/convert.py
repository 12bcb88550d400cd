"""Offline conversions, run in a local world of Megatron ranks (one per shard of the target layout).

A converted Megatron checkpoint directory holds:
    model/          Megatron distributed checkpoint (torch_dist), loadable at any TP/PP/EP layout
    hf_config/      the source config.json and tokenizer files (so the way back needs nothing else)
    conversion.json architecture, source, layout, dtype
Everything is assembled in `<out>.tmp` and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_rl import distributed
from megatron_rl.errors import UserError
from megatron_rl.parallel import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layout_world(tp: int, pp: int, ep: int) -> tuple[ParallelConfig, int]:
    """Expert TP is 1 for conversions, so experts spread over data-parallel ranks: world = pp * lcm(tp, ep)."""
    par = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=1 if ep > 1 else None)
    return par, pp * math.lcm(tp, ep)


def _build(hf_config: dict[str, Any], par: ParallelConfig, dtype: str) -> Any:
    from megatron_rl.policy.core import MegatronPolicy

    distributed.initialize(par, seed=0)
    return MegatronPolicy(hf_config, par, dtype=DTYPES[dtype], train=False)


def _hf_to_megatron_rank(rank: int, hf_dir: str, tmp: str, par: ParallelConfig, dtype: str) -> None:
    from megatron_rl.models.hf_config import load_hf_config
    from megatron_rl.policy.checkpoint import save_checkpoint

    policy = _build(load_hf_config(hf_dir), par, dtype)
    policy.load_hf(hf_dir)
    save_checkpoint(policy, Path(tmp) / "model", with_optimizer=False)
    distributed.destroy_model_parallel()


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise UserError(f"Output directory {out} already exists; pass --overwrite to replace it.")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def hf_to_megatron(
    hf_dir: str, out: str, tp: int = 1, pp: int = 1, ep: int = 1, dtype: str = "fp32", overwrite: bool = False
) -> Path:
    from checkpoint_converters.hf_io import _SIDE_FILES, HFCheckpoint
    from checkpoint_converters.live import check_no_unexpected
    from checkpoint_converters.mapping import mapping_for
    from megatron_rl.models.hf_config import architecture_of, load_hf_config, transformer_config_from_hf
    from megatron_rl.parallel import validate_layout

    hf = load_hf_config(hf_dir)
    arch = architecture_of(hf)
    par, world = layout_world(tp, pp, ep)
    cfg, info = transformer_config_from_hf(hf, par)
    validate_layout(par, info.shape(cfg), world)
    # Fail on a bad source before any process starts or anything is written.
    check_no_unexpected(HFCheckpoint(hf_dir), mapping_for(arch), hf)
    out_path = Path(out)
    tmp = _prepare_out(out_path, overwrite)
    try:
        distributed.spawn(_hf_to_megatron_rank, world, hf_dir, str(tmp), par, dtype)
        (tmp / "hf_config").mkdir()
        for f in _SIDE_FILES:
            if (Path(hf_dir) / f).is_file():
                shutil.copy2(Path(hf_dir) / f, tmp / "hf_config" / f)
        meta = {
            "architecture": arch,
            "source": str(Path(hf_dir).resolve()),
            "dtype": dtype,
            "saved_layout": {"tp": tp, "pp": pp, "ep": ep},
            "format": "torch_dist",
        }
        (tmp / "conversion.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(tmp, out_path)


def _read_megatron_dir(megatron_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from megatron_rl.models.hf_config import load_hf_config

    root = Path(megatron_dir)
    if not (root / "conversion.json").is_file() or not (root / "model" / "metadata.json").is_file():
        raise UserError(
            f"{root} is not a converted Megatron checkpoint (expected conversion.json and "
            f"model/metadata.json; create one with hf-to-megatron)."
        )
    return json.loads((root / "conversion.json").read_text()), load_hf_config(root / "hf_config")


def _megatron_to_hf_rank(rank: int, megatron_dir: str, tmp: str, par: ParallelConfig, dtype: str) -> None:
    from checkpoint_converters.hf_io import ShardedWriter
    from checkpoint_converters.live import export_hf_weights
    from megatron_rl.policy.checkpoint import load_checkpoint

    _, hf = _read_megatron_dir(megatron_dir)
    policy = _build(hf, par, dtype)
    load_checkpoint(policy, Path(megatron_dir) / "model", with_optimizer=False)
    writer = ShardedWriter(Path(tmp))
    for name, tensor in export_hf_weights(policy.model):
        writer.add(name, tensor)
    if rank == 0:
        writer.close()
    distributed.destroy_model_parallel()


def megatron_to_hf(
    megatron_dir: str, out: str, tp: int = 1, pp: int = 1, ep: int = 1, overwrite: bool = False
) -> Path:
    meta, _ = _read_megatron_dir(megatron_dir)
    par, world = layout_world(tp, pp, ep)
    out_path = Path(out)
    tmp = _prepare_out(out_path, overwrite)
    try:
        distributed.spawn(_megatron_to_hf_rank, world, megatron_dir, str(tmp), par, meta["dtype"])
        for f in (Path(megatron_dir) / "hf_config").iterdir():
            shutil.copy2(f, tmp / f.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(tmp, out_path)
