"""The nightly runner end to end on synthetic runs: local subprocesses that write metrics.jsonl (passing,
failing an assertion, crashing, hanging past the timeout), the report folder, and the baseline comparison.
The real GRPO run is covered by tests/functional/test_nightly_cpu_smoke.py."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

import megatron_rl.launch.__main__ as launch_cli
from megatron_rl.nightly.__main__ import main
from megatron_rl.nightly.metrics import last_logged_step, load_metrics

FAKE_RUN = r"""
import json, os, subprocess, sys, time
run_dir, steps, mode, scale = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": 0.1 * s, "reward/std": 0.05, "train/token_mult_prob_error": 1.0 + 0.001 * s,
               "timing/generate_s": 1.0 * scale, "timing/logprobs_s": 0.2, "timing/train_s": 0.5, "timing/refit_s": 0.1,
               "timing/step_s": 2.0 * scale, "memory/peak_gb": 10.0 + s, "throughput/tokens_per_s": 100.0 / scale}
        f.write(json.dumps(row) + "\n")
        print("step", s, flush=True)
if mode == "crash":
    print("RuntimeError: CUDA error: an illegal memory access was encountered", flush=True)
    sys.exit(3)
if mode == "hang":
    # Like a Ray worker: a grandchild in a process group of its own (same session).
    child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(120)"])
    open(os.path.join(run_dir, "grandchild.pid"), "w").write(str(child.pid))
    print("waiting forever", flush=True)
    time.sleep(120)
