"""The engine group on two real vLLM engines (tiny model, CPU): prompt order, one engine per prompt,
least-outstanding dispatch, one export reaching both engines, and health: an engine killed in the middle of
a generation is restarted, refitted to the current weights before it serves, and its prompts are redone;
one dead when a refit starts is restarted and the refit completes;
a stuck engine is caught by the deadline; past `max_failures` the error names the engine.

One group serves the whole module (two engine start-ups are the expensive part); the tests run in file
order and the last ones kill its engines.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from safetensors.torch import load_file

from megatron_rl.generation.base import EngineSettings, RefitSettings, SamplingSettings
from megatron_rl.models.tiny import save_tiny_checkpoint

GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=12, n=1)
# Different lengths, so the dispatch has unequal work to balance.
PROMPTS = [[3, 89, 87, 73, 86, 203, 21, 27, 15, 22, 25, 35, 4, 203, 3][: 4 + i] for i in range(10)]


class CheckpointPolicy:
    """A weight source with the policy's refit entry point (`push_hf_weights`), reading an HF checkpoint:
    what a Megatron policy's rank 0 does with its export, without the Megatron world. Counts its exports."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir, self.exports, self.tensors_sent = model_dir, 0, 0

    def weights(self):
        self.exports += 1
        for item in load_file(f"{self.model_dir}/model.safetensors").items():
            self.tensors_sent += 1
            yield item

    def push_hf_weights(self, engines, version: int) -> dict:
        from megatron_rl.generation.client import stream_from_policy_rank

        return stream_from_policy_rank(engines, self.weights(), 0, version)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    return [str(save_tiny_checkpoint(root / f"m{seed}", "llama", seed=seed)) for seed in range(2)]


@pytest.fixture(scope="module")
def group(ray_cluster, models):
    from megatron_rl.generation.client import EngineClient
    from megatron_rl.generation.group import EngineGroup

    def start(index: int) -> EngineClient:
        return EngineClient(
            models[0],
            EngineSettings(max_model_len=512, seed=0),
            num_cpus=0.5,
            refit=RefitSettings(transport="shm", bucket_mb=0.25),
            log_name=f"engine{index}",
        )

    g = EngineGroup(start, num_engines=2, max_failures=3, timeout_s=120)
    yield g
    g.shutdown()


def test_order_one_engine_per_prompt_and_both_serve(group):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=6, n=3, seed=7)
    results = group.generate(PROMPTS, sampling)
    assert len(results) == len(PROMPTS) and all(len(r) == 3 for r in results)
    engines = [{s.engine for s in r} for r in results]
    assert all(len(e) == 1 for e in engines), engines  # a prompt's samples share one engine (prefix cache)
    assert {e for (e,) in engines} == {0, 1}
    # Order: greedy continuations of distinct prompts come back where their prompts were.
    greedy = group.generate(PROMPTS[:4], GREEDY)
    assert [r[0].token_ids for r in greedy] == [
        group.engines[0].generate([p], GREEDY)[0][0].token_ids for p in PROMPTS[:4]
    ]
    m = group.step_metrics()
    assert m["generation/engines"] == 2 and m["generation/engines_healthy"] == 2
    assert m["generation/engine0_samples"] + m["generation/engine1_samples"] == 3 * len(PROMPTS) + 4
    assert m["generation/engine0_samples"] > 0 and m["generation/engine1_samples"] > 0
    assert m["generation/engine0_tokens_per_s"] > 0 and m["generation/engine_restarts"] == 0


def test_least_outstanding_work_and_samples_independent_of_the_engine(group):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    balanced = group.generate(PROMPTS, sampling)
    group.outstanding[0] += 1e9  # engine 0 busy with a huge batch: everything goes to engine 1
    try:
        skewed = group.generate(PROMPTS, sampling)
    finally:
        group.outstanding[0] -= 1e9
    assert {s.engine for r in skewed for s in r} == {1}
    assert {s.engine for r in balanced for s in r} == {0, 1}
    # Each prompt is seeded by its place in the batch, not on its engine: the same samples either way.
    assert [[s.token_ids for s in r] for r in skewed] == [[s.token_ids for s in r] for r in balanced]
    assert group.outstanding == [0.0, 0.0]


