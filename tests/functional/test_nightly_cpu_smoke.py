"""Nightly suites end to end: the cpu_smoke suite runs the real tiny GRPO recipe through the local launcher
and its report is checked; the GPU suites' Slurm scripts are rendered by the real launcher (dry run); and
Slurm entries are submitted through the real launcher to a stand-in sbatch (no Slurm controller here)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from megatron_rl.nightly.__main__ import main
from megatron_rl.nightly.suite import load_suite

pytestmark = pytest.mark.slow
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def test_cpu_smoke_suite_runs_and_reports(tmp_path):
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.nightly", "--suite", "cpu_smoke", "--report", str(report)],
        capture_output=True, text=True, timeout=1500, env=ENV, cwd=tmp_path,
    )  # fmt: skip
    summary = (report / "summary.md").read_text() if (report / "summary.md").exists() else proc.stdout[-3000:]
    assert proc.returncode == 0, summary

    suite = load_suite("cpu_smoke")
    data = json.loads((report / "report.json").read_text())
    assert data["passed"] is True and data["suite"] == "cpu_smoke" and data["launcher"] == "local"
    assert [e["name"] for e in data["entries"]] == [e.name for e in suite.entries]
    for entry, got in zip(suite.entries, data["entries"]):
        assert got["status"] == "passed", got
        assert [a["text"] for a in got["assertions"]] == [a.text for a in entry.assertions]
        assert all(a["passed"] and a["observed"] is not None for a in got["assertions"])
        observed = {a["text"]: a["observed"] for a in got["assertions"]}
        assert observed[f"last(step) >= {entry.steps}"] == entry.steps
        assert 1.0 <= observed["median(train/token_mult_prob_error) < 1.001"] < 1.001
        assert 0.0 < got["values"]["median(timing/step_s)"]["value"] < 60
        rows = [json.loads(x) for x in (Path(got["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, entry.steps + 1))
        assert (Path(got["run_dir"]) / "launch.log").read_text().startswith("$ ")

    md = (report / "summary.md").read_text()
    assert md.startswith("# Nightly suite `cpu_smoke`: PASSED")
    assert f"| `{suite.entries[0].name}` | ✅ passed |" in md
    ts = ET.parse(report / "junit.xml").getroot().find("testsuite")
    assert ts.get("name") == "nightly.cpu_smoke" and ts.get("failures") == "0" and ts.get("errors") == "0"
    assert [c.get("name") for c in ts.findall("testcase")] == [e.name for e in suite.entries]
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(suite.entries)


@pytest.mark.parametrize("name", ["nightly", "release", "perf"])
def test_gpu_suite_dry_run_renders_every_slurm_script(name, tmp_path, capsys):
    report, out = tmp_path / "report", tmp_path / "lustre"
    assert main(["--suite", name, "--dry-run", "--report", str(report), "--output-root", str(out)]) == 0
    suite = load_suite(name)
    scripts = sorted(p.name for p in (report / "scripts").iterdir())
    assert scripts == sorted(f"{e.name}.sbatch" for e in suite.entries)
    for e in suite.entries:
        text = (report / "scripts" / f"{e.name}.sbatch").read_text()
        assert text.startswith("#!/bin/bash"), e.name
        assert re.search(rf"^#SBATCH --nodes={e.nodes}$", text, re.M), e.name
        assert re.search(rf"run\.dir={re.escape(str(out))}/{name}-\d{{8}}-\d{{6}}/{e.name}\b", text), e.name
        for override in (f"run.steps={e.steps}", f"run.name={e.name}", f"conf={e.recipe}", *e.overrides):
            assert override in text, (e.name, override)
        assert "cluster.launcher=local" in text  # the job runs the training in-process on its Ray head
    assert not out.exists() and not (report / "report.json").exists()  # nothing ran, nothing submitted
    assert "nothing launched" in capsys.readouterr().out


def test_dry_run_reports_an_entry_the_launcher_refuses(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "launcher: slurm\nentries:\n"
        "  - {name: good, recipe: llama8b, steps: 2, nodes: 1}\n"
        "  - {name: bad_layout, recipe: llama70b, steps: 2, nodes: 16, overrides: [policy.parallel.tp=3]}\n"
    )
    assert main(["--suite", str(suite), "--dry-run", "--report", str(tmp_path / "r")]) == 1
    assert [p.name for p in (tmp_path / "r" / "scripts").iterdir()] == ["good.sbatch"]
    out = capsys.readouterr().out
    assert "bad_layout" in out and "tp" in out and "1 of 2 entries could not be rendered" in out


# A stand-in sbatch: "runs" the job at once by writing the metrics the training would, from the run.dir and
# run.steps in the script the launcher rendered, and records COMPLETED for the stand-in sacct.
SBATCH = r"""
import json, os, re, sys
script = open(sys.argv[-1]).read()
run_dir = re.search(r"run\.dir=(\S+)", script).group(1)
steps = int(re.search(r"run\.steps=(\d+)", script).group(1))
d = os.environ["FAKE_SLURM_DIR"]
job = str(4000 + len(os.listdir(d)))
open(os.path.join(d, job), "w").write("COMPLETED")
with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    for s in range(1, steps + 1):
        f.write(json.dumps({"step": s, "memory/peak_gb": 50.0, "train/token_mult_prob_error": 1.02}) + "\n")
