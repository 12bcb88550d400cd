"""A Ray worker's output goes to its log file in the run directory, yet its failure still reaches the
console in full: the WorkerError names its log file, and for a process that died, ends with its last lines."""

from __future__ import annotations

import pytest

from megatron_rl import console
from megatron_rl.ray_utils import WorkerError, gather, remote_class


def _worker_class():
    # Defined in a function so that Ray ships it by value (test modules are not importable in workers).
    class Worker:
        def __init__(self) -> None:
            from megatron_rl import console

            console.redirect_to_log("worker_rank0")

        def talk(self) -> int:
            import os

            print("chatter from python", flush=True)
            os.write(2, b"chatter from fd 2\n")
            return os.getpid()

        def fail(self) -> None:
            print("about to raise", flush=True)
            raise ValueError("bad shard")

        def die(self) -> None:
            import os

            os.write(2, b"Fatal: last words before the abort\n")
            os._exit(3)

    return Worker


@pytest.fixture
def logs(tmp_path, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.setenv(console.LOG_DIR_ENV, str(tmp_path / "logs"))
    return tmp_path / "logs"


def test_worker_output_in_its_log_and_failures_point_at_it(ray_cluster, logs):
    import ray

    worker = remote_class(_worker_class()).options(num_cpus=0.1).remote()
    try:
        pid = gather([worker.talk.remote()], "talking", 120)[0]
        log = logs / "worker_rank0.log"
        text = log.read_text()
        assert f"worker_rank0 pid={pid} " in text
        assert "chatter from python" in text and "chatter from fd 2" in text

        with pytest.raises(WorkerError) as raised:
            gather([worker.fail.remote()], "training", 60)
        message = str(raised.value)
        assert message.startswith("training: a worker raised ValueError: bad shard")
        assert f"its log: {log}" in message

        with pytest.raises(WorkerError) as raised:
            gather([worker.die.remote()], "training", 60)
        message = str(raised.value)
        assert "a worker process died" in message and f"its log: {log}" in message
        assert message.rstrip().endswith("Fatal: last words before the abort")
    finally:
        ray.kill(worker)
