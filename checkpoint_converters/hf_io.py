"""Streaming access to Hugging Face safetensors checkpoints (read tensor by tensor; write sharded + index)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_rl.errors import UserError

# Buffers some exporters write that are not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpoint:
    """Reads tensors lazily from model.safetensors or a sharded index; errors name file and tensor."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{index} is not a valid safetensors index ({exc}).") from exc
        elif single.is_file():
            weight_map = None
        else:
            raise UserError(f"No model.safetensors or model.safetensors.index.json in {self.dir}.")
        self._handles = {}
        files = sorted(set(weight_map.values())) if weight_map else [single.name]
        self.location: dict[str, str] = {}
        for f in files:
            path = self.dir / f
            if not path.is_file():
                raise UserError(f"{index} lists {f}, which does not exist in {self.dir}.")
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
            except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
                raise UserError(
                    f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted."
                ) from exc
            self._handles[f] = handle
            for n in names:
                self.location[n] = f
        if weight_map:
            for n, f in weight_map.items():
                if n not in self.location:
                    raise UserError(f"{index} maps tensor {n!r} to {f}, but that file does not contain it.")

    def names(self) -> list[str]:
        return [n for n in self.location if not n.endswith(IGNORED_SUFFIXES)]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.location:
            raise UserError(f"Tensor {name!r} is missing from the checkpoint in {self.dir}.")
        f = self.location[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as exc:
            raise UserError(
                f"Cannot read tensor {name!r} from {self.dir / f} ({exc}); the file may be "
                f"truncated or corrupted."
            ) from exc


class ShardedWriter:
    """Writes (name, tensor) pairs into numbered safetensors shards of at most `shard_bytes`, then an index."""

    def __init__(self, directory: Path, shard_bytes: int = 2 * 1024**3) -> None:
        self.dir, self.shard_bytes = directory, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0

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
        tmp_name = f"shard-{idx:05d}.safetensors"
        save_file(self.pending, str(self.dir / tmp_name), metadata={"format": "pt"})
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


_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def write_hf_checkpoint(
    items,
    template_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Streams (name, tensor) pairs into sharded safetensors plus config/tokenizer files copied from
    `template_dir`. Written to `<out>.tmp` and renamed into place only when complete."""
    import shutil

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"Output directory {out} already exists; pass --overwrite to replace it.")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ShardedWriter(tmp, shard_bytes)
    for name, tensor in items:
        writer.add(name, tensor)
    writer.close()
    for f in _SIDE_FILES:
        if (Path(template_dir) / f).is_file():
            shutil.copy2(Path(template_dir) / f, tmp / f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
