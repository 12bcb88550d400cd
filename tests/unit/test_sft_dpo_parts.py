"""SFT/DPO building blocks without a Megatron world: batch-exact DPO metrics, data order and sharding,
dataset checks that name file and line, step checkpoints (atomic, keep-last-N, resume detection)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_rl.dpo.loss import dpo_with_sums, summarize
from megatron_rl.errors import UserError
from megatron_rl.training.batching import TrainOrder, holdout_split, rank_micro_batches
from megatron_rl.training.checkpoints import CheckpointManager


def _lsig(x: float) -> float:
    return -math.log(1 / (1 + math.exp(-x)))


# ------------------------------------------------------------------------------------------ DPO metrics
def _pairs_mb(policy: list[tuple[float, float]], ref: list[tuple[float, float]]) -> tuple[torch.Tensor, dict]:
    """One-token responses: row 2i chosen, 2i+1 rejected; token logprob = the sequence logprob."""
    lp = torch.tensor([[v] for pair in policy for v in pair])
    ref_lp = torch.tensor([[v] for pair in ref for v in pair])
    return lp, {"mask": torch.ones_like(lp), "ref_lp": ref_lp}


def test_dpo_metrics_are_exact_over_unequal_micro_batches():
    # Micro-batch A: 1 pair, margin 0.1*((-1+2) - (-3+2)) = +0.2. Micro-batch B: 3 pairs, margins
    # 0.1*(0 - 2) = -0.2, 0.1*(1 - 0) = +0.1, 0.1*(0 - 0) = 0 (a tie is not "correct").
    a = _pairs_mb([(-1.0, -3.0)], [(-2.0, -2.0)])
    b = _pairs_mb([(-2.0, -1.0), (-1.0, -3.0), (-2.0, -2.0)], [(-2.0, -3.0), (-2.0, -3.0), (-2.0, -2.0)])
    totals: dict[str, float] = {}
    loss_total, pairs_total = 0.0, 0.0
    for lp, mb in (a, b):
        loss_sum, pairs, sums = dpo_with_sums(lp, mb, beta=0.1)
        loss_total, pairs_total = loss_total + float(loss_sum), pairs_total + float(pairs)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    m = summarize(totals)
    assert pairs_total == 4 and m["pairs"] == 4
    # Hand-computed: -log sigmoid of each margin, averaged over the 4 pairs.
    expected = (
        _lsig(0.2) + _lsig(-0.2) + _lsig(0.1) + _lsig(0.0)
    ) / 4  # (0.598139+0.798139+0.644397+0.693147)/4
    assert loss_total / pairs_total == pytest.approx(expected, abs=1e-6)
    assert m["dpo_loss"] == pytest.approx(expected, abs=1e-6)
    assert m["accuracy"] == pytest.approx(2 / 4)  # the average of per-micro-batch means would say (1 + 1/3)/2
    assert m["rewards/margin"] == pytest.approx((0.2 - 0.2 + 0.1 + 0.0) / 4)
    assert m["rewards/chosen"] == pytest.approx((0.1 + 0.0 + 0.1 + 0.0) / 4)
    assert m["rewards/rejected"] == pytest.approx((-0.1 + 0.2 + 0.0 + 0.0) / 4)
    # Policy alone: chosen > rejected in pairs 1 and 3 of 4.
    assert m["policy_accuracy"] == pytest.approx(2 / 4)


def test_dpo_sft_term_is_reported_per_pair():
    lp, mb = _pairs_mb([(-1.0, -3.0)], [(-2.0, -2.0)])
    loss_sum, _, sums = dpo_with_sums(lp, mb, beta=0.1, sft_weight=0.5)
    assert float(loss_sum) == pytest.approx(_lsig(0.2) + 0.5 * 1.0)  # chosen NLL per token = 1
    assert summarize({k: float(v) for k, v in sums.items()})["sft_nll"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ order, shards
def test_train_order_epochs_and_resume():
    order = TrainOrder([10, 11, 12, 13], seed=3)
    first = order.take(6)
    assert sorted(first[:4]) == [10, 11, 12, 13]  # one full epoch, then the next begins
    state = order.state_dict()
    rest = order.take(5)
    again = TrainOrder([10, 11, 12, 13], seed=3)
    again.load_state_dict(state)
    assert again.take(5) == rest and order.epoch == pytest.approx(11 / 4)
    endless = TrainOrder(None, seed=0)
    assert endless.take(3) == [0, 1, 2]


def test_holdout_split_is_seeded_and_disjoint():
    train, val = holdout_split(20, 0.1, seed=1)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == list(range(20))
    assert holdout_split(20, 0.1, seed=1) == (train, val) and holdout_split(20, 0.0, 1) == (
        list(range(20)),
        [],
    )
    with pytest.raises(ValueError):
        holdout_split(1, 0.5, seed=1)


def test_rank_micro_batches_keep_pairs_and_equal_counts():
    lengths = [10, 12, 30, 31, 5, 5, 8, 9, 20, 20]  # 5 pairs
    plans = [rank_micro_batches(lengths, 2, r, budget=64, keep_together=2) for r in range(2)]
    assert len(plans[0]) == len(plans[1])  # Megatron's schedules run one count everywhere
    seen = sorted(i for plan in plans for mb in plan for i in mb)
    assert seen == list(range(10))
    for plan in plans:
        for mb in plan:
            assert all(i % 2 == 0 and i + 1 in mb for i in mb if i % 2 == 0)  # a pair never splits
    single = rank_micro_batches(lengths, 1, 0, budget=1000, keep_together=2, packing=False)
    assert sorted(map(sorted, single)) == [[2 * k, 2 * k + 1] for k in range(5)]
    with pytest.raises(ValueError, match="cannot fill 2"):
        rank_micro_batches([4, 4], 2, 0, budget=64, keep_together=2)
    assert rank_micro_batches([4, 4], 2, 1, budget=64, keep_together=2, allow_empty=True) == []


# ------------------------------------------------------------------------------------------ datasets
def _cfg(kind: str, path: str | None = None, **data):
    return OmegaConf.create(
        {
            "run": {"seed": 0},
            "policy": {"max_seq_len": 64},
            "data": {
                "kind": kind,
                "path": path,
                "prompt_key": "prompt",
                "system_prompt": None,
                "val_size": 4,
                "arithmetic": {"min_value": 0, "max_value": 9, "ops": ["+"], "num_terms": 2, "seed": 0},
                **data,
            },
        }
    )


@pytest.fixture(scope="module")
def tok():
    from megatron_rl.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        ("sft", {"prompt": "hi", "respnse": "x"}, "expected a 'messages' list or 'prompt' + 'response'"),
        ("sft", {"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
        ("sft", {"prompt": "hi", "response": "x" * 100}, "exceed the maximum sequence length 64"),
        ("dpo", {"prompt": "hi", "chosen": "a"}, "missing field(s) ['rejected']"),
        ("dpo", {"prompt": "hi", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tok, kind, line, message):
    from megatron_rl.training.sources import load_examples

    good = {"sft": {"prompt": "a", "response": "b"}, "dpo": {"prompt": "a", "chosen": "b", "rejected": "c"}}[
        kind
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(good), "", json.dumps(good), json.dumps(line)]) + "\n")
    with pytest.raises(UserError) as err:
        load_examples(_cfg("jsonl", str(path)), tok, kind, 0.0)
    assert str(err.value).startswith(f"{path}:4: ") and message in str(err.value)


def test_arithmetic_examples_train_on_the_answer_only(tok):
    from megatron_rl.training.sources import HELD_OUT_START, load_examples

    sft = load_examples(_cfg("arithmetic"), tok, "sft", 0.1)
    assert sft.train is None and sft.val == list(range(HELD_OUT_START, HELD_OUT_START + 4))
    [row] = sft.get(0)
    trained = [int(t) for t, m in zip(row["ids"][1:], row["mask"]) if m]
    # "a+b=" -> the answer's digits and the end-of-turn token, nothing of the prompt.
    assert tok.decode(trained) in {f"{n}<|im_end|>" for n in range(19)}
    dpo = load_examples(_cfg("arithmetic"), tok, "dpo", 0.0)
    chosen, rejected = dpo.get(5)
    assert dpo.val == [] and not torch.equal(chosen["ids"], rejected["ids"])
    assert chosen["ids"][:-3].tolist()[:8] == rejected["ids"][:8].tolist()  # same prompt


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_atomic_keep_last_and_resume(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2)
    assert mgr.resume_from(None) is None and mgr.resume_from(False) is None
    with pytest.raises(UserError, match="run.resume=true"):
        mgr.resume_from(True)

    def save_policy(d: str) -> None:
        Path(d).mkdir(parents=True)
        (Path(d) / "weights").write_text("w")

    for step in (1, 2, 3):
        mgr.save(step, save_policy, {"data": {"position": step * 4}}, rng={"torch": torch.get_rng_state()})
    assert [s for s, _ in mgr.complete()] == [2, 3]
    assert mgr.state(mgr.latest())["data"]["position"] == 12
    assert (mgr.latest() / "rng" / "rank_00000.safetensors").is_file()

    # A save that dies after the policy shards were written leaves only a .tmp: never picked for resume.
    def crash(d: str) -> None:
        save_policy(d)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mgr.save(4, crash, {"data": {"position": 16}})
    assert (tmp_path / "ck" / "step_000004.tmp").is_dir()
    assert mgr.resume_from(None).name == "step_000003"
