"""GRPO end to end through the real CLI (Ray, Megatron ranks, vLLM engine) on the tiny recipe: the 40-step
learning run as the user runs it (a NeMo-Run experiment on the LocalExecutor), the others `--in-process`.

Task: single-digit addition ("3+5=" -> "8"). The tiny model starts from a short Megatron SFT warm start
that answers some problems right, so groups of 8 samples contain both rewards and GRPO has signal; what it
learns (which answer tokens to prefer after which digits) is exactly what the reward measures.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.functional.ctrl_c import popen_interruptible

CLI = [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny"]
KEYS_EXCLUDED = ("timing/", "throughput/", "time", "memory/", "refit/")


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def launch(*overrides: str, timeout: int = 600, in_process: bool = True) -> subprocess.CompletedProcess:
    """The CLI; `in_process=False` is the user's command: a NeMo-Run experiment whose task runs the CLI."""
    flags = ["--in-process"] if in_process else []
    return subprocess.run(
        [*CLI, *overrides, *flags], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_learn")
    overrides = (f"run.dir={run_dir}", "run.steps=40", "run.eval_every=20", "run.eval_samples=4")
    proc = launch(*overrides, in_process=False)  # the README's main command, through NeMo-Run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, metrics(run_dir), proc


def test_main_command_is_a_nemo_run_experiment(learning_run):
    run_dir, _, proc = learning_run
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) < 40, console
    bar = re.search(r"^GRPO .* 40/40 reward \d\.\d{3}", proc.stdout, re.M)  # the bar, fed by metrics.jsonl
    assert bar, proc.stdout
    assert re.search(r"^done: 40/40 steps in \d+ s; reward/mean [\d.]+ -> [\d.]+", proc.stdout, re.M)
    exp_id = re.search(r"NeMo-Run experiment (grpo-tiny_\d+) \(local\)", proc.stdout).group(1)
    task_log = Path(re.search(r"^task log: (\S+)$", proc.stdout, re.M).group(1))
    assert f"run dir:  {run_dir}" in proc.stdout
    # NeMo-Run's own commands know the run: its listing, its status and its copy of the task's output.
    nemo = str(Path(sys.executable).with_name("nemo"))
    asks = {
        what: subprocess.Popen(
            [nemo, "experiment", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
        )
        for what, args in {
            "list": ["list", "grpo-tiny"],
            "status": ["status", exp_id],
            "logs": ["logs", exp_id],
        }.items()
    }
    out = {what: p.communicate(timeout=120)[0] for what, p in asks.items()}
    assert exp_id in out["list"]
    assert "Status: SUCCEEDED" in out["status"] and "LocalExecutor" in out["status"]
    bar_lines = [line for line in out["logs"].splitlines() if "GRPO" in line and "40/40" in line]
    assert bar_lines and all(line.startswith("train/0 ") for line in bar_lines), out["logs"][-2000:]
    assert "40/40" in task_log.read_text()


def test_engine_and_worker_output_goes_to_the_run_logs(learning_run):
    """The console stays short because every worker writes to <run>/logs/: vLLM's chatter is there, neither on
    the console nor in the task's own log, which says once where the logs are."""
    run_dir, _, proc = learning_run
    logs = (run_dir / "logs").resolve()
    expected = {"engine0.log", "policy_rank0.log", "policy_rank1.log", "warm_start_rank0.log"}
    assert expected <= {p.name for p in logs.iterdir()}
    engine = (logs / "engine0.log").read_text()
    assert "Initializing a V1 LLM engine" in engine and engine.count(" INFO ") > 10, engine[-2000:]
    task_log = Path(re.search(r"^task log: (\S+)$", proc.stdout, re.M).group(1)).read_text()
    for shown in (proc.stdout + proc.stderr, task_log):
        assert "Initializing a V1 LLM engine" not in shown and "non-default args" not in shown
    assert [line for line in task_log.splitlines() if f"logs: {logs}/" in line], task_log[-2000:]


def assert_quiet_console(proc: subprocess.CompletedProcess, run_dir: Path) -> None:
    """An in-process run's console: the logs folder once and the bar, no engine or worker chatter."""
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 40, lines
    assert sum(line.startswith(f"logs: {run_dir.resolve() / 'logs'}/") for line in lines) == 1, lines
    assert any(line.startswith("GRPO ") for line in lines), lines
    assert "Initializing a V1 LLM engine" not in proc.stdout + proc.stderr


def test_reward_rises(learning_run):
    _, rows, _ = learning_run
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 40
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.05, (first, last)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 20, 40]
    # Reported with every evaluation (on the tiny model it does not track the greedy gain: 0.26, 0.19, 0.26).
    sampled = [r["eval/accuracy_sampled"] for r in rows if "eval/accuracy" in r]
    assert len(sampled) == 3 and all(0.0 < a < 1.0 for a in sampled), sampled


