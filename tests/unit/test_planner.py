"""The memory planner: its formulas against published figures, every recipe on its cluster, and failures."""

from __future__ import annotations

import json

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.errors import LayoutError, UserError
from megatron_rl.launch.__main__ import main
from megatron_rl.planner import plan, resolve_arch
from megatron_rl.planner.memory import (
    Arch,
    Layout,
    activation_bytes_per_token,
    inflight_microbatches,
    kv_bytes_per_token,
    mixed_precision_bytes,
    state_bytes_per_param,
    training_stages,
)


def gpt(h: int, a: int, layers: int = 1) -> Arch:
    """A GPT-3-style layer as Korthikanti et al. model it: MHA, 4h GeLU MLP."""
    return Arch(
        hidden=h, layers=layers, heads=a, kv_heads=a, head_dim=h // a, ffn=4 * h, vocab=51200, gated=False
    )


def paper_layer(h, a, s, t, sp, recompute):
    """One layer's activation bytes per token, from table 2 of the paper (b = 1)."""
    if recompute == "full":
        return 2 * h / (t if sp else 1)
    scores = 5 * a * s / (h * t) if recompute == "none" else 0
    return h * ((34 / t if sp else 10 + 24 / t) + scores)


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activations_reproduce_table_2_of_korthikanti_et_al(t, sp, recompute):
    h, a, s = 12288, 96, 2048  # GPT-3 175B
    ours = activation_bytes_per_token(
        gpt(h, a), t, sp and t > 1, recompute, s, flash_attention=False, dropout=True
    )
    assert ours == pytest.approx(paper_layer(h, a, s, t, sp and t > 1, recompute), rel=1e-12)


@pytest.mark.parametrize("h, a, saving", [(12288, 96, 0.70), (20480, 128, 0.65)])
def test_selective_recompute_saves_what_the_paper_reports(h, a, saving):
    # Section 4.3: 5as/h = 80 for GPT-3 and 64 for MT-NLG 530B; selective recompute saves 70% and 65%.
    full = activation_bytes_per_token(gpt(h, a), 8, True, "none", 2048, flash_attention=False, dropout=True)
    sel = activation_bytes_per_token(
        gpt(h, a), 8, True, "selective", 2048, flash_attention=False, dropout=True
    )
    assert 1 - sel / full == pytest.approx(saving, abs=0.005)


def test_pipeline_first_stage_holds_a_whole_model_of_activations():
    # Sec. 4.2.3: the first stage keeps p micro-batches of its L/p layers = L layers, whatever p is;
    # interleaving with m chunks multiplies that by 1 + (p-1)/(pm).
    arch = gpt(4096, 32, layers=48)
    acts = {}
    for pp in (1, 2, 4, 8):
        stages = training_stages(arch, Layout(tp=8, pp=pp, sp=True), "bf16", True, 2048, 2048, "selective")
        acts[pp] = stages[0].activations
    assert acts[2] == pytest.approx(acts[1]) and acts[8] == pytest.approx(acts[1])
    assert inflight_microbatches(8, vpp=2) == pytest.approx(8 * (1 + 7 / 16))


@pytest.mark.parametrize(
    "dtype, plain, dist8",
    [("bf16", 18, 6 + 12 / 8), ("fp32", 16, 8 + 8 / 8)],
)
def test_bytes_per_parameter_match_megatron_distributed_optimizer_table(dtype, plain, dist8):
    p, g, o = mixed_precision_bytes(dtype)
    assert state_bytes_per_param(p, g, o, dp=8, distributed=False) == plain
    assert state_bytes_per_param(p, g, o, dp=8, distributed=True) == pytest.approx(dist8)


def test_optimizer_sharding_matches_zero_figure_1():
    # ZeRO (Rajbhandari et al.), figure 1: 7.5B params, 64 ranks, fp16 params and grads, K = 12.
    assert state_bytes_per_param(2, 2, 12, dp=64, distributed=False) * 7.5 == pytest.approx(120.0)
    assert state_bytes_per_param(2, 2, 12, dp=64, distributed=True) * 7.5 == pytest.approx(31.4, abs=0.05)


