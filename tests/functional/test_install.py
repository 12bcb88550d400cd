"""`pip install .` (not editable) into a fresh virtual environment works from any directory: the recipes,
config groups, cluster profiles and suites ship inside the package.

Network-free: the fresh environment reuses the locked wheel set of the running interpreter through a .pth line
(torch, Hydra, ... are found there), and pip builds the package with the setuptools found the same way. Python
does not process .pth files inside a directory that a .pth line adds, so the checkout's editable install
(its own .pth hook) stays out: megatron_rl must come from the fresh environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What the build reads (pyproject.toml's packages and readme). pip builds in the source tree (build/,
# *.egg-info), so it builds a copy: the checkout stays clean and concurrent runs do not collide.
SOURCES = ("pyproject.toml", "README.md", "megatron_rl", "checkpoint_converters")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGATRON_RL_CONF_DIR")}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", "PYTHONNOUSERSITE": "1"}


def _run(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with megatron-rl pip-installed (not editable) from a copy of the
    checkout."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, src / name)
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp).stdout.strip()
    )
    locked = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "locked_wheels.pth").write_text("".join(f"{p}\n" for p in sorted(locked)))
    # --ignore-installed: pip sees the checkout's editable install through the .pth line and must leave it be.
    flags = ["-q", "--no-deps", "--no-build-isolation", "--ignore-installed"]
    pip = _run([python, "-m", "pip", "install", *flags, src], tmp)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    # The SPDX form of project.license (its TOML-table form is deprecated by setuptools).
    (metadata,) = site.glob("megatron_rl-*.dist-info/METADATA")
    assert "License-Expression: Apache-2.0" in metadata.read_text().splitlines()
    return env_dir


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the checkout."""
    assert not tmp_path.resolve().is_relative_to(ROOT)
    return tmp_path


def test_the_package_comes_from_the_fresh_environment(venv, elsewhere):
    probe = (
        "import sys, megatron_rl, checkpoint_converters\n"
        "from megatron_rl.config.compose import CONF_DIR\n"
        "print(megatron_rl.__file__); print(checkpoint_converters.__file__); print(CONF_DIR)\n"
        "print(any(m.startswith('__editable__') for m in sys.modules))\n"
    )
    out = _run([venv / "bin" / "python", "-c", probe], elsewhere)
    assert out.returncode == 0, out.stderr
    package, converters, conf_dir, editable = out.stdout.split("\n")[:4]
    for path in (package, converters, conf_dir):
        assert Path(path).is_relative_to(venv) and not Path(path).is_relative_to(ROOT), path
    assert editable == "False"
    assert (Path(conf_dir) / "tiny.yaml").is_file() and (
        Path(conf_dir) / "model" / "tiny_llama.yaml"
    ).is_file()
    site = Path(conf_dir).parent
    assert (site / "launch" / "clusters" / "h100_example.yaml").is_file()
    assert (site / "nightly" / "suites" / "cpu_smoke.yaml").is_file()


def test_cfg_composes_the_tiny_recipe(venv, elsewhere):
    out = _run([venv / "bin" / "python", "-m", "megatron_rl.launch", "grpo", "conf=tiny", "--cfg"], elsewhere)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["recipe"] == "tiny" and cfg["run"]["name"] == "tiny"
    assert cfg["model"]["hf_path"] == "tiny:llama" and cfg["policy"]["parallel"]["tp"] == 2
    assert not list(elsewhere.iterdir())  # printing the config writes nothing


def test_plan_llama70b_prints_its_table_and_fits(venv, elsewhere):
    out = _run([venv / "bin" / "python", "-m", "megatron_rl.launch", "plan", "conf=llama70b"], elsewhere)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed  # the recipe fits its 16 x 8 H100 layout
    assert "llama70b: per-GPU memory plan (GiB)" in printed and "gradients (fp32 main grads)" in printed
    assert "llama70b (grpo): fits" in printed and "FAIL" not in printed


def test_console_script_lists_the_packaged_recipes(venv, elsewhere):
    out = _run([venv / "bin" / "megatron-rl", "--help"], elsewhere)
    assert out.returncode == 0, out.stderr
    assert "llama70b" in out.stdout and "h100_example" in out.stdout
    assert "Recipes are read from: " + str(venv) in out.stdout
