"""The benchmark CLI's cheap paths: the GPU check fails cleanly without a GPU, bad --engines is refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_rl.bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_check_without_a_gpu_is_one_clear_error():
    out = bench("gpu-check")
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu-check needs a CUDA GPU"), out.stderr
    assert "docs/install.md#gpu-clusters" in lines[0]


def test_failed_counts_what_this_machine_can_run():
    from megatron_rl.bench.gpu_check import failed

    ok = {"ok": True}
    nccl = {"ok": False, "error": "NCCL error: Duplicate GPU detected"}
    assert failed({"gpus": 1, "cuda_ipc": ok, "nccl_broadcast": nccl}) == []
    assert failed({"gpus": 2, "cuda_ipc": ok, "nccl_broadcast": nccl}) == ["nccl_broadcast"]
    assert failed({"gpus": 1, "cuda_ipc": {"ok": False}, "error": "deadline"}) == ["cuda_ipc", "deadline"]


def test_gpu_check_offload_round_trip_runs_the_policy_path_on_cpu():
    """The same code as the GPU check's offload_onload (which times it on a GPU): every optimizer storage is
    freed, the model's weights are kept, every byte comes back."""
    from megatron_rl.bench.gpu_check import offload_round_trip

    out = offload_round_trip(0.003, "cpu")
    assert out["exact"] and out["storages_freed"] and out["device_freed_gb"] == 0
    assert out["gb"] == pytest.approx(0.003, rel=1e-3) and out["onload_gb_per_s"] > 0


@pytest.mark.parametrize("engines", ["0", "two", ""])
def test_refit_engines_must_be_counts(engines):
    out = bench("refit", "--engines", engines)
    assert out.returncode == 2 and "--engines takes engine counts >= 1" in out.stderr


def test_refit_cores_per_engine_must_be_a_count():
    out = bench("refit", "--engines", "1,2", "--cores-per-engine", "0")
    assert out.returncode == 2 and "--cores-per-engine takes a count >= 1" in out.stderr


def test_async_bench_needs_a_staleness_and_enough_steps():
    out = bench("async", "--max-staleness", "0")
    assert out.returncode == 2 and "--max-staleness >= 1" in out.stderr
