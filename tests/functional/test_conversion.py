"""HF <-> Megatron conversion for every architecture, end to end on tiny random models.

1. Offline: HF -> torch_dist -> HF in one process (the streaming converter): bit-exact, config untouched.
2. The converted checkpoint loads with Megatron at TP2(+SP), PP2, EP2 and TP2xEP2: logits equal
   transformers' (fp32, <= 1e-4, same top-1) and export_hf_weights gives the HF tensors back bit for bit.
   Each layout then saves with Megatron's own writer ...
3. ... and the streaming converter turns those checkpoints (written at another layout) back into HF, exactly.
Plus live loading (load_hf_weights, each rank reading its slices) against transformers at every layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from megatron_rl import distributed
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional import parallel_scenarios as sc

ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {"attention_bias": True}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {"mlp_only_layers": [1]}),  # a dense layer among the MoE ones
    "mixtral": ("mixtral", {}),
    # MLA with YaRN, a dense first layer, MoE with shared experts and sigmoid routing with its bias buffer,
    # group-limited top-k, and one MTP layer (megatron_rl.models.tiny)
    "deepseek_v3": ("deepseek_v3", {}),
}
MOE = ("qwen3_moe", "mixtral", "deepseek_v3")
DENSE_LAYOUTS = [{"tp": 2, "sequence_parallel": True}, {"pp": 2}]
MOE_LAYOUTS = [{"ep": 2}, {"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True}]


def layouts_of(arch: str) -> list[dict[str, Any]]:
    return MOE_LAYOUTS if arch in MOE else DENSE_LAYOUTS


def lid(layout: dict[str, Any]) -> str:
    return "_".join(f"{k}{int(v)}" for k, v in layout.items())


def read_hf(path: str | Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names that differ in presence, dtype, shape or any bit (empty = identical)."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if (
            x.dtype != y.dtype
            or x.shape != y.shape
            or not torch.equal(x.view(torch.uint8), y.view(torch.uint8))
        ):
            bad.append(k)
    return bad


# ------------------------------------------------------------------------------ functions run in spawns
def convert_all(rank: int, dirs: dict[str, str], work: str) -> None:
    from checkpoint_converters.convert import hf_to_megatron, megatron_to_hf

    for name, path in dirs.items():
        hf_to_megatron(path, f"{work}/{name}.meg", progress=False)
        megatron_to_hf(f"{work}/{name}.meg", f"{work}/{name}.back", progress=False)
    # bf16 Megatron weights: back to the source fp32 by default, or kept bf16; several shards and an index.
    hf_to_megatron(dirs["llama"], f"{work}/llama_bf16.meg", dtype="bf16", progress=False)
    megatron_to_hf(f"{work}/llama_bf16.meg", f"{work}/llama_bf16.back", progress=False)
    megatron_to_hf(
        f"{work}/llama_bf16.meg", f"{work}/llama_bf16.kept", dtype="bf16", shard_bytes=400_000, progress=False
    )


def split_dim_mismatches(chunks: list[Any], hf_dir: str) -> list[str]:
    """Parameters whose mapping kind splits another weight dim than Megatron's own `partition_dim` (the
    kinds use Megatron's words: column parallel splits dim 0, row parallel dim 1). At TP1/PP1 names are
    global, so the table resolves them directly."""
    from megatron.core.utils import unwrap_model

    from checkpoint_converters.mapping import mapping_for, resolve
    from checkpoint_converters.transforms import SPLIT_DIM

    mapping = mapping_for(json.loads((Path(hf_dir) / "config.json").read_text())["architectures"][0])
    bad, seen = [], 0
    for chunk in chunks:
        model = unwrap_model(chunk)
        for name, p in model.named_parameters():
            res = resolve(mapping, name, 0, 0, model.share_embeddings_and_output_weights)
            if res is None:
                continue
            seen += 1
            megatron = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
            if SPLIT_DIM[res.rule.kind] != megatron:
                bad.append(f"{name}: {res.rule.kind!r} but Megatron's partition_dim is {megatron}")
    return bad if seen else ["no parameter resolved"]


def stage_export(rank: int, policy: Any, original: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The refit's export from a pipelined policy (one sender per stage): what each rank received, merged on
    rank 0. Every tensor must come from exactly one sender, and together they are the model, bit for bit."""
    import torch.distributed as dist

    from checkpoint_converters import export_hf_weights
    from checkpoint_converters.live import stage_senders

    stages = stage_senders()
    mine = dict(export_hf_weights(policy.model, stages=stages))
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if rank != 0:
        return {}
    merged = {n: t for part in every for n, t in part.items()}
    return {
        "stage_senders": list(stages.senders),
        "stage_names": [sorted(part) for part in every],
        "stage_twice": sum(len(part) for part in every) - len(merged),
        "stage_differs": bit_equal(original, merged),
    }


