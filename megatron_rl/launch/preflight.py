"""What can be known wrong about a run before it starts, checked in the CLI's own process right after the
config is composed: who owns the run directory (its command; a live run holding it), the parallel layout
against the model's own numbers, and the first lines of the data files. A run stopped here has written
nothing and started no Ray cluster.

Only cheap checks belong here: the model's config.json (a tiny model's numbers come from its recipe, not
from building it) and the first HEAD_LINES examples of each data file, through the loaders' own per-line
checks. The loaders still check every line when the run reads the whole file.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError

HEAD_LINES = 100


def preflight(cfg: Any, command: str, local: bool = True) -> None:
    """Raises UserError (LayoutError for a layout) naming what to fix. `local`: the run starts on this
    machine, so its model and data files must be here (a Slurm job reads them on the cluster)."""
    from megatron_rl.planner import check_layout
    from megatron_rl.training.batching import check_batch_size
    from megatron_rl.training.run_dir import check_owner
    from megatron_rl.training.run_lock import check_free

    if local:
        from megatron_rl import platform

        platform.check_megatron_core()  # a release the CPU patches do not know fails here, not inside one
    check_owner(Path(cfg.run.dir).resolve(), command)
    check_free(cfg.run.dir)  # a live run holds the directory: stop before starting a second one
    if local:
        check_model_files(cfg)
    # The model's heads, layers and experts first: a layout that cannot split the model is the real problem
    # even when the world size is wrong too.
    layout = check_layout(cfg, generation=command == "grpo")
    if command in ("sft", "dpo"):
        check_batch_size(cfg[command].batch_size, layout.dp, f"{command}.batch_size")
    if local:
        check_data(cfg, command)


def check_model_files(cfg: Any) -> None:
    """The starting model is on this machine: a directory with config.json, or a built-in (tiny, SmolLM2)."""
    src = cfg.model.hf_path
    if src.startswith("tiny:"):
        return  # its numbers come from models.tiny (checked by the layout); it is built inside the run
    if src == "smollm2":
        from megatron_rl.models.smollm2 import gguf_path

        gguf_path()
        return
    from megatron_rl.models.hf_config import load_hf_config

    try:
        load_hf_config(src)
    except UserError as exc:
        raise UserError(f"model.hf_path={src!r}: {exc}") from None


def check_data(cfg: Any, command: str) -> None:
    """data.path (and data.val_path) exist, are UTF-8 JSONL and their first lines hold what `command`
    reads; a JSONL GRPO run leaves lines to train on after holding data.val_size out."""
    from megatron_rl.data.dpo import dpo_turns
    from megatron_rl.data.jsonl import check_head, count_lines, prompt_answer
    from megatron_rl.data.prompts import held_out_size
    from megatron_rl.data.sft import sft_messages

    d = cfg.data
    if d.kind != "jsonl":
        return
    if not d.path:
        raise UserError("data.kind=jsonl needs data.path pointing to a JSONL file.")
    check_row = {
        "grpo": partial(prompt_answer, prompt_key=d.prompt_key, answer_key=d.answer_key),
        "sft": partial(sft_messages, prompt_key=d.prompt_key),
        "dpo": partial(dpo_turns, prompt_key=d.prompt_key),
    }[command]
    for key in ("path", "val_path"):
        file = d[key]
        if file is None:
            continue
        if not Path(file).is_file():
            raise UserError(f"data.{key}={file}: no such file.")
        check_head(file, check_row, HEAD_LINES)
    if command == "grpo" and (held := held_out_size(cfg)) and held >= (lines := count_lines(d.path)):
        raise UserError(
            f"data.val_size={held} holds out every line of {d.path} ({lines}), leaving none to train on: "
            f"lower data.val_size or give data.val_path."
        )
