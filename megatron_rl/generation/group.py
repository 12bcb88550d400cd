"""Several vLLM engines behind one `GenerationEngine`: the controller's view of the run's rollout fleet.

- Dispatch: all `n` samples of a prompt go to one engine (they share its prefix cache); each prompt goes to
  the engine with the least work in flight (sampled tokens, prompt included), so a slow or busy engine gets
  less; each engine gets its part of a batch as one call, and the engines generate concurrently. Results
  come back in prompt order, each `Sample` tagged with its engine and weight version. Every prompt is
  seeded by its position in the whole batch, so what it samples does not depend on the engine.
- Refit: one export whatever the number of engines (the policy's rank 0 streams it into all of them through
  fanout.send_to_engines: each bucket is packed once; with PP > 1 each pipeline stage's sender streams its
  own stage, generation/stages.py); afterwards every engine must report the new version.
- Health: an engine whose actor died, or that does not answer within `timeout_s`, is marked dead, replaced by
  a new engine on the same resources, refitted to the current weights before it serves, and its unfinished
  prompts are sent again; `max_failures` bounds the restarts over the run, then `EngineGroupError` names the
  engine and its log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_rl import console
from megatron_rl.generation import fanout, transports
from megatron_rl.generation.base import GenerationEngine, Sample, SamplingSettings
from megatron_rl.generation.client import EngineClient, check_complete, refit_workdir
from megatron_rl.ray_utils import WorkerError, gather


class EngineGroupError(WorkerError):
    """An engine failed once more than `generation.max_failures` allows; the message names it and its log."""


def assign_prompts(work: list[float], loads: dict[int, float]) -> dict[int, list[int]]:
    """Least-outstanding-work dispatch: prompt i (with `work[i]` tokens to produce) -> an engine of `loads`
    (engine -> work already in flight). The largest prompts are placed first, each on the engine that is
    least loaded at that moment (ties: the lowest engine index). Returns engine -> its prompts, in order."""
    loads = dict(loads)
    out: dict[int, list[int]] = {}
    for i in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        engine = min(loads, key=lambda e: (loads[e], e))
        loads[engine] += work[i]
        out.setdefault(engine, []).append(i)
    return {e: sorted(idx) for e, idx in sorted(out.items())}


@dataclass
class _Call:
    engine: int
    client: EngineClient
    prompts: list[int]  # positions in the caller's batch
    work: float
    started: float = field(default_factory=time.monotonic)


class EngineGroup(GenerationEngine):
    def __init__(
        self,
        start_engine: Callable[[int], EngineClient],
        num_engines: int,
        max_failures: int = 3,
        timeout_s: float = 600.0,
        sleep_level: int = 0,
    ) -> None:
        """`start_engine(i)` starts engine i (its resources and log name); a restart calls it again.
        `sleep_level`: what `sleep()` asks of every engine (0: the group never sleeps)."""
        if num_engines < 1:
            raise ValueError(f"an engine group needs at least one engine, not {num_engines}")
        self._start, self.max_failures, self.timeout_s = start_engine, max_failures, timeout_s
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()  # the memory tags every engine has released (a restart matches it)
        self.weight_version = 0
        self.restarts = 0
        # Refits a set of engines with one export (from the policy of the last refit_from); restarts use it.
        self._export: Callable[[dict[int, EngineClient], int], dict[str, Any]] | None = None
        self._lock = threading.RLock()
        with ThreadPoolExecutor(num_engines) as pool:  # vLLM start-up dominates: start them side by side
            futures = [pool.submit(start_engine, i) for i in range(num_engines)]
        errors = [f.exception() for f in futures]
        started = [f.result() for f, e in zip(futures, errors) if e is None]
        if any(errors):
            for client in started:
                client.shutdown()
            raise next(e for e in errors if e is not None)
        self.engines: list[EngineClient] = started
        self.outstanding = [0.0] * num_engines
        self._stats = self._fresh_stats()

    def __len__(self) -> int:
        return len(self.engines)

    # Generation

    def generate(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[list[Sample]]:
        import ray

        results: list[list[Sample] | None] = [None] * len(prompts)
        work = [float(sampling.n * (len(p) + sampling.max_new_tokens)) for p in prompts]
        pending: dict[Any, _Call] = {}

        def submit(indices: list[int], engines: list[int] | None = None) -> None:
            with self._lock:
                loads = {e: self.outstanding[e] for e in engines or range(len(self.engines))}
                for e, part in assign_prompts([work[i] for i in indices], loads).items():
                    call = _Call(
                        e, self.engines[e], [indices[j] for j in part], sum(work[indices[j]] for j in part)
                    )
                    ref = call.client._submit(
                        "generate", [prompts[i] for i in call.prompts], sampling, call.prompts
                    )
                    self.outstanding[e] += call.work
                    pending[ref] = call

        def failed(call: _Call, why: str) -> None:
            others = [e for e in range(len(self.engines)) if e != call.engine]
            if others:  # the live engines take its prompts while it restarts
                submit(call.prompts, others)
            self._replace(call.engine, call.client, why)
            if not others:
                submit(call.prompts)

        if prompts:
            submit(list(range(len(prompts))))
        try:
            while pending:
                wait_s = min(c.started for c in pending.values()) + self.timeout_s - time.monotonic()
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait_s))
                if not ready:
                    now = time.monotonic()
                    for ref in [r for r, c in pending.items() if now - c.started >= self.timeout_s]:
                        call = self._finish(pending.pop(ref))
                        failed(call, f"no answer to a generation call within {self.timeout_s:.0f} s")
                    continue
                call = self._finish(pending.pop(ready[0]))
                phase = f"generation engine {call.engine}: generation"
                try:
                    out = gather(ready, phase, self.timeout_s)[0]
                except WorkerError as exc:
                    if not _died(exc):
                        raise
                    failed(call, "its process died during generation")
                    continue
                self._record(call, out)
                for i, samples in zip(call.prompts, out):
                    for s in samples:
                        s.engine = call.engine
                    results[i] = samples
        finally:
            for call in pending.values():
                self._finish(call)
        return results  # type: ignore[return-value]

    def _finish(self, call: _Call) -> _Call:
        with self._lock:
            self.outstanding[call.engine] -= call.work
        return call

    def _record(self, call: _Call, out: list[list[Sample]]) -> None:
        st = self._stats
        st["samples"][call.engine] += sum(len(s) for s in out)
        st["tokens"][call.engine] += sum(x.length for s in out for x in s)
        st["seconds"][call.engine] += time.monotonic() - call.started

    # Refit

    def refit_from(
        self, policy: Any, version: int, bucket_mb: int | None = None, transport: str | None = None
    ) -> dict[str, Any]:
        """One export from the policy reaches every engine; then all must report `version`. An engine that
        is restarted later is refitted the same way, from the same policy."""

        def export(clients: dict[int, EngineClient], v: int) -> dict[str, Any]:
            chosen = [
                c.with_refit(
                    transport=transport or c.refit.transport, bucket_mb=bucket_mb or c.refit.bucket_mb
                )
                for c in clients.values()
            ]
            if chosen[0].refit.transport == "files" or not hasattr(policy, "push_hf_weights"):
                return _files_refit(policy, chosen, v)
            return check_complete(policy.push_hf_weights(chosen, v))  # rank 0 fans its one export out

        self._export = export
        return self._refit(version, export)

    def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], version: int, reset_prefix_cache: bool = True
    ) -> dict[str, Any]:
        """Streams `weights` once into every engine. (A stream is read once: an engine restarted later can
        only be refitted after a `refit_from`.)"""

        def export(clients: dict[int, EngineClient], v: int) -> dict[str, Any]:
            return check_complete(
                fanout.send_to_engines(list(clients.values()), weights, v, reset_prefix_cache)
            )

        self._export = None  # the policy of an earlier refit_from no longer holds these weights
        return self._refit(version, export)

    def _refit(
        self, version: int, export: Callable[[dict[int, EngineClient], int], dict[str, Any]]
    ) -> dict[str, Any]:
        """Runs `export` on every engine. If it fails because engines died, those are replaced (and refitted)
        and the live ones, whose refit was aborted, get it once more; a failure with every engine alive is
        the refit's own and is raised. Afterwards every engine must report `version`."""
        start = time.perf_counter()
        self.weight_version = version
        clients = dict(enumerate(self.engines))
        try:
            stats = export(clients, version)
        except WorkerError as exc:
            dead = [i for i, c in clients.items() if not _alive(c)]
            if not dead:
                raise
            for i in dead:  # each replacement is refitted by _replace
                self._replace(i, clients[i], f"it failed during a refit to version {version}: {exc}")
            live = {i: c for i, c in clients.items() if i not in dead}
            stats = export(live, version) if live else {"engines": []}
        for i, client in enumerate(self.engines):
            if (current := client.version()) != version:
                raise WorkerError(
                    f"generation engine {i} is at weight version {current} after a refit to {version}"
                )
        index = {c.actor_id: i for i, c in enumerate(self.engines)}
        for e in stats.get("engines", []):
            if (i := index.get(e.get("engine"))) is not None:
                self._add_refit_s(i, e.get("receive_s", 0.0) + e.get("load_s", 0.0))
        return {"gb_per_s": 0.0, **stats, "refit_s": time.perf_counter() - start}

    def _add_refit_s(self, index: int, seconds: float) -> None:
        self._stats["refit_s"][index] = self._stats["refit_s"].get(index, 0.0) + seconds

    # Sleep mode (colocated GPU runs): every engine at once, a failure naming the engine.

    def sleep(self) -> dict[str, float]:
        """Every engine releases its weights and KV cache (vLLM sleep at the group's level). Returns the
        wall seconds and the device GB freed over all engines."""
        if not self.sleep_level:
            raise RuntimeError("sleep() on an engine group built without sleep mode (sleep_level=0)")
        start = time.perf_counter()
        self.asleep = {"weights", "kv_cache"}
        stats = self._each("sleep", f"sleep (level {self.sleep_level})", self.sleep_level)
        return {"sleep_s": time.perf_counter() - start, "freed_gb": sum(s["freed_gb"] for s in stats)}

    def wake_up(self, tags: list[str] | None = None) -> dict[str, float]:
        """Every engine brings back the memory of `tags` ("weights" before a refit, "kv_cache" after it;
        None: both). Returns the wall seconds and the device GB taken over all engines."""
        start = time.perf_counter()
        self.asleep -= set(tags or ("weights", "kv_cache"))
        stats = self._each("wake_up", f"wake-up ({', '.join(tags or ['all'])})", tags)
        return {"wake_s": time.perf_counter() - start, "taken_gb": sum(s["taken_gb"] for s in stats)}

    def _each(self, method: str, phase: str, *args: Any) -> list[dict[str, float]]:
        """`method` on every engine concurrently. An engine whose process died is replaced (the new one is
        brought to the group's sleep state, `self.asleep`, which the caller has already set)."""
        clients = list(self.engines)
        refs = [c._submit(method, *args) for c in clients]
        out = []
        for i, (client, ref) in enumerate(zip(clients, refs)):
            try:
                out += client._wait([ref], f"{phase} (engine {i} of {len(clients)})")
            except WorkerError as exc:
                if not _died(exc):
                    raise
                self._replace(i, client, f"its process died during {phase}")
                out.append({})
        return [{"freed_gb": 0.0, "taken_gb": 0.0, **o} for o in out]

    def _match_sleep_state(self, fresh: EngineClient, refit: Callable[[], None]) -> None:
        """A restarted engine (awake, weights from disk) into the group's state, refitted by `refit`: the
        refit needs its weights awake, so with only the KV cache asleep (between a refit's wake-ups) it
        sleeps and wakes its weights first; with everything asleep it is refitted first and then sleeps
        (at level 2 that discards the refit: the group's next wake-up and refit write them again)."""
        if self.asleep and "weights" not in self.asleep:
            fresh.sleep(self.sleep_level)
            fresh.wake_up(["weights"])
        refit()
        if "weights" in self.asleep:
            fresh.sleep(self.sleep_level)

    # Health

    def _replace(self, index: int, client: EngineClient, why: str) -> None:
        """Engine `index` (as `client`) failed: count it, then start a new one on the same resources and refit
        it to the group's weights before it serves. A failure of an engine already replaced is not counted
        again."""
        import ray

        with self._lock:
            if self.engines[index] is not client:
                return
            log = self.log_file(index)
            if self.restarts >= self.max_failures:
                raise EngineGroupError(
                    f"generation engine {index} failed: {why}; generation.max_failures={self.max_failures} "
                    f"restart(s) over the run are used up{console.log_hint(log, tail_lines=15)}"
                )
            self.restarts += 1
            try:
                ray.kill(client.actor)  # a stuck engine still holds its resources
            except Exception:  # noqa: BLE001 - it may be gone already
                pass
            transports.close_senders(client.actor_id)  # this process's refit slots/groups that served it
            if getattr(client, "resources", None) is not None:  # a separate engine's own placement group
                client.resources.release()
            try:
                fresh = self._start(index)

                def refit() -> None:
                    if self.weight_version > 0:
                        if self._export is None:
                            raise RuntimeError(
                                f"no policy to refit it to weight version {self.weight_version} from"
                            )
                        stats = self._export({index: fresh}, self.weight_version)
                        self._add_refit_s(index, stats["refit_s"])

                self._match_sleep_state(fresh, refit)
                if (got := fresh.version()) != self.weight_version:
                    raise RuntimeError(f"restarted at weight version {got}, not {self.weight_version}")
            except Exception as exc:
                raise EngineGroupError(
                    f"generation engine {index} failed ({why}) and could not be restarted: {exc}"
                    f"{console.log_hint(log)}"
                ) from exc
            self.engines[index] = fresh

    def log_file(self, index: int) -> Path | None:
        folder = console.log_dir()
        return folder / f"{self.engines[index].log_name}.log" if folder is not None else None

    def versions(self) -> list[int]:
        """Every engine's weight version, as it reports it."""
        return [c.version() for c in self.engines]

    def version(self) -> int:
        versions = self.versions()
        if len(set(versions)) != 1:
            raise WorkerError(f"generation engines disagree on the weight version: {versions}")
        return versions[0]

    # Metrics

    def _fresh_stats(self) -> dict[str, Any]:
        n = len(self.outstanding)
        return {"samples": [0] * n, "tokens": [0] * n, "seconds": [0.0] * n, "refit_s": {}}

    def step_metrics(self) -> dict[str, float]:
        """Since the last call: which engines served and how fast, refit seconds per engine, restarts."""
        st, self._stats = self._stats, self._fresh_stats()
        out: dict[str, float] = {
            "generation/engines": float(sum(1 for s in st["samples"] if s)),
            "generation/engines_healthy": float(len(self.engines)),
            "generation/engine_restarts": float(self.restarts),
        }
        for i, samples in enumerate(st["samples"]):
            out[f"generation/engine{i}_samples"] = float(samples)
            out[f"generation/engine{i}_tokens_per_s"] = (
                st["tokens"][i] / st["seconds"][i] if st["seconds"][i] else 0.0
            )
        for i, seconds in sorted(st["refit_s"].items()):
            out[f"refit/engine{i}_s"] = seconds
        return out

    def shutdown(self) -> None:
        for client in self.engines:
            client.shutdown()


def _files_refit(policy: Any, clients: list[EngineClient], version: int) -> dict[str, Any]:
    """The `files` refit for many engines: the policy's ranks write the bucket files once, every engine loads
    them (side by side)."""
    start = time.perf_counter()
    with refit_workdir() as workdir:
        files, nbytes = policy.write_hf_buckets(workdir, max(1, round(clients[0].refit.bucket_mb)))
        with ThreadPoolExecutor(len(clients)) as pool:
            stats = list(pool.map(lambda c: c.load_bucket_files(files, version), clients))
    total = time.perf_counter() - start
    return check_complete(
        {
            "transport": "files",
            "refit_s": total,
            "bytes": float(nbytes),
            "gb_per_s": nbytes / total / 1e9,
            "missing": sorted({m for s in stats for m in s.get("missing", ())}),
            "receive_s": max(s.get("receive_s", 0.0) for s in stats),
            "load_s": max(s.get("load_s", 0.0) for s in stats),
            "engines": [{"engine": c.actor_id, **s} for c, s in zip(clients, stats)],
        }
    )


def _alive(client: EngineClient) -> bool:
    try:
        client.version()
        return True
    except WorkerError:
        return False


def _died(exc: WorkerError) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc.__cause__, RayActorError)
