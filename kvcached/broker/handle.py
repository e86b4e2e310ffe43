"""A registered broker client: what Broker.register() returns and the engine keeps.

It carries the client's spec and verbs, the step functions resolved once at
registration, and the view the policy reads (policy.ClientView).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvcached.broker.client import ClientSpec, ReclaimVerbs, Step, StepFn, step_functions
from kvcached.broker.events import Event, EventKind
from kvcached.broker.policy import ClientView

if TYPE_CHECKING:
    from kvcached.broker.broker import Broker


class ClientHandle:
    """A registered client: what register() returns and the engine keeps."""

    def __init__(self, broker: "Broker", spec: ClientSpec, verbs: ReclaimVerbs) -> None:
        self.broker = broker
        self.spec = spec
        self.verbs = verbs
        self.steps: dict[Step, StepFn] = step_functions(verbs)   # what each step calls
        # Optional verbs (client.py): resolved once here, not looked up per view.
        self._cached = getattr(verbs, "cached_bytes", None)
        self._booked = getattr(verbs, "booked_bytes", None)

    @property
    def name(self) -> str:
        return self.spec.name

    def admit(self, nbytes: int, commit: Callable[[int], None] | None = None) -> int:
        return self.broker.admit(self, nbytes, commit)

    def record(self, step: EventKind | str, bytes_returned: int = 0, duration_s: float = 0.0,
               detail: str = "") -> None:
        """Log something the engine did itself (a resume before a step, a reload)."""
        self.broker.events.append(Event(self.name, step, bytes_returned, duration_s, "engine", detail))

    def unregister(self) -> None:
        self.broker.unregister(self)

    def view(self) -> ClientView:
        return ClientView(self.name, self.spec.priority, self.spec.min_bytes,
                          int(self.verbs.held_bytes()), bool(self.verbs.is_busy()),
                          float(self.verbs.idle_since()),
                          _optional_int(self._cached),
                          0 if self._booked is None else int(self._booked()))


def _optional_int(verb: Callable[[], object] | None) -> int | None:
    value = verb() if verb is not None else None
    return None if value is None else int(value)
