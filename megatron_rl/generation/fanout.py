"""One refit, any number of engines: the weight stream is exported and cut into buckets once, and each
bucket is packed once per transport and reaches every engine (transports.py). Engines on the sender's node
share the shared-memory slot files, engines on its GPU share one CUDA IPC handle, and all the others sit
in one broadcast group; `auto` chooses per engine (EngineClient.transport).

The sender's wall time is split into parts that add up to it (`account`): export (waiting for the
exporter), transport (packing and sending), engine receive and engine load (the parts of the engines' work
the sender had to wait for; the rest overlaps its own) and checks (the begin/end round trips: version check,
missing parameters, prefix-cache reset). What no part explains is reported as `unexplained_s`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from megatron_rl.generation import buckets, transports
from megatron_rl.generation.base import RefitSettings

PARTS = ("export_s", "transport_s", "engine_receive_s", "engine_load_s", "checks_s")
# Broadcast last: its sends block until every receiver has the tensor, so the other transports' loads are
# already queued and run meanwhile.
_ORDER = {"shm": 0, "cuda_ipc": 1, "broadcast": 2}


class _Clock:
    """Seconds per part of the sender's own time."""

    def __init__(self) -> None:
        self.parts = dict.fromkeys(PARTS, 0.0)

    def timed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        it = iter(weights)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.parts["export_s"] += time.perf_counter() - t0
                return
            self.parts["export_s"] += time.perf_counter() - t0
            yield item

    def waited(self, seconds: float, loads: list[list[dict[str, float]]]) -> None:
        """Attributes a wait for the engines to finish `loads` (per bucket, per engine figures, oldest
        first): the wait covers the end of their work, so it is the slowest engine's load of the newest
        bucket first, then its receive, then the bucket before. Any rest is call overhead (unexplained)."""
        for per_engine in reversed(loads):
            for part, key in (("engine_load_s", "load_s"), ("engine_receive_s", "receive_s")):
                share = min(seconds, max((e.get(key, 0.0) for e in per_engine), default=0.0))
                self.parts[part] += share
                seconds -= share


def _wait(clients: list[Any], refs: list[Any], phase: str) -> list[Any]:
    """Waits client by client (refs in `clients` order), so a failure names its engine."""
    out = []
    many = len(clients) > 1
    for i, (client, ref) in enumerate(zip(clients, refs)):
        out += client._wait([ref], f"{phase} (engine {i} of {len(clients)})" if many else phase)
    return out


def _abort(clients: list[Any]) -> None:
    for client in clients:
        client._abort_refit()


def send_to_engines(
    clients: list[Any],
    weights: Iterable[tuple[str, torch.Tensor]],
    version: int,
    reset_prefix_cache: bool = True,
    transport: str | None = None,
    probe: bool = False,
    settings: RefitSettings | None = None,
) -> dict[str, Any]:
    """Streams one export into every engine of `clients` (EngineClients) and sets their weight version.

    `transport`: force one for all engines (default: each engine's `transport()`, i.e. its refit setting,
    `auto` resolved per engine). `settings`: bucket size, slots, timeout (default: the first client's).
    `probe` (benchmarks): each engine only receives and copies the bytes, no reload, no version.
    Returns the figures of the refit: `refit_s`, the parts of `account`, `bytes` (of the export, once),
    `tensors`, `missing` (parameters some engine did not receive), `transport` (the kinds used, joined by
    "+"), the slowest engine's `receive_s`/`load_s`/`load_cpu_s`, and `engines`: each engine's own figures."""
    if not clients:
        raise ValueError("send_to_engines needs at least one engine")
    settings = settings or clients[0].refit
    by_kind: dict[str, list[Any]] = {}
    for client in clients:
        by_kind.setdefault(transport or client.transport(), []).append(client)
    kinds = sorted(by_kind, key=lambda k: _ORDER.get(k, 0))
    start = time.perf_counter()
    senders = [transports.sender_for(by_kind[k], k, settings) for k in kinds]
    ordered = [c for s in senders for c in s.clients]  # the order of every list of refs below
    clock = _Clock()
    method = "probe_bucket" if probe else "load_bucket"
    try:
        if not probe:
            t0 = time.perf_counter()
            _wait(ordered, [c._submit("begin_refit", version) for c in ordered], "refit start")
            clock.parts["checks_s"] += time.perf_counter() - t0
        figures = _stream(senders, ordered, clock.timed(weights), settings, clock, method)
        if probe:
            seconds = time.perf_counter() - start
            return {
                "transport": "+".join(kinds),
                "bytes": figures["bytes"],
                "refit_s": seconds,
                "gb_per_s": figures["bytes"] / seconds / 1e9,
            }
        t0 = time.perf_counter()
        ends = [c._submit("end_refit", version, reset_prefix_cache) for c in ordered]
        stats = _wait(ordered, ends, "refit end")
        ended = time.perf_counter() - t0
    except BaseException:
        if not probe:
            _abort(ordered)
        for sender in senders:
            transports.discard(sender)
        raise
    total = time.perf_counter() - start
    # The end call's engine-side finalize is the last layers' load; the rest of that round trip is checks.
    finalize = max(s.get("finalize_s", 0.0) for s in stats)
    clock.parts["engine_load_s"] += min(finalize, ended)
    clock.parts["checks_s"] += ended - min(finalize, ended)
    return account(
        {
            "transport": "+".join(kinds),
            "version": version,
            "refit_s": total,
            "bytes": figures["bytes"],
            "tensors": figures["tensors"],
            "buckets": figures["buckets"],
            "gb_per_s": figures["bytes"] / total / 1e9 if total else 0.0,
            "missing": sorted({m for s in stats for m in s.get("missing", ())}),
            "receive_s": max(s["receive_s"] for s in stats),
            "load_s": max(s["load_s"] for s in stats),
            "load_cpu_s": max(s["load_cpu_s"] for s in stats),
            "engines": [
                {"engine": c.actor_id, "transport": kind, **st}
                for (c, kind), st in zip(((c, s.kind) for s in senders for c in s.clients), stats)
            ],
            **clock.parts,
        }
    )