def test_run_directory_and_metrics(learning_run):
    run_dir, rows, _ = learning_run
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "hf_export" / "config.json").is_file()
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step_000030", "step_000040"]  # keep_last=2
    row = rows[-1]
    for key in (
        "reward/mean",
        "reward/std",
        "response_length/mean",
        "train/loss",
        "train/clip_fraction",
        "train/token_mult_prob_error",
        "timing/generate_s",
        "timing/logprobs_s",
        "timing/train_s",
        "timing/refit_s",
        "refit/gb_per_s",
        "refit/engine_load_s",
        "timing/step_s",
        "throughput/tokens_per_s",
        "memory/peak_gb",
    ):
        assert key in row, key
    # fp32 engine and policy on the same weights: the per-token probability ratio is ~1.
    assert all(r["train/token_mult_prob_error"] < 1.001 for r in rows if "train/token_mult_prob_error" in r)


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # Dynamic sampling (with refills) and the overlong filter are on, so resume covers their state too.
    common = [
        "run.checkpoint_every=2",
        "model.warmup_sft_steps=60",
        "grpo.dynamic_sampling=true",
        "grpo.overlong_filter=true",
        "generation.max_new_tokens=3",
    ]
    # The straight run names the synchronous schedule on a separate pool (grpo.max_staleness=0): the same
    # loop as the split run's default, step for step (asynchronous GRPO is max_staleness > 0).
    sync = ("grpo.max_staleness=0", "generation.colocated=false")
    assert launch(f"run.dir={straight}", "run.steps=4", *common, *sync).returncode == 0
    # The split run also frees its optimizer state and grad buffers around every generation
    # (policy/offload.py) and saves/loads its checkpoints with them offloaded: still step for step equal.
    offload = "policy.offload_during_generation=optimizer_and_grads"
    first = launch(f"run.dir={split}", "run.steps=2", *common, offload)
    assert first.returncode == 0, first.stderr[-2000:]
    assert_quiet_console(first, split)
    second = launch(f"run.dir={split}", "run.steps=4", *common, offload)
    assert second.returncode == 0, second.stderr[-2000:]
    trained = [r for r in metrics(split) if "train/loss" in r]
    assert len(trained) == 4 and all(r["memory/policy_offloaded_gb"] > 0 for r in trained)

    def comparable(rows):
        return [
            {k: v for k, v in r.items() if not k.startswith(KEYS_EXCLUDED) and not k.endswith("_per_s")}
            for r in rows
            if r["step"] > 2
        ]

    a, b = comparable(metrics(straight)), comparable(metrics(split))
    assert not [k for r in metrics(straight) for k in r if k.startswith("async/")]
    assert [r["step"] for r in b] == [3, 4]
    assert all(r["rollout/groups_kept"] <= 16 and r["rollout/prompts_drawn"] >= 16 for r in a)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)


