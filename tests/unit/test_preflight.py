"""Runs that cannot start stop before anything starts: one `error:` line, exit 2, nothing written, no Ray.

The layout is checked against the model's own numbers (tiny models' come from their recipe, without
building them), the data files' first lines through the loaders' own checks, and the run directory's owner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.config.compose import compose, save_resolved
from megatron_rl.launch.__main__ import main

GOOD = {
    "grpo": {"prompt": "1+1=", "answer": "2"},
    "sft": {"prompt": "1+1=", "response": "2"},
    "dpo": {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
}
RECIPE = {"grpo": "tiny", "sft": "sft_tiny", "dpo": "dpo_tiny"}


def _write(path: Path, lines: list[str | bytes]) -> str:
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return str(path)


def _fail(capsys, argv: list[str]) -> str:
    """Runs the CLI in this process; returns its one error line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The CLI runs here: a run that started would leave runs/ (or the run.dir below) behind."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _nothing_written(workdir: Path, inputs: set[str]) -> None:
    assert {p.name for p in workdir.iterdir()} == inputs


@pytest.mark.parametrize(
    "overrides, message",
    [
        # The model's heads first, even where the world size is wrong too (2 ranks, tp=3).
        (["policy.parallel.tp=3", "cluster.ranks=3"], "attention heads (4) are not divisible by tp=3"),
        (["policy.parallel.tp=3"], "attention heads (4) are not divisible by tp=3: choose tp among [1, 2, 4]"),
        (["policy.parallel.tp=1", "policy.parallel.sequence_parallel=false", "policy.parallel.pp=3",
          "cluster.ranks=3"], "layers (4) are not divisible by pp*vpp=3"),
        (["model.hf_path=tiny:qwen3_moe", "policy.parallel.ep=3", "cluster.ranks=6"],
         "experts (4) are not divisible by ep=3"),
        (["policy.parallel.tp=2", "cluster.ranks=3"], "World size 3 is not divisible by tp*pp*cp"),
        (["model.hf_path=tiny:gpt9"], "unknown tiny arch 'gpt9'"),
        (["model.hf_path=no/such/model"], "model.hf_path='no/such/model': No Hugging Face config.json"),
    ],
)  # fmt: skip
def test_layout_and_model_mistakes(workdir, capsys, overrides, message):
    line = _fail(capsys, ["grpo", "conf=tiny", *overrides])
    assert message in line and "Traceback" not in line
    _nothing_written(workdir, set())


def test_sft_batch_smaller_than_data_parallel(workdir, capsys):
    line = _fail(capsys, ["sft", "conf=sft_tiny", "sft.batch_size=1"])
    assert "sft.batch_size=1 is smaller than the data-parallel size 2" in line
    _nothing_written(workdir, set())


@pytest.mark.parametrize("command", ["grpo", "sft", "dpo"])
@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "data.path={path}: no such file"),
        ([], "Dataset file {path} holds no examples"),
        (["GOOD", '{"prompt": "2+2=", "answer": '], "{path}:2: not valid JSON (Expecting value at column 30, the end of the line: is it cut short?)"),
        (["GOOD", b'{"prompt": "caf\xe9"}'], "{path}:2: not UTF-8 text (byte 0xe9 at byte 16 of the line)"),
        (["GOOD", "[1, 2]"], "{path}:2: expected a JSON object, got list"),
        (["GOOD", '{"question": "2+2="}'], "{path}:2: "),
    ],
)  # fmt: skip
def test_data_mistakes(workdir, capsys, command, lines, message):
    path = workdir / "data.jsonl"
    if lines is not None:
        _write(path, [json.dumps(GOOD[command]) if ln == "GOOD" else ln for ln in lines])
    line = _fail(capsys, [command, f"conf={RECIPE[command]}", "data.kind=jsonl", f"data.path={path}"])
    # A truncated line's column is on that line (json alone would say "line 2 column 1" past its newline).
    assert message.format(path=path) in line
    _nothing_written(workdir, {"data.jsonl"} if lines is not None else set())


def test_a_key_missing_from_a_line_is_named(workdir, capsys):
    path = _write(workdir / "d.jsonl", [json.dumps(GOOD["grpo"]), '{"prompt": "2+2="}'])
    line = _fail(capsys, ["grpo", "conf=tiny", "data.kind=jsonl", f"data.path={path}"])
    assert line == f"error: {path}:2: missing field(s) ['answer']; the line has ['prompt']."
    line = _fail(capsys, ["dpo", "conf=dpo_tiny", "data.kind=jsonl", f"data.path={path}"])
    assert "missing field(s) ['chosen', 'rejected']" in line
    line = _fail(
        capsys, ["sft", "conf=sft_tiny", "data.kind=jsonl", f"data.path={path}", "data.prompt_key=q"]
    )
    assert f"{path}:1: expected a 'messages' list or 'q' + 'response' fields" in line


def test_held_out_split_and_validation_file(workdir, capsys):
    path = _write(workdir / "d.jsonl", [json.dumps(GOOD["grpo"])] * 3)
    line = _fail(capsys, ["grpo", "conf=tiny", "data.kind=jsonl", f"data.path={path}", "data.val_size=3"])
    assert "data.val_size=3 holds out every line of" in line and "give data.val_path" in line
    line = _fail(
        capsys, ["grpo", "conf=tiny", "data.kind=jsonl", f"data.path={path}", "data.val_path=v.jsonl"]
    )
    assert "data.val_path=v.jsonl: no such file" in line
    _nothing_written(workdir, {"d.jsonl"})


def test_a_run_directory_belongs_to_its_command(workdir, capsys):
    """Default directories tell commands apart; a shared explicit run.dir is refused, not resumed."""
    assert compose("tiny").run.dir == "runs/grpo/tiny"
    assert compose("tiny", command="sft").run.dir == "runs/sft/tiny"
    run = workdir / "shared"
    save_resolved(compose("tiny", [f"run.dir={run}"]), run)
    before = (run / "config.yaml").read_text()
    line = _fail(capsys, ["sft", "conf=sft_tiny", f"run.dir={run}"])
    assert line == (
        f"error: Run directory {run} belongs to a `grpo` run (its config.yaml says command: grpo); `sft` "
        "cannot resume it. Choose another run.dir or run.name."
    )
    assert (run / "config.yaml").read_text() == before and {p.name for p in run.iterdir()} == {"config.yaml"}


def test_the_cli_returns_in_seconds_without_starting_ray(tmp_path):
    """As a user runs it: a separate process, its own Ray and NeMo-Run directories, none of them created."""
    data = _write(tmp_path / "d.jsonl", [json.dumps(GOOD["grpo"]), '{"prompt": "2+2=", "answer": '])
    env = {
        **os.environ,
        "RAY_TMPDIR": str(tmp_path / "ray"),
        "NEMORUN_HOME": str(tmp_path / "nemo_run"),
        "PYTHONWARNINGS": "ignore",
    }
    for argv, message in [
        (["policy.parallel.tp=3", "cluster.ranks=3"], "attention heads (4) are not divisible by tp=3"),
        (["data.kind=jsonl", f"data.path={data}"], f"{data}:2: not valid JSON"),
    ]:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr
        assert time.monotonic() - started < 30
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # no runs/, ray/ or nemo_run/
