"""Megatron policy on CPU/gloo: parallel layouts agree with each other (fp32), and training lowers the loss.

Each spawn starts a 2-rank world once (~6 s of imports per rank) and runs several layouts in it, re-forming
only the model-parallel groups; the same weights move between layouts through a torch_dist checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl import distributed
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional import parallel_scenarios as sc

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {a: str(save_tiny_checkpoint(root / a, a, attention_bias=a == "qwen2")) for a in ARCHS}
    dirs["llama_tied"] = str(save_tiny_checkpoint(root / "llama_tied", "llama", tie_word_embeddings=True))
    return dirs


@pytest.fixture(scope="module")
def dense(tiny_dirs, tmp_path_factory):
    return distributed.spawn(sc.dense_equivalence, 2, tiny_dirs["llama"], str(tmp_path_factory.mktemp("ck")))


def test_a_spawned_world_meets_at_a_port_held_from_the_start_and_forms_again():
    assert distributed.spawn(sc.rendezvous_twice, 2) == [{"held": True, "sums": [3.0, 30.0]}] * 2


def test_tp2_sequence_parallel_matches_tp1(dense):
    r = dense[0]
    assert r["tp1_logits"].shape == r["tp2_logits"].shape == (2, 23, 384)
    assert (r["tp1_logits"] - r["tp2_logits"]).abs().max().item() <= 1e-5
    assert (r["tp1_logprobs"] - r["tp2_logprobs"]).abs().max().item() <= 1e-5
    ids = sc.fixed_batch()
    plain = torch.log_softmax(r["tp1_logits"][:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert (r["tp1_logprobs"] - plain).abs().max().item() <= 1e-5
    assert r["tp2_step"]["loss"] == pytest.approx(r["tp1_step"]["loss"], abs=1e-5)
    # Every parameter's gradient, gathered into the TP=1 layout, matches.
    assert r["grad_max_abs"] > 1e-3
    assert r["grad_max_abs_diff"] <= 1e-5
    assert r["tp2_step"]["grad_norm"] == pytest.approx(r["tp1_step"]["grad_norm"], rel=1e-5)


def test_pp2_train_step_matches_pp1(dense):
    r = dense[0]
    last = next(x for x in dense if x["pp2_logprobs"] is not None)
    assert (last["pp2_logprobs"] - r["tp1_logprobs"]).abs().max().item() <= 1e-5
    assert r["pp2_step"]["loss"] == pytest.approx(r["tp1_step"]["loss"], abs=1e-5)
    assert r["pp2_step"]["grad_norm"] == pytest.approx(r["tp1_step"]["grad_norm"], rel=1e-5)
    # Both pipeline stages report the same (last-stage) metrics.
    assert dense[1]["pp2_step"]["loss"] == r["pp2_step"]["loss"]


def test_optimizer_steps_lower_the_loss(dense):
    losses = [dense[0]["pp2_step"]["loss"], *dense[0]["pp2_losses"]]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_expert_parallel_matches_ep1(arch, tiny_dirs, tmp_path):
    r = distributed.spawn(sc.moe_equivalence, 2, tiny_dirs[arch], str(tmp_path))[0]
    assert (r["ep1_logits"] - r["ep2_logits"]).abs().max().item() <= 1e-5
    assert (r["ep1_logits"] - r["tp2ep2_logits"]).abs().max().item() <= 1e-5
    assert math.isfinite(r["ep2_step"]["loss"])


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_train_step_gradients_equal_transformers_autograd(arch, tiny_dirs):
    """The gradients Megatron accumulates (cross entropy on [s, b, V] logits, weight gradients fused into
    main_grad, a tied embedding's two uses summed) equal autograd's through transformers, fp32; bf16
    training runs on the same path."""
    from transformers import AutoModelForCausalLM

    out = distributed.spawn(sc.train_step_grads, 1, tiny_dirs[arch])[0]
    got = out["grads"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
    ids = sc.fixed_batch()
    logp = torch.log_softmax(hf(input_ids=ids).logits[:, :-1].float(), -1)
    (-logp.gather(-1, ids[:, 1:, None]).mean()).backward()
    hf_grads = dict(hf.named_parameters())
    assert ("output_layer.weight" in got) == (arch == "llama")
    for name, grad in got.items():
        want = torch.cat([hf_grads[h].grad for h in sc.HF_SAME_LAYOUT[name]])
        assert want.abs().max() > 1e-4, name
        torch.testing.assert_close(torch.from_numpy(grad), want, atol=2e-6, rtol=1e-4, msg=name)
    # bf16 trains too (its weight gradients accumulate into fp32 main_grad): the loss falls step by step.
    losses = out["bf16_losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_vocab_parallel_logprobs_match_log_softmax():
    for r in distributed.spawn(sc.vocab_parallel_logprobs_check, 2):
        assert r["value_err"] <= 1e-5
        assert r["grad_err"] <= 1e-5


def test_every_architecture_builds_and_trains(tiny_dirs):
    out = distributed.spawn(sc.build_every_architecture, 2, {a: tiny_dirs[a] for a in ARCHS})[0]
    assert set(out) == set(ARCHS)
    for arch, r in out.items():
        # A random model over 384 tokens starts near ln(384) = 5.95 nats.
        assert abs(r["loss"] - math.log(384)) < 0.5, (arch, r["loss"])
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert any(".linear_qkv.bias" in n for n in out["qwen2"]["names"])
    assert any("q_layernorm" in n for n in out["qwen3"]["names"])
    assert any("local_experts" in n for n in out["mixtral"]["names"])
    assert not any("q_layernorm" in n for n in out["llama"]["names"])


def test_distributed_optimizer_checkpoint_resumes_exactly(tiny_dirs, tmp_path):
    for r in distributed.spawn(sc.optimizer_checkpoint_resume, 2, tiny_dirs["llama"], str(tmp_path)):
        assert r["resumed"] == r["straight"]
