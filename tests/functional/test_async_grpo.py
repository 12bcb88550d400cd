"""Asynchronous GRPO through the real CLI (`grpo conf=tiny grpo.max_staleness=1 generation.colocated=false`):
the engine generates while the policy trains. One run, killed (SIGKILL, the whole process tree) after its
first checkpoint and resumed, serves every assertion: the staleness bound holds on every step (the resumed
ones included), the reward rises as in the synchronous learning run, and every prompt drawn is trained
exactly once, filtered, dropped for age, or still pending in the final checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny", "--in-process"]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
STEPS, KILL_AFTER = 40, 12
OVERRIDES = (
    "grpo.max_staleness=1",
    "generation.colocated=false",
    f"run.steps={STEPS}",
    "run.checkpoint_every=10",
    "run.eval_every=0",
    "run.export_hf_at_end=false",
    # Dynamic sampling filters groups in the producer; the overlong filter masks cut responses.
    "grpo.dynamic_sampling=true",
    "grpo.overlong_filter=true",
)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def kill_tree(session: int) -> None:
    import psutil

    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == session:
                p.send_signal(signal.SIGKILL)
        except (OSError, psutil.Error):
            pass


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async_grpo")
    cmd = [*CLI, f"run.dir={run_dir}", *OVERRIDES]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 400
    try:
        while len(rows(run_dir / "metrics.jsonl")) < KILL_AFTER and first.poll() is None:
            assert time.monotonic() < deadline, "the async run made no progress"
            time.sleep(0.2)
    finally:
        kill_tree(first.pid)
        first.wait()
    assert first.returncode == -signal.SIGKILL, first.stderr.read()[-3000:]
    killed_at = len(rows(run_dir / "metrics.jsonl"))
    second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=400)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return run_dir, rows(run_dir / "metrics.jsonl"), killed_at


def test_staleness_bound_holds_on_every_step(killed_and_resumed):
    _, metrics, killed_at = killed_and_resumed
    assert KILL_AFTER <= killed_at < STEPS
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert all(r["async/staleness_max"] <= 1 for r in metrics), [r["async/staleness_max"] for r in metrics]
    # The engine really ran ahead: most steps trained on samples of the previous weights.
    assert sum(r["async/staleness_mean"] > 0 for r in metrics) >= STEPS // 2
    for key in ("async/trainer_idle_s", "async/engine_idle_s", "async/dropped_stale_samples"):
        assert all(r[key] >= 0 for r in metrics), key


def test_reward_rises_as_in_the_synchronous_run(killed_and_resumed):
    _, metrics, _ = killed_and_resumed
    rewards = [r["reward/mean"] for r in metrics]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    # The synchronous run is deterministic and asserts a 0.05 rise; an asynchronous one is not (what each
    # step trains depends on timing), and the difference of two 10-step means varies by about 0.025 between
    # runs: measured rises of 0.058 and 0.10 put 0.05 inside the noise of a run that learns.
    assert last > first + 0.03, (first, last)


def test_each_prompt_is_trained_exactly_once_across_the_kill(killed_and_resumed):
    run_dir, _, _ = killed_and_resumed
    record = rows(run_dir / "rollout_prompts.jsonl")
    assert [r["step"] for r in record] == list(range(1, STEPS + 1))
    trained = [p for r in record for p in r["trained"]]
    assert len(trained) == len(set(trained)) >= 8 * STEPS
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved = state["async"]  # what the run had drawn but not trained, filtered or dropped yet
    # The buffered samples' arrays are beside the JSON, not in it.
    assert (ckpt / "trainer_state.safetensors").is_file() == bool(saved["buffer"])
    assert all("token_ids" not in s for g in saved["buffer"] for s in g["samples"])
    pending = [g["position"] for g in saved["buffer"] + saved["in_flight"]] + saved["filtered"]
    others = [p for r in record for p in r["filtered"] + r["dropped"]] + pending
    everything = trained + others
    assert len(everything) == len(set(everything))
    assert set(everything) == set(range(state["data"]["position"]))  # no prompt drawn was lost
