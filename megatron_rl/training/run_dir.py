"""Run directory: resolved config, metrics JSONL, wandb, progress bar, and step checkpoints with resume.

Layout: <run>/config.yaml, <run>/metrics.jsonl, <run>/checkpoints/step_000010/{policy/, trainer_state.json},
<run>/hf_export/. A step checkpoint is assembled in step_N.tmp and renamed when complete, so a crash (even
kill -9) mid-save leaves the previous checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_STEP = re.compile(r"^step_(\d+)$")


class RunDir:
    def __init__(self, cfg: Any) -> None:
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.path = Path(cfg.run.dir or f"runs/{cfg.run.name}").resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self.ckpt_root = self.path / "checkpoints"
        self._wandb = None

    # ---------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        steps = []
        for p in self.ckpt_root.glob("step_*"):
            m = _STEP.match(p.name)
            if m and (p / "trainer_state.json").is_file():
                steps.append((int(m.group(1)), p))
        return max(steps)[1] if steps else None

    def should_resume(self) -> Path | None:
        latest = self.latest_checkpoint()
        if self.cfg.run.resume is False:
            return None
        if self.cfg.run.resume and latest is None:
            from megatron_rl.errors import UserError

            raise UserError(f"run.resume=true but {self.ckpt_root} holds no complete checkpoint.")
        return latest

    def save_checkpoint(self, step: int, save_policy: Callable[[str], None], state: dict[str, Any]) -> Path:
        final = self.ckpt_root / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_policy(str(tmp / "policy"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        kept = sorted((p for p in self.ckpt_root.glob("step_*") if _STEP.match(p.name)), key=lambda p: p.name)
        for old in kept[: -max(1, self.cfg.run.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def trainer_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((ckpt / "trainer_state.json").read_text())

    # ---------------------------------------------------------------- metrics
    def start_logging(self, resume_step: int) -> None:
        metrics = self.path / "metrics.jsonl"
        if metrics.exists() and resume_step >= 0:
            # Drop rows past the checkpoint so a resumed run's file reads as one uninterrupted run.
            rows = [r for r in metrics.read_text().splitlines() if r and json.loads(r)["step"] <= resume_step]
            metrics.write_text("".join(r + "\n" for r in rows))
        elif metrics.exists():
            metrics.unlink()
        if self.cfg.logger.wandb:
            self._wandb = _init_wandb(self.cfg, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        if self.cfg.logger.metrics_jsonl:
            with (self.path / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


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
