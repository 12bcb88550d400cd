"""The report folder: report.json (machine-readable, the next run's baseline), summary.md, junit.xml and
report.html. Each file is written to a temporary name and renamed, so a reader never sees half a file."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from megatron_rl.nightly.baseline import tracked_values
from megatron_rl.nightly.results import EntryResult, Regression
from megatron_rl.nightly.suite import Suite

ICON = {"passed": "✅ passed", "failed": "❌ failed", "error": "💥 error", "timeout": "⏱️ timeout"}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class SuiteRun:
    suite: Suite
    results: list[EntryResult]
    launcher: str
    started: datetime
    duration_s: float
    baseline: str | None = None
    interrupted: bool = False

    @property
    def regressions(self) -> list[Regression]:
        return [r for res in self.results for r in res.regressions]

    @property
    def passed(self) -> bool:
        gated = self.regressions if self.suite.fail_on_regression else []
        return not self.interrupted and all(r.ok for r in self.results) and not gated


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def fmt_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_value(v: float | None) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "NaN"
    return f"{v:.8g}"  # enough digits to tell 1.0000002 from 1


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return str(path)


def to_json(run: SuiteRun, report_dir: Path) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in run.results) for s in ("passed", "failed", "error", "timeout")}
    entries = []
    for r in run.results:
        e = r.entry
        entries.append(
            {
                "name": e.name,
                "recipe": e.recipe,
                "command": e.command,
                "algo": e.algo,
                "steps": e.steps,
                "nodes": e.nodes,
                "status": r.status,
                "detail": r.detail,
                "duration_s": round(r.duration_s, 3),
                "run_dir": str(r.run_dir),
                "log": str(r.log_path) if r.log_path else None,
                "job_id": r.job_id,
                "assertions": [
                    {
                        "text": a.text,
                        "expression": a.expression,
                        "passed": a.passed,
                        "observed": _finite(a.observed),
                        "message": a.message,
                    }
                    for a in r.assertions
                ],
                "values": tracked_values(r),
                "regressions": [vars(g) for g in r.regressions],
                "metrics_problems": r.metrics.problems[:20],
                "log_tail": r.log_tail,
            }
        )
    return {
        "format": 1,
        "suite": run.suite.name,
        "suite_file": str(run.suite.path),
        "description": run.suite.description,
        "launcher": run.launcher,
        "started": run.started.isoformat(timespec="seconds"),
        "duration_s": round(run.duration_s, 3),
        "git_commit": git_commit(),
        "host": platform.node(),
        "baseline": run.baseline,
        "interrupted": run.interrupted,
        "passed": run.passed,
        "counts": counts,
        "entries": entries,
    }


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(run: SuiteRun, report_dir: Path) -> str:
    n_ok = sum(r.ok for r in run.results)
    verdict = "PASSED" if run.passed else "FAILED"
    regs = run.regressions
    lines = [
        f"# Nightly suite `{run.suite.name}`: {verdict}",
        "",
        f"{n_ok}/{len(run.results)} entries passed · {len(regs)} regression(s) · started "
        f"{run.started.strftime('%Y-%m-%d %H:%M UTC')} · {fmt_duration(run.duration_s)} · launcher "
        f"{run.launcher} · commit {git_commit()}",
        "",
        f"Baseline: `{run.baseline}`" if run.baseline else "Baseline: none",
    ]
    if run.suite.description:
        lines += ["", run.suite.description]
    if run.interrupted:
        lines += ["", "**Interrupted**: entries not started are missing from this report."]
    lines += ["", "| entry | status | duration | assertions | plots |", "|---|---|---|---|---|"]
    for r in run.results:
        checks = "<br>".join(
            f"{'✅' if a.passed else '❌'} `{_md_cell(a.text)}` ({fmt_value(a.observed)})"
            for a in r.assertions
        )
        why = f"{len(r.failed_assertions)} assertion(s)" if r.status == "failed" else r.detail
        status = ICON[r.status] + ("" if r.status == "passed" else f": {_md_cell(why)}")
        if r.regressions:
            status += f"; 📉 {len(r.regressions)} regression(s)"
        lines.append(
            f"| `{r.entry.name}` | {status} | {fmt_duration(r.duration_s)} | {checks or '—'} | "
            f"[plots](report.html#{r.entry.name}) |"
        )
    if regs:
        lines += [
            "",
            "## Regressions against the baseline",
            "",
            "| entry | value | baseline | now | change | allowed |",
            "|---|---|---|---|---|---|",
        ]
        for g in regs:
            lines.append(
                f"| `{g.entry}` | `{g.expression}` ({g.better} is better) | {g.baseline:.6g} | {g.current:.6g} | "
                f"{g.change} | ±{g.allowed:.4g} |"
            )
    bad = [r for r in run.results if not r.ok]
    if bad:
        lines += ["", "## Failures"]
    for r in bad:
        lines += ["", f"### `{r.entry.name}`: {r.status} ({r.detail})"]
        items = [f"- `{a.text}`: {a.message}" for a in r.failed_assertions]
        items += [f"- metrics file: {p}" for p in r.metrics.problems[:5]]
        lines += ["", *items] if items else []
        if r.log_tail:
            lines += ["", f"Log tail (`{_relative(r.log_path, report_dir)}`):", "", "```", r.log_tail, "```"]
    return "\n".join(lines) + "\n"


def _regression_text(r: EntryResult) -> str:
    return "\n".join(
        f"regressed {g.expression}: {g.baseline:.6g} -> {g.current:.6g} ({g.change}, allowed ±{g.allowed:.4g})"
        for g in r.regressions
    )


def to_junit(run: SuiteRun) -> str:
    """One test case per entry: <error> for a run that crashed or timed out (text: its log tail), <failure> for
    failed assertions, or for gating regressions of an otherwise passing entry."""
    name = f"nightly.{run.suite.name}"
    gate = run.suite.fail_on_regression
    failures = sum(
        r.status == "failed" or (r.status == "passed" and gate and bool(r.regressions)) for r in run.results
    )
    errors = sum(r.status in ("error", "timeout") for r in run.results)
    root = ET.Element("testsuites", name="nightly", tests=str(len(run.results)))
    suite = ET.SubElement(
        root,
        "testsuite",
        name=name,
        tests=str(len(run.results)),
        failures=str(failures),
        errors=str(errors),
        time=f"{run.duration_s:.3f}",
        timestamp=run.started.isoformat(timespec="seconds"),
        hostname=platform.node(),
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("git_commit", git_commit()),
        ("launcher", run.launcher),
        ("baseline", run.baseline or ""),
    ):
        ET.SubElement(props, "property", name=key, value=value)
    for r in run.results:
        case = ET.SubElement(suite, "testcase", classname=name, name=r.entry.name, time=f"{r.duration_s:.3f}")
        failing = "\n".join(f"{a.text}: {a.message}" for a in r.failed_assertions)
        regressed = _regression_text(r)
        if r.status in ("error", "timeout"):
            kind = "Timeout" if r.status == "timeout" else "RunError"
            el = ET.SubElement(case, "error", message=r.detail, type=kind)
            el.text = "\n\n".join(t for t in (failing, regressed, r.log_tail) if t)
        elif r.status == "failed":
            message = f"{len(r.failed_assertions)} assertion(s) failed"
            el = ET.SubElement(case, "failure", message=message, type="AssertionFailure")
            el.text = "\n".join(t for t in (failing, regressed) if t)
        elif regressed and gate:
            el = ET.SubElement(
                case, "failure", message=f"{len(r.regressions)} regression(s)", type="Regression"
            )
            el.text = regressed
        elif regressed:
            ET.SubElement(case, "system-err").text = "regressions (not gating):\n" + regressed
        out = ET.SubElement(case, "system-out")
        out.text = f"run_dir: {r.run_dir}\nlog: {r.log_path or ''}\njob: {r.job_id or ''}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_report(run: SuiteRun, report_dir: Path) -> dict[str, Path]:
    from megatron_rl.nightly.html_report import to_html

    report_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": report_dir / "report.json",
        "markdown": report_dir / "summary.md",
        "junit": report_dir / "junit.xml",
        "html": report_dir / "report.html",
    }
    write_atomic(files["json"], json.dumps(to_json(run, report_dir), indent=2, allow_nan=False) + "\n")
    write_atomic(files["markdown"], to_markdown(run, report_dir))
    write_atomic(files["junit"], to_junit(run))
    write_atomic(files["html"], to_html(run, report_dir))
    return files
