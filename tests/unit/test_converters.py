"""Checkpoint converter pieces that need no Megatron world: the shared tensor transforms (against
independent per-head/per-rank references), the mapping tables, and safetensors reading/writing with the
errors bad files must give."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_converters import transforms as T
from checkpoint_converters.hf_io import HFCheckpoint, StreamingHFWriter, commit_output, prepare_output
from checkpoint_converters.mapping import mapping_for, resolve
from megatron_rl.errors import UnsupportedArchitectureError, UserError

g = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# ------------------------------------------------------------------------------------------ transforms
def reference_qkv_shard(q, k, v, heads, groups, rank, tp):
    """Megatron's fused QKV rows for one TP rank, built head by head: for each KV group the rank owns,
    its query heads, then its key head, then its value head."""
    d = k.shape[0] // groups
    per = heads // groups
    rows = []
    for grp in range(groups // tp * rank, groups // tp * (rank + 1)):
        for h in range(grp * per, (grp + 1) * per):
            rows.append(q[h * d : (h + 1) * d])
        rows.append(k[grp * d : (grp + 1) * d])
        rows.append(v[grp * d : (grp + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize("heads, groups", [(8, 2), (8, 8), (6, 3), (4, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_interleave_matches_per_head_reference_and_inverts(heads, groups, bias):
    d, h = 4, 16
    shape = (lambda n: (n,)) if bias else (lambda n: (n, h))
    q, k, v = rand(*shape(heads * d)), rand(*shape(groups * d)), rand(*shape(groups * d))
    for tp in [t for t in (1, 2, 3, 4) if groups % t == 0]:
        shards = [T.to_megatron("qkv", [q, k, v], r, tp, heads, groups) for r in range(tp)]
        for r, shard in enumerate(shards):
            assert torch.equal(shard, reference_qkv_shard(q, k, v, heads, groups, r, tp))
        back = T.to_hf("qkv", shards, heads, groups)
        assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
        # TP splits whole groups, so the TP=1 tensor split in TP contiguous blocks gives the shards.
        whole = T.to_megatron("qkv", [q, k, v], 0, 1, heads, groups)
        assert all(torch.equal(a, b) for a, b in zip(whole.chunk(tp), shards))


def test_gate_up_each_rank_holds_its_gate_and_up_shards():
    gate, up = rand(12, 5), rand(12, 5)
    assert torch.equal(T.to_megatron("gate_up", [gate, up], 0, 1), torch.cat([gate, up]))
    s0, s1 = (T.to_megatron("gate_up", [gate, up], r, 2) for r in range(2))
    assert torch.equal(s0, torch.cat([gate[:6], up[:6]])) and torch.equal(s1, torch.cat([gate[6:], up[6:]]))
    # ... which is not a plain dim-0 split of the TP=1 tensor
    assert not torch.equal(s0, torch.cat([gate, up])[:12])
    back = T.to_hf("gate_up", [s0, s1])
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)
    pieces = T.to_megatron_pieces("gate_up", [gate, up], 1, 2)
    assert torch.equal(torch.cat(pieces), s1)


@pytest.mark.parametrize("kind, dim", [("column", 0), ("row", 1), ("replicated", None)])
def test_column_row_replicated_round_trip(kind, dim):
    w = rand(8, 12)
    for tp in (1, 2, 4):
        shards = [T.to_megatron(kind, [w], r, tp) for r in range(tp)]
        expected = [w] * tp if dim is None else list(w.chunk(tp, dim=dim))
        assert all(torch.equal(a, b) for a, b in zip(shards, expected))
        assert torch.equal(T.to_hf(kind, shards)[0], w)


@pytest.mark.parametrize("kind", T.KINDS)
def test_slices_read_exactly_what_a_rank_needs(kind):
    """hf_slices + assemble on the sliced parts (what a rank reads) equals to_megatron on whole tensors."""
    heads, groups, d = 8, 4, 2
    hf = {
        "qkv": [rand(heads * d, 6), rand(groups * d, 6), rand(groups * d, 6)],
        "gate_up": [rand(8, 6), rand(8, 6)],
    }.get(kind, [rand(8, 6)])
    for tp in (1, 2, 4):
        for r in range(tp):
            pieces = T.hf_slices(kind, [t.shape for t in hf], r, tp)
            parts = [T.take(t, p) for t, p in zip(hf, pieces)]
            got = T.assemble(kind, parts, heads, groups, tp)
            assert torch.equal(got, T.to_megatron(kind, hf, r, tp, heads, groups))
            if kind == "replicated" or tp == 1:
                assert pieces == [None] * len(hf)


# -------------------------------------------------------------------------------------------- mappings
ARCHS = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
    "DeepseekV3ForCausalLM",
]


def test_every_architecture_has_a_table_and_unknown_ones_are_named():
    for arch in ARCHS:
        assert mapping_for(arch).rules
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*supported: .*LlamaForCausalLM"):
        mapping_for("GPT2LMHeadModel")


def test_resolve_global_layers_experts_and_transformer_engine_names():
    llama, moe, mix = (
        mapping_for(a) for a in ("LlamaForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM")
    )
    r = resolve(llama, "decoder.layers.1.self_attention.linear_qkv.weight", 4, 0, False)
    assert r.rule.kind == "qkv" and r.hf_names == tuple(
        f"model.layers.5.self_attn.{p}_proj.weight" for p in "qkv"
    )
    # Transformer Engine spells the pre-attention / pre-MLP norms as fused-linear attributes.
    te = resolve(llama, "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", 0, 0, False)
    assert te.hf_names == ("model.layers.0.input_layernorm.weight",)
    te = resolve(llama, "decoder.layers.2.mlp.linear_fc1.layer_norm_weight", 0, 0, False)
    assert te.hf_names == ("model.layers.2.post_attention_layernorm.weight",)
    # local expert 1 on an EP rank whose first expert is 4, layer 3: global expert 5
    r = resolve(moe, "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight", 0, 4, False)
    assert r.rule.kind == "gate_up" and r.hf_names == (
        "model.layers.3.mlp.experts.5.gate_proj.weight",
        "model.layers.3.mlp.experts.5.up_proj.weight",
    )
    grouped = resolve(mix, "decoder.layers.0.mlp.experts.linear_fc2.weight7", 0, 0, False)
    assert grouped.hf_names == ("model.layers.0.block_sparse_moe.experts.7.w2.weight",)
    assert resolve(mix, "decoder.layers.0.mlp.router.weight", 0, 0, False).hf_names == (
        "model.layers.0.block_sparse_moe.gate.weight",
    )
    assert resolve(llama, "output_layer.weight", 0, 0, tied=True) is None
    with pytest.raises(KeyError, match="no rule"):
        resolve(llama, "decoder.layers.0.mlp.router.weight", 0, 0, False)


# ------------------------------------------------------------------------------------------ safetensors
@pytest.fixture()
def sharded(tmp_path):
    tensors = {
        "a": rand(6, 4),
        "b": rand(3).to(torch.bfloat16),
        "c": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "d": rand(5, 7).to(torch.float16),
    }
    save_file({k: tensors[k] for k in "ab"}, str(tmp_path / "m-1.safetensors"), metadata={"format": "pt"})
    save_file({k: tensors[k] for k in "cd"}, str(tmp_path / "m-2.safetensors"), metadata={"format": "pt"})
    index = {
        "weight_map": {
            "a": "m-1.safetensors",
            "b": "m-1.safetensors",
            "c": "m-2.safetensors",
            "d": "m-2.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, tensors


def test_reader_is_bit_exact_and_reads_slices(sharded):
    path, tensors = sharded
    ckpt = HFCheckpoint(path)
    assert sorted(ckpt.names()) == sorted(tensors)
    for name, t in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert torch.equal(ckpt.get("a", (0, 2, 5)), tensors["a"][2:5])
    assert torch.equal(ckpt.get("d", (1, 3, 7)), tensors["d"][:, 3:7])
    assert ckpt.info("c").file.name == "m-2.safetensors"
    with pytest.raises(UserError, match=r"Tensor 'zz' is missing from the checkpoint in"):
        ckpt.get("zz")
    ckpt.close()


def test_mapped_tensors_equal_reads_outlive_the_reader_and_catch_truncation(sharded):
    path, tensors = sharded
    ckpt = HFCheckpoint(path)
    mapped = {name: ckpt.mapped(name) for name in tensors}
    ckpt.close()  # a mapping keeps its own reference to the file
    for name, t in tensors.items():
        assert mapped[name].dtype == t.dtype and torch.equal(mapped[name], t), name
    ckpt = HFCheckpoint(path)
    with open(path / "m-2.safetensors", "r+b") as f:  # shrunk after the header was checked
        f.truncate(ckpt.info("d").end - 4)
    with pytest.raises(UserError, match=r"tensor 'd' from .*m-2.safetensors: the file is shorter"):
        ckpt.mapped("d")


def _single(tmp_path: Path) -> Path:
    save_file({"w": rand(64, 64), "v": rand(8)}, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:1000], "ends at byte .* but the file has 1000 bytes"),
        (lambda b: b[:5], "only 5 bytes"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length 1000000000 does not fit"),
        (lambda b: b[:8] + b"\xff" * 20 + b[28:], "unreadable header"),
    ],
    ids=["truncated", "stub", "bad-length", "garbage-header"],
)
def test_damaged_files_name_the_file(tmp_path, damage, message):
    f = _single(tmp_path)
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(UserError, match=message) as err:
        HFCheckpoint(tmp_path)
    assert str(f) in str(err.value) and "truncated or corrupted" in str(err.value)


def test_index_errors(sharded):
    path, _ = sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["e"] = "m-2.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        UserError, match="maps tensor 'e' to m-2.safetensors, but that file does not contain it"
    ):
        HFCheckpoint(path)
    index["weight_map"]["e"] = "m-3.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="lists m-3.safetensors, which does not exist"):
        HFCheckpoint(path)
    (path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a valid safetensors index"):
        HFCheckpoint(path)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(UserError, match="No model.safetensors"):
        HFCheckpoint(tmp_path)


def test_streaming_writer_shards_and_index_load_with_safetensors(tmp_path):
    tensors = {f"t{i}": rand(32, 32) for i in range(5)} | {"half": rand(16).to(torch.bfloat16)}
    plan = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    w = StreamingHFWriter(tmp_path, plan, shard_bytes=2 * 32 * 32 * 4)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in set(index["weight_map"].values()):
        loaded |= load_file(str(tmp_path / f))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())
    assert HFCheckpoint(tmp_path).get("half").dtype == torch.bfloat16


def test_streaming_writer_refuses_surprises(tmp_path):
    w = StreamingHFWriter(tmp_path, [("a", (2, 2), torch.float32), ("b", (3,), torch.float32)])
    with pytest.raises(ValueError, match="expected a \\[2, 2\\]"):
        w.write("a", rand(3, 2))
    w.write("a", rand(2, 2))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_output_is_replaced_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("keep")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        prepare_output(out, overwrite=False)
    tmp = prepare_output(out, overwrite=True)
    assert (out / "old").read_text() == "keep"  # untouched while the new one is assembled
    (tmp / "new").write_text("x")
    commit_output(tmp, out)
    assert (out / "new").exists() and not (out / "old").exists() and not tmp.exists()


# ------------------------------------------------------------------------------------ torch_dist metadata
def test_checkpoint_metadata_refuses_smuggled_callables(tmp_path):
    from checkpoint_converters.dist_ckpt import checkpoint_metadata

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UserError, match="refusing to load (posix|os).system"):
        checkpoint_metadata(tmp_path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="incomplete or corrupted"):
        checkpoint_metadata(tmp_path)
