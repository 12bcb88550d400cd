"""megatron-rl command line.

    python -m megatron_rl.launch [ALGO] [conf=RECIPE] [key=value ...] [--cfg] [--dry-run]

ALGO: grpo (default), sft, dpo, plan. RECIPE: a file in conf/ (default tiny). Overrides use Hydra syntax
(`policy.parallel.tp=8`, `+new.key=...` is refused unless the schema has it). `--cfg` prints the composed
config and exits. `launcher=slurm` (i.e. `cluster.launcher=slurm`) submits through NeMo-Run; `--dry-run`
prints the script that would be submitted and submits nothing.
"""

from __future__ import annotations

import importlib
import sys

from megatron_rl.errors import UserError

ALGORITHMS = {
    "grpo": "megatron_rl.grpo.driver:run",
    "sft": "megatron_rl.sft.driver:run",
    "dpo": "megatron_rl.dpo.driver:run",
}
ALIASES = {"launcher": "cluster.launcher", "nodes": "cluster.nodes"}


def _usage() -> str:
    from megatron_rl.config.compose import recipes

    return (__doc__ or "") + f"\nAlgorithms: {', '.join(ALGORITHMS)}, plan\nRecipes: {', '.join(recipes())}\n"


def parse(argv: list[str]) -> tuple[str, str, list[str], set[str]]:
    flags = {a for a in argv if a.startswith("--")}
    args = [a for a in argv if not a.startswith("--")]
    algo = "grpo"
    if args and "=" not in args[0]:
        algo = args.pop(0)
    if algo not in ALGORITHMS and algo != "plan":
        raise UserError(f"Unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}, plan.")
    recipe, overrides = "tiny", []
    for a in args:
        key, _, value = a.partition("=")
        if key == "conf":
            recipe = value
        else:
            overrides.append(f"{ALIASES.get(key, key)}={value}" if key in ALIASES else a)
    unknown = flags - {"--cfg", "--dry-run", "--help", "-h"}
    if unknown:
        raise UserError(f"Unknown flag(s) {sorted(unknown)}; known: --cfg, --dry-run, --help.")
    return algo, recipe, overrides, flags


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(_usage())
        return 0
    try:
        algo, recipe, overrides, flags = parse(argv)
        from megatron_rl.config.compose import compose

        cfg = compose(recipe, overrides)
        if "--cfg" in flags:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg))
            return 0
        if algo == "plan":
            from megatron_rl.launch.plan import main as plan

            return plan(cfg)
        if cfg.cluster.launcher == "slurm" or "--dry-run" in flags:
            from megatron_rl.launch.slurm import submit

            return submit(cfg, algo, recipe, overrides, dry_run="--dry-run" in flags)
        module, _, fn = ALGORITHMS[algo].partition(":")
        try:
            entry = getattr(importlib.import_module(module), fn)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                raise UserError(
                    f"Algorithm {algo!r} is not available in this version ({module} missing)."
                ) from None
            raise
        return int(entry(cfg) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from megatron_rl.grpo.ray_utils import WorkerError

        if not isinstance(exc, WorkerError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
