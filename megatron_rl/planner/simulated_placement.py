"""`python -m megatron_rl.launch plan conf=RECIPE --placement`: the recipe's real Ray actors placed on a
simulated cluster of its nodes and GPUs, and where Ray really put them, as one JSON object.

The cluster is Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`): one raylet per node on this
machine, each declaring the recipe's GPUs, so Ray schedules GPU actors and hands out GPU ids without any CUDA
call. The policy ranks (the run's rank actor class) and the engines (the run's engine actor class) are created
with the run's own options (megatron_rl.placement, rank_actors.rank_actor_options, client.engine_actor_options)
and asked only `where()`: neither Megatron nor vLLM starts. An engine of several GPUs whose process holds none
(its GPUs are vLLM's Ray executor workers, one per bundle) is checked through stand-in workers with the options
that executor uses; starting vLLM's own worker class would import vLLM once per GPU.

Actors are created a wave at a time (a node's ranks with the engines that share their GPUs), since every actor
is a process of its own; the placement groups stay reserved throughout, so every GPU's tenants are accounted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from megatron_rl.placement import EngineResources, Placement, placement, policy_bundles, policy_rank_gpus

OBJECT_STORE_BYTES = 80 << 20  # Ray's minimum: the probes move no data
WAVE_ACTORS = 24  # actor processes alive at once (each one imports torch)
READY_TIMEOUT_S = 60.0  # a placement group that cannot be reserved by then never will be


class _GPUWorker:
    """Stands in for one of vLLM's Ray executor workers (same options), to see which GPU it gets."""

    def where(self) -> dict[str, Any]:
        from megatron_rl.rank_actors import placed_on

        return placed_on()


def _start_cluster(table: Placement, cpus_per_node: float) -> Any:
    from ray.cluster_utils import Cluster

    args = dict(num_cpus=cpus_per_node, num_gpus=table.gpus_per_node, object_store_memory=OBJECT_STORE_BYTES)
    # No idle workers started ahead of the probes: each would be a process per declared CPU.
    head = dict(args, include_dashboard=False, _system_config={"enable_worker_prestart": False})
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(table.nodes - 1):
        cluster.add_node(wait=False, **args)
    cluster.wait_for_nodes()
    return cluster


