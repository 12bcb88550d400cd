"""Synchronous vs asynchronous GRPO step time on the tiny recipe (`python -m megatron_rl.bench async`).

Both runs use the same layout and the same CPU threads: one policy rank with `--threads` torch threads and
one vLLM engine in the separate pool with as many OpenMP threads, each in its own process. Only the
schedule differs: grpo.max_staleness=0 (generate, then train, then refit) or `--max-staleness k` (the engine
generates the next steps' groups while the policy trains). The figure is the median wall time between two
logged steps, after the first `--skip` steps (start-up, the first refits). `--max-new-tokens` (32: the untrained
model always uses them all) sets how long generation takes beside training; overlap can at best hide the
shorter of the two.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def layout(threads: int, max_new_tokens: int) -> list[str]:
    return [
        f"generation.max_new_tokens={max_new_tokens}",
        "cluster.ranks=1",
        "policy/parallel=tp1",
        f"cluster.cpus_per_rank={threads}",
        "generation.colocated=false",
        "model.warmup_sft_steps=0",
        "run.eval_every=0",
        "run.checkpoint_every=0",
        "run.export_hf_at_end=false",
        "logger.wandb=false",
    ]


def step_seconds(run_dir: Path, skip: int) -> tuple[float, list[dict[str, Any]]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]
    times = [r["time"] for r in rows]
    gaps = [b - a for a, b in zip(times[skip:], times[skip + 1 :])]
    return statistics.median(gaps), rows


def run_one(run_dir: Path, steps: int, threads: int, max_new_tokens: int, extra: list[str]) -> None:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(threads)}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    cmd = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny", "--in-process",
           f"run.dir={run_dir}", f"run.steps={steps}", *layout(threads, max_new_tokens), *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"bench async: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def run_async_bench(
    steps: int, max_staleness: int, threads: int, skip: int, max_new_tokens: int, log: Any
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="megatron_rl_bench_async_") as tmp:
        out: dict[str, Any] = {"model": "tiny", "steps": steps, "max_staleness": max_staleness,
                               "threads_per_process": threads, "cpus": os.cpu_count(),
                               "max_new_tokens": max_new_tokens}  # fmt: skip
        for mode, k in (("sync", 0), ("async", max_staleness)):
            log(f"[bench async] {mode} (grpo.max_staleness={k}) ...")
            run_dir = Path(tmp) / mode
            run_one(run_dir, steps, threads, max_new_tokens, [f"grpo.max_staleness={k}"])
            seconds, rows = step_seconds(run_dir, skip)
            out[f"step_s_{mode}"] = seconds
            tail = rows[skip:]
            out[f"{mode}_generate_s"] = statistics.median(r["timing/generate_s"] for r in tail)
            out[f"{mode}_train_s"] = statistics.median(
                r["timing/logprobs_s"] + r["timing/train_s"] for r in tail
            )
            out[f"{mode}_refit_s"] = statistics.median(r["timing/refit_s"] for r in tail)
            out[f"{mode}_reward_mean"] = statistics.mean(r["reward/mean"] for r in rows)
            if k:
                out["staleness_max"] = max(r["async/staleness_max"] for r in rows)
                out["trainer_idle_s"] = statistics.median(r["async/trainer_idle_s"] for r in tail)
                out["engine_idle_s"] = statistics.median(r["async/engine_idle_s"] for r in tail)
        out["speedup_vs_sync"] = out["step_s_sync"] / out["step_s_async"]
        return out
