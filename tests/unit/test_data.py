"""RL prompt data: the arithmetic generator, JSONL validation, chat rendering, the resumable order."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from megatron_rl.config.schema import DataConfig
from megatron_rl.data.arithmetic import ArithmeticConfig, ArithmeticProblems, evaluate
from megatron_rl.data.jsonl import read_jsonl, read_prompt_answer
from megatron_rl.data.prompts import PromptDataset, build_prompt_dataset
from megatron_rl.data.sampler import ResumableOrder
from megatron_rl.environments.math_verifier import extract_answer
from megatron_rl.errors import UserError
from megatron_rl.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ------------------------------------------------------------------------------------------ arithmetic
def test_precedence_multiplication_first():
    assert evaluate([2, 3, 4], ["+", "*"]) == 14  # 2 + 12
    assert evaluate([2, 3, 4], ["*", "-"]) == 2  # 6 - 4
    assert evaluate([10, 2, 3, 2], ["-", "*", "+"]) == 6  # 10 - 6 + 2
    assert evaluate([7], []) == 7


def test_problems_are_seeded_and_their_answers_check_out():
    gen = ArithmeticProblems(ArithmeticConfig(-5, 20, ["+", "-", "*"], 4, seed=5))
    assert gen.problem(17) == gen.problem(17)
    assert gen.problem(17) != ArithmeticProblems(
        ArithmeticConfig(-5, 20, ["+", "-", "*"], 4, seed=6)
    ).problem(17)
    for i in range(50):
        p = gen.problem(i)
        expr = p["prompt"].rstrip("=")
        assert re.fullmatch(r"(\(-\d+\)|\d+)([+\-*](\(-\d+\)|\d+)){3}", expr)
        # Python's own evaluation of the written expression agrees (usual precedence)
        assert int(p["answer"]) == eval(expr)  # noqa: S307 (digits, parentheses and + - * only: checked above)


def test_default_is_single_digit_addition():
    gen = ArithmeticProblems(ArithmeticConfig())
    for i in range(30):
        p = gen.problem(i)
        a, b = map(int, re.fullmatch(r"(\d)\+(\d)=", p["prompt"]).groups())
        assert p["answer"] == str(a + b)


@pytest.mark.parametrize(
    "fmt, pattern, reply",
    [
        ("plain", r"\d\+\d=", "{}"),
        ("number", r"What is \d\+\d\? Answer with the number only\.", "{}"),
        ("boxed", r"What is \d\+\d\? Put the final answer in \\boxed\{\}\.", "so \\boxed{{{}}}"),
    ],
)
def test_answer_formats_are_parseable(fmt, pattern, reply):
    p = ArithmeticProblems(ArithmeticConfig(answer_format=fmt)).problem(3)
    assert re.fullmatch(pattern, p["prompt"])
    assert extract_answer(reply.format(p["answer"])) == float(p["answer"])


@pytest.mark.parametrize(
    "cfg, key",
    [
        (ArithmeticConfig(ops=["/"]), "ops"),
        (ArithmeticConfig(ops=[]), "ops"),
        (ArithmeticConfig(min_value=5, max_value=2), "min_value"),
        (ArithmeticConfig(num_terms=0), "num_terms"),
        (ArithmeticConfig(answer_format="latex"), "answer_format"),
    ],
)
def test_bad_arithmetic_settings(cfg, key):
    with pytest.raises(UserError, match=f"data.arithmetic.{key}"):
        ArithmeticProblems(cfg)


# ------------------------------------------------------------------------------------------ JSONL
def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        read_jsonl(f, ("prompt", "answer"))
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n{"question": "x"}\n')  # blank line 2 still counts
    with pytest.raises(UserError, match=r"d\.jsonl:3: missing field\(s\) \['prompt', 'answer'\]"):
        read_jsonl(f, ("prompt", "answer"))
    f.write_text('["a list"]\n')
    with pytest.raises(UserError, match=r"d\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(f, ("prompt",))
    f.write_text("\n\n")
    with pytest.raises(UserError, match="holds no examples"):
        read_jsonl(f, ("prompt",))
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl", ("prompt",))


def test_prompt_answer_fields_are_configurable_and_typed(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "1+1?", "solution": 2}\n{"question": "2+2?", "solution": "4"}\n')
    assert read_prompt_answer(f, "question", "solution") == [
        {"prompt": "1+1?", "answer": "2"},  # numeric answers are accepted as text
        {"prompt": "2+2?", "answer": "4"},
    ]
    f.write_text('{"question": "1+1?", "solution": 2}\n{"question": ["x"], "solution": "4"}\n')
    with pytest.raises(UserError, match=r"q\.jsonl:2: field 'question' must be a string, got list"):
        read_prompt_answer(f, "question", "solution")


# ------------------------------------------------------------------------------------------ order / resume
def test_resumable_order_epochs_are_seeded_permutations():
    order = ResumableOrder(5, seed=3)
    first, second = order.take(5), order.take(5)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4]  # every item once per epoch
    assert first != second  # a new permutation per epoch (seed, epoch)
    assert ResumableOrder(5, seed=3).take(10) == first + second  # deterministic
    assert ResumableOrder(5, seed=3, shuffle=False).take(7) == [0, 1, 2, 3, 4, 0, 1]
    assert order.state_dict() == {"position": 10, "epoch": 2, "seed": 3, "num_items": 5}


def test_resume_continues_at_the_exact_item():
    a = ResumableOrder(7, seed=1)
    a.take(4)
    state = a.state_dict()
    rest = a.take(9)  # crosses into the next epoch
    b = ResumableOrder(7, seed=1)
    b.load_state_dict(state)
    assert b.take(9) == rest
    with pytest.raises(UserError, match="seed=1 but the dataset now has seed=2"):
        ResumableOrder(7, seed=2).load_state_dict(state)
    with pytest.raises(UserError, match="num_items"):
        ResumableOrder(6, seed=1).load_state_dict(state)


def test_prompt_dataset_renders_with_chat_template_and_resumes(tok):
    gen = ArithmeticProblems(ArithmeticConfig(seed=1))
    a = PromptDataset(gen, tok, system_prompt="Be brief.", endless=True)
    first = a.take(3)
    assert first[0]["prompt"] == gen.problem(0)["prompt"] and first[0]["answer"] == gen.problem(0)["answer"]
    text = tok.decode(first[0]["prompt_ids"])
    assert text == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{first[0]['prompt']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    state = a.state_dict()
    rest = a.take(2)
    b = PromptDataset(gen, tok, system_prompt="Be brief.", endless=True)
    b.load_state_dict({"position": state["position"]})  # older checkpoints stored only the position
    assert b.take(2) == rest
    plain = PromptDataset(gen, tok, endless=True, use_chat_template=False).take(1)[0]
    assert tok.decode(plain["prompt_ids"]) == plain["prompt"]


def test_build_prompt_dataset_from_config(tmp_path, tok):
    cfg = OmegaConf.structured(DataConfig)
    cfg.arithmetic.max_value = 99
    data = build_prompt_dataset(cfg, tok)
    item = ArithmeticProblems(ArithmeticConfig(max_value=99)).problem(0)
    assert data.take(1)[0]["prompt"] == item["prompt"]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(f'{{"q": "{i}+0=", "a": "{i}"}}\n' for i in range(6)))
    cfg.kind, cfg.path, cfg.prompt_key, cfg.answer_key = "jsonl", str(f), "q", "a"
    items = build_prompt_dataset(cfg, tok, seed=4).take(6)
    assert sorted(int(it["answer"]) for it in items) == list(range(6))
    assert all(it["prompt"] == f"{it['answer']}+0=" for it in items)
    cfg.path = None
    with pytest.raises(UserError, match="data.path"):
        build_prompt_dataset(cfg, tok)
