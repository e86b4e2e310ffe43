"""The tray application: pystray on the main thread, the daemon as a supervised child.

`run_tray` takes the single-instance lock, starts the daemon under a
DaemonSupervisor (or attaches to a daemon that `ebbtide serve` already runs),
and shows the icon. Two helper threads keep the view fresh: one polls the
control API, one follows its event stream so a reclaim shows at once. Without a
display (or when pystray has no working backend) it says so and supervises the
daemon headless.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from types import ModuleType

from app import exit_codes
from app.control_client import ControlClient, ControlError, DaemonNotRunning
from app.instance_lock import AlreadyRunning, InstanceLock
from app.login_item import for_platform, tray_command
from app.models.events import event_kind
from app.paths import AppPaths
from app.settings_file import LoadedSettings
from app.tray.dispatcher import Dispatcher, TrayHooks
from app.tray.icon import draw_icon
from app.tray.menu import Entry, build_entries, to_pystray
from app.tray.popup import TkPopup
from app.tray.supervisor import DaemonState, DaemonSupervisor, daemon_command, daemon_env
from app.tray.view import TrayMode, TrayView, down_view, view_from
from app.tray.xorg_clicks import enable_clicks
from kvcached.broker.events import EventKind

log = logging.getLogger(__name__)

POLL_S = 2.0


def is_reclaim(event: dict) -> bool:
    """Memory was just given back: a reclaim step that returned bytes, or a manual reclaim."""
    step = event_kind(str(event.get("kind", "")), event)
    if step is None or not step.is_reclaim():
        return False
    return step is EventKind.RECLAIM or int(event.get("bytes_returned", 0) or 0) > 0


class TrayApp:
    def __init__(self, client: ControlClient, settings_file, login_item: ModuleType | None,
                 supervisor: DaemonSupervisor | None = None) -> None:
        self.client = client
        self.supervisor = supervisor
        self.login_item = login_item
        self.view: TrayView = down_view(TrayMode.STARTING, "", endpoint=client.base_url)
        self.last_reclaim_at = 0.0
        self.icon = None
        self.stopping = threading.Event()
        self._drawn_key: object = None
        # pystray's xorg backend runs cross-thread calls through one shared reply queue, so two
        # threads updating the icon at once can take each other's replies: all icon calls go
        # through this lock.
        self._icon_lock = threading.Lock()
        hooks = TrayHooks(refresh=self.refresh, quit=self.quit, auto_yield=lambda: self.view.auto_yield,
                          tray_command=tray_command)
        self.dispatcher = Dispatcher(client, settings_file, login_item, hooks)
        self.popup = TkPopup(self.dispatcher.dispatch)

    # --- state -----------------------------------------------------------------
    def _start_at_login(self) -> bool:
        try:
            return bool(self.login_item and self.login_item.is_enabled())
        except Exception:  # a platform without a login item still gets a tray
            return False

    def refresh(self) -> TrayView:
        at_login, endpoint = self._start_at_login(), self.client.base_url
        if self.supervisor is not None and self.supervisor.state is DaemonState.FAILED:
            view = down_view(TrayMode.ERROR, f"the daemon exited with {self.supervisor.last_exit}; "
                                             f"its log: {self.supervisor.log_file}",
                             start_at_login=at_login, endpoint=endpoint)
        else:
            try:
                models, memory = self.client.models(), self.client.memory()
                if self.supervisor is not None:
                    self.supervisor.mark_running()
                view = view_from(models, memory, last_reclaim_at=self.last_reclaim_at,
                                 start_at_login=at_login, endpoint=endpoint)
                if self.dispatcher.last_error:  # a failed click shows until the next one works
                    view = dataclasses.replace(view, message=self.dispatcher.last_error)
            except (DaemonNotRunning, ControlError) as exc:
                starting = self.supervisor is not None and self.supervisor.state is not DaemonState.RUNNING
                view = down_view(TrayMode.STARTING if starting else TrayMode.ERROR, str(exc),
                                 start_at_login=at_login, endpoint=endpoint)
        self.view = view
        self._redraw()
        return view

    def entries(self) -> list[Entry]:
        return build_entries(self.view)

    def _redraw(self) -> None:
        icon, view = self.icon, self.view
        if icon is None:
            return
        key = (view.mode, round(view.held_fraction, 2), round(view.others_fraction, 2))
        with self._icon_lock:
            if self.stopping.is_set():
                return
            if key != self._drawn_key:  # redraw only on change: an undocked xorg icon logs on each update
                self._drawn_key = key
                icon.icon = draw_icon(view)
            if icon.title != view.tooltip():
                icon.title = view.tooltip()
            icon.update_menu()

    # --- pystray ---------------------------------------------------------------
    def build_icon(self):
        import pystray

        def items():
            yield pystray.MenuItem("Open menu", lambda icon, item: self.activate(), default=True, visible=False)
            yield from to_pystray(self.entries(), self.dispatcher.dispatch)

        self.icon = pystray.Icon("ebbtide", draw_icon(self.view), self.view.tooltip(), pystray.Menu(items))
        enable_clicks(self.icon)
        return self.icon

    def activate(self) -> None:
        """A click on the icon: the menu where the backend draws none, else the dashboard."""
        if self.icon is not None and not self.icon.HAS_MENU:
            self.popup.open(self.entries())
        elif self.view.mode not in (TrayMode.STARTING, TrayMode.ERROR):
            self.dispatcher.dispatch("open_dashboard")

    def start_helpers(self) -> None:
        for target, name in ((self._poll, "tray-poll"), (self._follow_events, "tray-events")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def _setup(self, icon) -> None:
        icon.visible = True
        self.start_helpers()

    def run(self) -> None:
        """Show the icon; returns after Quit. Must run on the main thread (macOS)."""
        if self.icon is None:
            self.build_icon()
        if type(self.icon).__module__ != "pystray._xorg":
            self.icon.run(setup=self._setup)
            return
        # pystray's xorg loop, stopped while docked, sometimes waits forever on python-xlib
        # for a DestroyNotify (its buffered DestroyWindow is never flushed when other threads
        # use the connection; seen under Xvfb). X needs no main thread, so the loop runs
        # beside us and Quit ends the tray whether or not that loop notices.
        loop = threading.Thread(target=self.icon.run, kwargs={"setup": self._setup}, name="tray-xorg", daemon=True)
        loop.start()
        self.stopping.wait()
        loop.join(2.0)

    def quit(self) -> None:
        self.stopping.set()
        self.popup.close()
        if self.supervisor is not None:
            self.supervisor.stop()
        with self._icon_lock:
            self._stop_icon()

    def _stop_icon(self) -> None:
        if self.icon is not None:
            # Undock before stopping: pystray's xorg loop, stopped while docked in a tray,
            # kept waiting for a DestroyNotify that never came (seen under Xvfb with a real
            # XEMBED tray); hidden first, it ends at once. Other backends just hide the icon.
            self.icon.visible = False
            self.icon.stop()

    # --- helper threads ------------------------------------------------------
    def _poll(self) -> None:
        while not self.stopping.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("tray: refresh failed")
            self.stopping.wait(POLL_S)

    def _follow_events(self) -> None:
        while not self.stopping.is_set():
            try:
                for event in self.client.events(self.stopping):
                    if is_reclaim(event):
                        self.last_reclaim_at = time.time()
                    if event.get("kind") in ("reclaim", "model", "broker", "settings"):
                        self.refresh()
            except Exception as exc:  # daemon restarting: try again shortly
                log.debug("tray: event stream ended: %s", exc)
            self.stopping.wait(1.0)


def no_display_reason(platform: str | None = None, environ: dict | None = None) -> str:
    """Why no icon can be shown here, or "" when a display may be there."""
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    if platform.startswith("linux") and not (environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY")):
        return "no display ($DISPLAY and $WAYLAND_DISPLAY are unset)"
    return ""


def run_headless(supervisor: DaemonSupervisor, stop: threading.Event) -> int:
    """Supervise the daemon until it fails for good or stop is set (SIGTERM, SIGINT)."""
    while not stop.wait(0.5):
        if supervisor.state is DaemonState.FAILED:
            print(f"ebbtide: the daemon keeps failing (exit {supervisor.last_exit}); its log is "
                  f"{supervisor.log_file}", file=sys.stderr)
            return exit_codes.ERROR
    supervisor.stop()
    return exit_codes.OK


def _login_item() -> ModuleType | None:
    try:
        return for_platform()
    except Exception:
        return None


def run_tray(paths: AppPaths, loaded: LoadedSettings, headless: bool = False) -> int:
    settings = loaded.settings
    # Signals are caught from the very start, so a SIGTERM while starting still ends cleanly.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lock = InstanceLock(paths.lock_file)
    supervisor: DaemonSupervisor | None = None
    try:
        lock.acquire("tray", settings.endpoint_url)
        supervisor = DaemonSupervisor(daemon_command(), daemon_env(os.getpid()), paths.log_dir / "daemon.log")
    except AlreadyRunning as exc:
        if exc.info is None or exc.info.role != "daemon":
            print(f"ebbtide: {exc}.", file=sys.stderr)
            return exit_codes.ALREADY_RUNNING
        print(f"Attaching to the daemon already running at {exc.info.endpoint} (pid {exc.info.pid}).")
    client = ControlClient.from_settings(paths, settings)
    try:
        if supervisor is not None:
            supervisor.start()
        return _show(client, loaded, supervisor, headless, stop)
    finally:
        if supervisor is not None:
            supervisor.stop()
        client.close()
        lock.release()


def _show(client: ControlClient, loaded: LoadedSettings, supervisor: DaemonSupervisor | None,
          headless: bool, stop: threading.Event) -> int:
    reason = "asked to run headless" if headless else no_display_reason()
    app = TrayApp(client, loaded.path, _login_item(), supervisor)
    if not reason:
        try:
            app.build_icon()
        except Exception as exc:  # pystray found no backend that works here
            reason = f"the tray icon cannot be shown ({exc})"
    if reason:
        if supervisor is None:
            print(f"ebbtide: {reason}, and a daemon is already running at {client.base_url}.", file=sys.stderr)
            return exit_codes.ALREADY_RUNNING
        print(f"ebbtide: {reason}; running the daemon without a tray icon at {client.base_url}.", flush=True)
        return run_headless(supervisor, stop)
    def quit_on_signal() -> None:
        stop.wait()
        app.quit()

    threading.Thread(target=quit_on_signal, name="tray-signals", daemon=True).start()
    print(f"Ebbtide is running at {client.base_url}.", flush=True)
    app.run()
    return exit_codes.OK
