"""Run directory: resolved config, metrics JSONL, wandb, and step checkpoints (training.checkpoints).

Layout: <run>/config.yaml, <run>/metrics.jsonl, <run>/checkpoints/step_000010/, <run>/hf_export/, <run>/wandb/.
Only one process per run logs (the GRPO controller, or rank 0 of an SFT/DPO world).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_rl.training.checkpoints import CheckpointManager


class RunDir:
    def __init__(self, cfg: Any) -> None:
        from megatron_rl.config.compose import save_resolved

        self.cfg = cfg
        self.path = Path(cfg.run.dir or f"runs/{cfg.command}/{cfg.run.name}").resolve()
        check_owner(self.path, cfg.command)
        save_resolved(cfg, self.path)
        self.ckpt_root = self.path / "checkpoints"
        self.checkpoints = CheckpointManager(self.ckpt_root, cfg.run.keep_last)
        self._wandb = None

    # ---------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    def should_resume(self) -> Path | None:
        return self.checkpoints.resume_from(self.cfg.run.resume)

    def save_checkpoint(self, step: int, save_policy: Callable[[str], None], state: dict[str, Any]) -> Path:
        """From a single controller: `save_policy` writes every rank's shards (e.g. through Ray actors)."""
        return self.checkpoints.save(step, save_policy, state)

    @staticmethod
    def trainer_state(ckpt: Path) -> dict[str, Any]:
        return CheckpointManager.state(ckpt)

    # ---------------------------------------------------------------- metrics
    def start_logging(self, resume_step: int) -> None:
        metrics = self.path / "metrics.jsonl"
        if metrics.exists() and resume_step >= 0:
            # Drop rows past the checkpoint so a resumed run's file reads as one uninterrupted run.
            rows = [r for r in _whole_rows(metrics) if json.loads(r)["step"] <= resume_step]
            tmp = metrics.with_name(metrics.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in rows))
            os.replace(tmp, metrics)
        elif metrics.exists():
            metrics.unlink()
        if self.cfg.logger.wandb and self._wandb is None:  # once: an in-job restart calls this again
            self._wandb = _init_wandb(self.cfg, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        if self.cfg.logger.metrics_jsonl:
            append_line(self.path / "metrics.jsonl", json.dumps(row))
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def append_line(path: Path, line: str) -> None:
    """Appends `line` and its newline with one write to a file opened for appending, so a reader (the
    launcher's follower) or a kill sees the whole line or none of it, never half of one."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # a regular file takes it all at once unless the disk is full
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


def _whole_rows(metrics: Path) -> list[str]:
    """The rows of metrics.jsonl; a last line cut short (a run killed mid-write by an older version, a full
    disk) is dropped, said so. A broken line elsewhere is an error naming it: that file was edited."""
    from megatron_rl.errors import UserError

    lines = metrics.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as exc:
            if i == len(lines) - 1:
                print(f"{metrics}:{i + 1}: dropping a line cut short ({exc})", file=sys.stderr, flush=True)
                break
            raise UserError(
                f"{metrics}:{i + 1}: not valid JSON ({exc}); fix or remove that line, or start over with "
                "run.resume=false."
            ) from None
        rows.append(line)
    return rows


def check_owner(path: str | Path, command: str) -> None:
    """A run directory belongs to the command that started it (its config.yaml's `command`): resuming a GRPO
    run with `sft` would load the wrong trainer state, so that is an error, not a silent resume."""
    import yaml

    from megatron_rl.errors import UserError

    file = Path(path) / "config.yaml"
    if not file.is_file():
        return
    try:
        owner = (yaml.safe_load(file.read_text()) or {}).get("command")
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(
            f"{file} is not a readable run config ({type(exc).__name__}); move the run directory "
            "away or choose another run.dir."
        ) from None
    if owner is not None and owner != command:
        raise UserError(
            f"Run directory {path} belongs to a `{owner}` run (its config.yaml says command: {owner}); "
            f"`{command}` cannot resume it. Choose another run.dir or run.name."
        )


def _init_wandb(cfg: Any, path: Path) -> Any:
    import wandb
    from omegaconf import OmegaConf

    # Offline unless asked for online and a key is set; every wandb file stays inside the run directory.
    mode = cfg.logger.wandb_mode if os.environ.get("WANDB_API_KEY") else "offline"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        os.environ.setdefault(var, str(path / "wandb"))
    (path / "wandb").mkdir(exist_ok=True)
    return wandb.init(
        project=cfg.logger.project,
        name=cfg.run.name,
        dir=str(path),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
        reinit="finish_previous",
    )
