"""Evaluation and validation sets are never trained on: GRPO's JSONL held-out split (data.val_size) or
separate file (data.val_path), arithmetic's far-away problems, and SFT/DPO's data.val_path."""

from __future__ import annotations

import json

import pytest

from megatron_rl.config.compose import compose
from megatron_rl.data.prompts import build_prompt_splits
from megatron_rl.errors import UserError
from megatron_rl.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _prompts(path, n: int, start: int = 0) -> str:
    path.write_text(
        "".join(json.dumps({"prompt": f"{i}+0=", "answer": str(i)}) + "\n" for i in range(start, n))
    )
    return str(path)


def _grpo(*overrides: str):
    return compose("tiny", ["run.eval_every=5", *overrides])


def _drawn(data, epochs: int) -> list[str]:
    """Every prompt training draws over `epochs` passes (the dataset cycles)."""
    return [item["prompt"] for item in data.take(epochs * len(data.items))]


def test_jsonl_evaluation_prompts_are_held_out_of_training(tmp_path, tok):
    path = _prompts(tmp_path / "p.jsonl", 50)
    data, eval_items = build_prompt_splits(
        _grpo("data.kind=jsonl", f"data.path={path}", "data.val_size=10", "run.eval_size=8"), tok
    )
    evaluated = {item["prompt"] for item in eval_items}
    trained = set(_drawn(data, epochs=3))
    assert len(eval_items) == 8 and all(item["prompt_ids"] for item in eval_items)
    assert len(trained) == 40 and not trained & evaluated  # the 10 held-out lines never reach training
    # The split is seeded by run.seed: the same run (a resume) holds out the same lines.
    again, eval_again = build_prompt_splits(
        _grpo("data.kind=jsonl", f"data.path={path}", "data.val_size=10", "run.eval_size=8"), tok
    )
    assert eval_again == eval_items and set(_drawn(again, 1)) == trained


def test_jsonl_evaluation_from_a_separate_file_trains_on_the_whole_training_file(tmp_path, tok):
    path, val = _prompts(tmp_path / "train.jsonl", 30), _prompts(tmp_path / "val.jsonl", 40, start=30)
    data, eval_items = build_prompt_splits(
        _grpo("data.kind=jsonl", f"data.path={path}", f"data.val_path={val}", "run.eval_size=64"), tok
    )
    assert len(set(_drawn(data, 2))) == 30
    assert sorted(int(item["answer"]) for item in eval_items) == list(range(30, 40))


def test_no_evaluation_holds_nothing_out(tmp_path, tok):
    path = _prompts(tmp_path / "p.jsonl", 20)
    data, eval_items = build_prompt_splits(
        _grpo("data.kind=jsonl", f"data.path={path}", "run.eval_every=0"), tok
    )
    assert eval_items == [] and len(set(_drawn(data, 1))) == 20


def test_holding_out_every_line_is_refused(tmp_path, tok):
    path = _prompts(tmp_path / "p.jsonl", 5)
    with pytest.raises(UserError, match=r"p\.jsonl: 5 example\(s\) cannot be split .* lower data\.val_size"):
        build_prompt_splits(_grpo("data.kind=jsonl", f"data.path={path}", "data.val_size=5"), tok)
    with pytest.raises(UserError, match="set data.val_size >= 1 or data.val_path"):
        build_prompt_splits(_grpo("data.kind=jsonl", f"data.path={path}", "data.val_size=0"), tok)


def test_arithmetic_evaluation_problems_are_past_any_training_index(tok):
    from megatron_rl.data.arithmetic import HELD_OUT_START

    data, eval_items = build_prompt_splits(_grpo("run.eval_size=16"), tok)
    problems = data.items  # the generator: problem(index)
    assert [item["prompt"] for item in eval_items] == [
        problems.problem(HELD_OUT_START + i)["prompt"] for i in range(16)
    ]
    assert [item["prompt"] for item in data.take(4)] == [problems.problem(i)["prompt"] for i in range(4)]


def test_sft_validation_from_a_separate_file(tmp_path, tok):
    from megatron_rl.training.sources import load_examples

    rows = lambda a, b: "".join(  # noqa: E731
        json.dumps({"prompt": f"{i}+0=", "response": str(i)}) + "\n" for i in range(a, b)
    )
    (tmp_path / "train.jsonl").write_text(rows(0, 12))
    (tmp_path / "val.jsonl").write_text(rows(12, 15))
    cfg = compose(
        "sft_tiny",
        [
            "data.kind=jsonl",
            f"data.path={tmp_path / 'train.jsonl'}",
            f"data.val_path={tmp_path / 'val.jsonl'}",
        ],
        command="sft",
    )
    ex = load_examples(cfg, tok, "sft", 0.1)
    assert ex.train == list(range(12)) and ex.val == [12, 13, 14]
    texts = [tok.decode(ex.get(i)[0]["ids"]) for i in ex.val]
    assert [f"{i}+0=" in text for i, text in zip(range(12, 15), texts)] == [True] * 3  # the val file's lines
    assert load_examples(cfg, tok, "sft", 0.0).val == []  # validation off: the file is not read
