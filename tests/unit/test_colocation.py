"""Colocation settings (megatron_rl/colocation.py): what each layout derives, what the config refuses, and the
planner's arithmetic for what vLLM sleep and the policy's offload free (the rule policy/offload.py runs)."""

from __future__ import annotations

import pytest

from megatron_rl import colocation
from megatron_rl.config.compose import compose
from megatron_rl.errors import UserError
from megatron_rl.launch.__main__ import main
from megatron_rl.planner import plan
from megatron_rl.planner.memory import GIB, resident_during_generation
from megatron_rl.planner.run_plan import VLLM_ASLEEP_GIB


def test_derived_sleep_level_and_offload():
    # Colocated on GPU: level 2 (the refit rewrites every weight, so level 1's host copy would be wasted).
    llama = compose("llama70b")
    assert (colocation.sleep_level(llama), colocation.offload_setting(llama)) == (2, "none")
    # CPU: vLLM has no sleep mode there, and host memory is all one.
    tiny = compose("tiny")
    assert (colocation.sleep_level(tiny), colocation.offload_setting(tiny)) == (0, "none")
    # A separate pool shares no GPU with the policy; asynchronous GRPO never sleeps.
    separate = compose("llama8b", ["generation.colocated=false", "generation.gpus=8", "grpo.max_staleness=1"])
    assert (colocation.sleep_level(separate), colocation.offload_setting(separate)) == (0, "none")
    # Colocated engines always run the synchronous loop (max_staleness aside), so they sleep.
    assert colocation.sleep_level(compose("llama70b", ["grpo.max_staleness=1"])) == 2
    given = compose("llama70b", ["generation.sleep_level=1", "policy.offload_during_generation=optimizer"])
    assert (colocation.sleep_level(given), colocation.offload_setting(given)) == (1, "optimizer")
    # A bigger vLLM share no longer fits beside Megatron's whole state: the plan derives the offload.
    bigger = compose("llama70b", ["generation.gpu_memory_utilization=0.8"])
    assert colocation.offload_setting(bigger) == "optimizer_and_grads"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["generation.sleep_level=1"], "generation.sleep_level=1: vLLM has no sleep mode on CPU"),
        (["generation.sleep_level=3"], "generation.sleep_level=3 is out of range"),
        (["policy.offload_during_generation=all"], "policy.offload_during_generation='all' is not one of"),
    ],
)
def test_refusals_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        compose("tiny", overrides)


def test_separate_pool_refuses_sleep_and_the_cli_says_so_in_one_line(capsys):
    with pytest.raises(UserError, match="a separate generation pool .* shares none"):
        compose("llama8b", ["generation.colocated=false", "generation.gpus=8", "generation.sleep_level=2"])
    assert main(["plan", "conf=tiny", "generation.sleep_level=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: generation.sleep_level=2: vLLM has no sleep mode on CPU (cluster.gpus_per_node=0); "
                   "set generation.sleep_level=0 or leave it null."]


def test_planner_counts_what_sleep_and_offload_free():
    base = plan(compose("llama70b"))
    worst = max(base.stages, key=lambda s: s.total)
    share = compose("llama70b").generation.gpu_memory_utilization * compose("llama70b").cluster.gpu_memory_gb
    # Sleeping engines keep ~1 GiB while Megatron trains; an engine that never sleeps keeps its whole share.
    assert base.phases["training"] == pytest.approx(worst.total / GIB + VLLM_ASLEEP_GIB)
    awake = plan(compose("llama70b", ["generation.sleep_level=0"]))
    assert awake.phases["training"] == pytest.approx(worst.total / GIB + share)
    assert not awake.fits and awake.reasons[0].startswith("training phase")
    # While vLLM generates Megatron keeps its weights, and whatever the offload setting leaves.
    assert base.phases["generation"] == pytest.approx(worst.static / GIB + share)
    for offload, freed in [("optimizer", worst.optimizer), ("optimizer_and_grads", worst.optimizer + worst.grads)]:
        p = plan(compose("llama70b", [f"policy.offload_during_generation={offload}"]))
        assert p.offload == offload
        assert p.phases["generation"] == pytest.approx((worst.static - freed) / GIB + share)
        assert resident_during_generation(worst, offload) == pytest.approx(worst.static - freed)
    assert resident_during_generation(worst, "optimizer_and_grads") == pytest.approx(worst.weights)


def test_plan_report_says_what_it_assumes(capsys):
    assert main(["plan", "conf=llama70b", "generation.gpu_memory_utilization=0.8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "colocated vLLM sleeps (level 2) while Megatron trains" in out
    assert "Megatron keeps its weights on the GPU while vLLM generates" in out
    assert "(policy.offload_during_generation=optimizer_and_grads)" in out
