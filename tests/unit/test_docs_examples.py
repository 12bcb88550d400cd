"""The documented commands run as documented.

Every `python -m megatron_rl.launch ...` line in a fenced code block of README.md or docs/*.md that only
plans, prints or renders (`plan`, `--cfg`, `--dry-run`, `--help`) runs here, in-process, and must exit with
the status its trailing comment states: `# exit N` (no statement means 0), and every "double-quoted" text in
that comment must appear in what the command prints. Commands that train or submit are not run; neither are
synopses (`[--cfg]`, `conf=RECIPE`).
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_rl.config.compose import PROFILES_DIR
from megatron_rl.launch.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = ["python", "-m", "megatron_rl.launch"]
CHEAP = {"plan", "--cfg", "--dry-run", "--help"}
_PLACEHOLDER = re.compile(r"[\[\]|]|\.\.\.|(^|=)[A-Z][A-Z_]+$")


@dataclass(frozen=True)
class Example:
    where: str  # file:line
    argv: list[str]
    status: int
    says: tuple[str, ...]  # texts the output must contain


def _code_lines(path: Path):
    """(line number, text) of the lines inside fenced code blocks, `\\`-continued lines joined."""
    fenced, pending, start = False, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if text.startswith("```"):
            fenced, pending = not fenced, ""
            continue
        if not fenced:
            continue
        if not pending:
            start = n
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text
        pending = ""


def documented_examples() -> list[Example]:
    found = []
    for path in DOCS:
        for n, text in _code_lines(path):
            command, _, comment = text.partition(" #")
            words = shlex.split(command)
            if words[: len(PREFIX)] != PREFIX:
                continue
            argv = words[len(PREFIX) :]
            if ">" in argv:  # the shell's redirection, not an argument
                argv = argv[: argv.index(">")]
            if not CHEAP & set(argv) or any(_PLACEHOLDER.search(a) for a in argv):
                continue
            status = re.search(r"\bexit (\d+)", comment)
            found.append(
                Example(
                    where=f"{path.relative_to(ROOT)}:{n}",
                    argv=argv,
                    status=int(status.group(1)) if status else 0,
                    says=tuple(re.findall(r'"([^"]+)"', comment)),
                )
            )
    return found


EXAMPLES = documented_examples()


def test_the_collector_finds_the_documented_examples():
    where = {e.where.split(":")[0] for e in EXAMPLES}
    assert {"README.md", "docs/quickstart.md", "docs/nightly.md"} <= where
    assert len(EXAMPLES) >= 10
    # The plan that does not fit is documented with its status and the part it names.
    unfit = [e for e in EXAMPLES if e.status == 1]
    assert unfit and all(e.argv[0] == "plan" and e.says for e in unfit)
    assert any(e.status == 2 for e in EXAMPLES)
    # Synopses and runs that train are left out.
    assert not any("[--cfg]" in e.argv or e.argv == ["grpo", "conf=tiny", "run.steps=40"] for e in EXAMPLES)


@pytest.fixture
def site_profile(tmp_path, monkeypatch):
    """The docs' own site profile, `mysite` (docs/clusters.md: a copy of the example profile), and a
    scratch working directory for what dry runs write (nightly report folders)."""
    user = tmp_path / "conf"
    (user / "clusters").mkdir(parents=True)
    shutil.copy(PROFILES_DIR / "h100_example.yaml", user / "clusters" / "mysite.yaml")
    monkeypatch.setenv("MEGATRON_RL_CONF_DIR", str(user))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_documented_command_exits_as_documented(example, site_profile, capsys):
    status = main(list(example.argv))
    out = capsys.readouterr()
    printed = out.out + out.err
    assert status == example.status, f"{example.where}: {shlex.join(example.argv)}\n{printed[-2000:]}"
    flat = " ".join(printed.split())  # rich wraps long lines at the terminal width
    for text in example.says:
        assert " ".join(text.split()) in flat, f"{example.where}: {text!r} not printed"
