"""Benchmarks that print JSON (one object per model on stdout; progress on stderr).

python -m megatron_rl.bench train [--rounds N] [--models tiny,smollm2]
python -m megatron_rl.bench refit [--models smollm2,llama1b] [--engines 1,2] [--rounds N]
python -m megatron_rl.bench gpu-check [--model llama1b]   # one GPU machine: CUDA IPC / NCCL refit figures
python -m megatron_rl.bench async [--steps N] [--max-staleness K] [--threads T]   # sync vs async GRPO step
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
    refit.add_argument(
        "--cores-per-engine",
        type=int,
        default=None,
        help="cores of every engine in every round (default: one engine gets them all, n engines split them)",
    )
    gpu = sub.add_parser(
        "gpu-check", help="CUDA IPC and NCCL broadcast refit (and sleep/wake) on a GPU machine"
    )
    gpu.add_argument("--model", default="llama1b", choices=["smollm2", "llama1b"])
    gpu.add_argument("--rounds", type=int, default=3)
    gpu.add_argument("--deadline-s", type=float, default=540)
    asy = sub.add_parser("async", help="GRPO step time, synchronous vs asynchronous (tiny model, same threads)")
    asy.add_argument("--steps", type=int, default=16)
    asy.add_argument("--max-staleness", type=int, default=1)
    asy.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of the policy and the engine")
    asy.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    asy.add_argument("--max-new-tokens", type=int, default=32, help="generation length (untrained: all used)")
    args = parser.parse_args(argv)

    if args.which == "async":
        from megatron_rl.bench.async_grpo import run_async_bench

        if args.max_staleness < 1 or args.steps < args.skip + 3:
            parser.error("async needs --max-staleness >= 1 and --steps >= --skip + 3")
        result = run_async_bench(
            args.steps,
            args.max_staleness,
            args.threads,
            args.skip,
            args.max_new_tokens,
            lambda m: print(m, file=sys.stderr),
        )
        print(json.dumps(result), flush=True)
        return 0
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
    if args.cores_per_engine is not None and args.cores_per_engine < 1:
        parser.error(f"--cores-per-engine takes a count >= 1 (got {args.cores_per_engine})")
    results = run_refit_bench(
        args.models.split(","), rounds=args.rounds, engines=engines, cores_per_engine=args.cores_per_engine
    )
    for result in results:
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
