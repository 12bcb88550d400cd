"""Ray on Slurm through NeMo-Run: one sbatch job whose single srun step runs one task per node inside the
container; node 0 is the Ray head and runs the training command, the other nodes are Ray workers.

The sbatch script is NeMo-Run's own (SlurmExecutor + SlurmBatchRequest, the template its Experiments submit):
sbatch flags, container image and mounts, logs, requeue on failure. We do not use NeMo-Run's Ray template
(nemo_run/run/ray/templates/ray.sub.j2, 0.11.1): it hard-codes 8 GPUs per node, patches a file inside NeMo-RL's
container, prints the whole environment (secrets included) to the logs, needs jq, and renders `-A=acct`
short flags that srun reads as an account named "=acct". Our per-node program is megatron_rl.launch.ray_node.

Everything lands in the run directory: <run>/slurm/ holds the submitted script, the node program, sbatch and
srun logs; the training writes <run>/config.yaml, metrics and checkpoints. The run directory is mounted into
the container at the same path, so it must sit on a filesystem every node sees.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError
from megatron_rl.faults.preemption import REQUEST_FILE, REQUEUE_EXIT
from megatron_rl.launch.executors import build_executor, cli_command, nemo_run, task_overrides
from megatron_rl.planner import check_layout

__all__ = ["build_request", "check_layout", "render", "submit", "training_command"]

NODE_SCRIPT = "ray_node.sh"
_HEREDOC = "MEGATRON_RL_RAY_NODE"


def training_command(cfg: Any, algo: str, overrides: list[str], run_dir: Path) -> list[str]:
    """The command node 0 runs: the same CLI, same recipe and overrides, in-process against the Ray cluster."""
    return cli_command(algo, cfg.recipe, task_overrides(overrides, run_dir), python="python")


def _require(cfg: Any) -> None:
    c = cfg.cluster
    missing = [k for k in ("account", "container_image") if not c[k]]
    if missing:
        raise UserError(
            f"Slurm launch needs {', '.join('cluster.' + k for k in missing)}: set them in a cluster profile "
            f"(clusters/<name>.yaml, selected with cluster.profile=<name>; docs/clusters.md) or on the command "
            "line."
        )
    if not c.gpus_per_node:
        raise UserError("Slurm launch needs cluster.gpus_per_node > 0 (CPU runs use cluster.launcher=local).")


def build_request(cfg: Any, algo: str, overrides: list[str]) -> Any:
    """NeMo-Run's SlurmBatchRequest for this run (nothing touches the disk or the network)."""
    nemo_run()  # quiet import
    from nemo_run.core.execution.slurm import SlurmBatchRequest

    from megatron_rl.launch.ray_node import render_node_script

    _require(cfg)
    c = cfg.cluster
    run_dir = Path(cfg.run.dir).absolute()
    job_dir = run_dir / "slurm"
    node_script = render_node_script(
        training_command(cfg, algo, overrides, run_dir),
        job_dir="/nemo_run",  # NeMo-Run mounts the job directory there
        workdir=c.workdir,
        gpus_per_node=c.gpus_per_node,
        ray_port=c.ray_port,
        timeout_s=c.ray_start_timeout_s,
        setup=list(c.setup),
    )
    # Runs in the batch step on the first node, before srun: writes the node program where every
    # container sees it, and hands srun's tasks the head's address (first one if the node has several).
    setup_lines = "\n".join(
        [
            "",
            "# Ray on Slurm: the per-node program (megatron_rl.launch.ray_node), started by srun below.",
            f"cat > {shlex.quote(str(job_dir / NODE_SCRIPT))} <<'{_HEREDOC}'",
            node_script.rstrip("\n"),
            _HEREDOC,
            'export MRL_HEAD_IP="${head_node_ip%% *}"',
            *preemption_lines(run_dir),
        ]
    )
    from megatron_rl import console

    verbose = {console.VERBOSE_ENV: "1"} if console.verbose() else None  # --verbose holds in the job too
    executor = build_executor("slurm", cfg, env=verbose, setup_lines=setup_lines)
    if c.preempt_notice_s:  # Slurm's notice before the time limit, to this batch shell (preemption_lines)
        executor.signal = f"B:USR1@{int(c.preempt_notice_s)}"
    executor.additional_parameters = {"requeue": True}  # the job may requeue itself (preemption_lines)
    return SlurmBatchRequest(
        launch_cmd=["sbatch", "--parsable"],
        jobs=[f"{algo}-{cfg.run.name}"],
        command_groups=[["bash", f"/nemo_run/{NODE_SCRIPT}"]],
        executor=executor,
        max_retries=c.retries,
        extra_env={},
    )


