"""Refit from a pipelined policy: one sender per pipeline stage, every engine fed by all of them.

With PP > 1 each stage's sender (its tp=0/dp=0/cp=0 rank: checkpoint_converters.live.stage_senders)
receives only its own stage's HF tensors from the export and streams them into every engine itself, so no
rank gathers, holds or sends the whole model. Stage 0's sender opens the refit on every engine (begin: the
version check) and closes it (end: the missing-parameter check, the version); in between each sender
streams through transports of its own: shared-memory slot files of its own (the stages at the same time),
CUDA IPC on its GPU, or a broadcast group of its own with every engine's workers, the stages taking turns
in stage order (transports.StageBroadcastSender; in one group shared by all senders each sender would also
have to receive the other stages' tensors). An engine refuses a tensor that arrives twice, and `end` reports any that never
came, so every parameter arrives exactly once.

Every rank of the policy runs `stream_from_stages`. The ranks agree on the plan with three small
all-gathers over the policy's world: what each sender resolved per engine (an engine any sender reaches
by broadcast is in the group for all of them) and which groups it holds; stage 0's go (refit opened, the
group's address); and each sender's figures or failure, after which stage 0 ends or aborts the refit.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from checkpoint_converters.live import StageSenders

from megatron_rl.generation import fanout, transports

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _recording(weights: Iterable[tuple[str, torch.Tensor]], names: list[str]) -> Iterator[tuple[str, Any]]:
    for name, tensor in weights:
        names.append(name)
        yield name, tensor


def summary(names: Iterable[str]) -> dict[str, list[Any]]:
    """What a sender exported, compactly: the decoder layers' indices and every other tensor's name."""
    names = list(names)
    return {
        "layers": sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))}),
        "extra": sorted(n for n in names if not _LAYER.search(n)),
    }


def _open(
    engines: list[Any], version: int, group_engines: list[Any], plans: list[dict[str, Any]]
) -> tuple[str, int] | None:
    """Stage 0: begins the refit on every engine and hosts the broadcast group (the cached one when every
    sender holds it). Returns the group's address, None when no engine is reached by broadcast."""
    fanout._wait(engines, [c._submit("begin_refit", version) for c in engines], "refit start")
    if not group_engines:
        return None
    ids = tuple(sorted(c.actor_id for c in group_engines))
    held = {p["groups"].get(ids) for p in plans}
    keep = held.pop() if len(held) == 1 else None
    address = keep[1] if keep is not None and keep[0] == len(plans) else None
    return transports.stage_broadcast_sender(group_engines, engines[0].refit, 0, len(plans), address).address


def _senders(
    engines: list[Any],
    kinds: dict[str, str],
    group: set[str],
    index: int,
    count: int,
    address: Any,
    out: list[transports.Sender],
) -> None:
    """This stage's senders into `out` (filled as they come, so a failure can still tell them)."""
    by_kind: dict[str, list[Any]] = {}
    for c in engines:
        by_kind.setdefault("broadcast" if c.actor_id in group else kinds[c.actor_id], []).append(c)
    for kind in sorted(by_kind, key=lambda k: fanout._ORDER.get(k, 0)):  # the broadcast last
        if kind == "broadcast":
            sender = transports.stage_broadcast_sender(by_kind[kind], engines[0].refit, index, count, address)
            sender.start_refit()
            out.append(sender)
            sender.connect()
        else:
            out.append(transports.sender_for(by_kind[kind], kind, engines[0].refit))


