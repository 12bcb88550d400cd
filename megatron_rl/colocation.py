"""Colocated generation on GPU: what the engines release while Megatron trains, and what Megatron releases
while the engines generate. The runtime (grpo/driver.py, grpo/setup.py) and the planner read both settings
from here, so the memory plan and the run agree.

- `generation.sleep_level`: 0 keeps the engines' memory; 1 (vLLM sleep level 1) moves their weights to
  host memory and discards the KV cache; 2 discards both (every step's refit writes the weights anyway).
  null: 2 when the engines share the policy's GPUs (such a run is always synchronous: grpo/async_rollouts.py),
  else 0 (CPU: vLLM has no sleep mode there; a separate pool, asynchronous GRPO's, shares no GPU).
- `policy.offload_during_generation`: none | optimizer | optimizer_and_grads (policy/offload.py). null:
  the least the memory plan needs for the generation phase to fit (colocated on GPU), else none.
"""

from __future__ import annotations

import time
from typing import Any

from megatron_rl.errors import UserError

SLEEP_LEVELS = (0, 1, 2)
OFFLOAD_CHOICES = ("none", "optimizer", "optimizer_and_grads")


def _gpu(cfg: Any) -> bool:
    return bool(cfg.cluster.gpus_per_node)


def shares_gpus(cfg: Any) -> bool:
    """The engines live on the policy's GPUs (a colocated GPU run)."""
    return _gpu(cfg) and bool(cfg.generation.colocated)


def sleep_level(cfg: Any) -> int:
    """The vLLM sleep level of the run's engines (0: they never sleep)."""
    given = cfg.generation.get("sleep_level")
    if given is not None:
        return int(given)
    return 2 if shares_gpus(cfg) else 0


def offload_setting(cfg: Any) -> str:
    """What each policy rank frees while the engines generate."""
    given = cfg.policy.get("offload_during_generation")
    if given is not None:
        return str(given)
    if not shares_gpus(cfg):
        return "none"
    from megatron_rl.planner.run_plan import plan

    return plan(cfg).offload


def check(cfg: Any) -> None:
    """Config-time refusals, one line each naming the key."""
    offload = cfg.policy.get("offload_during_generation")
    if offload is not None and offload not in OFFLOAD_CHOICES:
        raise UserError(
            f"policy.offload_during_generation={offload!r} is not one of {', '.join(OFFLOAD_CHOICES)} "
            "(or null: derived from the memory plan)."
        )
    given = cfg.generation.get("sleep_level")
    if str(cfg.get("command", "grpo")) != "grpo" or not given:
        return
    if not _gpu(cfg):
        raise UserError(
            f"generation.sleep_level={given}: vLLM has no sleep mode on CPU (cluster.gpus_per_node=0); "
            "set generation.sleep_level=0 or leave it null."
        )
    if not cfg.generation.colocated:
        raise UserError(
            f"generation.sleep_level={given}: sleep frees the GPUs an engine shares with the policy, and a "
            "separate generation pool (generation.colocated=false) shares none; set it to 0 or null."
        )


class TimeShare:
    """The synchronous GRPO loop's hand-overs of colocated GPUs (grpo/driver.py), in the order vLLM needs:

        generate -> engines sleep, policy state back -> logprobs, train
                 -> policy state out, engine weights wake -> refit -> KV cache wakes -> (evaluate) generate

    The weights wake before the KV cache so that the refit (Megatron's weights, the engine's, the transfer
    buckets) never meets the KV cache on the device. Each hand-over adds its seconds (and on GPU the
    memory the engines freed) to the step's metrics. With sleep level 0 and no offload it does nothing.

    Built right after the policy: the optimizer state leaves the GPU before the engines start, since vLLM
    takes its share of what is free then (a checkpoint load brings it back and offloads it again)."""

    def __init__(self, cfg: Any, policy: Any) -> None:
        self.policy, self.engine, self.sleeps = policy, None, False
        self.offload = offload_setting(cfg)
        if self.offload != "none":
            self.policy.offload(self.offload)

    def use(self, engine: Any) -> None:
        """The engine group, once started (awake: it generates, or is refitted by a resume, first)."""
        self.engine, self.sleeps = engine, bool(getattr(engine, "sleep_level", 0))

    def before_training(self, metrics: dict[str, float]) -> None:
        if self.sleeps:
            got = self.engine.sleep()
            metrics["timing/sleep_s"] = got["sleep_s"]
            if got["freed_gb"]:
                metrics["memory/engine_freed_gb"] = got["freed_gb"]
        if self.offload != "none":
            start = time.perf_counter()
            self.policy.onload()
            metrics["timing/onload_s"] = time.perf_counter() - start

    def before_refit(self, metrics: dict[str, float]) -> None:
        if self.offload != "none":
            start = time.perf_counter()
            metrics["memory/policy_offloaded_gb"] = self.policy.offload(self.offload) / 1e9
            metrics["timing/offload_s"] = time.perf_counter() - start
        if self.sleeps:
            metrics["timing/wake_s"] = self.engine.wake_up(["weights"])["wake_s"]

    def after_refit(self, metrics: dict[str, float]) -> None:
        if self.sleeps:
            woke = self.engine.wake_up(["kv_cache"])["wake_s"]
            metrics["timing/wake_s"] = metrics.get("timing/wake_s", 0.0) + woke