@pytest.mark.parametrize(
    "recipe, total_b, active_b",
    [
        ("llama8b", 8.03, 8.03),
        ("llama70b", 70.6, 70.6),
        ("qwen3_30b_a3b", 30.5, 3.3),
        ("qwen3_235b_a22b", 235.1, 22.2),
        ("mixtral8x7b", 46.7, 12.9),
        ("smollm2_135m_math", 0.1345, 0.1345),
        ("deepseek_v3", 671.0, 37.0),  # DeepSeek-V3 technical report: 671B total, 37B activated
    ],
)
def test_parameter_counts_match_the_model_cards(recipe, total_b, active_b):
    arch = resolve_arch(compose(recipe))
    assert arch.total_params() / 1e9 == pytest.approx(total_b, rel=0.01)
    assert arch.active_params() / 1e9 == pytest.approx(active_b, rel=0.02)


def test_kv_cache_per_token():
    arch = resolve_arch(compose("llama70b"))
    assert kv_bytes_per_token(arch, tp=1) == 2 * 80 * 8 * 128 * 2  # 320 KiB per token in bf16
    assert kv_bytes_per_token(arch, tp=8) == 2 * 80 * 1 * 128 * 2
    assert kv_bytes_per_token(arch, tp=16) == kv_bytes_per_token(arch, tp=8)  # KV heads replicate past 8


@pytest.mark.parametrize(
    "recipe, world",
    [
        ("tiny", 2),
        ("smollm2_135m_math", 2),
        ("llama8b", 8),
        ("llama70b", 128),
        ("qwen3_30b_a3b", 16),
        ("qwen3_235b_a22b", 256),
        ("mixtral8x7b", 32),
        ("deepseek_v3", 512),
        ("moonlight_16b_a3b", 16),
        ("tiny_deepseek", 2),
    ],
)
def test_every_recipe_fits_its_intended_cluster(recipe, world, capsys):
    p = plan(compose(recipe))
    assert p.world == world
    assert p.fits, p.reasons
    assert p.phases["kv_sequences"] >= 1
    if p.device == "gpu":
        assert max(p.phases["training"], p.phases["generation"]) <= 0.92 * 80
    assert main(["plan", f"conf={recipe}"]) == 0
    out, err = capsys.readouterr()
    assert "fits" in err and "weights" in out and "optimizer states" in out


def test_oversized_layout_fails_naming_the_component(capsys):
    # 70B with tp=1, pp=1 on one node: every GPU would hold all 70B parameters.
    argv = ["plan", "conf=llama70b", "cluster.nodes=1", "policy.parallel.tp=1", "policy.parallel.pp=1"]
    assert main([*argv, "policy.parallel.sequence_parallel=false"]) == 1
    err = capsys.readouterr().err
    assert "does not fit" in err and "the largest part is gradients (262.8 GiB)" in err
    assert "raise tp/pp" in err


def test_layout_that_does_not_divide_fails_with_the_rule(capsys):
    assert main(["plan", "conf=llama70b", "policy.parallel.tp=3"]) == 2
    assert "attention heads (64) are not divisible by tp=3" in capsys.readouterr().err
    with pytest.raises(LayoutError, match="MoE with tp>1 needs policy.parallel.sequence_parallel=true"):
        plan(compose("qwen3_30b_a3b", ["policy.parallel.sequence_parallel=false"]))
    with pytest.raises(LayoutError, match="exceeds policy.max_seq_len"):
        plan(compose("llama8b", ["generation.max_model_len=8192"]))


def test_vllm_that_cannot_start_fails(capsys):
    p = plan(compose("qwen3_235b_a22b", ["generation.gpu_memory_utilization=0.3"]))
    assert not p.fits and any(r.startswith("vLLM weights") for r in p.reasons)
    p = plan(compose("llama8b", ["generation.tp=1", "generation.gpu_memory_utilization=0.215"]))
    assert [r.split(":")[0] for r in p.reasons] == ["vLLM KV cache"]
    assert "vLLM needs at least one" in p.reasons[0]


