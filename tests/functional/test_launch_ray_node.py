"""The Ray-on-Slurm node program, run for real on this machine: two "nodes" (two processes with their own
Ray temp dirs, as srun would start them) form one Ray cluster, node 0 runs the command against it, and
everything stops when it ends. No Slurm here: the SLURM_* variables srun sets are set by hand."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_rl.launch.ray_node import render_node_script

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def short_tmp():
    # Ray's unix sockets live under the temp dir: keep its path short.
    path = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    yield path
    leftovers = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout.split()
    for pid in leftovers:  # only processes that belong to this test's Ray cluster
        os.kill(int(pid), signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"Ray processes outlived the node program: {leftovers}"


def start_node(script: Path, node: int, nodes: int, tmp: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_NODEID": str(node),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_ID": "4242",
        "MRL_HEAD_IP": "127.0.0.1",
        "RAY_TMPDIR": str(tmp / f"n{node}"),  # a node of its own: no other Ray on this machine is touched
        "RAY_AUTH_MODE": "disabled",
    }
    (tmp / f"n{node}").mkdir()
    return subprocess.Popen(
        ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def write_script(tmp: Path, command: list[str]) -> Path:
    path = tmp / "ray_node.sh"
    path.write_text(
        render_node_script(
            command,
            job_dir=str(tmp),
            workdir=str(ROOT),
            gpus_per_node=0,
            ray_port=free_port(),
            timeout_s=120,
            setup=["echo setup ran in $PWD"],
        )
    )
    return path


def test_two_nodes_form_one_cluster_and_run_the_command(short_tmp):
    probe = (
        "import ray; ray.init(); alive = sum(n['Alive'] for n in ray.nodes()); "
        "print('NODES', alive); assert alive == 2"
    )
    script = write_script(short_tmp, ["python", "-c", probe])
    worker = start_node(script, 1, 2, short_tmp)
    head = start_node(script, 0, 2, short_tmp)
    head_out, _ = head.communicate(timeout=240)
    worker_out, _ = worker.communicate(timeout=120)
    assert head.returncode == 0, head_out[-3000:]
    assert worker.returncode == 0, worker_out[-3000:]
    assert "NODES 2" in head_out and f"setup ran in {ROOT}" in head_out
    assert "2/2 nodes in the Ray cluster" in head_out
    assert (short_tmp / "ray_done.4242.0").exists()


def test_a_failing_command_fails_the_node(short_tmp):
    script = write_script(short_tmp, ["python", "-c", "import sys; sys.exit(3)"])
    head = start_node(script, 0, 1, short_tmp)
    out, _ = head.communicate(timeout=180)
    assert head.returncode == 3, out[-3000:]
    assert "training command exited with 3" in out
