"""`python -m megatron_rl.launch nightly --suite NAME [options]` (also `python -m megatron_rl.nightly`).

Exit status: 0 when every entry passed (and nothing regressed against --baseline), 1 when anything failed,
2 for bad input (unknown suite, malformed assertion, bad flag), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from megatron_rl.errors import UserError
from megatron_rl.nightly.suite import Entry, Suite, available_suites, load_suite, select


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_rl.launch nightly",
        description="Run a nightly suite: launch every entry, check its metrics, write a report folder "
        "(summary.md, report.html, junit.xml, report.json).",
    )
    p.add_argument(
        "--suite",
        required=True,
        help=f"a suite name ({', '.join(available_suites())}; your own in $MEGATRON_RL_CONF_DIR/suites/) "
        "or a YAML path",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="render every entry's Slurm script (or local command); launch nothing",
    )
    p.add_argument("--only", metavar="PATTERN", help="comma-separated glob patterns of entry names to run")
    p.add_argument(
        "--report", metavar="DIR", type=Path, help="report folder (default nightly_reports/SUITE-TIMESTAMP)"
    )
    p.add_argument(
        "--baseline", metavar="DIR", type=Path, help="a previous report folder to flag regressions against"
    )
    p.add_argument("--launcher", choices=("local", "slurm"), help="override the suite's launcher")
    p.add_argument("--output-root", metavar="DIR", help="where run directories go (shared storage for Slurm)")
    p.add_argument(
        "--poll-s", type=float, default=None, help="seconds between status polls (default 2 local, 30 Slurm)"
    )
    return p


def _check_entries(entries: list[Entry], launcher: str, suite: Suite) -> None:
    from megatron_rl.config.compose import recipes

    known = recipes()
    for e in entries:
        if e.recipe is not None and e.recipe not in known:
            raise UserError(
                f"suite file {suite.path}, entry {e.name!r}: unknown recipe {e.recipe!r} "
                f"(known recipes: {', '.join(known)})."
            )
        if e.command is not None and launcher != "local":
            raise UserError(
                f"suite file {suite.path}, entry {e.name!r}: a custom `command` runs only with the local launcher."
            )


def dry_run(entries: list[Entry], launcher: str, run_root: Path, report_dir: Path, console: Console) -> int:
    from megatron_rl.nightly.local import local_command
    from megatron_rl.nightly.slurm import render_script

    scripts = report_dir / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"dry run ({launcher}): nothing launched")
    for col in ("entry", "recipe", "steps", "nodes", "assertions"):
        table.add_column(col)
    table.add_column("script", overflow="fold")
    failures = 0
    for e in entries:
        run_dir = (run_root / e.name).absolute()
        try:
            if launcher == "slurm":
                text, path = render_script(e, run_dir), scripts / f"{e.name}.sbatch"
            else:
                text, path = shlex.join(local_command(e, run_dir)) + "\n", scripts / f"{e.name}.sh"
        except UserError as exc:
            failures += 1
            console.print(f"[red]error[/] {e.name}: {exc}")
            continue
        path.write_text(text)
        table.add_row(
            e.name,
            e.recipe or "(command)",
            str(e.steps or "—"),
            str(e.nodes or 1),
            str(len(e.assertions)),
            str(path),
        )
    console.print(table)
    if failures:
        console.print(f"[red]{failures} of {len(entries)} entries could not be rendered[/]")
    return 1 if failures else 0


def run(args: argparse.Namespace, console: Console) -> int:
    from megatron_rl.nightly.baseline import compare, load_baseline
    from megatron_rl.nightly.report import SuiteRun, write_report
    from megatron_rl.nightly.runner import run_entries

    suite = load_suite(args.suite)
    entries = select(suite, args.only)
    launcher = args.launcher or suite.launcher
    _check_entries(entries, launcher, suite)
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    report_dir = (args.report or Path("nightly_reports") / f"{suite.name}-{stamp}").absolute()
    root = args.output_root or suite.output_root
    run_root = Path(root) / f"{suite.name}-{stamp}" if root else report_dir / "runs"
    baseline = load_baseline(args.baseline) if args.baseline else None  # fail before hours of runs, not after
    if args.dry_run:
        return dry_run(entries, launcher, run_root, report_dir, console)
    for e in entries:  # a reused run directory would make the launcher resume a finished run
        if (run_root / e.name).exists() and any((run_root / e.name).iterdir()):
            raise UserError(
                f"run directory {run_root / e.name} already exists: give a new --report (or --output-root)."
            )
    poll_s = args.poll_s if args.poll_s is not None else (2.0 if launcher == "local" else 30.0)
    console.print(f"suite {suite.name}: {len(entries)} entries, launcher {launcher}, report {report_dir}")
    t0 = time.monotonic()
    results, interrupted = run_entries(suite, entries, launcher, run_root, console, poll_s=poll_s)
    if baseline is not None:
        compare(suite, results, baseline)
    outcome = SuiteRun(
        suite,
        results,
        launcher,
        started,
        time.monotonic() - t0,
        str(args.baseline) if args.baseline else None,
        interrupted,
    )
    files = write_report(outcome, report_dir)
    verdict = "[green]PASSED[/]" if outcome.passed else "[red]FAILED[/]"
    console.print(f"suite {suite.name}: {verdict}; report {files['markdown']} and {files['html']}")
    for reg in outcome.regressions:
        console.print(
            f"[red]regression[/] {reg.entry}: {reg.expression} {reg.baseline:.6g} -> {reg.current:.6g} ({reg.change})"
        )
    if interrupted:
        return 130
    return 0 if outcome.passed else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    console = Console(stderr=False)
    try:
        args = build_parser().parse_args(argv)
        return run(args, console)
    except SystemExit as exc:  # --help, or argparse's own usage error
        return int(exc.code or 0)
    except UserError as exc:  # also a missing MEGATRON_RL_CONF_DIR, met while listing the suites for --help
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