def preemption_lines(run_dir: Path) -> list[str]:
    """Batch-shell lines: on SIGUSR1 (`#SBATCH --signal=B:USR1@N`) or SIGTERM, ask the run to checkpoint and
    stop by creating its request file (a signal cannot reach the controller inside the step's container);
    when the run exits with REQUEUE_EXIT, requeue the job, which resumes from that checkpoint. srun runs in
    the background so that the trap runs while the step goes (bash runs traps only between commands)."""
    request = shlex.quote(str(run_dir / REQUEST_FILE))
    return [
        "",
        "# Preemption (docs/faults.md): the notice becomes the run's request file; its exit status",
        f"# {REQUEUE_EXIT} (checkpoint written) requeues the job, which then resumes.",
        f"preempt_notice() {{ echo \"[megatron-rl] $1: asking the run to checkpoint and stop\"; touch {request}; }}",
        "trap 'preempt_notice SIGUSR1' USR1",
        "trap 'preempt_notice SIGTERM' TERM",
        "srun() {",
        '  command srun "$@" &',
        "  local pid=$! rc",
        '  while true; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done',
        f'  if [ "$rc" = {REQUEUE_EXIT} ]; then',
        f'    echo "[megatron-rl] the run stopped for preemption (exit {REQUEUE_EXIT}): requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && return 0',
        "  fi",
        '  return "$rc"',
        "}",
    ]


def script_of(request: Any) -> str:
    text = request.materialize()
    return text if text.endswith("\n") else text + "\n"


def render(cfg: Any, algo: str, recipe: str | None = None, overrides: list[str] | None = None) -> str:
    """The exact sbatch script `submit` would hand to sbatch for `cfg` (composed from `recipe` and
    `overrides`, which the training command replays)."""
    if recipe is not None and recipe != cfg.recipe:
        raise UserError(f"render: cfg was composed from recipe {cfg.recipe!r}, not {recipe!r}.")
    return script_of(build_request(cfg, algo, list(overrides or [])))


def submit(cfg: Any, algo: str, overrides: list[str], dry_run: bool) -> int:
    """Dry run: the script on stdout, a note on stderr, nothing written or submitted. Otherwise: write the
    script and resolved config into <run>/slurm/ and submit through NeMo-Run's tunnel (sbatch on this host)."""
    from megatron_rl.config.compose import save_resolved

    check_layout(cfg, generation=algo == "grpo")
    request = build_request(cfg, algo, overrides)
    script = script_of(request)
    name = request.executor.job_details.job_name
    if dry_run:
        sys.stdout.write(script)
        sys.stdout.flush()
        print(
            f"[dry-run] {name}: {cfg.cluster.nodes} node(s) x {cfg.cluster.gpus_per_node} GPU(s); "
            f"nothing written, nothing submitted",
            file=sys.stderr,
        )
        return 0
    import shutil

    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch is not on PATH: submit from a Slurm login node, or add --dry-run to see the script."
        )
    run_dir = Path(cfg.run.dir).absolute()
    job_dir = run_dir / "slurm"
    (job_dir / "code").mkdir(parents=True, exist_ok=True)  # NeMo-Run's container workdir
    save_resolved(cfg, job_dir)
    path = job_dir / f"{name}.sbatch"
    tmp = path.with_suffix(".sbatch.tmp")
    tmp.write_text(script)
    tmp.replace(path)
    # in_stream=False: sbatch reads no input, and the caller's stdin (a console, a test runner) stays its own.
    result = request.executor.tunnel.run(
        f"sbatch --parsable {shlex.quote(str(path))}", warn=True, in_stream=False
    )
    if result.exited:
        raise UserError(f"sbatch rejected {path}: {(result.stderr or result.stdout).strip()}")
    job_id = result.stdout.strip().split(";")[0]
    (job_dir / "job_id").write_text(job_id + "\n")
    print(f"submitted Slurm job {job_id}: script {path}, logs {job_dir}/log-{name}_{job_id}_*.out")
    return 0