def stream(
    senders: list[transports.Sender],
    weights: Iterable[tuple[str, torch.Tensor]],
    settings: RefitSettings,
) -> dict[str, Any]:
    """The middle of a refit whose begin and end someone else runs (one pipeline stage's sender,
    generation/stages.py): every bucket of `weights` through `senders` into their engines, loaded.
    Returns `bytes`, `tensors`, `buckets`, `stream_s` and the parts of `account` but `checks_s`."""
    clock = _Clock()
    start = time.perf_counter()
    figures = _stream(
        senders, [c for s in senders for c in s.clients], clock.timed(weights), settings, clock, "load_bucket"
    )
    for sender in senders:
        t0 = time.perf_counter()
        sender.finish_stream()
        clock.parts["transport_s"] += time.perf_counter() - t0
    return {**figures, **clock.parts, "stream_s": time.perf_counter() - start}


def _stream(
    senders: list[transports.Sender],
    ordered: list[Any],
    weights: Iterator[tuple[str, torch.Tensor]],
    settings: RefitSettings,
    clock: _Clock,
    method: str,
) -> dict[str, int]:
    """begin/end aside: every bucket once through every sender, at most `slots` buckets in flight."""
    slots = max(1, settings.slots)
    in_flight: dict[int, list[Any]] = {}  # slot -> refs in `ordered` order; dict order is bucket order
    nbytes = tensors = count = 0
    bucket_bytes = max(1, int(settings.bucket_mb * (1 << 20)))
    spans, first = [], 0
    for sender in senders:
        spans.append((first, first + len(sender.clients)))
        first += len(sender.clients)

    def drain(slot_refs: list[list[Any]], lo: int = 0, hi: int = len(ordered)) -> None:
        t0 = time.perf_counter()
        results = [_wait(ordered[lo:hi], refs[lo:hi], "refit bucket load") for refs in slot_refs]
        if method == "load_bucket":
            clock.waited(time.perf_counter() - t0, results)

    for i, bucket in enumerate(buckets.iter_buckets(weights, bucket_bytes)):
        slot = i % slots
        if slot in in_flight:  # every engine must be done with a slot before it is refilled
            drain([in_flight.pop(slot)])
        refs: list[Any] = []
        for sender, (lo, hi) in zip(senders, spans):
            if sender.kind == "broadcast" and in_flight:
                # An engine receives only once it has loaded the buckets before: wait for that here, so
                # the time counts as the engines' load, not as the broadcast's (it would block as long).
                drain(list(in_flight.values()), lo, hi)
            t0 = time.perf_counter()
            refs += sender.send_bucket(slot, bucket, method)
            clock.parts["transport_s"] += time.perf_counter() - t0
        in_flight[slot] = refs
        nbytes += sum(buckets.nbytes(t) for _, t in bucket)
        tensors += len(bucket)
        count += 1
    drain(list(in_flight.values()))
    return {"bytes": nbytes, "tensors": tensors, "buckets": count}


def account(stats: dict[str, Any]) -> dict[str, Any]:
    """Adds `unexplained_s` and `unexplained_fraction`: the refit's seconds that no part explains."""
    explained = sum(stats.get(p, 0.0) for p in PARTS)
    rest = stats["refit_s"] - explained
    return {**stats, "unexplained_s": rest, "unexplained_fraction": rest / stats["refit_s"]}
