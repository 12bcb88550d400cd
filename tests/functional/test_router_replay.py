"""MoE router replay on a tiny Qwen3-MoE: a vLLM engine (bf16, so its routing differs from the fp32
trainer's on near ties, as engine and trainer kernels do at scale) returns the experts it routed every token
to; a TP=2 + SP + EP=2 Megatron policy forwards the same sequences, packed into padded micro-batches,
without replay (the agreement metric) and with it (the trainer's routing must equal the engine's everywhere,
in the logprob and the train forwards, and the logprob mismatch must be no worse).
"""

from __future__ import annotations

import pytest
import torch

from megatron_rl import distributed
from megatron_rl.generation.base import EngineSettings, SamplingSettings
from megatron_rl.generation.metrics import token_mult_prob_error
from megatron_rl.grpo import rollout
from megatron_rl.models.tiny import save_tiny_checkpoint
from tests.functional import replay_scenarios as sc

PROMPTS = [[3, 89, 87, 73, 86, 203, 21], [40, 41, 42], [7, 100, 200, 300, 17, 9, 12, 13, 14], [55, 66]]


@pytest.fixture(scope="module")
def replayed(ray_cluster, tmp_path_factory):
    from megatron_rl.generation.client import EngineClient

    model = str(save_tiny_checkpoint(tmp_path_factory.mktemp("moe") / "qwen3_moe", "qwen3_moe", seed=3))
    engine = EngineClient(
        model, EngineSettings(max_model_len=128, dtype="bfloat16", return_routing=True), num_cpus=0.5
    )
    try:
        items = [{"prompt_ids": p, "answer": "", "prompt": ""} for p in PROMPTS]
        batch = rollout.generate(engine, items, SamplingSettings(max_new_tokens=16, n=3, seed=7))
    finally:
        engine.shutdown()
    batch.advantages = torch.zeros(len(batch))
    seqs = batch.sequences()
    # a 96-token budget: several micro-batches, rows padded to their longest
    ranks = distributed.spawn(sc.replay_check, 2, model, seqs, 96)
    return batch, seqs, ranks


def test_engine_returns_routing_for_every_token_and_moe_layer(replayed):
    batch, seqs, _ = replayed
    assert len(batch.routed_experts) == len(batch) == 12
    for prompt, response, routed in zip(batch.prompt_ids, batch.response_ids, batch.routed_experts):
        assert routed.shape == (len(prompt) + len(response) - 1, 4, 2)  # every token but the last; 4 layers
        assert int(routed.min()) >= 0 and int(routed.max()) < 4  # 4 experts
        assert (routed.sort(-1).values[..., 0] != routed.sort(-1).values[..., 1]).all()  # 2 distinct experts
    assert all(s["routing"] is r for s, r in zip(seqs, batch.routed_experts))


def test_agreement_without_replay_is_reported_and_matches_an_independent_count(replayed):
    _, _, ranks = replayed
    assert ranks[0]["micro_batches"] > 1 and ranks[0]["padded"]
    agree = sum(r["measure_counts"]["agree"] for r in ranks)  # SP: each TP rank counts its slice
    total = sum(r["measure_counts"]["total"] for r in ranks)
    independent = ranks[0]["measure_independent"]
    assert total == independent["total"] > 0
    assert agree == independent["agree"]
    assert 0.5 < agree / total < 1.0  # bf16 engine vs fp32 trainer: most, not all, decisions agree


def test_with_replay_the_trainer_routes_every_token_as_the_engine_did(replayed):
    _, _, ranks = replayed
    for phase in ("engine_independent", "train_independent"):  # logprob forward, train forward
        got = ranks[0][phase]
        assert got["agree"] == got["total"] == ranks[0]["measure_independent"]["total"], phase
    # the metric under replay: each layer's own choice before its replay, upstream layers replayed
    counts = [r["engine_counts"] for r in ranks]
    assert sum(c["total"] for c in counts) == ranks[0]["measure_independent"]["total"]
    assert 0.0 < sum(c["agree"] for c in counts) <= sum(c["total"] for c in counts)


def test_replay_does_not_worsen_the_logprob_mismatch(replayed):
    _, seqs, ranks = replayed
    engine = torch.cat([s["engine_lp"] for s in seqs])
    mask = torch.cat([s["resp"] for s in seqs])
    errors = {
        phase: token_mult_prob_error(torch.cat(ranks[0][f"{phase}_logprobs"]), engine, mask)
        for phase in ("measure", "engine")
    }
    assert 1.0 <= errors["engine"] <= errors["measure"], errors
    counts = [r["measure_counts"] for r in ranks]
    agreement = sum(c["agree"] for c in counts) / sum(c["total"] for c in counts)
    print(f"router agreement without replay {agreement:.4f}; token_mult_prob_error {errors}")  # -s shows it
