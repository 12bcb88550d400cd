"""The converter writing to a read-only or full filesystem: one line naming the path, what is wrong and the
space needed, exit 2, nothing half-written. Real filesystems: a 1 MiB tmpfs and a read-only bind mount of
it, in a private mount namespace (`unshare -m`) of one spawned process that runs every case."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from megatron_rl.models.tiny import save_tiny_checkpoint

# Runs inside the namespace: every case through the CLI's main() (or the writer the GRPO export uses),
# results as one JSON line.
CASES = textwrap.dedent(
    """
    import contextlib, io, json, sys, torch
    from pathlib import Path
    from checkpoint_converters.__main__ import main
    from checkpoint_converters.hf_io import write_hf_checkpoint
    from checkpoint_converters.storage import storage_error
    from megatron_rl.errors import UserError

    hf, meg, mnt = sys.argv[1:4]
    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main([*argv, "--no-progress"])
        return {"rc": rc, "err": err.getvalue()}
    out = {
        "to_megatron_read_only": cli("hf-to-megatron", "--hf-dir", hf, "--out", f"{mnt}/ro/meg"),
        "to_megatron_full": cli("hf-to-megatron", "--hf-dir", hf, "--out", f"{mnt}/meg"),
        "to_hf_full": cli("megatron-to-hf", "--megatron-dir", meg, "--out", f"{mnt}/hf"),
    }
    # A size nobody knew ahead (the GRPO run's HF export): the writer's own failure is translated.
    try:
        write_hf_checkpoint([("w", torch.zeros(600_000))], hf, f"{mnt}/export")
        out["export_full"] = "written"
    except UserError as exc:
        out["export_full"] = str(exc)
    # torch's archive writer on a full disk reports only a short write ("unexpected pos").
    try:
        torch.save(torch.zeros(600_000), f"{mnt}/t.pt")
        out["short_write"] = "written"
    except RuntimeError as exc:
        Path(f"{mnt}/t.pt").unlink(missing_ok=True)
        out["short_write"] = [str(exc).splitlines()[0], str(storage_error(exc, Path(f"{mnt}/t.pt"), 2_400_000))]
    out["left"] = sorted(str(p.relative_to(mnt)) for p in Path(mnt).rglob("*"))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if shutil.which("unshare") is None:
        pytest.skip("the unshare tool (util-linux) is not installed: no private mount namespace")
    root = tmp_path_factory.mktemp("storage")
    hf = save_tiny_checkpoint(root / "hf", "llama")
    meg = root / "meg"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "checkpoint_converters",
            "hf-to-megatron",
            "--hf-dir",
            str(hf),
            "--out",
            str(meg),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    mnt = root / "mnt"
    mnt.mkdir()
    (root / "cases.py").write_text(CASES)
    shell = (
        f"mount -t tmpfs -o size=1m tmpfs {mnt} && mkdir {mnt}/ro && mount --bind {mnt}/ro {mnt}/ro && "
        f"mount -o remount,bind,ro {mnt}/ro && exec {sys.executable} {root / 'cases.py'} {hf} {meg} {mnt}"
    )
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, timeout=300)
    if proc.returncode and "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
        pytest.skip(f"this sandbox forbids private mount namespaces: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), mnt


def _one_line(case: dict) -> str:
    lines = case["err"].strip().splitlines()
    assert case["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), case
    return lines[0]


def test_read_only_output_is_named(results):
    out, mnt = results
    assert _one_line(out["to_megatron_read_only"]) == (
        f"error: Cannot write {mnt}/ro/meg: {mnt}/ro is on a read-only filesystem; write it elsewhere."
    )


@pytest.mark.parametrize("case, out_dir", [("to_megatron_full", "meg"), ("to_hf_full", "hf")])
def test_full_filesystem_says_how_much_was_needed(results, case, out_dir):
    out, mnt = results
    line = _one_line(out[case])
    # The tiny model: 2.6 MiB of fp32 tensors, plus side files and the metadata allowance.
    assert line.startswith(f"error: Cannot write {mnt}/{out_dir}: the filesystem of {mnt} is out of space: ")
    assert "the output needs about 3." in line and "MiB, 1.0 MiB is free" in line


def test_failed_writes_are_translated_and_leave_nothing(results):
    out, mnt = results
    assert out["export_full"] == (
        f"Cannot write {mnt}/export: the filesystem of {mnt} is out of space: the output needs more than the "
        "1.0 MiB free. Free some space or write it elsewhere."
    )
    raw, translated = out["short_write"]
    assert "unexpected pos" in raw  # what users saw before
    assert translated.startswith(f"Cannot write {mnt}/t.pt: the filesystem of {mnt} is out of space")
    assert out["left"] == ["ro"]  # no <out>.tmp, no partial output
