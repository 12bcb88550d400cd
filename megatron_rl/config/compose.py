"""Hydra composition of a recipe plus command-line overrides, validated against the typed schema.

Order of precedence (later wins): schema defaults < config groups chosen by the recipe < the recipe file <
the cluster profile (clusters/<cluster.profile>.yaml: site facts) < the command line.

Recipes and config groups ship in megatron_rl/conf/, cluster profiles in megatron_rl/launch/clusters/; a
directory named by MEGATRON_RL_CONF_DIR overlays both (see `search_path`).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from megatron_rl.config.schema import CHOICES, RANGES, ClusterConfig, Config
from megatron_rl.config.search_path import (
    NOT_GROUPS,
    dirs_text,
    find_yaml,
    search_dirs,
    yaml_names,
    yaml_problem,
)
from megatron_rl.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE_DIR / "conf"
PROFILES_DIR = PACKAGE_DIR / "launch" / "clusters"
# Sections whose sub-keys are free-form (a dict, not a dataclass).
_FREE_FORM = ("cluster.env.", "env.kwargs.")


def conf_dirs() -> list[Path]:
    """Where recipes and config groups are looked up, first match wins: MEGATRON_RL_CONF_DIR, the package."""
    return search_dirs(CONF_DIR)


def recipes() -> list[str]:
    return yaml_names(conf_dirs())


def groups() -> dict[str, list[str]]:
    """Config groups (folders of the recipe directories, e.g. "model", "policy/parallel"), their options."""
    found: dict[str, set[str]] = {}
    for conf_dir in conf_dirs():
        for d in (p for p in conf_dir.rglob("*") if p.is_dir()):
            name = d.relative_to(conf_dir).as_posix()
            options = {f.stem for f in d.glob("*.yaml")}
            if options and name.split("/")[0] not in NOT_GROUPS:
                found.setdefault(name, set()).update(options)
    return {name: sorted(found[name]) for name in sorted(found)}


def profile_dirs() -> list[Path]:
    return search_dirs(PROFILES_DIR, "clusters")


def profiles() -> list[str]:
    return yaml_names(profile_dirs())


def schema_keys(cls: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(default):
            keys += schema_keys(type(default), name + ".")
    return keys


def _closest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _register_schema() -> None:
    """Recipes start from the schema (`defaults: [schema, ...]`): every key exists, with its type."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def _primary_config(recipe: str, more_dirs: list[Path]) -> str:
    """Hydra looks for the primary config only in its main directory (the first of `conf_dirs()`), so a
    packaged recipe could not be composed with a user directory in front. A primary config in the ConfigStore
    that only includes the recipe lets Hydra find the recipe, and every group option, along the whole search
    path (the user directory first, the package second)."""
    from hydra.core.config_store import ConfigStore

    node: dict[str, Any] = {"defaults": [recipe, "_self_"]}
    if more_dirs:
        node["hydra"] = {"searchpath": [f"file://{d}" for d in more_dirs]}
    ConfigStore.instance().store(name="_megatron_rl_primary", node=node)
    return "_megatron_rl_primary"


def check_overrides(overrides: list[str]) -> list[str]:
    """Every override names a schema key or a config group option; typos get the closest match. Returns the
    overrides for Hydra, with entries of free-form mappings (cluster.env.X=...) turned into add-or-set."""
    known, grps = set(schema_keys()), groups()
    out = []
    for o in overrides:
        if "=" not in o and not o.startswith("~"):
            raise UserError(f"Override {o!r} is not of the form key=value.")
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in grps:
            if value not in grps[key]:
                raise UserError(
                    f"Unknown option {value!r} for config group {key!r} (override {o!r}); available: "
                    f"{', '.join(grps[key])}.{_closest(value, grps[key])}"
                )
        elif any(key.startswith(p) and len(key) > len(p) for p in _FREE_FORM):
            o = "++" + o.lstrip("+")
        elif key not in known:
            hint = _closest(key, sorted(known | set(grps)))
            plus = " Keys added with '+' must exist in the schema too." if o.startswith("+") else ""
            raise UserError(f"Unknown config key {key!r} in override {o!r}.{hint}{plus}")
        out.append(o)
    return out


