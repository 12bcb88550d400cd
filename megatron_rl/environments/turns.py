"""The tokens the chat template puts between the model's turns, rendered once per observation.

An episode's token ids only ever grow: the model's sampled tokens are appended as sampled, then an
observation's tokens, which are the template's text for the new turn(s) (and whatever closes the model's
turn that it did not sample itself, such as ChatML's newline after `<|im_end|>`), tokenized once on their
own. The new turn's text is the difference between the template applied to a fixed stand-in conversation
ending with an assistant turn and the same conversation followed by the observation messages and the
generation prompt, so the conversation so far is never rendered, let alone re-tokenized, again.
"""

from __future__ import annotations

from typing import Any

from megatron_rl.environments.base import Message
from megatron_rl.errors import UserError

# Stand-ins for the turns before the observation: only the text after them is used.
_REPLY = "<<megatron-rl reply>>"
_BEFORE = [{"role": "user", "content": "<<megatron-rl prompt>>"}, {"role": "assistant", "content": _REPLY}]


def _apply(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


class TurnRenderer:
    """`observation_ids(messages, last_model_token)`: the token ids to append after a model turn."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"Multi-turn episodes need a chat template; the tokenizer {tokenizer.name_or_path!r} has none."
            )
        self.tokenizer = tokenizer
        self._before = _apply(tokenizer, _BEFORE, False)
        # What the template writes after an assistant turn's content (ChatML: "<|im_end|>\n").
        self.turn_end = self._before[self._before.rindex(_REPLY) + len(_REPLY) :]

    def turn_text(self, messages: list[Message]) -> str:
        """The template's text for `messages` following an assistant turn, with the generation prompt."""
        after = _apply(self.tokenizer, _BEFORE + list(messages), True)
        if not after.startswith(self._before):
            raise UserError(
                f"The chat template of {self.tokenizer.name_or_path!r} renders earlier turns differently once "
                f"a {messages[0]['role']!r} turn follows, so an observation cannot be appended as tokens."
            )
        return after[len(self._before) :]

    def closing_text(self, last_model_token: int | None) -> str:
        """The part of the template's end-of-turn that the model did not sample: all of it, unless the
        model's last token is its start (the end-of-turn token on which generation stopped)."""
        if last_model_token is None:
            return self.turn_end
        last = self.tokenizer.decode([last_model_token], skip_special_tokens=False)
        return self.turn_end[len(last) :] if last and self.turn_end.startswith(last) else self.turn_end

    def observation_ids(self, messages: list[Message], last_model_token: int | None) -> list[int]:
        text = self.closing_text(last_model_token) + self.turn_text(messages)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
