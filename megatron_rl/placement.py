"""Where a run's processes sit, decided once from the composed config: node -> GPU -> (policy rank, engine).

The table is pure arithmetic (no Ray here at module level): the GRPO runtime, the memory planner and
`launch plan --placement` read the same numbers. GPUs are counted in order: policy rank r holds GPU
r % gpus_per_node of node r // gpus_per_node (Megatron puts tensor-parallel ranks next to each other, so a TP
group stays inside a node when tp divides a node's GPUs).

Layouts:
- CPU (cluster.gpus_per_node=0): ranks and engines share the host; engines are plain actors (no GPUs).
- Colocated (generation.colocated=true): engine e time-shares the GPUs of policy ranks e*w .. e*w+w-1
  (w = generation.tp * generation.pp): it lives in those ranks' placement-group bundles with a fraction of
  each GPU.
- Separate (generation.colocated=false): the last generation.gpus GPUs form the generation pool; engine e
  holds GPUs e*w .. e*w+w-1 of it in a placement group of its own.
An engine's GPUs stay on one node unless generation.span_nodes=true (then it takes whole nodes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Ray's share of a colocated GPU for each tenant. Ray only counts these (vLLM's gpu_memory_utilization and the
# planner decide memory); they let the policy rank and the engine's worker on one GPU both be scheduled there.
POLICY_GPU_SHARE = 0.5
ENGINE_GPU_SHARE = 0.5
# Ray's CPUs for a colocated engine's process (it drives vLLM's GPU workers). Every policy bundle reserves
# them: Ray numbers bundles in no node order, so bundles must be alike for any rank to take any of them.
COLOCATED_ENGINE_CPUS = 1.0


@dataclass(frozen=True)
class RankSlot:
    rank: int
    node: int
    gpu: int | None  # None on CPU


@dataclass(frozen=True)
class EngineSlot:
    engine: int
    gpus: tuple[tuple[int, int], ...]  # (node, gpu) per engine GPU, in engine-rank order; () on CPU
    # colocated: the policy ranks whose bundles (and GPUs) it shares; separate: its own group's bundles
    bundles: tuple[int, ...]
    node: int = 0  # its first node (the engine process's)

    @property
    def nodes(self) -> list[int]:
        return sorted({n for n, _ in self.gpus}) or [self.node]

    def as_json(self) -> dict[str, Any]:
        """{engine, node, gpus}; an engine spanning nodes has node = [nodes] and gpus = [[gpus of each]]."""
        nodes = self.nodes
        per_node = [[g for n, g in self.gpus if n == node] for node in nodes]
        if len(nodes) == 1:
            return {"engine": self.engine, "node": nodes[0], "gpus": per_node[0]}
        return {"engine": self.engine, "node": nodes, "gpus": per_node}


@dataclass
class Placement:
    nodes: int
    gpus_per_node: int  # 0: CPU
    colocated: bool
    span_nodes: bool
    engine_width: int  # GPUs per engine (generation.tp * generation.pp)
    policy_ranks: list[RankSlot]
    engines: list[EngineSlot]
    problems: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "layout": "cpu" if not self.gpu else "colocated" if self.colocated else "separate",
            "policy_ranks": [{"rank": r.rank, "node": r.node, "gpu": r.gpu} for r in self.policy_ranks],
            "engines": [e.as_json() for e in self.engines],
            "problems": list(self.problems),
            "ok": self.ok,
        }


def _with_rollouts(cfg: Any) -> bool:
    return str(cfg.get("command", "grpo")) == "grpo"


def policy_gpus(cfg: Any) -> int:
    """GPUs the policy trains on: every GPU, less the separate generation pool of a GRPO run (0 on CPU)."""
    c, g = cfg.cluster, cfg.generation
    total = c.nodes * c.gpus_per_node
    if total and _with_rollouts(cfg) and not g.colocated:
        return max(0, total - (g.gpus or 0))
    return total


def engine_width(cfg: Any) -> int:
    """GPUs of one engine: generation.tp * generation.pp (1 process on CPU, whatever they say)."""
    g = cfg.generation
    return int(g.tp) * int(g.get("pp") or 1) if cfg.cluster.gpus_per_node else 1


def _width_name(cfg: Any) -> str:
    """How a message names an engine's width: by the keys that set it."""
    g = cfg.generation
    pp = int(g.get("pp") or 1)
    return f"generation.tp={g.tp}" if pp == 1 else f"generation.tp*pp={g.tp}*{pp}"


