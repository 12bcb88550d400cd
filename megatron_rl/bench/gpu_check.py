"""The GPU refit paths, checked and timed on one GPU machine: `python -m megatron_rl.bench gpu-check`.

A trainer actor holds the weights on its GPU and refits vLLM engines from there (generation/fanout.py):
CUDA IPC into one engine on its GPU, the same export into two engines sharing one IPC handle, and an NCCL
broadcast (which needs the engine on another GPU: NCCL refuses two ranks on one device, so with a single
GPU the attempt is reported, not counted as a failure). Colocation: an engine built for sleep mode sleeps at
level 1 (weights to host memory) and level 2 (weights discarded), the device memory each frees is read from
the driver (mem_get_info), and after a level-2 sleep the weights wake, are refitted over CUDA IPC, then the
KV cache wakes; and a policy-sized optimizer state goes to host memory and back through the policy's
offload path (policy/offload.py). After each refit with the original weights, and after each wake-up,
greedy generation must be unchanged. Prints one JSON object; exits 1 when a check that this machine can
run failed, 2 without a CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from megatron_rl import platform
from megatron_rl.errors import UserError
from megatron_rl.ray_utils import WorkerError

PROMPTS = [[1] + list(range(10 + i, 42 + i)) for i in range(2)]


class Deadline(BaseException):
    """The whole check's time is up: not an Exception, so no single check's handler swallows it."""


def preflight() -> int:
    """The number of CUDA GPUs this process sees; a UserError (one line, exit 2) when there is none."""
    if platform.use_cpu():
        raise UserError(
            "gpu-check needs a CUDA GPU: this machine has none visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Run it on a GPU node "
            "with the GPU install (docs/install.md#gpu-clusters)."
        )
    return torch.cuda.device_count()


class Trainer:
    """Stands in for the policy's rank 0: the weights on its GPU, sent from there."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        from megatron_rl.bench.refit import load_state

        self.state = {k: t.cuda() for k, t in load_state(Path(model_dir), getattr(torch, dtype)).items()}
        torch.cuda.synchronize()

    def gpu_uuid(self) -> str | None:
        from megatron_rl import platform

        return platform.gpu_uuid()

    def refit(self, clients: list[Any], version: int, transport: str) -> dict[str, Any]:
        from megatron_rl.generation.fanout import send_to_engines

        return send_to_engines(clients, iter(self.state.items()), version, transport=transport)


def _timed_refits(
    trainer: Any, clients: list[Any], transport: str, rounds: int, version: list[int], timeout_s: float = 300
) -> dict:
    """Median of `rounds` refits after a warm-up; the parts of the median one."""
    import ray

    from megatron_rl.bench.refit import refit_parts

    runs = []
    for _ in range(rounds + 1):
        version[0] += 1
        runs.append(ray.get(trainer.refit.remote(clients, version[0], transport), timeout=timeout_s))
    runs = sorted(runs[1:], key=lambda s: s["refit_s"])
    median = runs[(len(runs) - 1) // 2]
    return {
        "refit_s": statistics.median(r["refit_s"] for r in runs),
        "gb_per_s": median["gb_per_s"],
        "backend_transport": median["transport"],
        "accounting": refit_parts(median),
    }


def offload_round_trip(gb: float, device: str) -> dict[str, Any]:
    """A bf16 policy's optimizer state of `gb` GB (fp32 main copy and two Adam moments) moved to host memory
    and back by policy/offload.py's Offloader, the model's own weights kept: seconds and GB/s each way, the
    device memory freed (the driver's figure; 0 on CPU), whether every storage was freed and every byte
    came back."""
    from types import SimpleNamespace

    from megatron_rl.policy.offload import Offloader

    n = max(1, int(gb * 1e9 / 12))
    weights = torch.zeros(n, dtype=torch.bfloat16, device=device)
    main = torch.randn(n, device=device)
    state = {"exp_avg": torch.randn(n, device=device), "exp_avg_sq": torch.rand(n, device=device)}
    inner = SimpleNamespace(param_groups=[{"params": [main]}], state={main: state})
    optimizer = SimpleNamespace(optimizer=inner, zero_grad=lambda: None)
    tensors = [main, *state.values()]

    def checksums() -> list[int]:
        return [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in tensors]

    before = checksums()
    offloader = Offloader([weights])
    platform.synchronize()
    free0, t0 = platform.device_free_bytes(), time.perf_counter()
    nbytes = offloader.offload(optimizer, [], "optimizer")
    offload_s = time.perf_counter() - t0
    freed = platform.device_free_bytes() - free0
    all_freed = all(t.untyped_storage().nbytes() == 0 for t in tensors)
    t0 = time.perf_counter()
    offloader.onload()
    onload_s = time.perf_counter() - t0
    return {
        "gb": nbytes / 1e9,
        "offload_s": offload_s,
        "onload_s": onload_s,
        "offload_gb_per_s": nbytes / offload_s / 1e9,
        "onload_gb_per_s": nbytes / onload_s / 1e9,
        "device_freed_gb": freed / 1e9,
        "storages_freed": all_freed,
        "exact": checksums() == before and weights.untyped_storage().nbytes() == 2 * n,
    }


def _check(results: dict[str, Any], name: str, fn, log) -> None:
    log(f"[gpu-check] {name}")
    start = time.perf_counter()
    try:
        results[name] = {"ok": True, **fn()}
    except Exception as exc:  # noqa: BLE001 - every check reports its own failure, the others still run
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:600]}"}
    results[name]["seconds"] = time.perf_counter() - start


