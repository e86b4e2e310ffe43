"""llama.cpp's n_indent: a completion stops where a line comes back to a shallower indent.

llama.vscode sends the cursor line's indentation as n_indent, so a suggestion
ends before it starts the next block at an outer level. As llama.cpp's
server: once a line after a newline shows its first non-blank character at an
indent below n_indent, generation stops and that line is cut at the
character. While a new line's indent is still being written it is held back.
"""
from __future__ import annotations


class IndentGuard:
    def __init__(self, n_indent: int) -> None:
        self.n_indent = n_indent
        self.stopped = False
        self._line: str | None = None   # text of the current line after a newline, while undecided

    def feed(self, text: str) -> str:
        if self.n_indent <= 0 or self.stopped:
            return "" if self.stopped else text
        out = []
        for ch in text:
            if self._line is None:
                out.append(ch)
                if ch == "\n":
                    self._line = ""
                continue
            if ch in " \t":
                self._line += ch
                continue
            if ch != "\n" and len(self._line) < self.n_indent:
                out.append(self._line)
                self.stopped = True
                return "".join(out)
            out.append(self._line + ch)
            self._line = "" if ch == "\n" else None
        return "".join(out)

    def flush(self) -> str:
        held, self._line = self._line or "", None
        return "" if self.stopped else held
