"""The tray menu for pystray backends that draw none (xorg): a Tk popup menu at the pointer.

pystray's xorg backend only reports a click on the icon. On such desktops a
click opens this popup, drawn from the same menu entries, and every item ends
in the same dispatcher. Tk runs in the popup's own thread (Tk objects must stay
in the thread that made them); a click hands the command to another thread so
a slow daemon never freezes the menu. No other thread ever calls into Tk:
`close()` only raises a flag that the popup's own loop polls, because a call
from another thread waits, uninterruptibly, for a Tk loop that may just have
ended (it froze the tray's Quit, and CI, that way).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.tray.menu import Entry

log = logging.getLogger(__name__)

CLOSE_POLL_MS = 50  # how soon an open popup notices close()


class TkPopup:
    """One popup at a time; `open()` returns at once, `posted` is set once it is on screen."""

    def __init__(self, dispatch: Callable[[str, str], bool]) -> None:
        self.dispatch = dispatch
        self.posted = threading.Event()
        self.closed = threading.Event()
        self.closed.set()
        self.item_centers: dict[str, tuple[int, int]] = {}  # label -> screen point (top level only)
        self.bounds: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, top, right, bottom on screen
        self._close_asked = threading.Event()

    def open(self, entries: list[Entry], at: tuple[int, int] | None = None) -> bool:
        if not self.closed.is_set():
            return False  # already open
        self.posted.clear()
        self.closed.clear()
        self._close_asked.clear()
        threading.Thread(target=self._run, args=(entries, at), name="tray-popup", daemon=True).start()
        return True

    def close(self) -> None:
        """Asks an open popup to go; safe from any thread, returns at once."""
        self._close_asked.set()

    def _run(self, entries: list[Entry], at: tuple[int, int] | None) -> None:
        try:
            import tkinter

            root = tkinter.Tk(className="ebbtide")
            root.withdraw()
            menu = self._menu(root, entries)
            menu.bind("<Unmap>", lambda _: root.after(100, root.destroy))
            x, y = at if at is not None else root.winfo_pointerxy()
            menu.tk_popup(x, y)
            root.after(50, lambda: self._note_positions(menu, entries))
            self._watch_close(root)
            root.mainloop()
        except Exception:
            log.exception("tray: the popup menu failed")
        finally:
            self.posted.clear()
            self.closed.set()

    def _watch_close(self, root) -> None:
        """On the popup's thread: destroys the popup once close() was asked for."""
        if self._close_asked.is_set():
            root.destroy()
        else:
            root.after(CLOSE_POLL_MS, lambda: self._watch_close(root))

    def _menu(self, root, entries: list[Entry] | tuple[Entry, ...]):
        import tkinter

        menu = tkinter.Menu(root, tearoff=0)
        for entry in entries:
            state = "normal" if entry.enabled else "disabled"
            if entry.is_separator:
                menu.add_separator()
            elif entry.children:
                menu.add_cascade(label=entry.label, menu=self._menu(menu, entry.children), state=state)
            elif entry.checked is not None:
                # IntVar, not BooleanVar: Tk compares the value with onvalue "1" as text.
                var = tkinter.IntVar(master=root, value=int(entry.checked))
                menu.add_checkbutton(label=entry.label, variable=var, state=state, command=self._later(entry))
                menu._keep = getattr(menu, "_keep", []) + [var]  # Tk forgets variables Python drops
            else:
                menu.add_command(label=entry.label, state=state, command=self._later(entry))
        return menu

    def _later(self, entry: Entry) -> Callable[[], None]:
        def run() -> None:
            threading.Thread(target=self.dispatch, args=(entry.command, entry.arg), daemon=True).start()
        return run

    def _note_positions(self, menu, entries: list[Entry]) -> None:
        top, left, width = menu.winfo_rooty(), menu.winfo_rootx(), menu.winfo_width()
        self.bounds = (left, top, left + width, top + menu.winfo_height())
        for index, entry in enumerate(entries):
            if entry.is_separator:
                continue
            y0 = menu.yposition(index)
            y1 = menu.yposition(index + 1) if index + 1 < len(entries) else menu.winfo_height()
            self.item_centers[entry.label] = (left + width // 2, top + (y0 + y1) // 2)
        self.posted.set()
