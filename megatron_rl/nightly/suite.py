"""Suite files (nightly/suites/NAME.yaml; your own in $MEGATRON_RL_CONF_DIR/suites/): which recipes run, for
how long, on how many nodes, checked how.

description: what the suite is for
launcher: slurm                # or local; `--launcher` overrides
output_root: /lustre/nightly   # run directories (shared storage for Slurm); default <report>/runs
env: {WANDB_MODE: offline}     # extra environment of local runs
defaults:                      # every entry starts from these
  steps: 20
  timeout_s: 3600              # running time allowed per entry
  overrides: [logger.wandb=false]
  assertions: ["max(memory/peak_gb) < 75"]
baseline:                      # how `--baseline DIR` judges regressions
  tolerance: 0.10              # relative, in the bad direction
  tolerances: {timing/step_s: 0.15, "median(train/token_mult_prob_error)": {abs: 0.01}}
entries:
  - name: llama8b_tp2
    recipe: llama8b
    steps: 50
    nodes: 1
    overrides: {policy.optim.lr: 2.0e-6}
    assertions: ["median(train/token_mult_prob_error) < 1.05", "mean(reward/mean[-10:]) > 0.6"]
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_rl.config.search_path import dirs_text, find_yaml, search_dirs, yaml_names, yaml_problem
from megatron_rl.errors import UserError
from megatron_rl.nightly.assertions import Assertion, parse_assertion

SUITES_DIR = Path(__file__).resolve().parent / "suites"
# Keys the runner sets itself from an entry's fields; a suite that overrides them would fight it.
MANAGED = {
    "run.dir": "the runner gives every entry its own run directory",
    "run.name": "the runner names each run after its entry",
    "run.steps": "use the entry's `steps:` field",
    "cluster.nodes": "use the entry's `nodes:` field",
    "cluster.launcher": "use the suite's `launcher:` or --launcher",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP = {"description", "launcher", "output_root", "env", "defaults", "baseline", "entries"}
_DEFAULTS = {"algo", "steps", "nodes", "timeout_s", "queue_timeout_s", "overrides", "assertions"}
_ENTRY = _DEFAULTS | {"name", "recipe", "command"}
_BASELINE = {"tolerance", "tolerances", "fail_on_regression"}


@dataclass(frozen=True)
class Tolerance:
    rel: float = 0.0
    abs: float = 0.0

    def allowed(self, baseline: float) -> float:
        return max(abs(baseline) * self.rel, self.abs)


@dataclass
class Entry:
    name: str
    recipe: str | None
    algo: str
    steps: int | None
    nodes: int | None
    overrides: list[str]
    assertions: list[Assertion]
    timeout_s: float
    queue_timeout_s: float
    command: list[str] | None = None  # a custom local command instead of the launcher (writes metrics.jsonl)

    def launcher_overrides(self, run_dir: Path) -> list[str]:
        """The launcher's key=value arguments: the entry's overrides plus the managed keys."""
        managed = [f"run.dir={run_dir}", f"run.name={self.name}"]
        if self.steps is not None:
            managed.append(f"run.steps={self.steps}")
        if self.nodes is not None:
            managed.append(f"cluster.nodes={self.nodes}")
        return [*self.overrides, *managed]


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    launcher: str
    output_root: str | None
    env: dict[str, str]
    entries: list[Entry]
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(rel=0.1))
    tolerances: dict[str, Tolerance] = field(default_factory=dict)
    fail_on_regression: bool = True

    def tolerance_for(self, expression: str, metric: str) -> Tolerance:
        return self.tolerances.get(expression) or self.tolerances.get(metric) or self.tolerance


def suite_dirs() -> list[Path]:
    """Where suites are looked up by name, first match wins: MEGATRON_RL_CONF_DIR/suites/, the package."""
    return search_dirs(SUITES_DIR, "suites")


def available_suites() -> list[str]:
    return yaml_names(suite_dirs())


def find_suite(name: str) -> Path:
    """A suite by name (suites/NAME.yaml along `suite_dirs()`) or by path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    found = find_yaml(suite_dirs(), name)
    if found is not None:
        return found
    raise UserError(
        f"Unknown suite {name!r}: no {name}.yaml in {dirs_text(suite_dirs())} and no such YAML file; "
        f"available suites: {', '.join(available_suites()) or 'none'}."
    )


def _check_keys(data: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))}).{hint}")


def _overrides(raw: Any, where: str) -> dict[str, str]:
    """Overrides as a list of 'key=value' strings or a mapping; returned keyed by key, in order."""
    if raw is None:
        return {}
    if isinstance(raw, dict):
        items = []
        for k, v in raw.items():
            if isinstance(v, dict):
                raise UserError(f"{where}: override {k!r} has a mapping value; spell out its leaf keys.")
            text = "null" if v is None else json.dumps(v) if isinstance(v, bool | list) else str(v)
            items.append(f"{k}={text}")
        raw = items
    if not isinstance(raw, list) or not all(isinstance(o, str) for o in raw):
        raise UserError(
            f"{where}: overrides must be a list of 'key=value' strings or a mapping, got {raw!r}."
        )
    out: dict[str, str] = {}
    for o in raw:
        key, eq, _ = o.partition("=")
        key = key.strip().lstrip("+~")
        if not eq or not key:
            raise UserError(f"{where}: override {o!r} is not of the form key=value.")
        if key in MANAGED:
            raise UserError(f"{where}: override {o!r} sets {key}, which the runner manages ({MANAGED[key]}).")
        out[key] = o
    return out