"""


def entry(name: str, mode: str, *assertions: str, scale: float = 1.0, **extra) -> dict:
    cmd = ["{python}", "{fake}", "{run_dir}", "{steps}", mode, str(scale)]
    return {"name": name, "command": cmd, "assertions": list(assertions), **extra}


@pytest.fixture
def make_suite(tmp_path):
    fake = tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)

    def make(entries: list[dict], **top) -> Path:
        for e in entries:
            e["command"] = [c.replace("{fake}", str(fake)) for c in e["command"]]
        data = {
            "description": "synthetic runs",
            "launcher": "local",
            "defaults": {"steps": 5, "timeout_s": 60},
        }
        data.update(top)
        data["entries"] = entries
        path = tmp_path / f"suite{len(list(tmp_path.glob('suite*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_suite_with_failures_reports_each_and_keeps_going(make_suite, tmp_path):
    suite = make_suite(
        [
            entry(
                "good",
                "ok",
                "mean(reward/mean[-2:]) > 0.3",
                "max(memory/peak_gb) < 75",
                "median(train/token_mult_prob_error) < 1.05",
            ),
            entry("low_reward", "ok", "mean(reward/mean[-2:]) > 0.6", "max(eval/accuracy) > 0.5"),
            entry("crash", "crash", "max(memory/peak_gb) < 75"),
            entry("hang", "hang", timeout_s=2),
        ]
    )
    report = tmp_path / "report"
    t0 = time.monotonic()
    rc = main(["--suite", str(suite), "--report", str(report), "--poll-s", "0.1"])
    assert rc == 1
    assert time.monotonic() - t0 < 30

    data = json.loads((report / "report.json").read_text())
    by = {e["name"]: e for e in data["entries"]}
    assert [e["name"] for e in data["entries"]] == ["good", "low_reward", "crash", "hang"]
    assert {n: e["status"] for n, e in by.items()} == {
        "good": "passed",
        "low_reward": "failed",
        "crash": "error",
        "hang": "timeout",
    }
    assert data["passed"] is False and data["counts"] == {"passed": 1, "failed": 1, "error": 1, "timeout": 1}

    good = by["good"]["assertions"]
    assert [a["text"] for a in good][0] == "last(step) >= 5" and all(a["passed"] for a in good)
    assert good[1]["observed"] == pytest.approx(0.45)
    low = {a["text"]: a for a in by["low_reward"]["assertions"]}
    assert low["mean(reward/mean[-2:]) > 0.6"]["message"] == "mean(reward/mean[-2:]) = 0.45, expected > 0.6"
    assert "metric 'eval/accuracy' is missing from the run" in low["max(eval/accuracy) > 0.5"]["message"]
    assert by["crash"]["detail"] == "exit code 3" and "illegal memory access" in by["crash"]["log_tail"]
    assert "timed out after 2 s" in by["hang"]["detail"] and "waiting forever" in by["hang"]["log_tail"]
    # the whole tree died with the timeout, the grandchild in its own process group included
    grandchild = int((report / "runs" / "hang" / "grandchild.pid").read_text())
    assert not alive(grandchild)
    assert by["good"]["values"]["median(timing/step_s)"] == {
        "value": 2.0,
        "better": "lower",
        "metric": "timing/step_s",
    }

    md = (report / "summary.md").read_text()
    assert md.startswith("# Nightly suite `suite0`: FAILED")
    assert "1/4 entries passed" in md
    assert "| `good` | ✅ passed |" in md and "[plots](report.html#good)" in md
    assert "❌ `mean(reward/mean[-2:]) > 0.6` (0.45)" in md
    assert "| `crash` | 💥 error: exit code 3 |" in md
    assert "### `crash`: error (exit code 3)" in md and "illegal memory access" in md

    junit = ET.parse(report / "junit.xml").getroot()
    ts = junit.find("testsuite")
    assert ts.get("tests") == "4" and ts.get("failures") == "1" and ts.get("errors") == "2"
    cases = {c.get("name"): c for c in ts.findall("testcase")}
    assert cases["good"].find("failure") is None and cases["good"].find("error") is None
    fail = cases["low_reward"].find("failure")
    assert fail.get("message") == "2 assertion(s) failed" and "expected > 0.6" in fail.text
    assert "illegal memory access" in cases["crash"].find("error").text
    assert cases["hang"].find("error").get("type") == "Timeout"

    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # every entry logged metrics
    assert "id='low_reward'" in html and "expected &gt; 0.6" in html


def test_local_entries_are_nemo_run_experiments(make_suite, tmp_path):
    """Each local entry is a NeMo-Run experiment (the launcher's executor factory and task), which NeMo-Run's
    own API finds by the id the report records; its output also lands in the run's launch.log."""
    from megatron_rl.launch.executors import nemo_run

    suite = make_suite([entry("ok", "ok"), entry("crash", "crash")])
    report = tmp_path / "report"
    assert main(["--suite", str(suite), "--report", str(report), "--poll-s", "0.1"]) == 1
    data = json.loads((report / "report.json").read_text())
    states = {}
    for e in data["entries"]:
        assert e["job_id"].startswith(f"nightly-{e['name']}_"), e["job_id"]
        (task,) = nemo_run().Experiment.from_id(e["job_id"]).status(return_dict=True).values()
        states[e["name"]] = task["status"].name
        log = (report / "runs" / e["name"] / "launch.log").read_text()
        assert log.startswith("$ ") and "step 5" in log
    assert states == {"ok": "SUCCEEDED", "crash": "FAILED"}


def test_metrics_file_torn_line_duplicates_and_non_numbers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "eval/accuracy": 0.2},
        {"step": 1, "reward/mean": 0.1, "note": "warm", "ok": True},
        {"step": 2, "reward/mean": 0.2},
        {"step": 2, "reward/mean": 0.25, "eval/accuracy": 0.4},  # a resumed run logged step 2 again
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')  # killed mid-write
    m = load_metrics(path)
    assert m.series["reward/mean"] == [0.1, 0.25] and m.steps["reward/mean"] == [1, 2]
    assert m.series["eval/accuracy"] == [0.2, 0.4] and m.series["step"] == [0.0, 1.0, 2.0]
    assert m.last_step == 2 and m.rows == 4
    assert any("line 5" in p for p in m.problems) and any("note is not a number" in p for p in m.problems)
    assert last_logged_step(path) == 2
    assert load_metrics(tmp_path / "none.jsonl").problems == [f"{tmp_path / 'none.jsonl'} does not exist"]


