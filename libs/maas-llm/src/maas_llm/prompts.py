"""Render chat messages with a model's chat template and count tokens, without torch.

The inference gateway admits a generation on its prompt tokens before it reaches Triton, so
rendering and counting must be cheap and light: the template runs in jinja2's immutable
sandbox (a template cannot reach Python internals or mutate its inputs) and tokens are counted
with the `tokenizers` library on the directory's tokenizer.json. The rendered text is what the
Triton generation model takes as `text_input`; the engine tokenizes it the same way
(`PromptRenderer.encode`), so the count the gateway charges is the count the model sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from maas_runtime.errors import FailedPrecondition, InvalidArgument
from tokenizers import Tokenizer

from maas_llm.directory import CausalLmDirectory

CHAT_ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str


def _special_token(value: Any) -> str:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return ""


class PromptRenderer:
    """A model's chat template and tokenizer: `render` messages, `count_tokens` of text."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, special_tokens: Mapping[str, str]):
        self._tokenizer = tokenizer
        self._chat_template_source = chat_template
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise_template_exception
        self._template = environment.from_string(chat_template) if chat_template else None
        self._special_tokens = dict(special_tokens)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str] | CausalLmDirectory) -> PromptRenderer:
        """The renderer of a causal-LM directory (tokenizer.json + its chat template)."""
        checked = (
            directory if isinstance(directory, CausalLmDirectory) else CausalLmDirectory.open(directory)
        )
        tokenizer = Tokenizer.from_file(str(Path(checked.path) / "tokenizer.json"))
        special = {
            name: _special_token(checked.tokenizer_config.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        return cls(tokenizer, checked.chat_template, special)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render(
        self,
        messages: Sequence[ChatMessage | Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        field_path: str = "messages",
    ) -> str:
        """The prompt text of `messages`; InvalidArgument for an empty or malformed list."""
        if self._template is None:
            raise FailedPrecondition(
                "the model has no chat template; send a prompt instead of messages",
                reason="CHAT_TEMPLATE_MISSING",
            )
        if not messages:
            raise InvalidArgument.for_field(field_path, "at least one message is required")
        plain = []
        for index, message in enumerate(messages):
            role = message.role if isinstance(message, ChatMessage) else message.get("role", "")
            content = (
                message.content if isinstance(message, ChatMessage) else message.get("content", "")
            )
            if role not in CHAT_ROLES:
                raise InvalidArgument.for_field(
                    f"{field_path}[{index}].role",
                    f"{role!r} is not one of {', '.join(sorted(CHAT_ROLES))}",
                )
            if not isinstance(content, str):
                raise InvalidArgument.for_field(f"{field_path}[{index}].content", "must be text")
            plain.append({"role": role, "content": content})
        try:
            return self._template.render(
                messages=plain, add_generation_prompt=add_generation_prompt, **self._special_tokens
            )
        except TemplateError as error:
            raise InvalidArgument.for_field(
                field_path, f"the chat template refused the messages ({error})"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids of already rendered text (special tokens in it are recognised, none added)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))


def _raise_template_exception(message: str) -> None:
    raise TemplateError(message)
