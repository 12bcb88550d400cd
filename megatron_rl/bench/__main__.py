"""Benchmarks that print JSON (one object per model on stdout; progress on stderr).

python -m megatron_rl.bench train [--rounds N] [--models tiny,smollm2]
python -m megatron_rl.bench refit [--models smollm2,llama1b] [--engines 1,2] [--rounds N]
python -m megatron_rl.bench gpu-check [--model llama1b]   # one GPU machine: CUDA IPC / NCCL refit figures
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
    refit.add_argument("--engines", default="1", help="engine counts to refit with one export each, e.g. 1,2")
    refit.add_argument("--rounds", type=int, default=3)
    gpu = sub.add_parser(
        "gpu-check", help="CUDA IPC and NCCL broadcast refit (and sleep/wake) on a GPU machine"
    )
    gpu.add_argument("--model", default="llama1b", choices=["smollm2", "llama1b"])
    gpu.add_argument("--rounds", type=int, default=3)
    gpu.add_argument("--deadline-s", type=float, default=540)
    args = parser.parse_args(argv)

    if args.which == "gpu-check":
        return _gpu_check(args)

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

    try:
        engines = tuple(sorted({int(n) for n in args.engines.split(",")}))
    except ValueError:
        engines = ()
    if not engines or min(engines) < 1:
        parser.error(
            f"--engines takes engine counts >= 1 separated by commas, e.g. 1,2 (got {args.engines!r})"
        )
    for result in run_refit_bench(args.models.split(","), rounds=args.rounds, engines=engines):
        print(json.dumps(result), flush=True)
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from megatron_rl.bench.gpu_check import failed, run_gpu_check
    from megatron_rl.errors import UserError

    try:
        results = run_gpu_check(
            args.model, args.rounds, args.deadline_s, log=lambda m: print(m, file=sys.stderr)
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results), flush=True)
    bad = failed(results)
    if bad:
        print(f"error: gpu-check: failed: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
