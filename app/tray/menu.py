"""The tray menu as plain data, built from a TrayView; pystray's Menu and the Tk popup both render it.

Keeping the entries as data (label, command, argument) means the same list is
tested without a display, drawn by whichever menu the platform has, and every
click ends in the one dispatcher.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from app.human import format_bytes
from app.tray.view import ModelRow, TrayMode, TrayView

GIVE_BACK_ALL = "Give back all GPU memory now"
FREE_KEEP_READY = "Free all GPU memory, keep ready"
AUTO_YIELD = "Auto-yield to other apps"
START_AT_LOGIN = "Start at login"
COPY_URL = "Copy endpoint URL"
OPEN_DASHBOARD = "Open dashboard"
QUIT = "Quit"


@dataclass(frozen=True)
class Entry:
    label: str
    command: str = ""                 # a Dispatcher command; "" for a heading
    arg: str = ""
    checked: bool | None = None       # a toggle when not None
    enabled: bool = True
    children: tuple["Entry", ...] = ()

    @property
    def is_separator(self) -> bool:
        return self.label == "-"


SEPARATOR = Entry("-")

# state -> (label, command) of the first action: a paused model resumes, others pause.
FIRST_ACTION: dict[str, tuple[str, str]] = {"paused": ("Resume", "resume"), "loaded": ("Pause", "pause"),
                                             "loading": ("Pause", "pause")}


def model_entry(row: ModelRow) -> Entry:
    in_memory = row.state != "unloaded"
    label_action, action = FIRST_ACTION.get(row.state, ("Pause", "pause"))
    children = (
        Entry(label_action, action, row.name, enabled=in_memory),
        Entry(FREE_KEEP_READY, "weights_to_host", row.name, enabled=in_memory and row.rung != "weights_on_host"),
        Entry("Give back its memory", "reclaim", row.name, enabled=in_memory),
        Entry("Unload", "unload", row.name, enabled=in_memory),
    )
    held = f" - {format_bytes(row.held_bytes)}" if in_memory and not row.remote else ""
    where = f", on {row.remote}" if row.remote else ""  # served elsewhere: holds no memory here
    return Entry(f"{row.name} ({row.shown_state}{held}{where})", children=children)


def heading(view: TrayView) -> str:
    if view.mode is TrayMode.ERROR:
        return f"Ebbtide: daemon stopped ({view.message or 'error'})"[:80]
    if view.mode is TrayMode.STARTING:
        return "Ebbtide: starting..."
    total = f" of {format_bytes(view.device_total)}" if view.device_total else ""
    return f"Ebbtide: models hold {format_bytes(view.held_bytes)}{total}"


def build_entries(view: TrayView) -> list[Entry]:
    is_up = view.mode not in (TrayMode.STARTING, TrayMode.ERROR)
    entries = [Entry(heading(view), enabled=False), SEPARATOR]
    entries += [model_entry(row) for row in view.models] or [Entry("No models found", enabled=False)]
    entries += [
        SEPARATOR,
        Entry(GIVE_BACK_ALL, "reclaim_all", enabled=is_up),
        Entry(AUTO_YIELD, "toggle_auto_yield", checked=view.auto_yield, enabled=is_up),
        Entry(START_AT_LOGIN, "toggle_start_at_login", checked=view.start_at_login),
        SEPARATOR,
        Entry(COPY_URL, "copy_url"),
        Entry(OPEN_DASHBOARD, "open_dashboard", enabled=is_up),
        SEPARATOR,
        Entry(QUIT, "quit"),
    ]
    return entries


def find(entries: list[Entry] | tuple[Entry, ...], label: str) -> Entry | None:
    """The entry with this label, searched depth first (tests and the popup use it)."""
    for entry in entries:
        if entry.label == label:
            return entry
        found = find(entry.children, label)
        if found is not None:
            return found
    return None


def to_pystray(entries: list[Entry] | tuple[Entry, ...], dispatch: Callable[[str, str], bool]):
    """pystray MenuItems for the entries; each click calls dispatch(command, arg)."""
    import pystray

    def item(entry: Entry):
        if entry.is_separator:
            return pystray.Menu.SEPARATOR
        if entry.children:
            return pystray.MenuItem(entry.label, pystray.Menu(*[item(c) for c in entry.children]))
        # pystray counts an action's parameters, so these closures take exactly (icon, item) / (item).
        def action(icon, menu_item) -> None:
            dispatch(entry.command, entry.arg)

        def checked(menu_item) -> bool:
            return bool(entry.checked)

        return pystray.MenuItem(entry.label, action if entry.command else None,
                                checked=checked if entry.checked is not None else None, enabled=entry.enabled)

    return [item(e) for e in entries]
