"""Make clicks reach pystray's xorg icon.

pystray 0.19.5's xorg backend creates its icon window with only Exposure and
StructureNotify in its event mask, so the X server never sends it ButtonPress:
the default action never runs and a click does nothing (pystray#151, "Callbacks
not working on tint2"). Adding ButtonPressMask to that window is the whole fix.
Other backends are left alone.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def enable_clicks(icon: object) -> bool:
    """True when the icon is an xorg one and now receives button presses."""
    window = getattr(icon, "_window", None)
    display = getattr(icon, "_display", None)
    if type(icon).__module__ != "pystray._xorg" or window is None or display is None:
        return False
    from Xlib import X

    window.change_attributes(event_mask=X.ExposureMask | X.StructureNotifyMask | X.ButtonPressMask)
    display.flush()
    return True