def test_recompute_and_micro_batch_move_activations_only():
    base = plan(compose("llama70b"))
    full = plan(compose("llama70b", ["policy.recompute=full"]))
    half = plan(compose("llama70b", ["policy.micro_batch_tokens=4096"]))
    first = lambda p: p.stages[0]  # noqa: E731
    assert first(full).activations < first(base).activations / 5
    assert first(half).activations == pytest.approx(first(base).activations / 2)
    assert first(full).static == first(base).static == first(half).static


def test_arch_comes_from_the_checkpoint_config_when_present(tmp_path):
    from megatron_rl.models.tiny import tiny_config

    assert resolve_arch(compose("tiny")).hidden == 128  # tiny:<arch> -> tiny_config
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("mixtral")))
    arch = resolve_arch(compose("tiny", [f"model.hf_path={tmp_path}"]))
    assert (arch.experts, arch.top_k, arch.moe_ffn) == (4, 2, 256)  # num_local_experts, intermediate_size
    arch = resolve_arch(compose("tiny", [f"model.hf_path={tmp_path}", "model.arch.num_hidden_layers=8"]))
    assert arch.layers == 8  # the recipe's numbers win
    with pytest.raises(UserError, match="model.arch lacks hidden_size"):
        resolve_arch(compose("tiny", [f"model.hf_path={tmp_path}/missing"]))


def test_sft_and_dpo_plans_leave_out_the_engine(capsys):
    argv = ["conf=llama8b", "generation.max_model_len=8192"]
    assert main(["plan", *argv]) == 2  # GRPO: the engine's sequences would not fit the policy's length
    assert "plan sft" in capsys.readouterr().err
    assert main(["plan", "sft", *argv]) == 0
    out, err = capsys.readouterr()
    assert "llama8b (sft): fits" in err and "vLLM" not in out
    grpo, sft = plan(compose("llama8b")), plan(compose("llama8b"), "sft")
    assert sft.phases["training"] == pytest.approx(grpo.phases["training"] - 1.0)  # no sleeping engine


def test_deepseek_v3_mla_mtp_and_the_published_256_gpu_layout(capsys):
    """MLA caches one latent per layer (not per head), the MTP layer is counted apart (~14B with its embedding
    and head copies, the report's figure), and NeMo RL's 256-GPU layout (pp=16 with 3 + 14x4 + 2 layers,
    ep=16, vLLM tp=32) does not fit while Megatron's state stays resident during generation; the derived
    policy.offload_during_generation (the optimizer state to host, as NeMo RL does) makes it fit."""
    arch = resolve_arch(compose("deepseek_v3"))
    assert kv_bytes_per_token(arch, tp=8) == 61 * (512 + 64) * 2
    assert (arch.mtp_params + 2 * arch.embedding_params) / 1e9 == pytest.approx(14.0, rel=0.05)
    nemo_rl = ["cluster.nodes=32", "generation.tp=32", "generation.gpu_memory_utilization=0.6"]
    resident = [*nemo_rl, "policy.offload_during_generation=none"]
    p = plan(compose("deepseek_v3", resident))
    assert [s.name for s in p.stages] == ["first stage", "middle stage", "last stage"]
    assert not p.fits and [r.split(":")[0] for r in p.reasons] == ["generation phase"]
    assert main(["plan", "conf=deepseek_v3", *resident]) == 1
    assert "generation phase: 99.2 GiB of 73.6 GiB" in capsys.readouterr().err
    p = plan(compose("deepseek_v3", nemo_rl))
    assert p.fits and (p.offload, p.sleep_level) == ("optimizer", 2)
    worst = max(p.stages, key=lambda s: s.total)
    # 99.2 GiB less the optimizer state that went to host memory (what policy/offload.py frees)
    assert p.phases["generation"] == pytest.approx(99.2 - worst.optimizer / 1024**3, abs=0.05)
    with pytest.raises(LayoutError, match=r"layers \(61\) minus first_stage_layers \(4\)"):
        plan(compose("deepseek_v3", ["policy.parallel.first_stage_layers=4"]))