open(os.path.join(run_dir, "slurm", f"log-job_{job}_0.out"), "w").write("training done\n")
print(job)
"""
SACCT = r"""
import os, sys
print(open(os.path.join(os.environ["FAKE_SLURM_DIR"], sys.argv[sys.argv.index("-j") + 1])).read())
"""


def test_slurm_entries_submitted_through_the_launcher(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in (("sbatch", SBATCH), ("sacct", SACCT), ("squeue", ""), ("scancel", "")):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755 | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    suite = tmp_path / "gpu.yaml"
    suite.write_text(
        "launcher: slurm\n"
        "defaults: {steps: 3, assertions: ['median(train/token_mult_prob_error) < 1.05', 'max(memory/peak_gb) < 75']}\n"
        "entries:\n"
        "  - {name: llama8b_2nodes, recipe: llama8b, nodes: 2, steps: 4}\n"
    )
    report = tmp_path / "report"
    argv = [
        "--suite",
        str(suite),
        "--report",
        str(report),
        "--output-root",
        str(tmp_path / "runs"),
        "--poll-s",
        "0.2",
    ]
    rc = main(argv)
    data = json.loads((report / "report.json").read_text())
    assert rc == 0, data
    (e,) = data["entries"]
    assert (e["name"], e["status"], e["job_id"]) == ("llama8b_2nodes", "passed", "4000")
    assert [a["observed"] for a in e["assertions"]] == [4, 1.02, 50.0]
    run_dir = Path(e["run_dir"])
    script = next((run_dir / "slurm").glob("*.sbatch")).read_text()  # what the launcher wrote and submitted
    assert re.search(r"^#SBATCH --nodes=2$", script, re.M) and "run.steps=4" in script
    assert "submitted Slurm job 4000" in (run_dir / "submit.log").read_text()
    assert e["log"].endswith("log-job_4000_0.out")


def test_nightly_renders_what_the_launcher_cli_dry_run_prints(tmp_path, capfd):
    """One Slurm renderer: a suite entry's script is the launcher's own `--dry-run` output for its command."""
    from megatron_rl.launch.__main__ import main as launch
    from megatron_rl.nightly.slurm import render_script

    entry = next(e for e in load_suite("nightly").entries if e.recipe == "llama8b")
    run_dir = tmp_path / "runs" / entry.name
    rendered = render_script(entry, run_dir)
    argv = [entry.algo, f"conf={entry.recipe}", *entry.launcher_overrides(run_dir), "cluster.launcher=slurm"]
    capfd.readouterr()
    assert launch([*argv, "--dry-run"]) == 0
    assert capfd.readouterr().out == rendered and f"run.dir={run_dir}" in rendered
