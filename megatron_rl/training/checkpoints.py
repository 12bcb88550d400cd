"""Step checkpoints of a training run: atomic save, keep-last-N, resume detection, RNG and trainer state.

Layout: <root>/step_000010/{policy/, trainer_state.json, trainer_state.safetensors, rng/rank_00000.safetensors
...}. A checkpoint is assembled in step_N.tmp and renamed only when every part is written, so a crash (even
kill -9) mid-save leaves the previous checkpoint as the latest loadable one; `trainer_state.json` is written
last and marks a directory as complete. The trainer state's arrays (its "tensors" entry: asynchronous GRPO's
buffered samples) go to trainer_state.safetensors beside it, which the JSON lists by name.

Works from a single controller (GRPO: the policy saves through Ray actors, the controller writes the rest)
and from SPMD ranks (SFT/DPO: every rank calls `save`, rank 0 does the file-system work, barriers between).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from checkpoint_converters.hf_io import commit_output
from megatron_rl import platform
from megatron_rl.errors import UserError

_STEP = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
TENSORS_FILE = "trainer_state.safetensors"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = max(1, int(keep_last))

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """(step, path) of every `step_N` folder, complete or not, oldest first."""
        found = []
        for p in self.root.glob("step_*"):
            m = _STEP.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint (a readable trainer state), oldest first."""
        return [(step, p) for step, p in self._step_dirs() if problem(p) is None]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resume_from(self, resume: bool | None) -> Path | None:
        """resume=None: the latest complete checkpoint if any; True: it must exist; False: start fresh.

        Newer step folders that cannot be resumed from (no trainer_state.json: a save that did not finish; or
        one that is not readable) are moved aside, said so, and the previous complete one is used. When there
        is none, that is an error saying how to start over: starting at step 0 would overwrite them."""
        if resume is False:
            return None
        skipped: list[tuple[Path, str]] = []
        for _, path in reversed(self._step_dirs()):
            why = problem(path)
            if why is None:
                for bad, reason in skipped:
                    aside = _move_aside(bad)
                    _say(f"checkpoint {bad} {reason}: moved aside to {aside.name}; resuming from {path.name}")
                return path
            skipped.append((path, why))
        if skipped:
            bad, reason = skipped[0]
            raise UserError(
                f"Cannot resume: checkpoint {bad} {reason}, and {self.root} holds no earlier complete "
                "checkpoint. To start over, run again with run.resume=false (the new checkpoints replace it), "
                "or choose another run.name or run.dir."
            )
        if resume:
            raise UserError(f"run.resume=true but {self.root} holds no complete checkpoint.")
        return None

    @staticmethod
    def state(ckpt: str | Path) -> dict[str, Any]:
        """The trainer state of checkpoint `ckpt`; UserError naming the file when it is missing or unreadable."""
        why = problem(Path(ckpt))
        if why is not None:
            raise UserError(f"Cannot resume from checkpoint {ckpt}: it {why}.")
        state = json.loads((Path(ckpt) / STATE_FILE).read_text())
        if names := state.pop("tensors", None):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            file = Path(ckpt) / TENSORS_FILE
            try:
                state["tensors"] = load_file(str(file))
            except (OSError, SafetensorError) as exc:
                raise UserError(
                    f"Cannot resume from checkpoint {ckpt}: {file} is not readable ({exc})."
                ) from None
            if missing := sorted(set(names) - state["tensors"].keys()):
                raise UserError(f"Cannot resume from checkpoint {ckpt}: {file} lacks {', '.join(missing)}.")
        return state

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
            tensors = state.get("tensors") or {}
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
            rest = {k: v for k, v in state.items() if k != "tensors"}
            listed = {"tensors": sorted(tensors)} if tensors else {}
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **rest, **listed}))
            if final.exists() and (why := problem(final)) is not None:
                _say(f"checkpoint {final} {why}: replaced by this run's step {step}")
            commit_output(tmp, final)  # the old folder is removed only once the new one is in place
            for _, old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final


def problem(ckpt: Path) -> str | None:
    """Why step folder `ckpt` cannot be resumed from (a phrase: "has no ...", "holds ..."); None when it can."""
    file = ckpt / STATE_FILE
    if not file.is_file():
        return f"has no {STATE_FILE} (a save that did not finish)"
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"is not readable: {file} is not valid JSON ({exc})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"is not readable: {file} holds no step number"
    if state.get("tensors") and not (ckpt / TENSORS_FILE).is_file():
        return f"has no {TENSORS_FILE} (its {STATE_FILE} lists tensors)"
    return None


def _move_aside(path: Path) -> Path:
    """Renames `path` to `<name>.bad` (`.bad2`, ... when taken): out of the way of resume and of new saves."""
    for i in range(1, 1000):
        aside = path.with_name(f"{path.name}.bad{i if i > 1 else ''}")
        if not aside.exists():
            os.replace(path, aside)
            return aside
    raise UserError(f"Cannot move {path} aside: {path}.bad ... {path}.bad999 all exist; clean them up.")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
