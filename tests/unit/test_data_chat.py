"""SFT and DPO data: chat-template tokenisation with an assistant-only loss mask, line-precise errors."""

from __future__ import annotations

import json

import pytest

from megatron_rl.data.chat import tokenize_conversation
from megatron_rl.data.dpo import load_dpo_pairs
from megatron_rl.data.sft import load_sft_sequences
from megatron_rl.errors import UserError
from megatron_rl.models.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tok, seq):
    """The tokens the loss sees: mask[t] marks token t+1."""
    ids = seq["ids"].tolist()
    return tok.decode([ids[t + 1] for t, m in enumerate(seq["mask"].tolist()) if m])


CONV = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_conversation_mask_covers_assistant_turns_through_end_of_turn(tok):
    ids, mask = tokenize_conversation(tok, CONV)
    assert tok.decode(ids) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    # the newline the template adds after <|im_end|> is glue, not the model's to predict
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "yo<|im_end|>4<|im_end|>"
    assert len(mask) == len(ids)


def test_sft_loader_both_formats(tmp_path, tok):
    f = write(tmp_path / "sft.jsonl", [{"messages": CONV}, {"prompt": "3+4=", "response": "7"}])
    seqs = load_sft_sequences(f, tok, system_prompt="Be brief.")
    assert trained_text(tok, seqs[0]) == "yo<|im_end|>4<|im_end|>"
    assert trained_text(tok, seqs[1]) == "7<|im_end|>"
    assert tok.decode(seqs[1]["ids"].tolist()).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert seqs[1]["mask"].shape == (len(seqs[1]["ids"]) - 1,)
    # a conversation with its own system message keeps it (no second one)
    own = write(tmp_path / "own.jsonl", [{"messages": [{"role": "system", "content": "X"}, *CONV[:2]]}])
    text = tok.decode(load_sft_sequences(own, tok, system_prompt="Be brief.")[0]["ids"].tolist())
    assert "Be brief." not in text and text.startswith("<|im_start|>system\nX")


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', r"sft\.jsonl:2: not valid JSON"),
        ({"text": "hi"}, r"sft\.jsonl:2: expected a 'messages' list or 'prompt' \+ 'response'"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"sft\.jsonl:2: the conversation has no assistant",
        ),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"sft\.jsonl:2: message 0 has role 'robot'"),
        (
            {"messages": [{"role": "user"}]},
            r"sft\.jsonl:2: message 0 must be an object with 'role' and 'content'",
        ),
        ({"messages": "hi"}, r"sft\.jsonl:2: messages must be a non-empty list"),
        ({"prompt": "a", "response": 5}, r"sft\.jsonl:2: field 'response' must be a string"),
    ],
)
def test_sft_errors_name_the_line(tmp_path, tok, row, message):
    f = write(tmp_path / "sft.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(UserError, match=message):
        load_sft_sequences(f, tok)


def test_sft_too_long_is_an_error_naming_the_line(tmp_path, tok):
    f = write(
        tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "b" * 100}]
    )
    assert len(load_sft_sequences(f, tok, max_seq_len=200)) == 2
    with pytest.raises(UserError, match=r"sft\.jsonl:2: \d+ tokens exceed the maximum sequence length 64"):
        load_sft_sequences(f, tok, max_seq_len=64)


def test_dpo_pairs(tmp_path, tok):
    rows = [
        {"prompt": "3+4=", "chosen": "7", "rejected": "8"},
        {
            "prompt": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "1+1="},
            ],
            "chosen": "2",
            "rejected": "11",
        },
    ]
    pairs = load_dpo_pairs(write(tmp_path / "dpo.jsonl", rows), tok)
    assert trained_text(tok, pairs[0]["chosen"]) == "7<|im_end|>"
    assert trained_text(tok, pairs[0]["rejected"]) == "8<|im_end|>"
    # earlier assistant turns of the context are not trained: only the compared reply
    assert trained_text(tok, pairs[1]["rejected"]) == "11<|im_end|>"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "chosen": "b"}, r"dpo\.jsonl:2: missing field\(s\) \['rejected'\]"),
        (
            {"prompt": 3, "chosen": "b", "rejected": "c"},
            r"dpo\.jsonl:2: field 'prompt' must be a string or a list",
        ),
        ({"prompt": "a", "chosen": ["b"], "rejected": "c"}, r"dpo\.jsonl:2: field 'chosen' must be a string"),
        (
            {
                "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "chosen": "c",
                "rejected": "d",
            },
            r"dpo\.jsonl:2: the 'prompt' conversation must not end with an assistant turn",
        ),
    ],
)
def test_dpo_errors_name_the_line(tmp_path, tok, row, message):
    f = write(tmp_path / "dpo.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, row])
    with pytest.raises(UserError, match=message):
        load_dpo_pairs(f, tok)


def test_template_that_rewrites_history_is_reported(tok):
    import copy

    odd = copy.copy(tok)
    # A template that drops earlier assistant turns (as "thinking" templates do) breaks the prefix property.
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(UserError, match="does not render prefixes"):
        tokenize_conversation(odd, CONV)
