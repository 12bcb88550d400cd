"""report.html: one self-contained page (plots embedded as base64 PNG), readable offline or as a CI artifact."""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from megatron_rl.nightly.plots import entry_png
from megatron_rl.nightly.report import ICON, SuiteRun, fmt_duration, fmt_value, git_commit

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
code, pre { font-family: ui-monospace, monospace; font-size: 12px; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; max-height: 30em; }
.passed { color: #1a7f37; } .failed, .error, .timeout { color: #cf222e; }
.ok { color: #1a7f37; } .bad { color: #cf222e; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; }
"""


def _checks(result) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(a.text)}</code></td><td>{escape(fmt_value(a.observed))}</td>"
        f"<td class='{'ok' if a.passed else 'bad'}'>{'pass' if a.passed else 'FAIL'}</td>"
        f"<td>{escape(a.message)}</td></tr>"
        for a in result.assertions
    )
    return f"<table><tr><th>assertion</th><th>observed</th><th></th><th>why</th></tr>{rows}</table>"


def _entry_section(result, report_dir: Path) -> str:
    e = result.entry
    what = (
        f"recipe <code>{escape(e.recipe)}</code>"
        if e.recipe
        else f"command <code>{escape(' '.join(e.command or []))}</code>"
    )
    parts = [
        f"<h2 id='{escape(e.name)}'>{escape(e.name)} <span class='{result.status}'>{escape(ICON[result.status])}</span></h2>",
        f"<p>{what} · {e.steps or '—'} steps · {e.nodes or 1} node(s) · {escape(fmt_duration(result.duration_s))} · "
        f"{escape(result.detail)}<br>run dir <code>{escape(str(result.run_dir))}</code>"
        + (f" · job {escape(result.job_id)}" if result.job_id else "")
        + "</p>",
        _checks(result),
    ]
    if result.regressions:
        rows = "".join(
            f"<tr><td><code>{escape(g.expression)}</code></td><td>{g.baseline:.6g}</td><td>{g.current:.6g}</td>"
            f"<td class='bad'>{escape(g.change)}</td><td>±{g.allowed:.4g}</td></tr>"
            for g in result.regressions
        )
        parts.append(
            "<h3>Regressions</h3><table><tr><th>value</th><th>baseline</th><th>now</th><th>change</th>"
            f"<th>allowed</th></tr>{rows}</table>"
        )
    if result.metrics.series:
        png = entry_png(result.metrics, e.name, e.assertions)
        parts.append(
            f"<img alt='metrics of {escape(e.name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        )
    else:
        parts.append("<p class='bad'>No metrics were logged.</p>")
    if result.metrics.problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in result.metrics.problems[:10])
        parts.append(f"<p>Problems reading metrics:</p><ul>{items}</ul>")
    if result.log_tail:
        parts.append(
            f"<h3>Log tail</h3><p><code>{escape(str(result.log_path))}</code></p><pre>{escape(result.log_tail)}</pre>"
        )
    return "\n".join(parts)


def to_html(run: SuiteRun, report_dir: Path) -> str:
    verdict = "PASSED" if run.passed else "FAILED"
    summary_rows = "".join(
        f"<tr><td><a href='#{escape(r.entry.name)}'>{escape(r.entry.name)}</a></td>"
        f"<td class='{r.status}'>{escape(ICON[r.status])}</td><td>{escape(fmt_duration(r.duration_s))}</td>"
        f"<td>{sum(a.passed for a in r.assertions)}/{len(r.assertions)}</td><td>{len(r.regressions)}</td></tr>"
        for r in run.results
    )
    n_ok = sum(r.ok for r in run.results)
    meta = (
        f"{n_ok}/{len(run.results)} entries passed · {len(run.regressions)} regression(s) · started "
        f"{run.started.strftime('%Y-%m-%d %H:%M UTC')} · {fmt_duration(run.duration_s)} · launcher {run.launcher} · "
        f"commit {git_commit()} · baseline {run.baseline or 'none'}"
    )
    body = [
        f"<h1>Nightly suite <code>{escape(run.suite.name)}</code>: "
        f"<span class='{'passed' if run.passed else 'failed'}'>{verdict}</span></h1>",
        f"<p>{escape(meta)}</p>",
        f"<p>{escape(run.suite.description)}</p>" if run.suite.description else "",
        "<table><tr><th>entry</th><th>status</th><th>duration</th><th>assertions</th><th>regressions</th></tr>"
        f"{summary_rows}</table>",
        *(_entry_section(r, report_dir) for r in run.results),
    ]
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>nightly {escape(run.suite.name)}: {verdict}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
