"""Chat templates from the model file, rendered in a Jinja2 sandbox.

The template is the GGUF's `tokenizer.chat_template` (or a HF
tokenizer_config.json's `chat_template`), which is code shipped inside a
downloaded file: it runs in `jinja2.sandbox.ImmutableSandboxedEnvironment`, so
it cannot reach Python internals or mutate what it is given. The globals match
what HF transformers offers templates (`raise_exception`, `strftime_now`,
`bos_token`, `eos_token`, `add_generation_prompt`, a `tojson` filter that keeps
non-ASCII), since templates are written against that. A file without a
template gets ChatML, the most common format among small instruct models.
A template that raises (e.g. "roles must alternate") becomes InvalidRequest.

Tools and thinking are template variables, as llama.cpp's `--jinja` passes
them: `tools` (OpenAI-shaped function definitions, only when the request has
some) and `enable_thinking` (Qwen3's switch; `reasoning_effort` for levels).
What a template can do is read from its source: it renders tools when it
reads `tools`, and it thinks when it knows `<think>`, `enable_thinking` or
`reasoning_content`.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Mapping
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engines.errors import InvalidRequest, ModelLoadError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


THINKING_MARKS = ("<think>", "enable_thinking", "reasoning_content")


class TemplateError(InvalidRequest):
    """The chat template refused the conversation (raise_exception) or failed on it."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return _dt.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False, separators: Any = None) -> str:
    # HF's tojson keeps non-ASCII characters and does not HTML-escape.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template plus the special tokens it refers to."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = not source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"chat template does not compile: {exc} (line {exc.lineno})") from None

    @property
    def supports_tools(self) -> bool:
        return not self.is_fallback and "tools" in self.source

    @property
    def supports_thinking(self) -> bool:
        return any(mark in self.source for mark in THINKING_MARKS)

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], name: str | None = None) -> ChatTemplate:
        """From GGUF metadata; `name` picks a named template (tokenizer.chat_template.NAME)."""
        key = f"tokenizer.chat_template.{name}" if name else "tokenizer.chat_template"
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def token(id_key: str) -> str:
            idx = meta.get(id_key)
            return str(tokens[int(idx)]) if idx is not None and 0 <= int(idx) < len(tokens) else ""

        return cls(meta.get(key), token("tokenizer.ggml.bos_token_id"),
                   token("tokenizer.ggml.eos_token_id"))

    def render(self, messages: Iterable[Mapping[str, Any] | Any], add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """Render messages (dicts or objects with role/content) to the prompt text.
        `extra` passes template variables such as tools or documents."""
        msgs = [_as_dict(m) for m in messages]
        try:
            return self._template.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template failed on these messages: {exc}") from None
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
            raise TemplateError(f"chat template failed on these messages: "
                                f"{type(exc).__name__}: {exc}") from None


def _as_dict(message: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(message, Mapping):
        if "role" not in message:
            raise InvalidRequest("chat message lacks 'role'")
        return dict(message)
    if hasattr(message, "template_dict"):
        return message.template_dict()
    try:
        return {"role": message.role, "content": message.content}
    except AttributeError:
        raise InvalidRequest(f"chat message of type {type(message).__name__} has no role/content") from None


def template_variables(tools: tuple[dict, ...], think: bool | str | None) -> dict[str, Any]:
    """What a request adds to a render: tools only when there are some (templates test
    `if tools`), the thinking switch only when the client chose (else the template's default)."""
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = list(tools)
    if think is not None:
        extra["enable_thinking"] = think is not False
        if isinstance(think, str):
            extra["reasoning_effort"] = think
    return extra