def stream_from_stages(
    engines: list[Any], weights: Iterable[tuple[str, torch.Tensor]], stages: StageSenders, version: int
) -> dict[str, Any] | None:
    """Runs on every rank of a pipelined Megatron policy during a refit; `weights` is
    export_hf_weights(..., stages=stages) (each stage's sender gets its stage's tensors; every rank must
    drain it). Returns the refit's figures on stage 0's sender (global rank 0), None elsewhere."""
    import torch.distributed as dist

    start = time.perf_counter()
    rank = dist.get_rank()
    index = stages.senders.index(rank) if rank in stages.senders else -1
    lead = stages.senders[0]
    mine = None
    if index >= 0:
        mine = {
            "kinds": {c.actor_id: c.transport() for c in engines},
            "groups": transports.cached_stage_groups(),
        }
    every = _all_gather(mine)
    plans = [every[r] for r in stages.senders]  # in stage order
    group = {a for p in plans for a, k in p["kinds"].items() if k == "broadcast"}
    go: dict[str, Any] = {}
    failure: BaseException | None = None
    if rank == lead:
        try:
            go["address"] = _open(engines, version, [c for c in engines if c.actor_id in group], plans)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it before anyone raises
            failure, go["error"] = exc, f"opening the refit: {type(exc).__name__}: {exc}"
            fanout._abort(engines)
            _forget(engines)
    go = _all_gather(go if rank == lead else None)[lead]
    if "error" in go:
        if failure is not None:
            raise failure
        return None  # nobody iterates the export: its collectives never start
    opened = time.perf_counter()  # on every rank at about the same moment: the end of a collective
    if index < 0:
        for _ in weights:  # the export's TP/EP gathers and sends to the stage's sender need every rank
            pass
        _all_gather(None)
        return None
    figures: dict[str, Any] | None = None
    error = None
    used: list[transports.Sender] = []
    try:
        _senders(engines, plans[index]["kinds"], group, index, len(plans), go["address"], used)
        connect_s = time.perf_counter() - opened  # joining (or building) the broadcast group
        names: list[str] = []
        figures = fanout.stream(used, _recording(weights, names), engines[0].refit)
        figures["connect_s"] = connect_s
        kinds = {c.actor_id: s.kind for s in used for c in s.clients}
        figures.update(stage=index, rank=rank, transport="+".join(s.kind for s in used), kinds=kinds)
        figures.update(summary(names))
    except Exception as exc:  # noqa: BLE001 - reported to stage 0 below, which raises for all
        failure, error = exc, f"pipeline stage {index}'s sender (rank {rank}): {type(exc).__name__}: {exc}"
        for sender in used:
            if isinstance(sender, transports.StageBroadcastSender):
                sender.fail()
        for _ in weights:  # the stage's other ranks wait inside the export's collectives
            pass
    results = [r for r in _all_gather({"figures": figures, "error": error}) if r is not None]
    errors = [r["error"] for r in results if r["error"]]
    if errors:
        _forget(engines)  # a broadcast group may be half used: the next refit builds a new one
        if rank == lead:
            fanout._abort(engines)
            raise RuntimeError("refit from the pipeline stages failed: " + "; ".join(errors)) from failure
        return None
    if rank != lead:
        return None
    return _end(engines, version, [r["figures"] for r in results], start, opened)


def _forget(engines: list[Any]) -> None:
    for c in engines:
        transports.close_senders(c.actor_id)


def _end(
    engines: list[Any], version: int, senders: list[dict[str, Any]], start: float, opened: float
) -> dict[str, Any]:
    """Stage 0, once every sender's buckets are loaded: ends the refit on every engine and adds up the
    figures. The parts come from the slowest sender (the others ran meanwhile; every sender counts from
    the same moment, `opened`); `checks_s` adds stage 0's begin/end round trips, the senders' agreement and
    the slowest one's joining of the broadcast group."""
    streamed = time.perf_counter()
    try:
        stats = fanout._wait(engines, [c._submit("end_refit", version, True) for c in engines], "refit end")
    except BaseException:
        fanout._abort(engines)
        _forget(engines)
        raise
    ended = time.perf_counter() - streamed
    total = time.perf_counter() - start
    senders = sorted(senders, key=lambda s: s["stage"])
    slowest = max(senders, key=lambda s: s["connect_s"] + s["stream_s"])
    finalize = min(max(s.get("finalize_s", 0.0) for s in stats), ended)
    parts = {p: slowest[p] for p in fanout.PARTS if p != "checks_s"}
    parts["engine_load_s"] += finalize
    parts["checks_s"] = (opened - start) + slowest["connect_s"] + (ended - finalize)
    nbytes = sum(s["bytes"] for s in senders)

    def joined(kinds: Iterable[str]) -> str:
        return "+".join(sorted(set(kinds), key=lambda k: fanout._ORDER.get(k, 0)))

    return fanout.account(
        {
            "transport": joined(k for s in senders for k in s["transport"].split("+")),
            "version": version,
            "refit_s": total,
            "bytes": nbytes,
            "tensors": sum(s["tensors"] for s in senders),
            "buckets": sum(s["buckets"] for s in senders),
            "gb_per_s": nbytes / total / 1e9 if total else 0.0,
            "missing": sorted({m for s in stats for m in s.get("missing", ())}),
            "receive_s": max(s["receive_s"] for s in stats),
            "load_s": max(s["load_s"] for s in stats),
            "load_cpu_s": max(s["load_cpu_s"] for s in stats),
            "engines": [
                {"engine": c.actor_id, "transport": joined(s["kinds"][c.actor_id] for s in senders), **st}
                for c, st in zip(engines, stats)
            ],
            "senders": senders,
            "slowest_sender": slowest["stage"],
            **parts,
        }
    )
