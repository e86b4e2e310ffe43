"""A chat answer's text, as it streams, split into thinking, content and tool calls.

Dialect-neutral: the OpenAI and Ollama routes feed it the engine's text and
write what comes out in their own shapes (reasoning_content / thinking,
content, tool_calls). Thinking is split off first (engines/text/reasoning.py).
Where tools were offered, content that may still turn out to be a call (it
starts with `<tool_call>`, `[TOOL_CALLS]`, `{`...) is held back until it
either is one (parsed at the end into calls: engines/text/tool_calls.py) or
cannot be (then it streams as text), so a client never sees a call's JSON as
text, nor waits for an ordinary answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from app.server.structured import ToolPlan, template_of
from engines.base import ModelInfo
from engines.text.chat_template import template_variables
from engines.text.reasoning import ReasoningSplitter, starts_thinking
from engines.text.tool_calls import ToolCall, may_open_call, parse_tool_calls
from engines.types import ChatMessage


@dataclass
class Piece:
    thinking: str = ""
    content: str = ""


@dataclass
class OutputShaper:
    plan: ToolPlan
    splitter: ReasoningSplitter | None = None
    _held: str = ""
    _holding: bool = True
    thinking: str = ""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def feed(self, text: str) -> Piece:
        thinking, content = self.splitter.feed(text) if self.splitter else ("", text)
        return Piece(self._think(thinking), self._content(content))

    def finish(self) -> Piece:
        """The rest, once generation ended; self.calls holds the calls found."""
        thinking, content = self.splitter.flush() if self.splitter else ("", "")
        piece = Piece(self._think(thinking), self._content(content))
        if self._holding and self._held:
            text, calls = parse_tool_calls(self._held) if self.plan.expects_calls else (self._held, [])
            if calls and not self.plan.parallel:
                calls = calls[:1]
            self.calls = [c.with_id() for c in calls]
            piece.content += text
            self.content += text
            self._held = ""
        return piece

    def _think(self, text: str) -> str:
        self.thinking += text
        return text

    def _content(self, text: str) -> str:
        if not self.plan.expects_calls or not self._holding:
            self.content += text
            return text
        self._held += text
        if may_open_call(self._held):
            return ""
        self._holding = False
        out, self._held = self._held, ""
        self.content += out
        return out


def make_shaper(info: ModelInfo, plan: ToolPlan, messages: tuple[ChatMessage, ...],
                think: bool | str | None) -> OutputShaper:
    """A shaper for one chat answer. Thinking is split where the template thinks and the
    client did not turn it off; the rendered prompt says whether the answer starts inside it."""
    template = template_of(info)
    if think is False or not template.supports_thinking:
        return OutputShaper(plan)
    try:
        prompt = template.render(messages, True, **template_variables(plan.tools, think))
    except Exception:   # the engine renders it again and reports the error properly
        prompt = ""
    return OutputShaper(plan, ReasoningSplitter(inside=starts_thinking(prompt)))
