"""Hydra composition of a recipe plus command-line overrides, validated against the typed schema."""

from __future__ import annotations

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from megatron_rl.config.schema import Config
from megatron_rl.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def recipes() -> list[str]:
    return sorted(p.stem for p in CONF_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _schema_keys(cls: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(default):
            keys += _schema_keys(type(default), name + ".")
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _schema_keys(), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _register_schema() -> None:
    """Recipes start from the schema (`defaults: [schema, _self_]`): every key exists, with its type."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="schema", node=Config)


def compose(recipe: str, overrides: list[str] | None = None) -> Any:
    """Returns the validated OmegaConf config (attribute access) for `recipe` with `overrides` applied."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    if recipe not in recipes():
        raise UserError(f"Unknown recipe {recipe!r}; available: {', '.join(recipes())}.")
    overrides = list(overrides or [])
    known = set(_schema_keys())
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o:
            raise UserError(f"Override {o!r} is not of the form key=value.")
        # dict-valued sections (arch, cluster.env) take any sub-key
        if key not in known and not key.startswith(("arch.", "cluster.env.")):
            raise UserError(f"Unknown config key {key!r} in override {o!r}.{_suggest(key)}")
    _register_schema()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            raw = hydra_compose(config_name=recipe, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException) as exc:
        import re

        text = str(exc.__cause__ or exc)
        key = re.search(r"full_key: (\S+)", text)
        if key and "could not be converted" in text:
            raise UserError(
                f"Config key {key.group(1)!r} has the wrong type: {text.splitlines()[0]}"
            ) from None
        raise UserError(
            f"Cannot compose recipe {recipe!r} with {overrides}: {text.splitlines()[0]}"
        ) from None
    OmegaConf.set_struct(raw, False)
    raw.recipe = recipe
    # Merge onto the schema: unknown keys (typos, or new keys added with '+') and wrong types fail here.
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or str(exc)
        raise UserError(f"Unknown config key {key!r} (recipe {recipe!r}).{_suggest(str(key))}") from None
    except ValidationError as exc:
        key = getattr(exc, "full_key", "?")
        raise UserError(f"Config key {key!r} has the wrong type: {exc.msg.splitlines()[0]}") from None
    return cfg
