"""Parallel layout: tp/pp/cp/ep/sp from config, dp derived, every divisibility rule checked up front."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_rl.errors import LayoutError


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    # Expert tensor parallelism; None means "same as tp" (Megatron's default).
    etp: int | None = None
    sequence_parallel: bool = False
    # Virtual pipeline stages per rank (interleaved 1F1B); None disables interleaving.
    vpp: int | None = None
    # Uneven pipelines (Megatron's num_layers_in_first/last_pipeline_stage): layer counts with no even split
    # (DeepSeek-V3's 61) give the first and/or last stage fewer layers (the embedding, the LM head); the other
    # stages split the rest evenly. None: an even split.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    def stage_layers(self, num_layers: int) -> tuple[int, int, int]:
        """(first, middle, last) stage layer counts (pp=1: the one stage's)."""
        if self.pp == 1:
            return num_layers, num_layers, num_layers
        first, last = self.first_stage_layers, self.last_stage_layers
        rest = num_layers - (first or 0) - (last or 0)
        even = self.pp - (first is not None) - (last is not None)
        middle = rest // even if even else 0
        return (middle if first is None else first), middle, (middle if last is None else last)

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise LayoutError(
                f"World size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = "
                f"{model_parallel}. Change the number of ranks (cluster.nodes * cluster.gpus_per_node) or "
                f"the layout so that world size = tp*pp*cp*dp."
            )
        return world_size // model_parallel

    def check_world(self, world_size: int) -> int:
        """Model-independent rules: world = tp*pp*cp*dp and the expert grid fits; returns dp."""
        dp = self.data_parallel_size(world_size)
        etp = self.etp if self.etp is not None else self.tp
        # Megatron folds the expert grid (ep x etp) into the tp*cp*dp ranks of one pipeline stage.
        expert_ranks = self.tp * self.cp * dp
        if expert_ranks % (self.ep * etp):
            raise LayoutError(
                f"Expert layout ep={self.ep} x etp={etp} must divide tp*cp*dp={expert_ranks} ranks per "
                f"pipeline stage (world {world_size}); lower ep, set etp=1, or add ranks."
            )
        return dp


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that the layout must divide."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    num_experts: int | None = None


def validate_layout(par: ParallelConfig, shape: ModelShape, world_size: int | None) -> int:
    """Checks every divisibility rule; returns the data-parallel size. Raises LayoutError naming the fix."""
    for name in ("tp", "pp", "cp", "ep"):
        value = getattr(par, name)
        if not isinstance(value, int) or value < 1:
            raise LayoutError(f"policy.parallel.{name} must be a positive integer, got {value!r}.")
    problems: list[str] = []
    if shape.num_attention_heads % par.tp:
        problems.append(
            f"attention heads ({shape.num_attention_heads}) are not divisible by tp={par.tp}: "
            f"choose tp among {_divisors(shape.num_attention_heads)}"
        )
    if shape.num_query_groups % par.tp:
        problems.append(
            f"key/value heads ({shape.num_query_groups}) are not divisible by tp={par.tp}: "
            f"choose tp among {_divisors(shape.num_query_groups)}"
        )
    if shape.vocab_size % par.tp:
        problems.append(f"vocab size ({shape.vocab_size}) is not divisible by tp={par.tp}")
    stages = par.pp * (par.vpp or 1)
    uneven = par.first_stage_layers is not None or par.last_stage_layers is not None
    if uneven:
        problems += _uneven_problems(par, shape.num_layers)
    elif shape.num_layers % stages:
        problems.append(
            f"layers ({shape.num_layers}) are not divisible by pp*vpp={stages}: "
            f"choose pp among {_divisors(shape.num_layers)}"
        )
    if par.sequence_parallel and par.tp == 1:
        problems.append("sequence_parallel=true needs tp>1 (it splits activations across the TP group)")
    if par.ep > 1:
        if not shape.num_experts:
            problems.append(f"ep={par.ep} but the model has no experts: set policy.parallel.ep=1")
        elif shape.num_experts % par.ep:
            problems.append(
                f"experts ({shape.num_experts}) are not divisible by ep={par.ep}: "
                f"choose ep among {_divisors(shape.num_experts)}"
            )
    if problems:
        raise LayoutError("Parallel layout does not fit the model: " + "; ".join(problems) + ".")
    return par.check_world(world_size) if world_size is not None else 0


def _uneven_problems(par: ParallelConfig, num_layers: int) -> list[str]:
    if par.pp < 2:
        return ["first_stage_layers/last_stage_layers need pp>1"]
    if par.vpp:
        return ["first_stage_layers/last_stage_layers do not combine with vpp here"]
    first, last = par.first_stage_layers or 0, par.last_stage_layers or 0
    even = par.pp - (par.first_stage_layers is not None) - (par.last_stage_layers is not None)
    rest = num_layers - first - last
    if rest < 0 or (even and rest % even) or (not even and rest):
        return [
            f"layers ({num_layers}) minus first_stage_layers ({first}) and last_stage_layers ({last}) leave "
            f"{rest}, which the other {even} stage(s) cannot split evenly"
        ]
    return []


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
