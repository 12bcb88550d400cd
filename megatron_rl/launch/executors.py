"""The one place that builds NeMo-Run executors: LocalExecutor for cluster.launcher=local, SlurmExecutor for
cluster.launcher=slurm. The CLI and the nightly runner both launch through it, and both run the same task:
the CLI itself with `--in-process`, so what a job runs is what `python -m megatron_rl.launch ... --in-process`
runs here.

NeMo-Run keeps its experiments (metadata, task logs) under $NEMORUN_HOME, by default ~/.nemo_run; it reads
the variable once, when it is first imported.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError

IN_PROCESS = "--in-process"
# Overrides the launcher sets itself on the task's command line.
_LAUNCHER_KEYS = ("cluster.launcher=", "run.dir=")


def nemo_run() -> Any:
    """`import nemo_run`, without the deprecation warnings its dependencies print while importing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nemo_run

    return nemo_run


def cli_command(algo: str, recipe: str, overrides: list[str], python: str = sys.executable) -> list[str]:
    """The command a launched task runs: this CLI, same recipe and overrides, run in the task's own process
    (`--in-process`)."""
    return [python, "-m", "megatron_rl.launch", algo, f"conf={recipe}", *overrides, IN_PROCESS]


def task_overrides(overrides: list[str], run_dir: str | Path) -> list[str]:
    """The user's overrides minus the ones the launcher decides, plus the run directory made absolute (a
    task's working directory may differ) and the local launcher (the task runs the training itself: here, or
    on Slurm on the Ray head node)."""
    kept = [o for o in overrides if not o.lstrip("+").startswith(_LAUNCHER_KEYS)]
    return [*kept, f"run.dir={Path(run_dir).absolute()}", "cluster.launcher=local"]


def build_executor(
    launcher: str, cfg: Any | None = None, env: dict[str, str] | None = None, setup_lines: str = ""
) -> Any:
    """The NeMo-Run executor for `launcher` (a config's cluster.launcher). `env` is added to the task's
    environment; a Slurm executor is built from `cfg` (its cluster section and run directory), and
    `setup_lines` run in its batch script before srun (the Ray-on-Slurm node program)."""
    if launcher == "local":
        return nemo_run().LocalExecutor(ntasks_per_node=1, env_vars=dict(env or {}))
    if launcher == "slurm" and cfg is not None:
        return _slurm_executor(cfg, env or {}, setup_lines)
    raise UserError(f"cluster.launcher={launcher!r}: choose local or slurm (a Slurm job needs its config).")


# SlurmExecutor fields taken as they are from the cluster section.
_SLURM_FIELDS = ("account", "partition", "qos", "time", "nodes", "gpus_per_node", "container_image")


def _slurm_executor(cfg: Any, env: dict[str, str], setup_lines: str) -> Any:
    """One task per node, whole nodes, inside the container; NeMo-Run's job directory is <run>/slurm/."""
    run = nemo_run()
    from nemo_run.core.packaging.base import Packager
    from nemo_run.core.tunnel.client import LocalTunnel

    c = cfg.cluster
    run_dir = Path(cfg.run.dir).absolute()
    executor = run.SlurmExecutor(
        **{name: c[name] for name in _SLURM_FIELDS},
        ntasks_per_node=1,
        exclusive=True,
        container_mounts=[*c.mounts, f"{run_dir}:{run_dir}"],
        env_vars={k: shlex.quote(str(v)) for k, v in {**c.env, **env}.items()},
        setup_lines=setup_lines,
        job_name_prefix="megatron-rl-",
        tunnel=LocalTunnel(job_dir=str(run_dir)),
        packager=Packager(),  # the code is in the container (cluster.workdir), nothing to ship
        poll_estimated_start_time=False,
    )
    executor.job_dir = str(run_dir / "slurm")
    return executor
