"""A minimal freedesktop system tray for tests: owns _NET_SYSTEM_TRAY_S0 and docks icons.

Xvfb runs no desktop, so nothing would take pystray's xorg icon. This host does
what a panel does (System Tray Protocol: selection owner, REQUEST_DOCK, reparent
the icon's window into its own), so the icon is really mapped and drawn. It
prints "ready" and then "docked <window id> <x> <y> <size>" for each icon.
Run: python xtray_host.py (with DISPLAY set).
"""
from __future__ import annotations

import sys

from Xlib import X, Xatom, display
from Xlib.protocol import event

SIZE = 32
PANEL = (220, 40)


def main() -> None:
    d = display.Display()
    screen = d.screen()
    panel_x = screen.width_in_pixels - PANEL[0]
    panel = screen.root.create_window(panel_x, 0, PANEL[0], PANEL[1], 0, screen.root_depth,
                                      background_pixel=0x303840, override_redirect=True,
                                      event_mask=X.SubstructureNotifyMask | X.StructureNotifyMask)
    panel.map()
    selection = d.intern_atom(f"_NET_SYSTEM_TRAY_S{d.get_default_screen()}")
    opcode = d.intern_atom("_NET_SYSTEM_TRAY_OPCODE")
    manager = d.intern_atom("MANAGER")
    panel.set_selection_owner(selection, X.CurrentTime)
    screen.root.send_event(event.ClientMessage(window=screen.root, client_type=manager,
                                               data=(32, [X.CurrentTime, selection, panel.id, 0, 0])),
                           event_mask=X.StructureNotifyMask)
    panel.change_property(d.intern_atom("_NET_SYSTEM_TRAY_ORIENTATION"), Xatom.CARDINAL, 32, [0])
    d.sync()
    print("ready", flush=True)
    slots: dict[int, int] = {}  # window id -> slot; pystray asks to dock again on each icon update
    while True:
        ev = d.next_event()
        if ev.type == X.ClientMessage and ev.client_type == opcode and ev.data[1][1] == 0:
            icon = d.create_resource_object("window", ev.data[1][2])
            if icon.id in slots:
                continue
            slots[icon.id] = len(slots)
            x, y = 4 + slots[icon.id] * (SIZE + 4), (PANEL[1] - SIZE) // 2
            icon.reparent(panel, x, y)
            icon.configure(width=SIZE, height=SIZE)
            icon.map()
            d.sync()
            print(f"docked {icon.id} {panel_x + x} {y} {SIZE}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
