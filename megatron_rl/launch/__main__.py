"""megatron-rl command line.

    python -m megatron_rl.launch [ALGO] [conf=RECIPE] [key=value ...] [--cfg] [--dry-run] [--in-process] [--verbose]
        [--help]

    python -m megatron_rl.launch nightly --suite NAME [--dry-run] [--only PATTERN]   (see docs/nightly.md)

ALGO is grpo (the default), sft, dpo, or plan (the per-GPU memory plan and layout checks of the recipe;
`plan sft` / `plan dpo` plan a run without the generation engine). `plan --placement` instead places the
recipe's Ray actors (policy ranks, engines) on a simulated cluster of its nodes and GPUs and prints where they
landed as one JSON object (nodes, policy_ranks, engines, problems, ok); exit 1 when they cannot be placed.
RECIPE names a recipe (default tiny): a packaged one or your own (see the end). Overrides use Hydra syntax:
`policy.parallel.tp=8`, `cluster.nodes=16`, a config group option such as `model=llama3_8b` or
`algorithm=dapo`, and `launcher=local|slurm` (short for cluster.launcher). `+key=value` is checked against the
schema like any other key. `--cfg` prints the composed config and exits. With cluster.launcher=local (the
default) the run is a NeMo-Run experiment on its LocalExecutor (`nemo experiment list|status|logs`,
docs/quickstart.md) whose task is this command with `--in-process`: the run in this very process (what tests
and debuggers use). With cluster.launcher=slurm the run is submitted as Ray on Slurm through NeMo-Run.
`--dry-run` prints what would run (the task's command, or the exact sbatch script) to stdout and starts
nothing. The console is quiet: the progress bar, the final figures and errors; the engine's and workers'
output goes to the run's logs/ folder. `--verbose` shows everything on the console instead.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from megatron_rl.errors import UserError
from megatron_rl.faults.preemption import REQUEUE_EXIT, Preempted

ALGORITHMS = {
    "grpo": "megatron_rl.grpo.driver:run",
    "sft": "megatron_rl.sft.driver:run",
    "dpo": "megatron_rl.dpo.driver:run",
}
ALIASES = {"launcher": "cluster.launcher"}
FLAGS = ("--cfg", "--dry-run", "--in-process", "--verbose", "--placement", "--help", "-h")


def usage() -> str:
    from megatron_rl.config.compose import conf_dirs, groups, profiles, recipes
    from megatron_rl.config.search_path import ENV_VAR, dirs_text

    lines = [
        (__doc__ or "").strip(),
        "",
        f"Algorithms: {', '.join(ALGORITHMS)}, plan",
        f"Recipes: {', '.join(recipes())}",
        "Config groups (override with group=option):",
        *(f"  {g}: {', '.join(opts)}" for g, opts in groups().items()),
        f"Cluster profiles (cluster.profile=NAME): {', '.join(profiles())}",
        f"Your own recipes and group options go in a directory named by {ENV_VAR}=DIR (profiles in",
        "DIR/clusters/, suites in DIR/suites/); a file there wins over the packaged one of the same name.",
        f"Recipes are read from: {dirs_text(conf_dirs())}",
    ]
    return "\n".join(lines) + "\n"


class Args(NamedTuple):
    algo: str  # grpo | sft | dpo | plan
    recipe: str
    overrides: list[str]
    flags: set[str]
    plan_for: str = "grpo"  # `plan sft conf=...` plans an SFT run (no generation engine)


def parse(argv: list[str]) -> Args:
    flags = {a for a in argv if a.startswith("-")}
    unknown = flags - set(FLAGS)
    if unknown:
        raise UserError(f"Unknown flag(s) {', '.join(sorted(unknown))}; known: {', '.join(FLAGS)}.")
    args = [a for a in argv if not a.startswith("-")]
    algo = "grpo"
    if args and "=" not in args[0]:
        algo = args.pop(0)
    if algo not in ALGORITHMS and algo != "plan":
        raise UserError(f"Unknown algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}, plan.")
    plan_for = "grpo"
    if algo == "plan" and args and args[0] in ALGORITHMS:
        plan_for = args.pop(0)
    recipe, overrides = "tiny", []
    for a in args:
        key, eq, value = a.partition("=")
        if key == "conf":
            recipe = value
        elif key in ALIASES and eq:
            overrides.append(f"{ALIASES[key]}={value}")
        else:
            overrides.append(a)
    return Args(algo, recipe, overrides, flags, plan_for)


def _entry(algo: str):
    module, _, fn = ALGORITHMS[algo].partition(":")
    return getattr(importlib.import_module(module), fn)


def run(argv: list[str]) -> int:
    algo, recipe, overrides, flags, plan_for = parse(argv)
    from megatron_rl import console

    # Before the heavy imports, whose warnings it filters.
    console.configure(verbose_flag="--verbose" in flags)
    from megatron_rl.config.compose import compose, save_resolved

    cfg = compose(recipe, overrides, command=plan_for if algo == "plan" else algo)
    if "--cfg" in flags:
        from omegaconf import OmegaConf

        sys.stdout.write(OmegaConf.to_yaml(cfg))
        return 0
    if algo == "plan" and "--placement" in flags:
        from megatron_rl.planner.simulated_placement import main as place

        return place(cfg)
    if algo == "plan":
        from megatron_rl.planner.report import main as plan

        return plan(cfg, plan_for)
    from megatron_rl.launch.preflight import preflight

    # Before anything is written or started: a run that cannot start leaves no trace.
    preflight(cfg, algo, local=cfg.cluster.launcher == "local")
    if cfg.cluster.launcher == "slurm":
        from megatron_rl.launch.slurm import submit

        return submit(cfg, algo, overrides, dry_run="--dry-run" in flags)
    if "--dry-run" in flags or "--in-process" not in flags:
        from megatron_rl.launch import local

        if "--dry-run" in flags:
            return local.dry_run(cfg, algo, overrides)
        return local.run(cfg, algo, overrides)
    entry = _entry(algo)
    from megatron_rl.process_lifetime import run_processes
    from megatron_rl.training.run_lock import RunLock

    # This process owns the run: the lock keeps a second run out of its directory, and every process the run
    # starts carries its mark, so none outlives it.
    with RunLock(cfg.run.dir), run_processes():
        save_resolved(cfg, cfg.run.dir)
        return int(entry(cfg) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["nightly"]:  # its own argparse CLI: suites, reports, baselines
        return importlib.import_module("megatron_rl.nightly.__main__").main(argv[1:])
    try:
        if "--help" in argv or "-h" in argv:
            sys.stdout.write(usage())
            return 0
        return run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # A crashed Ray worker: the controller already turned it into one paragraph naming the phase.
        try:
            from megatron_rl.ray_utils import WorkerError
        except ImportError:
            raise exc from None
        if not isinstance(exc, WorkerError):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:  # a signal during the set-up, before any step: nothing to save
        print(f"stopped for preemption ({exc}) before any step; exit {REQUEUE_EXIT}", file=sys.stderr)
        return REQUEUE_EXIT
    except KeyboardInterrupt:
        # Ctrl-C: the workers are shut down on the way out (megatron_rl.faults); no traceback.
        print("interrupted (Ctrl-C): stopped; the run resumes from its last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
