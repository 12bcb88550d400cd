#!/usr/bin/env bash
# Installs the environment if needed, then runs the whole CPU test suite (GPU tests skip with a reason).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
export RAY_AUTH_MODE=disabled WANDB_MODE=offline VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests --durations=30 "$@"
