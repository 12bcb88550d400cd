"""Where the YAML assets are found: in the package, overlaid by a user directory.

The package ships recipes and config groups (megatron_rl/conf/), cluster profiles
(megatron_rl/launch/clusters/) and nightly suites (megatron_rl/nightly/suites/), so a plain `pip install`
finds them from any directory.
`MEGATRON_RL_CONF_DIR=DIR` adds a directory laid out like the packaged assets: recipe files and config-group
folders at its top, cluster profiles in DIR/clusters/, suites in DIR/suites/. A file in DIR wins over the
packaged file of the same name; everything else still comes from the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_rl.errors import UserError

ENV_VAR = "MEGATRON_RL_CONF_DIR"
# Folders of the user directory that hold the other kinds of asset, not config groups.
NOT_GROUPS = ("clusters", "suites")


def user_conf_dir() -> Path | None:
    """The directory named by MEGATRON_RL_CONF_DIR, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise UserError(
            f"{ENV_VAR}={value} {what}: it should name a directory of your own recipes "
            f"(with optional clusters/ and suites/ folders), or be unset."
        )
    return path.resolve()


def search_dirs(packaged: Path, sub: str = "") -> list[Path]:
    """The directories to look in, first match wins: the user directory (or its `sub` folder), then the
    packaged one."""
    user = user_conf_dir()
    dirs = [user / sub if sub else user] if user is not None else []
    return [d for d in dirs if d.is_dir()] + [packaged]


def yaml_names(dirs: list[Path]) -> list[str]:
    """The names (stems) of the YAML files at the top of `dirs`, each once; `_`-prefixed ones are private."""
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml") if not p.stem.startswith("_")})


def find_yaml(dirs: list[Path], name: str) -> Path | None:
    """The first `<dir>/<name>.yaml` that exists."""
    return next((d / f"{name}.yaml" for d in dirs if (d / f"{name}.yaml").is_file()), None)


def dirs_text(dirs: list[Path]) -> str:
    """The search path in words, for messages."""
    return " then ".join(str(d) for d in dirs)


def yaml_problem(exc: Exception) -> str:
    """A YAML parse error in one line: the file (when known), line and column, and what is wrong."""
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    context = getattr(exc, "context", None)
    what = f"{problem} ({context})" if context else problem
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return what
    # A parsed string is named "<unicode string>": the caller names the file then.
    name = "" if str(mark.name).startswith("<") else f"{mark.name}, "
    return f"{name}line {mark.line + 1}, column {mark.column + 1}: {what}"
