"""HF <-> Megatron checkpoint conversion.

python -m checkpoint_converters hf-to-megatron --hf-dir DIR --out DIR [--tp N --pp N --ep N --dtype bf16|fp32]
python -m checkpoint_converters megatron-to-hf --megatron-dir DIR --out DIR [--tp N --pp N --ep N]
python -m checkpoint_converters validate --hf-dir DIR --megatron-dir DIR [--tolerance 1e-4]
python -m checkpoint_converters inspect DIR
"""

from __future__ import annotations

import argparse
import json
import sys

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
    a.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    b = sub.add_parser("megatron-to-hf", help="Megatron torch_dist -> HF safetensors")
    b.add_argument("--megatron-dir", required=True)
    b.add_argument("--out", required=True)
    for s in (a, b):
        s.add_argument("--tp", type=int, default=1)
        s.add_argument("--pp", type=int, default=1)
        s.add_argument("--ep", type=int, default=1)
        s.add_argument("--overwrite", action="store_true")
    v = sub.add_parser("validate", help="compare Megatron and transformers logits")
    v.add_argument("--hf-dir", required=True)
    v.add_argument("--megatron-dir", required=True)
    v.add_argument("--tolerance", type=float, default=1e-4)
    i = sub.add_parser("inspect", help="architecture, parameters, layout, dtypes, tensors")
    i.add_argument("dir")
    bench = sub.add_parser("bench", help="convert a ~1B random Llama vs copying its files (JSON)")
    bench.add_argument("--workdir", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "hf-to-megatron":
            from checkpoint_converters.convert import hf_to_megatron

            out = hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp, args.ep, args.dtype, args.overwrite)
            print(f"wrote {out}")
        elif args.cmd == "megatron-to-hf":
            from checkpoint_converters.convert import megatron_to_hf

            out = megatron_to_hf(args.megatron_dir, args.out, args.tp, args.pp, args.ep, args.overwrite)
            print(f"wrote {out}")
        elif args.cmd == "validate":
            from checkpoint_converters.validate import validate

            result, ok = validate(args.hf_dir, args.megatron_dir, args.tolerance)
            print(json.dumps({**result, "tolerance": args.tolerance, "ok": ok}))
            return 0 if ok else 1
        elif args.cmd == "bench":
            from checkpoint_converters.bench import run_bench

            print(json.dumps(run_bench(args.workdir)))
        else:
            from checkpoint_converters.validate import inspect

            print(json.dumps(inspect(args.dir), indent=2))
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