def run_gpu_check(
    model: str = "llama1b", rounds: int = 3, deadline_s: float = 540, log=print, offload_gb: float = 12.0
) -> dict:
    """Runs every check within `deadline_s` (a check still running then is reported as cut off)."""
    gpus = preflight()
    import ray

    from megatron_rl.bench.refit import model_for
    from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
    from megatron_rl.generation.client import EngineClient

    def cut_off(signum: int, frame: Any) -> None:
        raise Deadline(f"gpu-check deadline of {deadline_s:.0f} s reached")

    signal.signal(signal.SIGALRM, cut_off)
    signal.alarm(int(deadline_s))
    cache = Path(tempfile.gettempdir()) / "megatron_rl_bench"
    cache.mkdir(parents=True, exist_ok=True)
    model_dir, dtype = model_for(model, cache)
    dtype_name = str(dtype).removeprefix("torch.")
    results: dict[str, Any] = {
        "bench": "gpu-check",
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "model": model,
        "dtype": dtype_name,
    }
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only cluster: no token under $HOME

    def offload() -> dict[str, Any]:
        out = offload_round_trip(offload_gb, "cuda")
        if not (out["exact"] and out["storages_freed"]):
            raise AssertionError(f"offload round trip not exact or not freed: {out}")
        return out

    # First, in this process, before any engine takes its share of the GPU; its memory is returned after.
    _check(results, "offload_onload", offload, log)
    torch.cuda.empty_cache()
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    engines: list[EngineClient] = []
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
    version = [0]
    try:
        trainer = ray.remote(num_gpus=0.3)(Trainer).remote(str(model_dir), dtype_name)
        uuid = ray.get(trainer.gpu_uuid.remote(), timeout=600)
        settings = EngineSettings(max_model_len=512, dtype=dtype_name, gpu_memory_utilization=0.25)

        def engine(num_gpus: float) -> EngineClient:
            client = EngineClient(
                str(model_dir), settings, num_cpus=1, num_gpus=num_gpus, timeout_s=300, refit=RefitSettings()
            )
            engines.append(client)
            return client

        def unchanged(clients: list[EngineClient], reference: list[list[int]]) -> None:
            for c in clients:
                if [s[0].token_ids for s in c.generate(PROMPTS, greedy)] != reference:
                    raise AssertionError("greedy generation changed after a refit with the same weights")

        def cuda_ipc() -> dict[str, Any]:
            first = engine(0.3)
            if first.info.get("device_uuid") != uuid:
                raise RuntimeError("Ray put the engine on another GPU than the trainer's")
            results["reference"] = [s[0].token_ids for s in first.generate(PROMPTS, greedy)]
            out = _timed_refits(trainer, [first], "cuda_ipc", rounds, version)
            unchanged([first], results["reference"])
            return out

        def cuda_ipc_two_engines() -> dict[str, Any]:
            second = engine(0.3)
            if second.info.get("device_uuid") != uuid:
                raise RuntimeError("Ray put the second engine on another GPU than the trainer's")
            out = _timed_refits(trainer, engines[:2], "cuda_ipc", rounds, version)
            unchanged(engines[:2], results["reference"])
            one = results["cuda_ipc"]["refit_s"]
            return {
                **out,
                "refit_s_by_engines": {"1": one, "2": out["refit_s"]},
                "ratio": out["refit_s"] / one,
            }

        def nccl_broadcast() -> dict[str, Any]:
            target = engine(1) if gpus > 1 else engines[0]  # its own GPU when there is one
            # On one GPU NCCL is expected to refuse (or hang until its timeout): do not wait long.
            out = _timed_refits(trainer, [target], "broadcast", rounds, version, 300 if gpus > 1 else 90)
            unchanged([target], results["reference"])
            return out

        def sleep_wake() -> dict[str, Any]:
            # An engine of its own, built for sleep mode (vLLM's sleep-mode allocator), on the trainer's GPU.
            sleeper = EngineClient(
                str(model_dir),
                dataclasses.replace(settings, sleep_level=2),
                num_cpus=1,
                num_gpus=0.3,
                timeout_s=300,
                refit=RefitSettings(),
            )
            engines.append(sleeper)
            unchanged([sleeper], results["reference"])
            share_gb = settings.gpu_memory_utilization * torch.cuda.get_device_properties(0).total_memory / 1e9
            one = sleeper.sleep(1)  # weights to host memory, KV cache discarded
            one.update(sleeper.wake_up())
            unchanged([sleeper], results["reference"])  # the weights came back from host memory
            two = sleeper.sleep(2)  # weights and KV cache discarded
            two.update(sleeper.wake_up(["weights"]))
            try:
                sleeper.generate(PROMPTS, greedy)
                raise AssertionError("the engine generated with the weights a level-2 sleep discarded")
            except WorkerError as exc:
                if "discarded the weights" not in str(exc):
                    raise
            version[0] += 1
            refit = ray.get(trainer.refit.remote([sleeper], version[0], "cuda_ipc"), timeout=300)
            kv = sleeper.wake_up(["kv_cache"])
            # Unchanged: the refit rewrote every weight and the buffers (rotary tables) survived the sleep.
            unchanged([sleeper], results["reference"])
            for got in (one, two):
                if got["freed_gb"] <= 0:
                    raise AssertionError(f"sleep freed no device memory: {got}")
            return {
                "share_gb": share_gb,
                "level1": one,
                "level2": {**two, "refit_s": refit["refit_s"], "kv_wake_s": kv["wake_s"]},
                "level2_freed_fraction_of_share": two["freed_gb"] / share_gb,
            }

        _check(results, "cuda_ipc", cuda_ipc, log)
        if results["cuda_ipc"]["ok"]:
            _check(results, "cuda_ipc_2_engines", cuda_ipc_two_engines, log)
            _check(results, "sleep_wake", sleep_wake, log)
            # Last: on one GPU a refused NCCL group may leave the engine unusable.
            _check(results, "nccl_broadcast", nccl_broadcast, log)
            if gpus == 1 and not results["nccl_broadcast"]["ok"]:
                results["nccl_broadcast"]["note"] = (
                    "one GPU: the engine shares the trainer's device, which NCCL does not allow; the "
                    "broadcast refit needs a second GPU"
                )
    except Deadline as exc:
        results["error"] = str(exc)
    finally:
        signal.alarm(0)
        for client in engines:
            try:
                client.shutdown()
            except Exception:  # noqa: BLE001 - shutting down after a failure: report that failure
                pass
        ray.shutdown()
    results.pop("reference", None)
    return results


def failed(results: dict[str, Any]) -> list[str]:
    """The checks this machine could run that failed (NCCL on a single GPU does not count)."""
    names = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    if results.get("gpus") == 1:
        names = [n for n in names if n != "nccl_broadcast"]
    return names + (["deadline"] if "error" in results else [])
