"""Where a converted checkpoint lands: a read-only or full filesystem is the user's to fix, so it is said in
one line naming the path and the space needed, before writing when it can be known, and otherwise in place
of the writer's own error (torch's archive writer reports a full disk only as a short write)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from megatron_rl.errors import UserError

# Beside the tensors: torch_dist metadata and per-tensor records, safetensors headers and the index.
METADATA_ALLOWANCE = 1 << 20


def _existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def files_bytes(directory: str | Path, names: tuple[str, ...]) -> int:
    """The total size of the named files present in `directory`."""
    return sum((Path(directory) / n).stat().st_size for n in names if (Path(directory) / n).is_file())


def _read_only(out: Path, where: Path) -> UserError:
    return UserError(f"Cannot write {out}: {where} is on a read-only filesystem; write it elsewhere.")


def _no_space(out: Path, where: Path, needed: int) -> UserError:
    free = human(shutil.disk_usage(where).free)
    room = f"needs about {human(needed)}, {free} is free" if needed else f"needs more than the {free} free"
    return UserError(
        f"Cannot write {out}: the filesystem of {where} is out of space: the output {room}. "
        "Free some space or write it elsewhere."
    )


def check_output_room(out: Path, needed: int) -> None:
    """Before anything is written: the output's filesystem takes writes and has `needed` bytes free (0: the
    size is not known ahead)."""
    where = _existing(out.parent)
    if not os.access(where, os.W_OK):
        if os.statvfs(where).f_flag & os.ST_RDONLY:
            raise _read_only(out, where)
        raise UserError(f"Cannot write {out}: no permission to write in {where}.")
    if needed and shutil.disk_usage(where).free < needed:
        raise _no_space(out, where, needed)


def storage_error(exc: BaseException, out: Path, needed: int) -> UserError | None:
    """The failed write `exc` as a UserError when the filesystem caused it (read-only, full), else None.
    Called once the partial output is removed, so the free space reported is what the filesystem offers."""
    where = _existing(out.parent)
    code = getattr(exc, "errno", None)
    if code == errno.EROFS:
        return _read_only(out, where)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
    # torch's zip writer says only "unexpected pos A vs B" when a write comes up short.
    short_write = isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)
    if full or (short_write and (not needed or shutil.disk_usage(where).free < needed)):
        return _no_space(out, where, needed)
    return None