def num_engines(cfg: Any) -> int:
    """generation.num_engines, or when 0/null the number the layout holds: colocated = policy GPUs / GPUs
    per engine; separate = generation.gpus / GPUs per engine; CPU = 1. Never below 1."""
    given = cfg.generation.get("num_engines")
    if given:
        return int(given)
    if not cfg.cluster.gpus_per_node:
        return 1
    pool = policy_gpus(cfg) if cfg.generation.colocated else (cfg.generation.gpus or 0)
    return max(1, pool // engine_width(cfg))


def placement(cfg: Any) -> Placement:
    """The table for a composed config, with every problem found (a Placement with problems is not ok)."""
    c, g = cfg.cluster, cfg.generation
    per_node = int(c.gpus_per_node)
    rollouts = _with_rollouts(cfg)
    if not per_node:
        ranks = [RankSlot(r, 0, None) for r in range(c.ranks)]
        engines = [EngineSlot(e, (), ()) for e in range(num_engines(cfg))] if rollouts else []
        return Placement(c.nodes, 0, bool(g.colocated), bool(g.get("span_nodes")), 1, ranks, engines)

    def where(i: int) -> tuple[int, int]:
        return i // per_node, i % per_node

    total, policy, width = c.nodes * per_node, policy_gpus(cfg), engine_width(cfg)
    named = _width_name(cfg)
    colocated, span = bool(g.colocated), bool(g.get("span_nodes"))
    problems: list[str] = []
    ranks = [RankSlot(r, *where(r)) for r in range(policy)]
    engines: list[EngineSlot] = []
    if rollouts:
        count = num_engines(cfg)
        pool, first = (policy, 0) if colocated else (int(g.gpus or 0), policy)
        what = f"the {policy} policy GPUs" if colocated else f"generation.gpus={pool}"
        if not colocated and pool <= 0:
            problems.append(
                "generation.colocated=false needs generation.gpus > 0 (the generation pool's GPUs)"
            )
        elif not colocated and pool >= total:
            problems.append(f"generation.gpus={pool} leaves none of the {total} GPUs to the policy")
        elif count * width > pool:
            problems.append(
                f"{count} engines of {named} GPUs need {count * width} GPUs but {what} hold "
                f"{pool}: GPUs would be over-subscribed (lower generation.num_engines)"
            )
        elif pool % width:
            problems.append(f"engines of {named} GPUs do not tile {what}")
        if width > per_node and not span:
            problems.append(
                f"an engine of {named} GPUs is wider than a node ({per_node} GPUs): set "
                f"generation.span_nodes=true to spread it over {-(-width // per_node)} nodes, or lower "
                f"generation.tp" + ("" if named.startswith("generation.tp=") else " or generation.pp")
            )
        elif span and width > per_node and width % per_node:
            problems.append(
                f"an engine spanning nodes takes whole nodes: {named} is not a multiple of {per_node} GPUs"
            )
        for e in range(min(count, max(pool, 0) // width)):
            start = first + e * width
            gpus = tuple(where(i) for i in range(start, start + width))
            bundles = tuple(range(start, start + width)) if colocated else tuple(range(width))
            engines.append(EngineSlot(e, gpus, bundles, node=gpus[0][0]))
        crossing = [e.engine for e in engines if len(e.nodes) > 1]
        if crossing and not span and width <= per_node:
            problems.append(
                f"engines {crossing} would cross nodes: {named} must divide a node's "
                f"{per_node} GPUs (or set generation.span_nodes=true)"
            )
        partial = [e.engine for e in engines if len(e.nodes) > 1 and e.gpus[0][1] != 0]
        if partial and span and width % per_node == 0:
            problems.append(
                f"spanning engines {partial} would start inside a node: the policy's GPUs must end on a node "
                f"boundary (generation.gpus a multiple of {per_node})"
            )
    problems += _policy_problems(cfg, ranks, per_node)
    return Placement(c.nodes, per_node, colocated, span, width, ranks, engines, problems)


def _policy_problems(cfg: Any, ranks: list[RankSlot], per_node: int) -> list[str]:
    tp = int(cfg.policy.parallel.tp)
    if tp > per_node:
        return [
            f"policy.parallel.tp={tp} is wider than a node ({per_node} GPUs): tensor parallelism needs NVLink"
        ]
    crossing = [r // tp for r in range(0, len(ranks), tp) if len({s.node for s in ranks[r : r + tp]}) > 1]
    if crossing:
        return [f"policy TP groups {crossing} cross nodes: policy.parallel.tp={tp} must divide {per_node}"]
    return []


def check(cfg: Any) -> Placement:
    """The table, raising LayoutError naming every problem when it cannot be placed."""
    from megatron_rl.errors import LayoutError

    table = placement(cfg)
    if table.problems:
        raise LayoutError("Placement check failed: " + "; ".join(table.problems) + ".")
    return table


# Ray options: the one place the runtime and `plan --placement` get them from (Ray imported inside).


def policy_bundles(cfg: Any, table: Placement) -> list[dict[str, float]]:
    """The policy's placement-group bundles, one per rank, all alike; with colocated engines each also holds
    what an engine process takes beside its rank."""
    cpus = float(cfg.cluster.cpus_per_rank)
    if not table.gpu:
        return [{"CPU": cpus} for _ in table.policy_ranks]
    if table.colocated and table.engines:
        cpus += COLOCATED_ENGINE_CPUS
    return [{"CPU": cpus, "GPU": 1.0} for _ in table.policy_ranks]


def policy_rank_gpus(cfg: Any, table: Placement) -> float:
    """Ray's GPU share of one policy rank: whole GPUs unless engines share them."""
    if not table.gpu:
        return 0.0
    return POLICY_GPU_SHARE if table.colocated and table.engines else 1.0


@dataclass
class EngineResources:
    """How one engine is placed: its actor's Ray options (placement group and bundle included), the env of
    its process, and the options of the per-GPU workers vLLM's Ray executor starts for it (empty when the
    engine process holds its GPUs itself). `own_group` is a placement group created for this engine, to be
    removed with it."""

    options: dict[str, Any]
    env: dict[str, str]
    workers: list[dict[str, Any]]
    own_group: Any = None

    def release(self) -> None:
        if self.own_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.own_group)
            self.own_group = None


def engine_resources(
    cfg: Any,
    table: Placement,
    engine: int,
    policy_group: Any = None,
    bundle_of_rank: list[int] | None = None,
) -> EngineResources:
    """Ray options of engine `engine`: CPU: a plain actor; colocated: inside `policy_group` (the policy's
    placement group, rank r in bundle `bundle_of_rank[r]`) in its ranks' bundles with a GPU fraction;
    separate: in a new placement group of its own (created here, not waited on: `own_group.ready()`)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpus = float(cfg.cluster.cpus_per_rank)
    if not table.gpu:
        return EngineResources({"num_cpus": cpus, "num_gpus": 0}, {}, [])
    slot = table.engines[engine]
    width, own = len(slot.gpus), None
    if table.colocated:
        if policy_group is None:
            raise ValueError("colocated engines are placed in the policy's placement group: pass it")
        group, share = policy_group, ENGINE_GPU_SHARE
        whole, cpus = False, COLOCATED_ENGINE_CPUS  # fractions of the ranks' GPUs: one per worker
        order = bundle_of_rank or list(range(len(table.policy_ranks)))
    else:
        from ray.util.placement_group import placement_group

        whole = not table.span_nodes or width <= table.gpus_per_node
        if whole:  # one bundle holds all its GPUs: one node, by construction
            own = placement_group([{"CPU": cpus, "GPU": float(width)}], strategy="STRICT_PACK")
        else:  # whole nodes: one bundle per GPU, packed node by node
            own = placement_group(
                [{"CPU": cpus, "GPU": 1.0}] + [{"GPU": 1.0} for _ in range(width - 1)], strategy="PACK"
            )
        group, share = own, 1.0
    bundles = (
        (0,) if whole else tuple(order[r] for r in slot.bundles) if table.colocated else tuple(range(width))
    )

    def strategy(bundle: int, capture: bool) -> Any:
        return PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=capture
        )

    if whole or width == 1:  # the engine process holds its GPUs (vLLM's in-process or multiprocess executor)
        gpus = float(width) if whole and not table.colocated else share
        return EngineResources(
            {"num_cpus": cpus, "num_gpus": gpus, "scheduling_strategy": strategy(bundles[0], False)},
            {},
            [],
            own,
        )
    # vLLM's Ray executor starts one worker per GPU in the current placement group's listed bundles
    # (vllm/v1/executor/ray_executor.py): the engine process itself holds no GPU.
    env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles)), "VLLM_RAY_PER_WORKER_GPUS": str(share)}
    workers = [{"num_cpus": 0, "num_gpus": share, "scheduling_strategy": strategy(b, True)} for b in bundles]
    return EngineResources(
        {"num_cpus": cpus, "num_gpus": 0, "scheduling_strategy": strategy(bundles[0], True)},
        env,
        workers,
        own,
    )