def simulate(cfg: Any, wave_timeout_s: float = 300.0) -> dict[str, Any]:
    """Places the run's actors on a simulated cluster; the JSON report (see the module doc)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from megatron_rl import console
    from megatron_rl.generation.client import EngineActor, engine_actor_options
    from megatron_rl.grpo.policy_worker import PolicyWorker
    from megatron_rl.rank_actors import bundle_of_rank, rank_actor_options, reserve
    from megatron_rl.ray_utils import remote_class

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    table = placement(cfg)
    cpus = float(cfg.cluster.cpus_per_rank)
    per_node = max(table.gpus_per_node, len(table.policy_ranks) if not table.gpu else 0)
    cluster = _start_cluster(table, math.ceil(2 * per_node * cpus) + 1)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level=console.ray_logging_level())
        node_of = {n.node_id: i for i, n in enumerate(cluster.list_all_nodes())}
        problems = list(table.problems)
        world = len(table.policy_ranks)
        bundles = policy_bundles(cfg, table)
        group = reserve(bundles) if bundles else None
        policy_ready = group is None or _ready(group)
        order = bundle_of_rank(group) if group is not None and policy_ready else None
        resources: list[EngineResources | None] = [
            _engine_resources(cfg, table, e.engine, group, order) for e in table.engines
        ]
        groups = [("the policy's placement group", group)] + [
            (f"engine {i}'s placement group", r.own_group)
            for i, r in enumerate(resources)
            if r and r.own_group
        ]
        ready = {name for name, pg in groups if (policy_ready if pg is group else _ready(pg))}
        problems += [
            f"{name} could not be reserved on the cluster" for name, _ in groups if name not in ready
        ]
        rank_cls, engine_cls, worker_cls = (remote_class(c) for c in (PolicyWorker, EngineActor, _GPUWorker))
        rank_gpus = policy_rank_gpus(cfg, table)
        jobs: list[tuple[tuple[str, int], Any, dict[str, Any], tuple]] = []
        if "the policy's placement group" in ready:
            jobs += [
                (("rank", r), rank_cls, rank_actor_options(group, b, cpus, rank_gpus), (r, world, None))
                for r, b in enumerate(order or range(world))
            ]
        for e, res in enumerate(resources):
            own = res is not None and res.own_group is not None
            if (own and f"engine {e}'s placement group" not in ready) or (
                not own and table.colocated and table.gpu and "the policy's placement group" not in ready
            ):
                continue
            options = engine_actor_options(cpus, 0, res)
            jobs.append((("engine", e), engine_cls, options, ("", None)))
            jobs += [(("worker", e), worker_cls, w, ()) for w in (res.workers if res else [])]
        seen = _place(jobs, _wave_key(table), wave_timeout_s)
        for job, where in seen.items():
            if where is None:
                problems.append(f"{job[0]} {job[1]} could not be scheduled within {wave_timeout_s:.0f} s")
        for res in resources:
            if res is not None:
                res.release()
        if group is not None:
            remove_placement_group(group)
        report = _report(cfg, table, seen, node_of, problems)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return report


def _engine_resources(
    cfg: Any, table: Placement, engine: int, group: Any, order: list[int] | None
) -> EngineResources | None:
    from megatron_rl.placement import engine_resources

    return engine_resources(cfg, table, engine, group, order) if table.gpu else None


def _ready(pg: Any) -> bool:
    import ray

    done, _ = ray.wait([pg.ready()], timeout=READY_TIMEOUT_S)
    return bool(done)


def _wave_key(table: Placement) -> Any:
    """Which wave a job belongs to: a colocated engine goes with the ranks whose GPUs it shares."""
    chunk = math.lcm(table.gpus_per_node or 1, table.engine_width) if table.gpu else WAVE_ACTORS
    first = {e.engine: (e.bundles[0] if e.bundles else 0) for e in table.engines}

    def key(kind: str, index: int) -> tuple[int, int]:
        if kind == "rank":
            return 0, index // chunk
        if table.colocated and table.gpu:
            return 0, first[index] // chunk
        return 1, index

    return key


def _place(jobs: list, key: Any, timeout_s: float) -> dict[tuple[tuple[str, int], int], Any]:
    """Creates the jobs' actors wave by wave, asks each `where()`; None for one that was never scheduled."""
    import ray

    units: dict[Any, list] = defaultdict(list)
    for job in jobs:
        units[key(*job[0])].append(job)
    waves: list[list] = [[]]
    for unit in units.values():
        if waves[-1] and len(waves[-1]) + len(unit) > WAVE_ACTORS:
            waves.append([])
        waves[-1].extend(unit)
    seen: dict[tuple[tuple[str, int], int], Any] = {}
    for wave in waves:
        actors = [cls.options(**options).remote(*args) for _, cls, options, args in wave]
        refs = [a.where.remote() for a in actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for (job_id, *_), ref in zip(wave, refs):
            seen[(job_id, len(seen))] = ray.get(ref) if ref in done else None
        for a in actors:
            ray.kill(a)
    return seen


def _report(
    cfg: Any, table: Placement, seen: dict, node_of: dict[str, int], problems: list[str]
) -> dict[str, Any]:
    ranks, engines = {}, defaultdict(list)
    engine_proc: dict[int, int] = {}
    for ((kind, index), _), where in seen.items():
        if where is None:
            continue
        node = node_of.get(where["node_id"], -1)
        if kind == "rank":
            ranks[index] = (node, where["gpus"])
        else:
            if kind == "engine":
                engine_proc[index] = node
            engines[index] += [(node, g) for g in where["gpus"]]
    tenants: dict[tuple[int, int], list[str]] = defaultdict(list)
    for r, (node, gpus) in sorted(ranks.items()):
        if table.gpu and len(gpus) != 1:
            problems.append(f"policy rank {r} got GPUs {gpus} on node {node}, not one")
        tenants.update({(node, g): tenants[(node, g)] + [f"rank {r}"] for g in gpus})
    tp = int(cfg.policy.parallel.tp)
    for first in range(0, len(table.policy_ranks), tp):
        nodes = {ranks[r][0] for r in range(first, first + tp) if r in ranks}
        if len(nodes) > 1:
            problems.append(
                f"policy TP group {first // tp} (ranks {first}..{first + tp - 1}) spans nodes {sorted(nodes)}"
            )
    engine_rows = []
    for slot in table.engines:
        e = slot.engine
        if e not in engine_proc:
            continue
        gpus = sorted(set(engines[e]))
        nodes = sorted({n for n, _ in gpus}) or [engine_proc[e]]
        for n, g in gpus:
            tenants[(n, g)].append(f"engine {e}")
        if len(gpus) != len(slot.gpus):
            problems.append(f"engine {e} got {len(gpus)} GPUs, needs {len(slot.gpus)}")
        must = -(-len(slot.gpus) // table.gpus_per_node) if table.gpu and table.span_nodes else 1
        if len(nodes) > must:
            problems.append(f"engine {e} landed on nodes {nodes}: its GPUs must be on {must} node(s)")
        if table.colocated and table.gpu:
            own = {tuple([ranks[b][0], g]) for b in slot.bundles if b in ranks for g in ranks[b][1]}
            if set(gpus) != own:
                problems.append(
                    f"colocated engine {e} is not on the GPUs of its policy ranks {list(slot.bundles)}"
                )
        per_node = [[g for n, g in gpus if n == node] for node in nodes]
        engine_rows.append(
            {
                "engine": e,
                "node": nodes[0] if len(nodes) == 1 else nodes,
                "gpus": per_node[0] if len(nodes) == 1 else per_node,
            }
        )
    for (node, gpu), who in sorted(tenants.items()):
        policy = [w for w in who if w.startswith("rank")]
        engine_ids = {w for w in who if w.startswith("engine")}
        if len(policy) > 1 or len(engine_ids) > 1 or (engine_ids and policy and not table.colocated):
            problems.append(f"GPU {gpu} of node {node} is over-subscribed: {', '.join(who)}")
    return {
        "nodes": table.nodes,
        "gpus_per_node": table.gpus_per_node,
        "layout": table.as_json()["layout"],
        "policy_ranks": [
            {"rank": r, "node": node, "gpu": gpus[0] if gpus else None}
            for r, (node, gpus) in sorted(ranks.items())
        ],
        "engines": engine_rows,
        "problems": problems,
        "ok": not problems,
    }


@contextmanager
def _quiet() -> Iterator[None]:
    """Ray's raylets report every started and killed probe on the driver's stdout and stderr: kept out of
    sight unless --verbose, so that stdout holds the one JSON object."""
    from megatron_rl import console

    if console.verbose():
        yield
        return
    saved = []
    with tempfile.TemporaryFile() as sink:
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            saved.append((fd, os.dup(fd)))
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            for (fd, copy), stream in zip(saved, (sys.stdout, sys.stderr)):
                stream.flush()
                os.dup2(copy, fd)
                os.close(copy)


def _simulate_here(config: dict[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    with _quiet():
        return simulate(OmegaConf.create(config))


def main(cfg: Any) -> int:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from omegaconf import OmegaConf

    # A process of its own: its Ray driver connects to the simulated cluster, whatever this process is
    # connected to (a test session's cluster, an in-process run's).
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        report = pool.submit(_simulate_here, OmegaConf.to_container(cfg, resolve=True)).result()
    sys.stdout.write(json.dumps(report) + "\n")
    if not report["ok"]:
        print(
            f"error: recipe {cfg.recipe!r} cannot be placed: " + " | ".join(report["problems"]),
            file=sys.stderr,
        )
        return 1
    print(
        f"{cfg.recipe}: placed {len(report['policy_ranks'])} policy ranks and {len(report['engines'])} engines "
        f"on {report['nodes']} simulated nodes",
        file=sys.stderr,
    )
    return 0