def test_one_export_reaches_every_engine(group, models):
    policy = CheckpointPolicy(models[1])
    before = group.generate([PROMPTS[-1]] * 2, GREEDY)
    stats = group.refit_from(policy, version=1)
    assert policy.exports == 1 and policy.tensors_sent == 39  # the tiny model's tensors, once
    assert group.versions() == [1, 1] and group.version() == 1
    assert len(stats["engines"]) == 2 and stats["missing"] == [] and stats["refit_s"] > 0
    after = group.generate([PROMPTS[-1]] * 2, GREEDY)
    assert {s.engine for r in after for s in r} == {0, 1}
    assert after[0][0].token_ids == after[1][0].token_ids != before[0][0].token_ids
    assert all(s.weight_version == 1 for r in after for s in r)
    m = group.step_metrics()
    assert m["refit/engine0_s"] > 0 and m["refit/engine1_s"] > 0


def test_engine_killed_mid_generation_is_restarted_refitted_and_its_prompts_redone(group):
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=400, n=4, seed=3)
    victim = group.engines[1]

    def kill_once_it_generates() -> None:
        while not group.outstanding[1]:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(victim.info["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_once_it_generates)
    killer.start()
    results = group.generate(PROMPTS * 4, sampling)
    killer.join()
    assert len(results) == 4 * len(PROMPTS) and all(len(r) == 4 for r in results)
    assert group.restarts == 1 and group.engines[1] is not victim
    # Refitted before it served again: the new engine holds version 1, not the checkpoint it started from.
    assert group.engines[1].version() == 1
    assert all(s.weight_version == 1 for r in results for s in r)
    greedy = group.generate([PROMPTS[-1]] * 2, GREEDY)
    assert {s.engine for r in greedy for s in r} == {0, 1}
    assert greedy[0][0].token_ids == greedy[1][0].token_ids
    m = group.step_metrics()
    assert m["generation/engine_restarts"] == 1 and m["generation/engines_healthy"] == 2
    assert m["refit/engine1_s"] > 0  # the restarted engine's refit


def test_engine_dead_at_refit_start_is_restarted_and_every_export_runs_to_its_end(group, models):
    # Dead between a generation and the refit (as when it is killed just after serving its last prompt):
    # the first export fails at its start. Its sender still reads it to the end, since a Megatron policy's
    # other ranks are in its collectives; a sender that gave up there left them waiting forever.
    policy = CheckpointPolicy(models[0])
    victim = group.engines[0]
    os.kill(victim.info["pid"], signal.SIGKILL)
    group.refit_from(policy, version=2)
    assert group.restarts == 2 and group.engines[0] is not victim
    assert group.versions() == [2, 2]
    # The failed export, then one for the restarted engine and one for the live engine, each read whole.
    assert policy.exports == 3 and policy.tensors_sent == 3 * 39
    greedy = group.generate([PROMPTS[-1]] * 2, GREEDY)
    assert {s.engine for r in greedy for s in r} == {0, 1}
    assert greedy[0][0].token_ids == greedy[1][0].token_ids
    assert all(s.weight_version == 2 for r in greedy for s in r)


def test_stuck_engine_is_caught_by_the_deadline(group):
    group.timeout_s = 8
    victim = group.engines[0]
    os.kill(victim.info["pid"], signal.SIGSTOP)  # alive, never answering
    start = time.monotonic()
    results = group.generate(PROMPTS, SamplingSettings(temperature=1.0, max_new_tokens=6, n=2, seed=1))
    assert time.monotonic() - start < 60
    assert len(results) == len(PROMPTS) and group.restarts == 3 and group.engines[0] is not victim
    assert group.engines[0].version() == 2


def test_failures_past_max_failures_stop_with_the_engine_named(group):
    from megatron_rl.generation.group import EngineGroupError

    group.timeout_s = 120
    os.kill(group.engines[1].info["pid"], signal.SIGKILL)
    with pytest.raises(
        EngineGroupError, match=r"generation engine 1 failed: its process died .*max_failures=3"
    ):
        group.generate(PROMPTS, GREEDY)
