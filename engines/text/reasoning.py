"""Reasoning split off the answer, as it streams: `<think>...</think>` becomes thinking.

Qwen3, DeepSeek-R1 and their kin write their reasoning between `<think>` and
`</think>` before the answer. Some templates open the block themselves (the
generation prompt ends with `<think>`): then the output starts inside it. A tag
split across chunks is held back until it is whole, so neither side ever sees
half a tag. This is what llama.cpp's server does with --reasoning-format
deepseek and Ollama with `think`.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def starts_thinking(prompt_text: str) -> bool:
    """Does the rendered prompt leave the model inside a thinking block?"""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


class ReasoningSplitter:
    """feed(text) -> (thinking, content) pieces; flush() at the end."""

    def __init__(self, inside: bool = False) -> None:
        self.inside = inside
        self._seen_any = False     # an opening tag counts only at the start of the answer
        self._held = ""
        self._trim = inside        # newlines right after a tag belong to neither side

    def feed(self, text: str) -> tuple[str, str]:
        self._held += text
        thinking, content = [], []
        while self._held:
            if self._trim:
                self._held = self._held.lstrip("\n")
                if not self._held:
                    break
                self._trim = False
            if self.inside:
                cut = self._held.find(CLOSE)
                if cut < 0:
                    keep = _partial_tail(self._held, CLOSE)
                    thinking.append(self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    break
                thinking.append(self._held[:cut])
                self._held = self._held[cut + len(CLOSE):]
                self.inside, self._seen_any, self._trim = False, True, True
                continue
            if not self._seen_any:
                head = self._held.lstrip()
                if head.startswith(OPEN):
                    self._held, self.inside, self._seen_any, self._trim = head[len(OPEN):], True, True, True
                    continue
                if OPEN.startswith(head):   # maybe the opening tag, still arriving
                    break
                self._seen_any = True
            content.append(self._held)
            self._held = ""
        return "".join(thinking), "".join(content)

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.inside else ("", held)


def _partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of text could begin tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(text: str, inside: bool = False) -> tuple[str, str]:
    """(thinking, content) of a whole answer."""
    splitter = ReasoningSplitter(inside)
    a, b = splitter.feed(text)
    c, d = splitter.flush()
    return (a + c).strip(), b + d
