#!/usr/bin/env bash
# Installs the environment if needed, then runs the main job on its embedded default (tiny model, CPU ok).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
export RAY_AUTH_MODE=disabled WANDB_MODE=${WANDB_MODE:-offline} VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m megatron_rl.launch grpo "$@"
