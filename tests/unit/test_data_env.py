"""Data, packing and the math verifier."""

from __future__ import annotations

import re

import pytest

from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems
from megatron_rl.data.packing import pack_by_token_budget
from megatron_rl.data.prompts import PromptDataset, read_jsonl
from megatron_rl.environments.base import make_environment
from megatron_rl.environments.math_verifier import extract_answer
from megatron_rl.errors import UserError
from megatron_rl.models.tiny import build_tokenizer


def test_packing_respects_budget_and_keeps_everything():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30]
    groups = pack_by_token_budget(lengths, 24)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 24 or len(g) == 1
    assert [7] in groups  # the over-long sequence goes alone
    assert pack_by_token_budget(lengths, 24) == groups  # deterministic


def test_arithmetic_is_seeded_and_correct():
    gen = ArithmeticProblems(ArithmeticConfig(0, 20, ["+", "*"], 3, seed=5))
    p = gen.problem(17)
    assert p == gen.problem(17)
    left_to_right = p["prompt"].rstrip("=")
    toks = re.findall(r"\d+|[+*]", left_to_right)
    value = int(toks[0])
    for op, t in zip(toks[1::2], toks[2::2]):
        value = value + int(t) if op == "+" else value * int(t)
    assert p["answer"] == str(value)
    with pytest.raises(UserError, match="ops"):
        ArithmeticProblems(ArithmeticConfig(ops=["/"]))


def test_prompt_dataset_resumes_at_its_position():
    tok = build_tokenizer()
    gen = ArithmeticProblems(ArithmeticConfig(seed=1))
    a = PromptDataset(gen, tok, endless=True)
    first = a.take(3)
    state = a.state_dict()
    rest = a.take(2)
    b = PromptDataset(gen, tok, endless=True)
    b.load_state_dict(state)
    assert b.take(2) == rest
    assert tok.decode(first[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(f, ("prompt", "answer"))
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"question": "x"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:3: missing field\(s\) \['prompt', 'answer'\]"):
        read_jsonl(f, ("prompt", "answer"))
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", ("prompt",))


@pytest.mark.parametrize(
    "text, value",
    [
        ("so the total is 42", 42.0),
        ("\\boxed{-3.5} and 7", -3.5),
        ("The answer is 1,234.", 1234.0),
        ("no digits here", None),
        ("12+7=19", 19.0),
    ],
)
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_math_environment_scores():
    env = make_environment("math")
    assert env.score(["19", "18", "x"], [{"answer": "19"}] * 3) == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="math"):
        make_environment("chess")