def load_at_layouts(rank: int, dirs: dict[str, str], work: str) -> dict[str, dict[str, Any]]:
    """world 2, each architecture at TP1 and its parallel layouts: live-load the HF weights (each rank reads
    its slices) and export them; then wipe the weights, load the converted torch_dist checkpoint, export and
    compare logits with transformers; then save with Megatron's own writer at this layout."""
    from transformers import AutoModelForCausalLM

    from checkpoint_converters import export_hf_weights, load_hf_weights
    from megatron_rl.models.hf_config import load_hf_config
    from megatron_rl.parallel import ParallelConfig
    from megatron_rl.policy.checkpoint import load_checkpoint, save_checkpoint
    from megatron_rl.policy.core import MegatronPolicy

    out: dict[str, dict[str, Any]] = {}
    ids = sc.fixed_batch(seed=3, b=2, s=20)
    for name, path in dirs.items():
        original = read_hf(path)
        with torch.no_grad():
            hf_logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
        for layout in [{}, *layouts_of(name)]:
            par = ParallelConfig(**layout)
            distributed.initialize(par, seed=0)
            policy = MegatronPolicy(load_hf_config(path), par, train=False)
            res: dict[str, Any] = {}
            if not layout and rank == 0:
                res["split_dims"] = split_dim_mismatches(policy.model, path)
            load_hf_weights(policy.model, path)
            live = dict(export_hf_weights(policy.model))  # every rank iterates: collectives inside
            if rank == 0:
                res["live_differs"] = bit_equal(original, live)
            with torch.no_grad():  # nothing of the live load may survive into the checks below
                for chunk in policy.model:
                    for p in chunk.parameters():
                        p.zero_()
            if rank == 0:  # exported tensors are copies, not views of the (now zeroed) parameters
                res["live_untouched"] = bit_equal(original, live) == []
            load_checkpoint(policy, f"{work}/{name}.meg/model", with_optimizer=False)
            exported = dict(export_hf_weights(policy.model))
            res |= stage_export(rank, policy, original)
            lp = policy.logprobs([{"input_ids": ids}])
            if lp is not None:  # the last stage
                ref = torch.log_softmax(hf_logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                res["logprob_err"] = (lp[0] - ref).abs().max().item()
            logits = sc.full_logits(policy, ids)
            if rank == 0:
                res["export_differs"] = bit_equal(original, exported)
                if logits is not None:
                    res["logit_err"] = (logits - hf_logits).abs().max().item()
                    res["top1_equal"] = bool((logits.argmax(-1) == hf_logits.argmax(-1)).all())
            if layout:
                save_checkpoint(policy, f"{work}/{name}.{lid(layout)}.saved", with_optimizer=False)
            out.setdefault(f"{name}:{lid(layout)}", {}).update(res)
    out |= exported_grads(rank, dirs["llama"])
    distributed.destroy_model_parallel()
    return out


def exported_grads(rank: int, path: str) -> dict[str, dict[str, Any]]:
    """export_hf_weights(grads=True) after one train step, at TP1, TP2+SP and PP2, against the gradient
    transformers computes for the same mean token NLL."""
    from transformers import AutoModelForCausalLM

    from checkpoint_converters import export_hf_weights, load_hf_weights
    from megatron_rl.models.hf_config import load_hf_config
    from megatron_rl.parallel import ParallelConfig
    from megatron_rl.policy.core import MegatronPolicy
    from megatron_rl.policy.optim import OptimConfig

    ids = sc.fixed_batch(seed=4, b=2, s=16)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    logits = hf(ids).logits
    nll = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    nll.backward()
    ref = {n: p.grad for n, p in hf.named_parameters()}
    scale = max(g.abs().max().item() for g in ref.values())
    out = {}
    for layout in ({}, {"tp": 2, "sequence_parallel": True}, {"pp": 2}):
        # dp=2 at TP1 sees the same batch on both ranks; whole (unsharded) gradients stay in main_grad, and
        # no clipping rescales them.
        par = ParallelConfig(**layout)
        distributed.initialize(par, seed=0)
        optim = OptimConfig(lr=1e-3, weight_decay=0.0, clip_grad=0.0, use_distributed_optimizer=False)
        policy = MegatronPolicy(load_hf_config(path), par, optim)
        load_hf_weights(policy.model, path)
        policy.train_step([{"input_ids": ids}], sc.nll_loss)
        grads = dict(export_hf_weights(policy.model, grads=True))
        if rank == 0:
            out[f"grads:{lid(layout)}"] = {
                "names_differ": sorted(set(grads) ^ set(ref)),
                "rel_err": max((grads[n] - ref[n]).abs().max().item() for n in ref) / scale,
            }
    return out


def convert_saved(rank: int, dirs: dict[str, str], work: str) -> None:
    from checkpoint_converters.convert import megatron_to_hf

    for name, path in dirs.items():
        for layout in layouts_of(name):
            saved = f"{work}/{name}.{lid(layout)}.saved"
            megatron_to_hf(saved, saved + ".hf", hf_config_dir=path, progress=False)


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_conv")
    return {name: str(save_tiny_checkpoint(root / name, arch, **kw)) for name, (arch, kw) in ARCHS.items()}


@pytest.fixture(scope="module")
def work(tiny_dirs, tmp_path_factory) -> SimpleNamespace:
    """Runs the three stages (three local worlds) once for every test below."""
    path = str(tmp_path_factory.mktemp("conv_work"))
    distributed.spawn(convert_all, 1, tiny_dirs, path)
    results = distributed.spawn(load_at_layouts, 2, tiny_dirs, path)
    distributed.spawn(convert_saved, 1, tiny_dirs, path)
    merged: dict[str, dict[str, Any]] = {}
    for r in results:
        for key, res in r.items():
            merged.setdefault(key, {}).update(res)
    return SimpleNamespace(path=Path(path), layouts=merged)


@pytest.mark.parametrize("name", list(ARCHS))
def test_hf_megatron_hf_is_bit_exact(work, tiny_dirs, name):
    back = work.path / f"{name}.back"
    assert bit_equal(read_hf(tiny_dirs[name]), read_hf(back)) == []
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (back / side).read_bytes() == (Path(tiny_dirs[name]) / side).read_bytes()
    assert not Path(str(back) + ".tmp").exists()


ALL = [(name, lid(layout)) for name in ARCHS for layout in [{}, *layouts_of(name)]]
CASES = [(name, layout) for name, layout in ALL if layout]


@pytest.mark.parametrize("name, layout", ALL, ids=[f"{n}-{lay or 'tp1'}" for n, lay in ALL])
def test_megatron_matches_transformers_at_every_layout_and_exports_exactly(work, name, layout):
    """Live-loaded HF weights and the converted checkpoint both export back bit for bit; the converted one
    gives transformers' logits (fp32)."""
    res = work.layouts[f"{name}:{layout}"]
    assert res["live_differs"] == [] and res["export_differs"] == []
    # The refit's per-stage export: rank 0 alone sends at pp=1; at pp=2 each rank sends its own stage's
    # tensors (tied embeddings: the one embedding from the first stage), none twice, the model exactly.
    assert res["stage_twice"] == 0 and res["stage_differs"] == []
    first, second = res["stage_names"]
    if "pp2" in layout:
        assert res["stage_senders"] == [0, 1] and first and second
        assert "model.embed_tokens.weight" in first and "model.norm.weight" in second
        assert "lm_head.weight" not in first and ("lm_head.weight" in second) == ("tied" not in name)
        assert not any(".layers.0." in n for n in second) and not any(".layers.3." in n for n in first)
    else:
        assert res["stage_senders"] == [0] and second == []
    assert res["live_untouched"]
    assert res["logprob_err"] <= 1e-4
    if "logit_err" in res:  # full logits are gathered only at pp=1
        assert res["logit_err"] <= 1e-4 and res["top1_equal"]


@pytest.mark.parametrize("name", list(ARCHS))
def test_mapping_kinds_split_the_dims_megatron_splits(work, name):
    assert work.layouts[f"{name}:"]["split_dims"] == []


@pytest.mark.parametrize("name, layout", CASES, ids=[f"{n}-{lay}" for n, lay in CASES])
def test_checkpoint_saved_at_another_layout_converts_back_exactly(work, tiny_dirs, name, layout):
    back = work.path / f"{name}.{layout}.saved.hf"
    assert bit_equal(read_hf(tiny_dirs[name]), read_hf(back)) == []


@pytest.mark.parametrize("layout", ["", "tp2_sequence_parallel1", "pp2"])
def test_exported_gradients_are_transformers_gradients(work, layout):
    res = work.layouts[f"grads:{layout}"]
    assert res["names_differ"] == []
    assert res["rel_err"] <= 1e-5


def test_bf16_weights_round_to_the_source_dtype_or_stay_bf16(work, tiny_dirs):
    original = read_hf(tiny_dirs["llama"])
    widened = read_hf(work.path / "llama_bf16.back")
    kept_dir = work.path / "llama_bf16.kept"
    kept = read_hf(kept_dir)
    assert (kept_dir / "model.safetensors.index.json").is_file() and len(
        list(kept_dir.glob("*.safetensors"))
    ) > 2
    for k, x in original.items():
        assert widened[k].dtype == torch.float32 and torch.equal(widened[k], x.to(torch.bfloat16).float())
        assert kept[k].dtype == torch.bfloat16 and torch.equal(kept[k], x.to(torch.bfloat16))
    cfg = json.loads((kept_dir / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
