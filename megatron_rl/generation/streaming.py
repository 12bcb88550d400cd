"""The engine group as one continuous generator (async GRPO): prompts go in by key, finished groups come out.

Each engine generates continuously (generation/inflight.py); this side only dispatches and collects. A
prompt goes to the engine with the least work in flight (the group's own dispatch rule, all `n` samples on
one engine), and `poll` gathers what every engine finished. An engine that died is replaced by the group
(restarted, refitted to the current weights) and the prompts it held are sent again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from megatron_rl.generation.base import Sample, SamplingSettings
from megatron_rl.generation.group import EngineGroup, _died, assign_prompts
from megatron_rl.ray_utils import WorkerError, gather


@dataclass
class _Request:
    engine: int
    client: Any
    prompt: list[int]
    sampling: SamplingSettings
    work: float


class EngineStream:
    def __init__(self, group: EngineGroup) -> None:
        self.group = group
        self._requests: dict[str, _Request] = {}
        self._last_poll = time.monotonic()

    def __len__(self) -> int:
        """Prompts in flight."""
        return len(self._requests)

    def submit(self, prompts: list[tuple[str, list[int]]], sampling: SamplingSettings) -> None:
        """Sends (key, prompt ids) pairs to the engines; keys must be unique among those in flight."""
        if not prompts:
            return
        g = self.group
        work = [float(sampling.n * (len(p) + sampling.max_new_tokens)) for _, p in prompts]
        with g._lock:
            loads = {e: g.outstanding[e] for e in range(len(g.engines))}
            parts = assign_prompts(work, loads)
            calls = []
            for e, idx in parts.items():
                client = g.engines[e]
                for i in idx:
                    self._requests[prompts[i][0]] = _Request(e, client, prompts[i][1], sampling, work[i])
                    g.outstanding[e] += work[i]
                calls.append((e, client, client._submit("submit", [prompts[i] for i in idx], sampling)))
        for e, client, ref in calls:
            try:
                gather([ref], f"generation engine {e}: submitting prompts", g.timeout_s)
            except WorkerError as exc:
                if not _died(exc):
                    raise
                self._recover(e, client, "its process died while taking prompts")

    def poll(self) -> tuple[dict[str, list[Sample]], float]:
        """Groups finished since the last poll (key -> samples, each tagged with its engine), and the seconds
        the engines had nothing to generate (summed over engines)."""
        g = self.group
        clients = list(enumerate(g.engines))
        refs = [c._submit("poll") for _, c in clients]
        done: dict[str, list[Sample]] = {}
        idle = 0.0
        now = time.monotonic()
        for (e, client), ref in zip(clients, refs):
            try:
                out = gather([ref], f"generation engine {e}: collecting rollouts", g.timeout_s)[0]
            except WorkerError as exc:
                if not _died(exc):
                    raise
                self._recover(e, client, "its process died during generation")
                continue
            idle += out["idle_s"]
            st = g._stats
            st["seconds"][e] += max(0.0, now - self._last_poll - out["idle_s"])
            for key, samples in out["done"].items():
                req = self._requests.pop(key, None)
                if req is None:
                    continue  # sent again after its engine was replaced; this copy is stale
                with g._lock:
                    g.outstanding[e] -= req.work
                for s in samples:
                    s.engine = e
                st["samples"][e] += len(samples)
                st["tokens"][e] += sum(s.length for s in samples)
                done[key] = samples
        self._last_poll = now
        # An engine replaced meanwhile (e.g. during a refit) lost what it held: send that again.
        for e, client in enumerate(g.engines):
            lost = [k for k, r in self._requests.items() if r.engine == e and r.client is not client]
            if lost:
                self._resend(lost)
        return done, idle

    def _recover(self, engine: int, client: Any, why: str) -> None:
        self.group._replace(engine, client, why)
        self._resend([k for k, r in self._requests.items() if r.client is client])

    def _resend(self, keys: list[str]) -> None:
        lost = [(k, self._requests.pop(k)) for k in keys]
        with self.group._lock:
            for _, r in lost:
                self.group.outstanding[r.engine] -= r.work
        by_sampling: dict[int, list[tuple[str, _Request]]] = {}
        for k, r in lost:
            by_sampling.setdefault(id(r.sampling), []).append((k, r))
        for part in by_sampling.values():
            self.submit([(k, r.prompt) for k, r in part], part[0][1].sampling)
