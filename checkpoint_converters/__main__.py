"""HF <-> Megatron checkpoint conversion (also installed as `checkpoint-converters`).

  hf-to-megatron --hf-dir DIR --out DIR [--tp N --pp N --ep N] [--dtype fp32|bf16] [--overwrite]
  megatron-to-hf --megatron-dir DIR --out DIR [--hf-config DIR] [--dtype fp32|bf16] [--overwrite]
  validate --hf-dir DIR --megatron-dir DIR [--tolerance 1e-4]
  inspect DIR [--tensors]
  bench [--workdir DIR]

Runs on the CPU (GPUs are hidden). Bad input exits with status 2 and one paragraph naming the file and tensor; validate exits 1 past the
tolerance. Outputs appear only when complete (assembled in <out>.tmp, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from megatron_rl.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="checkpoint-converters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron torch_dist")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1, help="intended layout, checked against the model")
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--ep", type=int, default=1)
    a.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="Megatron parameter dtype")
    b = sub.add_parser("megatron-to-hf", help="Megatron torch_dist -> HF safetensors")
    b.add_argument("--megatron-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument(
        "--hf-config", default=None, help="config + tokenizer dir, for a bare torch_dist checkpoint"
    )
    b.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the source HF dtype")
    b.add_argument("--shard-gb", type=float, default=2.0, help="maximum size of one safetensors file")
    for s in (a, b):
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        s.add_argument("--no-progress", action="store_true")
    v = sub.add_parser("validate", help="compare Megatron and transformers logits")
    v.add_argument("--hf-dir", required=True)
    v.add_argument("--megatron-dir", required=True)
    v.add_argument("--hf-config", default=None)
    v.add_argument("--tolerance", type=float, default=1e-4)
    i = sub.add_parser("inspect", help="architecture, parameters, layout, dtypes, tensors")
    i.add_argument("dir")
    i.add_argument("--tensors", action="store_true", help="list every tensor with dtype and shape")
    bench = sub.add_parser("bench", help="convert a ~1B random Llama vs copying its files (JSON)")
    bench.add_argument("--workdir", default=None)
    bench.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the HF files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Conversion is file streaming on the CPU (gloo, Megatron's local layer spec, meta-device model): hide
    # GPUs before anything initialises CUDA, so a GPU node runs the same code path.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # Megatron warns at import about missing TE/apex; its local fallbacks are what runs here.
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.cmd == "hf-to-megatron":
            from checkpoint_converters.convert import hf_to_megatron

            out = hf_to_megatron(
                args.hf_dir,
                args.out,
                args.tp,
                args.pp,
                args.ep,
                args.dtype,
                args.overwrite,
                not args.no_progress,
            )
            print(f"wrote {out}")
        elif args.cmd == "megatron-to-hf":
            from checkpoint_converters.convert import megatron_to_hf

            out = megatron_to_hf(
                args.megatron_dir,
                args.out,
                args.hf_config,
                args.dtype,
                args.overwrite,
                int(args.shard_gb * 1024**3),
                not args.no_progress,
            )
            print(f"wrote {out}")
        elif args.cmd == "validate":
            from checkpoint_converters.validate import validate

            result, ok = validate(args.hf_dir, args.megatron_dir, args.tolerance, args.hf_config)
            print(json.dumps({**result, "tolerance": args.tolerance, "ok": ok}))
            return 0 if ok else 1
        elif args.cmd == "bench":
            from checkpoint_converters.bench import run_bench

            print(json.dumps(run_bench(args.workdir, dtype=args.dtype)))
        else:
            from checkpoint_converters.validate import inspect

            print(json.dumps(inspect(args.dir, args.tensors), indent=2))
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
