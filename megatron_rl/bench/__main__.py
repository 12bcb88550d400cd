"""Benchmarks that print JSON (one object per model on stdout; progress on stderr).

python -m megatron_rl.bench train [--rounds N] [--models tiny,smollm2]
python -m megatron_rl.bench refit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def _model_dir(name: str, cache: Path) -> Path:
    if name == "tiny":
        from megatron_rl.models.tiny import save_tiny_checkpoint

        path = cache / "tiny_llama"
        return path if (path / "config.json").exists() else save_tiny_checkpoint(path, "llama")
    if name == "smollm2":
        from megatron_rl.models.smollm2 import materialize_smollm2

        return materialize_smollm2(cache / "smollm2_135m")
    raise SystemExit(f"unknown model {name!r}: choose tiny or smollm2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_rl.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="which", required=True)
    train = sub.add_parser("train", help="Megatron train step vs transformers forward+backward (tokens/s)")
    train.add_argument("--models", default="tiny,smollm2")
    train.add_argument("--rounds", type=int, default=5)
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--seq", type=int, default=256)
    train.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "megatron_rl_bench"))
    refit = sub.add_parser("refit", help="Megatron -> vLLM refit vs save+reload vs plain copy (GB/s)")
    refit.add_argument("--models", default="smollm2,llama1b")
    args = parser.parse_args(argv)

    if args.which == "train":
        from megatron_rl.bench.train import bench_model

        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            print(f"[bench train] {name} ...", file=sys.stderr)
            result = bench_model(_model_dir(name, cache), name, args.batch, args.seq, args.rounds)
            print(json.dumps(result), flush=True)
        return 0
    from megatron_rl.bench.refit import run_refit_bench

    for result in run_refit_bench(args.models.split(",")):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
