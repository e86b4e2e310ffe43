"""Stop strings, with hold-back of partial matches.

Text is streamed as it is decoded, but a piece that might be the start of a stop
string cannot be sent yet: if the stop string completes, the client must never
see it. StopMatcher keeps back the longest tail of the text that is a prefix of
some stop string, and releases it as soon as it can no longer become one.
Pure Python, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    stops: tuple[str, ...] = ()
    held: str = ""
    is_stopped: bool = False
    _stops: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._stops = tuple(s for s in self.stops if s)  # an empty stop string would stop at once

    def feed(self, text: str) -> str:
        """Add decoded text; returns what can be sent now. After a stop string
        completes, is_stopped is set and everything from the stop on is dropped."""
        if self.is_stopped:
            return ""
        if not self._stops:
            return text
        pending = self.held + text
        cut = self._first_match(pending)
        if cut is not None:
            self.is_stopped = True
            self.held = ""
            return pending[:cut]
        keep = self._partial_tail(pending)
        self.held = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        """The generation ended without a stop string: send what was held back."""
        out, self.held = ("" if self.is_stopped else self.held), ""
        return out

    def _first_match(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
