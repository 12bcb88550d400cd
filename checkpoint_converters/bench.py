"""`python -m checkpoint_converters bench`: convert a ~1.1B-parameter random Llama (TinyLlama's shape) written
to disk, against copying the same files in the same run; peak RSS of the converting process against the
checkpoint size.

Both sides make their output durable (fsync) before they count as done: the converter fsyncs what it
writes before renaming it into place, so the copy baseline does the same. Each conversion runs in a fresh
process; `convert_s` times the conversion call inside it (imports excluded, as for the in-process copy),
`convert_process_s` the whole process, and the peak RSS is that process's high-water mark (os.wait4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from checkpoint_converters.hf_io import HFCheckpoint

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
}

_CHILD = """
import json, sys, time
import checkpoint_converters.convert as c
import checkpoint_converters.dist_ckpt, megatron.core.models.gpt.gpt_model, megatron.core.dist_checkpointing
fn = getattr(c, sys.argv[1])
kwargs = {"dtype": sys.argv[4]} if sys.argv[1] == "hf_to_megatron" else {}
start = time.perf_counter()
fn(sys.argv[2], sys.argv[3], overwrite=True, progress=False, **kwargs)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _random_model(rank: int, out: str, dtype: str, shape: dict[str, Any]) -> None:
    """Writes random weights tensor by tensor (no full model in memory) plus a tiny model's side files."""
    import torch

    from checkpoint_converters.dist_ckpt import meta_model, param_maps, single_process_world
    from checkpoint_converters.hf_io import StreamingHFWriter
    from checkpoint_converters.mapping import mapping_for
    from megatron_rl.dtypes import hf_name, precision
    from megatron_rl.models.tiny import save_tiny_checkpoint

    tmp = Path(out + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny = save_tiny_checkpoint(tmp / "tiny", "llama")
    cfg = json.loads((tiny / "config.json").read_text())
    cfg.update(shape, dtype=hf_name(dtype), tie_word_embeddings=False)
    torch_dtype = precision(dtype)
    gen = torch.Generator().manual_seed(0)
    with single_process_world():
        model, _, _ = meta_model(cfg, torch_dtype)
        maps = param_maps(model, mapping_for("LlamaForCausalLM"))
    plan = [(h, s, torch_dtype) for m in maps for h, s in zip(m.hf_names, m.hf_shapes)]
    writer = StreamingHFWriter(tmp, plan, shard_bytes=2 * 1024**3)
    for name, s, _ in plan:
        writer.write(name, (torch.randn(s, generator=gen) * 0.02).to(torch_dtype))
    writer.close()
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(tmp / "tiny")
    os.replace(tmp, out)


def _copy_durable(src: Path, dst: Path) -> None:
    def copy(a: str, b: str) -> None:
        shutil.copy2(a, b)
        with open(b, "rb") as f:
            os.fsync(f.fileno())

    shutil.copytree(src, dst, copy_function=copy)


def _convert_process(fn: str, src: Path, dst: Path, dtype: str) -> tuple[float, float, int]:
    """(seconds inside the conversion call, seconds of the whole process, peak RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", _CHILD, fn, str(src), str(dst), dtype],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{fn} failed:\n{err.decode()[-3000:]}")
    inner = json.loads(out.decode().strip().splitlines()[-1])["seconds"]
    return inner, wall, usage.ru_maxrss * 1024  # Linux reports KiB


def run_bench(workdir: str | None = None, rounds: int = 2, dtype: str = "fp32") -> dict[str, Any]:
    """Runs the benchmark in `workdir` (the random model is kept there and reused), or in a temporary
    directory removed afterwards."""
    from megatron_rl import distributed

    root = Path(workdir or tempfile.mkdtemp(prefix="conv_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model = root / f"llama_1b_{dtype}"
        if not (model / "config.json").is_file():
            distributed.spawn(_random_model, 1, str(model), dtype, LLAMA_1B)
        ckpt = HFCheckpoint(model)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        params = sum(math.prod(i.shape) for i in ckpt.tensors.values())
        ckpt.close()
        copy, to_meg, to_hf = [], [], []
        for i in range(rounds):  # interleaved, so load from other jobs hits both sides alike
            start = time.perf_counter()
            _copy_durable(model, root / f"copy{i}")
            copy.append(time.perf_counter() - start)
            shutil.rmtree(root / f"copy{i}")
            to_meg.append(_convert_process("hf_to_megatron", model, root / "meg", dtype))  # dtype kept
            to_hf.append(_convert_process("megatron_to_hf", root / "meg", root / "back", dtype))
            shutil.rmtree(root / "meg")
            shutil.rmtree(root / "back")
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    t_copy = statistics.median(copy)
    t_meg = statistics.median(t for t, _, _ in to_meg)
    t_hf = statistics.median(t for t, _, _ in to_hf)
    rss_meg, rss_hf = max(r for _, _, r in to_meg), max(r for _, _, r in to_hf)
    return {
        "bench": "convert",
        "model": f"llama_{params / 1e9:.2f}b_random_{dtype}",
        "parameters": params,
        "checkpoint_bytes": size,
        "rounds": rounds,
        "copy_s": t_copy,
        "convert_s": t_meg,
        "convert_process_s": statistics.median(w for _, w, _ in to_meg),
        "time_vs_copy": t_meg / t_copy,
        "peak_rss_bytes": rss_meg,
        "peak_rss_fraction": rss_meg / size,
        "to_hf_s": t_hf,
        "to_hf_time_vs_copy": t_hf / t_copy,
        "to_hf_peak_rss_fraction": rss_hf / size,
        "targets": {"time_vs_copy": 2.0, "peak_rss_fraction": 0.25},
    }
