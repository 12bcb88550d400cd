"""The per-node program of a Ray-on-Slurm job: srun starts it once per node inside the container.

Node 0 starts the Ray head, waits until every node has joined, runs the training command against that
cluster (RAY_ADDRESS) and leaves a "done" file on the shared job directory; every other node starts a Ray
worker and stops when the done file appears. A worker never exits first with status 0: srun --wait would
then kill the head. Any failure exits nonzero, and srun --kill-on-bad-exit ends the whole step.
"""

from __future__ import annotations

import shlex

# Placeholders are @NAME@ (bash uses $ and braces itself).
_TEMPLATE = r"""#!/bin/bash
set -uo pipefail
head_ip=${MRL_HEAD_IP:?the batch script exports the head node address}
port=@RAY_PORT@
gpus=@GPUS_PER_NODE@
nodes=${SLURM_JOB_NUM_NODES:?}
node=${SLURM_NODEID:?}
done_file=@JOB_DIR@/ray_done.${SLURM_JOB_ID:-local}.${SLURM_RESTART_COUNT:-0}
deadline=$((SECONDS + @TIMEOUT_S@))
ray_pid=
export RAY_USAGE_STATS_ENABLED=0
cd @WORKDIR@ || { echo "[ray-node $node] no code at @WORKDIR@ (cluster.workdir)" >&2; exit 1; }
@SETUP@
# `ray start --block` stops exactly the Ray processes it started when it gets SIGTERM.
stop_ray() { [ -n "$ray_pid" ] && kill "$ray_pid" 2>/dev/null && wait "$ray_pid" 2>/dev/null; ray_pid=; }
alive_nodes() {
  python -c 'import os, ray; ray.init(address=os.environ["MRL_RAY_ADDRESS"], logging_level="ERROR"); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null
}
# The head lets the workers leave first (they drain against it), then stops.
finish_head() {
  touch "$done_file"
  for _ in $(seq 12); do [ "$(alive_nodes)" = 1 ] && break; sleep 5; done
  stop_ray
}
if [ "$node" = 0 ]; then
  export MRL_RAY_ADDRESS="$head_ip:$port"
  trap finish_head EXIT
  ray start --head --node-ip-address="$head_ip" --port="$port" --num-gpus="$gpus" \
    --include-dashboard=false --disable-usage-stats --block &
  ray_pid=$!
  while true; do
    kill -0 "$ray_pid" 2>/dev/null || { echo "[ray-node 0] the Ray head failed to start" >&2; exit 1; }
    alive=$(alive_nodes)
    echo "[ray-node 0] ${alive:-0}/$nodes nodes in the Ray cluster"
    [ "${alive:-0}" -ge "$nodes" ] && break
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "[ray-node 0] only ${alive:-0} of $nodes nodes joined within @TIMEOUT_S@ s (cluster.ray_start_timeout_s)" >&2
      exit 1
    fi
    sleep 5
  done
  RAY_ADDRESS="$head_ip:$port" @COMMAND@
  status=$?
  echo "[ray-node 0] training command exited with $status"
  exit "$status"
else
  while [ ! -e "$done_file" ]; do
    if [ -z "$ray_pid" ] || ! kill -0 "$ray_pid" 2>/dev/null; then
      # Not started yet, or it could not reach the head (still starting): retry until the deadline.
      if [ -n "$ray_pid" ] && [ "$SECONDS" -ge "$deadline" ]; then
        echo "[ray-node $node] the Ray worker stopped (head at $head_ip:$port unreachable or gone)" >&2
        exit 1
      fi
      ray start --address="$head_ip:$port" --num-gpus="$gpus" --disable-usage-stats --block &
      ray_pid=$!
    fi
    sleep 5
  done
  stop_ray
  exit 0
fi
"""


def render_node_script(
    command: list[str],
    *,
    job_dir: str,
    workdir: str,
    gpus_per_node: int,
    ray_port: int,
    timeout_s: int,
    setup: list[str],
) -> str:
    """The node program with the training command quoted word by word (Hydra overrides can hold spaces,
    brackets and quotes)."""
    values = {
        "@RAY_PORT@": str(int(ray_port)),
        "@GPUS_PER_NODE@": str(int(gpus_per_node)),
        "@TIMEOUT_S@": str(int(timeout_s)),
        "@JOB_DIR@": shlex.quote(job_dir),
        "@WORKDIR@": shlex.quote(workdir),
        "@SETUP@": "\n".join(setup) if setup else "# (no cluster.setup lines)",
        "@COMMAND@": " ".join(shlex.quote(word) for word in command),
    }
    text = _TEMPLATE
    for key, value in values.items():
        text = text.replace(key, value)
    return text
