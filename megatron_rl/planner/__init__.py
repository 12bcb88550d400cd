"""The memory planner: will a recipe's layout run, and does it fit its GPUs (or host)?

- `memory`: the formulas (bytes of weights, gradients, optimizer state, activations, KV cache), pure arithmetic.
- `layout`: a config's architecture numbers and the layout rules Megatron and vLLM impose (`check_layout`).
- `run_plan`: a config mapped onto the formulas: per-stage memory, engine share, checks (`plan`).
- `report`: the `plan` command's table and exit status.
"""

from megatron_rl.planner.layout import check_layout, resolve_arch
from megatron_rl.planner.memory import Arch, Layout, StageMemory
from megatron_rl.planner.run_plan import Check, Plan, plan

__all__ = ["Arch", "Check", "Layout", "Plan", "StageMemory", "check_layout", "plan", "resolve_arch"]