def test_kill_during_checkpoint_save_keeps_previous_loadable(tmp_path):
    """A process killed with SIGKILL in the middle of writing step 6 leaves step 4 as the latest."""
    from megatron_rl.config.compose import compose
    from megatron_rl.training.run_dir import RunDir

    run_dir = tmp_path / "run"
    proc = launch(f"run.dir={run_dir}", "run.steps=2", "run.checkpoint_every=2", "model.warmup_sft_steps=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    script = "\n".join(
        [
            "import os, time",
            "from megatron_rl.config.compose import compose",
            "from megatron_rl.training.run_dir import RunDir",
            f"cfg = compose('tiny', ['run.dir={run_dir}'])",
            "def slow(path):",
            "    os.makedirs(path)",
            "    open(os.path.join(path, 'part'), 'w').write('x')",
            "    print('writing', flush=True)",
            "    time.sleep(60)",
            "RunDir(cfg).save_checkpoint(4, slow, {'data': {'position': 0}})",
        ]
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    cfg = compose("tiny", [f"run.dir={run_dir}"])
    latest = RunDir(cfg).latest_checkpoint()
    assert latest is not None and latest.name == "step_000002"
    assert (run_dir / "checkpoints" / "step_000004.tmp").exists()
    # ... and the run resumes from it.
    again = launch(f"run.dir={run_dir}", "run.steps=3", "run.checkpoint_every=2", "model.warmup_sft_steps=0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2, 3]  # step 0: the initial evaluation


def test_malformed_dataset_line_is_named(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    proc = launch(
        f"run.dir={tmp_path / 'run'}", "data.kind=jsonl", f"data.path={bad}", "model.warmup_sft_steps=0"
    )
    assert proc.returncode == 2
    assert f"{bad}:2: not valid JSON" in proc.stderr


def test_crashing_worker_ends_the_run_with_a_clear_error(tmp_path):
    from megatron_rl.models.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "model", "llama")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated file
    started = time.monotonic()
    # Through the launcher: the task's error comes back from its NeMo-Run log, in full, with its exit status.
    proc = launch(f"run.dir={tmp_path / 'run'}", f"model.hf_path={model}", in_process=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]  # the task's own status
    assert "model.safetensors" in proc.stderr and "truncated or corrupted" in proc.stderr
    assert proc.stderr.rstrip().endswith("error: the run failed (exit status 2); above, the end of its log")
    assert "task log: " in proc.stdout
    assert time.monotonic() - started < 300


def test_ctrl_c_cancels_the_experiment_and_everything_it_started(tmp_path):
    import psutil

    from megatron_rl.launch.executors import nemo_run

    run_dir = tmp_path / "run"
    parent = popen_interruptible(
        [*CLI, f"run.dir={run_dir}", "run.steps=1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=ENV,
    )  # fmt: skip
    exp_id = re.search(r"NeMo-Run experiment (\S+) \(local\)", parent.stdout.readline()).group(1)
    deadline = time.monotonic() + 120
    while not (run_dir / "config.yaml").exists() and time.monotonic() < deadline:  # the task is running
        time.sleep(0.2)
    (task,) = [
        p for p in psutil.process_iter(["cmdline"])
        if "--in-process" in (p.info["cmdline"] or []) and f"run.dir={run_dir}" in p.info["cmdline"]
    ]  # fmt: skip
    time.sleep(3)  # into its start: Ray and its workers come up in the task's session
    parent.send_signal(signal.SIGINT)
    try:
        out, err = parent.communicate(timeout=120)
    finally:  # not stopped: the run must not go on training beside the next tests
        if parent.poll() is None:
            parent.kill()
        if task.is_running():
            task.kill()
    assert parent.returncode == 130, err[-2000:]
    assert "interrupted: cancelling the experiment" in err and f"nemo experiment logs {exp_id}" in out
    (state,) = nemo_run().Experiment.from_id(exp_id).status(return_dict=True).values()
    assert state["status"].name == "CANCELLED"
    # A zombie has ended: killed processes whose parent died too are reaped by PID 1 in its own time (this
    # machine's init takes seconds), so only processes still running count.
    assert _running_in_session(task.pid) == []


def _running_in_session(sid: int) -> list[str]:
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {proc.info['name']} ({proc.info['status']})")
        except OSError:
            continue
    return found
