"""`launch plan --placement`: the run's real Ray actors placed on a simulated multi-node GPU cluster (Ray's
own test cluster, GPUs declared, no CUDA), reported from where Ray really put them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _place(*overrides: str) -> tuple[int, dict, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # its own cluster, never the tests' shared one
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_rl.launch", "plan", *overrides, "--placement"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr  # one JSON object, nothing else on stdout
    return proc.returncode, json.loads(lines[0]), proc.stderr


@pytest.fixture(scope="module")
def llama8b():
    return _place("conf=llama8b")


def test_llama8b_places_four_engines_on_the_gpus_of_their_policy_ranks(llama8b):
    rc, report, err = llama8b
    assert rc == 0 and report["ok"] is True and report["problems"] == [], err
    assert set(report) >= {"nodes", "policy_ranks", "engines", "problems", "ok"}
    ranks = report["policy_ranks"]
    assert [r["rank"] for r in ranks] == list(range(8)) and {r["node"] for r in ranks} == {0}
    assert sorted(r["gpu"] for r in ranks) == list(range(8))  # one GPU each, none shared by two ranks
    assert [e["engine"] for e in report["engines"]] == [0, 1, 2, 3]
    for e in report["engines"]:  # colocated: engine e on the very GPUs of policy ranks 2e and 2e+1
        mine = [ranks[r] for r in (2 * e["engine"], 2 * e["engine"] + 1)]
        assert e["node"] == mine[0]["node"] == mine[1]["node"]
        assert sorted(e["gpus"]) == sorted(r["gpu"] for r in mine)


def test_a_separate_pool_lands_on_gpus_of_its_own():
    rc, report, err = _place("conf=llama8b", "generation.colocated=false", "generation.gpus=4")
    assert rc == 0 and report["ok"], err
    policy = {r["gpu"] for r in report["policy_ranks"]}
    engines = [g for e in report["engines"] for g in e["gpus"]]
    assert len(policy) == 4 and len(engines) == len(set(engines)) == 4 and not policy & set(engines)


def test_an_engine_wider_than_a_node_without_spanning_exits_1_naming_why():
    rc, report, err = _place(
        "conf=llama8b",
        "cluster.nodes=2",
        "cluster.gpus_per_node=2",
        "generation.tp=4",
        "policy.parallel.tp=2",
    )
    assert rc == 1 and report["ok"] is False
    # the table's reason, and what Ray really did: the engine's workers landed on both nodes
    assert any("wider than a node (2 GPUs): set generation.span_nodes=true" in p for p in report["problems"])
    assert any("engine 0 landed on nodes [0, 1]" in p for p in report["problems"]), report["problems"]
    assert "cannot be placed" in err and "span_nodes" in err


def test_a_pipeline_engine_with_expert_parallel_spans_two_nodes_a_stage_on_each():
    """An MoE recipe's engine of tp=2 x pp=2 (expert parallel) on 2 nodes of 2 GPUs: its four workers (vLLM's
    Ray executor, one per bundle) take both nodes' GPUs, shared with the policy ranks there."""
    rc, report, err = _place(
        "conf=moonlight_16b_a3b",
        "cluster.nodes=2",
        "cluster.gpus_per_node=2",
        "generation.tp=2",
        "generation.pp=2",
        "generation.span_nodes=true",
        "policy.parallel.tp=2",
    )
    assert rc == 0 and report["ok"] is True, err
    assert report["engines"] == [{"engine": 0, "node": [0, 1], "gpus": [[0, 1], [0, 1]]}]
    # Ranks fill a node before the next (a TP group of 2 per node); which node Ray's PACK fills first varies.
    ranks = report["policy_ranks"]
    assert {ranks[0]["node"], ranks[2]["node"]} == {0, 1}
    for first in (0, 2):
        pair = ranks[first : first + 2]
        assert pair[0]["node"] == pair[1]["node"] and sorted(r["gpu"] for r in pair) == [0, 1], ranks