def _cause(exc: BaseException) -> str:
    """The first line of the deepest cause: Hydra wraps OmegaConf's message (which names the key)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _composition_error(exc: BaseException, recipe: str, given: list[str]) -> UserError:
    """Hydra reports schema violations in recipe/group files as text ("KeyError raised while composing
    config: <reason> full_key: <key>"); turn them into the same messages as the command line's."""
    text = "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    key = re.search(r"full_key: (\S+)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = lines[1] if len(lines) > 1 and "raised while composing" in lines[0] else _cause(exc)
    where = f"recipe {recipe!r}" + (f" with overrides {given}" if given else "")
    if key and "ConfigKeyError" in text:
        k = key.group(1)
        return UserError(f"Unknown config key {k!r} ({where}).{_closest(k, schema_keys())}")
    if key and ("ValidationError" in text or "convert" in text):
        return UserError(f"Config key {key.group(1)!r} has the wrong type: {reason} ({where}).")
    if "already at" in reason:
        reason += " (drop the '+': it adds keys, and this one exists)"
    return UserError(f"Cannot compose {where}: {reason}")


def _merge_schema(raw: Any, where: str) -> Any:
    """Merges `raw` onto the structured schema: unknown keys (typos, or keys added with '+') and wrong
    types fail here, naming the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    try:
        return OmegaConf.merge(OmegaConf.structured(Config), raw)
    except ConfigKeyError as exc:
        key = str(getattr(exc, "full_key", "") or exc)
        raise UserError(f"Unknown config key {key!r} ({where}).{_closest(key, schema_keys())}") from None
    except ValidationError as exc:
        key = getattr(exc, "full_key", "?")
        raise UserError(f"Config key {key!r} has the wrong type: {_cause(exc)} ({where}).") from None


def apply_profile(cfg: Any, overrides: list[str]) -> None:
    """Site facts from clusters/<cluster.profile>.yaml (MEGATRON_RL_CONF_DIR/clusters/, then the package's
    launch/clusters/) replace the recipe's, except the cluster keys given on the command line."""
    import yaml
    from omegaconf import OmegaConf

    name = cfg.cluster.profile
    if not name:
        return
    path = find_yaml(profile_dirs(), name)
    if path is None:
        raise UserError(
            f"Unknown cluster profile {name!r} (no {name}.yaml in {dirs_text(profile_dirs())}); available: "
            f"{', '.join(profiles())}.{_closest(name, profiles())}"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"Cluster profile {path} is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"Cluster profile {path} must be a mapping of cluster.* keys.")
    names = [f.name for f in fields(ClusterConfig)]
    for key in data:
        if key not in names:
            raise UserError(f"Unknown key {key!r} in cluster profile {path}.{_closest(str(key), names)}")
    given = {o.partition("=")[0].lstrip("+~") for o in overrides}
    if "cluster.profile" in given:
        given.discard("cluster.profile")
    env_given = {k.removeprefix("cluster.env.") for k in given if k.startswith("cluster.env.")}
    picked = {k: v for k, v in data.items() if f"cluster.{k}" not in given}
    if isinstance(picked.get("env"), dict):
        picked["env"] = {k: v for k, v in picked["env"].items() if k not in env_given}
    merged = _merge_schema({"cluster": picked}, f"cluster profile {path}")
    for key in picked:
        if key == "env":
            cfg.cluster.env = OmegaConf.merge(cfg.cluster.env, merged.cluster.env)
        else:
            cfg.cluster[key] = merged.cluster[key]


def check_values(cfg: Any) -> None:
    """Choices and ranges that types alone cannot express."""
    from omegaconf import OmegaConf

    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise UserError(
                f"{key}={value!r} is not one of {', '.join(allowed)}.{_closest(str(value), list(allowed))}"
            )
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise UserError(f"{key}={value} is out of range: it must be {bounds}.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", cfg.run.name):
        raise UserError(f"run.name={cfg.run.name!r} must use only letters, digits, '.', '_' and '-'.")
    from megatron_rl import colocation

    colocation.check(cfg)  # sleep mode and offload settings the platform or layout cannot honour


def compose(recipe: str, overrides: list[str] | None = None, command: str = "grpo") -> Any:
    """Returns the validated OmegaConf config (attribute access) for `recipe` with `overrides` applied, for
    the CLI `command` (grpo, sft or dpo: it names the default run directory, runs/<command>/<run.name>).
    Recipes and groups come from MEGATRON_RL_CONF_DIR (if set), then from the package."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dirs = conf_dirs()
    known = recipes()
    if recipe not in known:
        raise UserError(f"Unknown recipe {recipe!r}; available: {', '.join(known)}.{_closest(recipe, known)}")
    given = list(overrides or [])
    overrides = check_overrides(given)
    _register_schema()
    try:
        with initialize_config_dir(config_dir=str(dirs[0]), version_base=None):
            raw = hydra_compose(config_name=_primary_config(recipe, dirs[1:]), overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _composition_error(exc, recipe, given) from None
    except yaml.YAMLError as exc:  # Hydra lets the parser's error through: a recipe or group file
        raise UserError(f"Cannot compose recipe {recipe!r}: not valid YAML: {yaml_problem(exc)}") from None
    OmegaConf.set_struct(raw, False)
    raw.recipe, raw.command = recipe, command
    cfg = _merge_schema(raw, f"recipe {recipe!r}")
    apply_profile(cfg, given)
    if cfg.run.dir is None:
        cfg.run.dir = f"runs/{command}/{cfg.run.name}"
    check_values(cfg)
    return cfg


def save_resolved(cfg: Any, run_dir: str | Path) -> Path:
    """Writes <run_dir>/config.yaml (the fully resolved config) atomically: temp file, then rename."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".config.yaml.{os.getpid()}.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)
    return path
