"""The platform package: the one place that tests for CUDA, cheap to import, and the megatron-core range its
CPU patches were checked against (pyproject.toml, the constant, and the CLI's stop outside it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from megatron_rl import platform

ROOT = Path(__file__).resolve().parents[2]
CUDA_TEST = re.compile(r"\bcuda\s*\.\s*is_available\s*\(")
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "offline"}


def test_only_the_platform_package_tests_for_cuda():
    home = ROOT / "megatron_rl" / "platform"
    sources = [
        p
        for top in ("megatron_rl", "checkpoint_converters")
        for p in sorted((ROOT / top).rglob("*.py"))
        if home not in p.parents
    ]
    assert len(sources) > 50  # the walk found the package, so an empty result below means something
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if CUDA_TEST.search(line)
    ]
    assert offenders == [], "ask megatron_rl.platform (use_cpu(), gpu_uuid(), ...) instead"
    assert CUDA_TEST.search((ROOT / "megatron_rl/platform/__init__.py").read_text())


def test_platform_imports_without_megatron_or_engines():
    """vLLM actor processes import it: it must not drag in Megatron (or Ray/vLLM)."""
    code = (
        "import sys, megatron_rl.platform\n"
        "heavy = ('megatron.', 'vllm', 'ray', 'transformers')\n"
        "print(sorted(m for m in sys.modules if m == 'megatron' or m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV)
    assert out.stdout.strip() == "[]"


def test_pyproject_bounds_megatron_core_to_the_supported_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (mcore,) = [Requirement(d) for d in deps if Requirement(d).name == "megatron-core"]
    assert mcore.specifier == SpecifierSet(platform.MEGATRON_CORE_SUPPORTED)
    assert "0.16.1" in mcore.specifier and "0.17.0" not in mcore.specifier


def test_the_installed_megatron_core_is_supported():
    platform.check_megatron_core()  # raises a UserError otherwise


def test_cli_stops_on_another_megatron_core_with_one_line(tmp_path):
    """A real run command with megatron-core 9.9.9 installed (a dist-info first on sys.path): one line
    naming both versions, exit 2, before anything is written."""
    site = tmp_path / "site"
    info = site / "megatron_core-9.9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\nVersion: 9.9.9\n")
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.launch", "grpo", "conf=tiny", "run.steps=1", "run.dir=run"],
        capture_output=True, text=True, timeout=120, cwd=work, env={**ENV, "PYTHONPATH": path},
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: megatron-core 9.9.9 is installed")
    assert platform.MEGATRON_CORE_SUPPORTED in lines[0]
    assert list(work.iterdir()) == []
