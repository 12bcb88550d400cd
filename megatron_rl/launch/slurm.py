"""Ray on Slurm through NeMo-Run: one sbatch job starts a Ray head and one worker per node inside the
container, then runs the same CLI (with `cluster.launcher=local`) on the head against that Ray cluster."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron_rl.errors import UserError

PROFILES = Path(__file__).resolve().parents[2] / "launch" / "clusters"
# NeMo-Run 0.11.1's ray.sub.j2 renders short srun flags with '=' ("-A=acct", "-p=batch"), which srun
# would read as an account named "=acct", and glues two flags in its attach helper. Fixed after rendering.
_TEMPLATE_FIXES = (
    ("-A=", "--account="),
    ("-p=", "--partition="),
    ("--no-container-mount-home--gres", "--no-container-mount-home --gres"),
)


def load_profile(name: str | None) -> dict[str, Any]:
    if not name:
        return {}
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise UserError(f"Unknown cluster profile {name!r} (no {path}); available: {known}.")
    return yaml.safe_load(path.read_text()) or {}


def _settings(cfg: Any) -> dict[str, Any]:
    """Profile values, overridden by whatever the recipe or command line set in `cluster`."""
    from omegaconf import OmegaConf

    merged = load_profile(cfg.cluster.profile)
    for k, v in OmegaConf.to_container(cfg.cluster).items():
        if v not in (None, [], {}) or k not in merged:
            merged[k] = v
    missing = [k for k in ("account", "partition", "container_image") if not merged.get(k)]
    if missing:
        raise UserError(
            f"Slurm launch needs cluster.{', cluster.'.join(missing)} (set them in a profile under "
            f"launch/clusters/ or on the command line)."
        )
    if not merged.get("gpus_per_node"):
        raise UserError("Slurm launch needs cluster.gpus_per_node > 0.")
    return merged


def render(cfg: Any, algo: str, recipe: str, overrides: list[str]) -> str:
    from nemo_run.core.execution.slurm import SlurmExecutor
    from nemo_run.core.tunnel.client import LocalTunnel
    from nemo_run.run.ray.slurm import SlurmRayRequest

    s = _settings(cfg)
    job_dir = str(Path(s.get("job_dir") or cfg.run.dir or f"runs/{cfg.run.name}").absolute() / "slurm")
    workdir = s.get("workdir") or "/opt/megatron-rl"
    inner = [o for o in overrides if not o.startswith("cluster.launcher=")]
    command = " ".join(
        [
            "cd",
            shlex.quote(workdir),
            "&&",
            "RAY_ADDRESS=auto",
            "python",
            "-m",
            "megatron_rl.launch",
            algo,
            f"conf={recipe}",
            *map(shlex.quote, inner),
            "cluster.launcher=local",
        ]
    )
    executor = SlurmExecutor(
        account=s["account"],
        partition=s["partition"],
        time=s["time"],
        nodes=s["nodes"],
        ntasks_per_node=1,
        gpus_per_node=s["gpus_per_node"],
        container_image=s["container_image"],
        container_mounts=list(s.get("mounts") or []),
        env_vars=dict(s.get("env") or {}),
        tunnel=LocalTunnel(job_dir=job_dir),
    )
    request = SlurmRayRequest(
        name=f"{algo}-{recipe}",
        cluster_dir=f"{job_dir}/{algo}-{recipe}",
        template_name="ray.sub.j2",
        executor=executor,
        command=command,
        workdir=workdir,
        launch_cmd=["sbatch", "--parsable"],
    )
    script = request.materialize()
    for bad, good in _TEMPLATE_FIXES:
        script = script.replace(bad, good)
    return script


def check_layout(cfg: Any) -> int:
    """The recipe's layout against its published architecture numbers and its world size; returns dp."""
    from omegaconf import OmegaConf

    from megatron_rl.config.schema import world_size
    from megatron_rl.parallel import ModelShape, ParallelConfig, validate_layout

    a = cfg.arch
    if not a:
        return 0
    shape = ModelShape(a["num_layers"], a["heads"], a["kv_heads"], a["vocab"], a.get("experts"))
    return validate_layout(
        ParallelConfig(**OmegaConf.to_container(cfg.policy.parallel)), shape, world_size(cfg)
    )


def submit(cfg: Any, algo: str, recipe: str, overrides: list[str], dry_run: bool) -> int:
    check_layout(cfg)
    script = render(cfg, algo, recipe, overrides)
    if dry_run:
        sys.stdout.write(script)
        print(
            f"[dry-run] {algo} conf={recipe}: {cfg.cluster.nodes} node(s); nothing submitted", file=sys.stderr
        )
        return 0
    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch is not on PATH: submit from a Slurm login node, or use --dry-run to see the script."
        )
    run_dir = Path(cfg.run.dir or f"runs/{cfg.run.name}")
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = run_dir / "slurm" / f"{algo}-{recipe}.sbatch"
    path.write_text(script)
    job = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False)
    if job.returncode:
        raise UserError(f"sbatch rejected {path}: {job.stderr.strip()}")
    print(f"submitted job {job.stdout.strip()} ({path})")
    return 0
