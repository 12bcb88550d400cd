"""Step checkpoints of a training run: atomic save, keep-last-N, resume detection, RNG and trainer state.

Layout: <root>/step_000010/{policy/, trainer_state.json, rng/rank_00000.safetensors ...}. A checkpoint is
assembled in step_N.tmp and renamed only when every part is written, so a crash (even kill -9) mid-save
leaves the previous checkpoint as the latest loadable one; `trainer_state.json` is written last and marks
a directory as complete.

Works from a single controller (GRPO: the policy saves through Ray actors, the controller writes the rest)
and from SPMD ranks (SFT/DPO: every rank calls `save`, rank 0 does the file-system work, barriers between).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_rl import platform
from megatron_rl.errors import UserError

_STEP = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = max(1, int(keep_last))

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        found = []
        for p in self.root.glob("step_*"):
            m = _STEP.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resume_from(self, resume: bool | None) -> Path | None:
        """resume=None: the latest checkpoint if any; True: it must exist; False: start fresh."""
        if resume is False:
            return None
        latest = self.latest()
        if resume and latest is None:
            raise UserError(f"run.resume=true but {self.root} holds no complete checkpoint.")
        return latest

    @staticmethod
    def state(ckpt: str | Path) -> dict[str, Any]:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())

    def save(
        self,
        step: int,
        save_policy: Callable[[str], None],
        state: dict[str, Any],
        *,
        rank: int = 0,
        barrier: Callable[[], None] = lambda: None,
        rng: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Every SPMD rank calls this with its own `rank` and `rng`; `save_policy` is collective."""
        final = self.root / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        save_policy(str(tmp / "policy"))
        if rng is not None:
            from safetensors.torch import save_file

            (tmp / "rng").mkdir(exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng" / f"rank_{rank:05d}.safetensors")
            )
        barrier()
        if rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for _, old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final


def capture_rng() -> dict[str, torch.Tensor]:
    """This rank's torch RNG streams: the default generator, CUDA's, and Megatron's model-parallel tracker
    (dropout inside tensor-parallel regions). Data order does not use them: it is a pure function of
    (seed, position)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch": torch.get_rng_state()}
    if not platform.use_cpu():
        out["cuda"] = torch.cuda.get_rng_state()
    for name, value in get_cuda_rng_tracker().get_states().items():
        out[f"tracker/{name}"] = value
    return out


def restore_rng(ckpt: str | Path, rank: int) -> bool:
    """Restores what `capture_rng` saved for `rank`; False when the checkpoint has no file for it (it was
    written by a different world size: weights and data position still resume exactly, RNG re-seeds)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from safetensors.torch import load_file

    path = Path(ckpt) / "rng" / f"rank_{rank:05d}.safetensors"
    if not path.is_file():
        return False
    saved = load_file(str(path))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and not platform.use_cpu():
        torch.cuda.set_rng_state(saved["cuda"])
    tracker = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("tracker/")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)
    return True