def test_baseline_regressions(make_suite, tmp_path):
    checks = ("max(memory/peak_gb) < 75", "mean(reward/mean) > 0.1")
    base_suite = make_suite([entry("e", "ok", *checks)])
    base = tmp_path / "base"
    assert main(["--suite", str(base_suite), "--report", str(base), "--poll-s", "0.1"]) == 0

    # Twice as slow: step time and throughput regress by 100% and 50%; memory and reward are unchanged.
    tol = {
        "tolerance": 0.1,
        "tolerances": {"timing/step_s": 0.5, "median(throughput/tokens_per_s)": {"abs": 60}},
    }
    slow = make_suite([entry("e", "ok", *checks, scale=2.0), entry("new", "ok")], baseline=tol)
    now = tmp_path / "now"
    rc = main(["--suite", str(slow), "--report", str(now), "--baseline", str(base), "--poll-s", "0.1"])
    assert rc == 1
    data = json.loads((now / "report.json").read_text())
    assert [e["status"] for e in data["entries"]] == ["passed", "passed"]
    regs = data["entries"][0]["regressions"]
    # step time 2 -> 4 (+100% > 50% allowed); throughput 100 -> 50 (-50, within the absolute 60 allowed)
    assert [(r["expression"], r["baseline"], r["current"]) for r in regs] == [
        ("median(timing/step_s)", 2.0, 4.0)
    ]
    assert regs[0]["allowed"] == pytest.approx(1.0)
    assert data["entries"][1]["regressions"] == []  # no baseline for a new entry
    md = (now / "summary.md").read_text()
    assert "| `e` | ✅ passed; 📉 1 regression(s) |" in md
    assert (
        "## Regressions against the baseline" in md
        and "| `e` | `median(timing/step_s)`" in md
        and "+100.0%" in md
    )
    case = ET.parse(now / "junit.xml").getroot().find("testsuite/testcase[@name='e']")
    assert case.find("failure").get("type") == "Regression"

    # Not gating: the same regression is reported but the suite passes.
    lax = make_suite([entry("e", "ok", *checks, scale=2.0)], baseline={**tol, "fail_on_regression": False})
    rc = main(
        ["--suite", str(lax), "--report", str(tmp_path / "lax"), "--baseline", str(base), "--poll-s", "0.1"]
    )
    assert rc == 0
    assert len(json.loads((tmp_path / "lax" / "report.json").read_text())["entries"][0]["regressions"]) == 1


def test_cli_errors_exit_2(make_suite, tmp_path, capsys):
    suite = make_suite([entry("e", "ok")])
    assert main(["--suite", "no_such_suite"]) == 2
    assert "Unknown suite 'no_such_suite'" in capsys.readouterr().err
    assert main(["--suite", str(suite), "--baseline", str(tmp_path / "missing")]) == 2
    assert "no report.json there" in capsys.readouterr().err
    assert main(["--suite", str(suite), "--only", "x*"]) == 2
    assert main(["--suite", str(suite), "--launcher", "slurm"]) == 2
    assert "custom `command` runs only with the local launcher" in capsys.readouterr().err
    assert main(["--bogus"]) == 2
    assert main(["--help"]) == 0
    assert not list(tmp_path.glob("nightly_reports"))


def test_reused_report_folder_is_refused(make_suite, tmp_path, capsys):
    suite = make_suite([entry("e", "ok")])
    report = tmp_path / "r"
    assert main(["--suite", str(suite), "--report", str(report), "--poll-s", "0.1"]) == 0
    assert main(["--suite", str(suite), "--report", str(report), "--poll-s", "0.1"]) == 2
    assert f"run directory {report}/runs/e already exists" in capsys.readouterr().err


def test_launch_cli_dispatches_nightly(make_suite, tmp_path):
    suite = make_suite([entry("a", "ok")])
    rc = launch_cli.main(["nightly", "--suite", str(suite), "--dry-run", "--report", str(tmp_path / "d")])
    assert rc == 0 and (tmp_path / "d" / "scripts" / "a.sh").is_file()
    assert launch_cli.main(["nightly", "--suite", "no_such_suite"]) == 2


def test_dry_run_local_writes_commands_and_launches_nothing(make_suite, tmp_path):
    suite = make_suite([entry("a", "ok"), entry("b", "ok")])
    report = tmp_path / "dry"
    assert main(["--suite", str(suite), "--report", str(report), "--dry-run", "--only", "b"]) == 0
    assert [p.name for p in (report / "scripts").iterdir()] == ["b.sh"]
    text = (report / "scripts" / "b.sh").read_text()
    assert f"{report}/runs/b 5 ok" in text
    assert not (report / "runs").exists() and not (report / "report.json").exists()


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default report folders land in the test's tmp dir
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    yield
    assert os.getcwd() == str(tmp_path)