def _number(raw: Any, key: str, where: str, integer: bool = False, minimum: float = 0) -> Any:
    ok = isinstance(raw, int) if integer else isinstance(raw, int | float)
    if isinstance(raw, bool) or not ok or raw < minimum:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{where}: {key} must be {kind} >= {minimum}, got {raw!r}.")
    return raw


def _tolerance(raw: Any, where: str) -> Tolerance:
    if isinstance(raw, dict):
        _check_keys(raw, {"rel", "abs"}, where)
        return Tolerance(
            rel=_number(raw.get("rel", 0.0), "rel", where), abs=_number(raw.get("abs", 0.0), "abs", where)
        )
    return Tolerance(rel=_number(raw, "tolerance", where))


def _entry(raw: Any, index: int, defaults: dict[str, Any], path: Path) -> Entry:
    if not isinstance(raw, dict):
        raise UserError(f"suite file {path}: entry #{index + 1} must be a mapping, got {raw!r}.")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"suite file {path}: entry #{index + 1} needs a `name` of letters, digits, '_', '.', '-' "
            f"(it names the run directory and the JUnit test case), got {name!r}."
        )
    where = f"suite file {path}, entry {name!r}"
    _check_keys(raw, _ENTRY, where)
    merged = {**defaults, **{k: v for k, v in raw.items() if k not in ("overrides", "assertions")}}
    recipe, command = raw.get("recipe"), raw.get("command")
    if (recipe is None) == (command is None):
        raise UserError(f"{where}: give exactly one of `recipe` (a recipe name) or `command`.")
    if isinstance(command, str):
        command = shlex.split(command)
    if command is not None and (not command or not all(isinstance(c, str) for c in command)):
        raise UserError(f"{where}: command must be a non-empty string or list of strings, got {command!r}.")
    overrides = {**_overrides(defaults.get("overrides"), where), **_overrides(raw.get("overrides"), where)}
    steps = merged.get("steps")
    steps = None if steps is None else _number(steps, "steps", where, integer=True, minimum=1)
    nodes = merged.get("nodes")
    nodes = None if nodes is None else _number(nodes, "nodes", where, integer=True, minimum=1)
    for source in (defaults.get("assertions"), raw.get("assertions")):
        if not isinstance(source or [], list):
            raise UserError(f"{where}: assertions must be a list of strings, got {source!r}.")
    texts = [*(defaults.get("assertions") or []), *(raw.get("assertions") or [])]
    # Every run must have reached its last step: a run that exits early (or a Slurm job whose script
    # swallowed the exit code) fails here even when its other assertions pass on the steps it did log.
    implicit = [f"last(step) >= {steps}"] if steps is not None else []
    assertions = [parse_assertion(t, where) for t in [*implicit, *texts]]
    return Entry(
        name=name,
        recipe=recipe,
        algo=str(merged.get("algo", "grpo")),
        steps=steps,
        nodes=nodes,
        overrides=list(overrides.values()),
        assertions=assertions,
        timeout_s=float(_number(merged.get("timeout_s", 3600), "timeout_s", where, minimum=1)),
        queue_timeout_s=float(
            _number(merged.get("queue_timeout_s", 86400), "queue_timeout_s", where, minimum=1)
        ),
        command=command,
    )


def load_suite(name_or_path: str) -> Suite:
    path = find_suite(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"suite file {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"suite file {path} must hold a mapping with an `entries` list.")
    _check_keys(data, _TOP, f"suite file {path}")
    launcher = data.get("launcher", "local")
    if launcher not in ("local", "slurm"):
        raise UserError(f"suite file {path}: launcher must be 'local' or 'slurm', got {launcher!r}.")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"suite file {path}: defaults must be a mapping.")
    _check_keys(defaults, _DEFAULTS, f"suite file {path}, defaults")
    entries_raw = data.get("entries")
    if not isinstance(entries_raw, list) or not entries_raw:
        raise UserError(f"suite file {path}: `entries` must be a non-empty list.")
    entries = [_entry(raw, i, defaults, path) for i, raw in enumerate(entries_raw)]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise UserError(f"suite file {path}: two entries are named {e.name!r}; names must be unique.")
        seen.add(e.name)
    base = data.get("baseline") or {}
    where = f"suite file {path}, baseline"
    _check_keys(base, _BASELINE, where)
    tolerances = base.get("tolerances") or {}
    if not isinstance(tolerances, dict):
        raise UserError(f"{where}: tolerances must map a metric or expression to a tolerance.")
    env = data.get("env") or {}
    if not isinstance(env, dict):
        raise UserError(f"suite file {path}: env must be a mapping of variable to value.")
    return Suite(
        name=path.stem,
        path=path,
        description=str(data.get("description", "")).strip(),
        launcher=launcher,
        output_root=data.get("output_root"),
        env={str(k): str(v) for k, v in env.items()},
        entries=entries,
        tolerance=_tolerance(base.get("tolerance", 0.1), where),
        tolerances={str(k): _tolerance(v, f"{where}, tolerance of {k!r}") for k, v in tolerances.items()},
        fail_on_regression=bool(base.get("fail_on_regression", True)),
    )


def select(suite: Suite, only: str | None) -> list[Entry]:
    """Entries whose name matches any of the comma-separated glob patterns in `only` (all if None)."""
    if not only:
        return list(suite.entries)
    import fnmatch

    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [e for e in suite.entries if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(e.name for e in suite.entries)
        raise UserError(f"--only {only!r} matches no entry of suite {suite.name!r} (entries: {names}).")
    return chosen
