"""`python -m checkpoint_converters bench`: HF -> Megatron conversion of a ~1B random Llama written to disk,
against copying the same files, in one run; peak RSS of any conversion process vs the checkpoint size."""

from __future__ import annotations

import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run_bench(workdir: str | None = None, rounds: int = 2) -> dict[str, Any]:
    from checkpoint_converters.convert import hf_to_megatron
    from megatron_rl.bench.refit import _llama_1b

    root = Path(workdir or tempfile.mkdtemp(prefix="conv_bench_"))
    model = _llama_1b(root / "llama_1b")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    convert, copy = [], []
    for i in range(rounds):
        start = time.perf_counter()
        shutil.copytree(model, root / f"copy{i}")
        copy.append(time.perf_counter() - start)
        start = time.perf_counter()
        hf_to_megatron(str(model), str(root / f"meg{i}"), overwrite=True)
        convert.append(time.perf_counter() - start)
        shutil.rmtree(root / f"copy{i}")
        shutil.rmtree(root / f"meg{i}")
    # ru_maxrss of children: the largest resident set of any reaped conversion rank (KiB on Linux).
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(child_peak, self_peak)
    t_conv, t_copy = statistics.median(convert), statistics.median(copy)
    return {
        "bench": "convert",
        "model": "llama_1.1b_random_fp32",
        "checkpoint_bytes": size,
        "rounds": rounds,
        "convert_s": t_conv,
        "copy_s": t_copy,
        "time_vs_copy": t_conv / t_copy,
        "peak_rss_bytes": peak,
        "peak_rss_fraction": peak / size,
    }
