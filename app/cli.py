"""The `ebbtide` command: the tray with no arguments, the daemon with `serve`, and client commands.

Client commands (ps, models, pause, resume, reclaim, unload, status) go
through the control API only. Exit codes mean one thing each (EXIT below), so
scripts can tell "the daemon is not running" from "that model does not exist".
Messages are plain sentences on stdout (results) and stderr (problems).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from app import env, exit_codes
from app.control_client import ControlClient, ControlError, DaemonNotRunning
from app.human import format_bytes, model_held_bytes, model_weights_bytes
from app.instance_lock import AlreadyRunning, InstanceLock
from app.paths import AppPaths, app_paths
from app.settings import FIELDS, SettingValueError
from app.settings_file import LoadedSettings, effective_toml, load_settings
from app.tray.view import device_figures

EXIT_OK, EXIT_ERROR, EXIT_USAGE = exit_codes.OK, exit_codes.ERROR, exit_codes.USAGE
EXIT_NOT_RUNNING, EXIT_ALREADY_RUNNING, EXIT_NOT_FOUND = (
    exit_codes.NOT_RUNNING, exit_codes.ALREADY_RUNNING, exit_codes.NOT_FOUND)
# HTTP status of a control API error -> exit code (anything else is a plain error).
STATUS_EXIT = {404: EXIT_NOT_FOUND, 400: EXIT_USAGE, 422: EXIT_USAGE}
MODEL_ACTIONS = ("pause", "resume", "unload")

log = logging.getLogger(__name__)


def _setting(key: str) -> Callable[[str], object]:
    """An argparse type that parses with the settings key's own parser."""
    def parse(text: str) -> object:
        try:
            return FIELDS[key](text)
        except SettingValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    parse.__name__ = key  # argparse names the type in its error message
    return parse


# serve's options: flag -> settings key.
SERVE_OPTIONS = {"--host": "host", "--port": "port", "--model": "default_model", "--backend": "backend",
                 "--headroom": "headroom_bytes", "--keep-alive": "keep_alive_s", "--log-level": "log_level"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebbtide", description="Local LLMs that give GPU memory back. "
        "With no command, starts the tray icon (and the daemon under it).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground (no tray)")
    for flag, key in SERVE_OPTIONS.items():
        serve.add_argument(flag, dest=key, type=_setting(key), help=f"overrides the setting {key}")
    sub.add_parser("ps", help="list the models in memory, with their state and memory")
    sub.add_parser("models", help="list every model the daemon can serve")
    for action in MODEL_ACTIONS:
        cmd = sub.add_parser(action, help=f"{action} one model")
        cmd.add_argument("model", help="model name, as `ebbtide models` lists it")
        if action == "pause":
            cmd.add_argument("--weights", action="store_true",
                             help="its weights too: nothing of it left on the GPU, ready again at copy speed")
    reclaim = sub.add_parser("reclaim", help="give GPU memory back now: one model's, or everything")
    reclaim.add_argument("model", nargs="?", help="only this model (default: everything)")
    warmup = sub.add_parser("warmup", help="compile a model's kernels into the cache now, not at its first request")
    warmup.add_argument("model", nargs="?", help="model name (default: the default model)")
    sub.add_parser("status", help="say whether the daemon runs, where, and what it holds")
    sub.add_parser("dashboard", help="print the dashboard's address (with its access token)")
    config = sub.add_parser("config", help="print the settings file's path and the effective values")
    config.add_argument("--path", action="store_true", help="print only the file's path")
    autostart = sub.add_parser("autostart", help="start the tray at login: enable, disable or status")
    autostart.add_argument("action", choices=("enable", "disable", "status"))
    pull = sub.add_parser("pull", help="fetch a GGUF model from Hugging Face: hf.co/OWNER/REPO[:QUANT] or OWNER/REPO")
    pull.add_argument("model", help="e.g. hf.co/bartowski/Qwen2.5-Coder-1.5B-Instruct-GGUF:Q4_K_M")
    desktop = sub.add_parser("desktop", help="the Linux menu entry and icon: install, uninstall or status")
    desktop.add_argument("action", choices=("install", "uninstall", "status"))
    tray = sub.add_parser("tray", help="start the tray icon (the same as no command)")
    tray.add_argument("--headless", action="store_true", help="no icon: supervise the daemon only")
    return parser


def _client(paths: AppPaths, loaded: LoadedSettings) -> ControlClient:
    return ControlClient.from_settings(paths, loaded.settings)


def cmd_serve(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    try:
        from app.daemon import serve
    except ImportError as exc:
        print(f"ebbtide: the daemon is not available in this build ({exc})", file=sys.stderr)
        return EXIT_ERROR
    lock = InstanceLock(paths.lock_file)
    if not os.environ.get(env.SUPERVISOR):  # under the tray, the tray holds the lock
        try:
            lock.acquire("daemon", loaded.settings.endpoint_url)
        except AlreadyRunning as exc:
            print(f"ebbtide: {exc}", file=sys.stderr)
            return EXIT_ALREADY_RUNNING
    try:
        return int(serve(loaded.settings) or 0)
    finally:
        lock.release()


def _print_models(models: list[dict]) -> None:
    """One row a model; WHY says which engine serves (or would serve) it and why."""
    rows = [(m.get("name", "?"), m.get("state", "?") + (" (busy)" if m.get("busy") else ""),
             m.get("engine") or "", format_bytes(model_held_bytes(m)),
             format_bytes(model_weights_bytes(m)) if model_weights_bytes(m) else "",
             (f"{m['route']['engine']}: {m['route']['reason']}" if m.get("route") else "")) for m in models]
    header = ("NAME", "STATE", "ENGINE", "MEMORY", "WEIGHTS", "WHY")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_ps(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    with _client(paths, loaded) as client:
        models = [m for m in client.models() if m.get("state") not in ("unloaded", None)]
    if not models:
        print("No model is in memory.")
    else:
        _print_models(models)
    return EXIT_OK


def cmd_models(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    with _client(paths, loaded) as client:
        _print_models(client.models())
    return EXIT_OK


def cmd_model_action(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    action = "weights_to_host" if getattr(args, "weights", False) else args.command
    with _client(paths, loaded) as client:
        result = client.model_action(args.model, action)
    freed = result.get("bytes_returned") if isinstance(result, dict) else None
    tail = f", {format_bytes(freed)} given back" if freed else ""
    print(f"{args.model}: {action.replace('_', ' ')} done{tail}.")
    return EXIT_OK


def cmd_reclaim(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    with _client(paths, loaded) as client:
        result = client.model_action(args.model, "reclaim") if args.model else client.reclaim_all()
    freed = result.get("bytes_returned", 0) if isinstance(result, dict) else 0
    print(f"Gave back {format_bytes(freed or 0)} of memory" + (f" from {args.model}." if args.model else "."))
    return EXIT_OK


def cmd_warmup(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    from app.warmup import warm_up
    from engines.errors import ModelNotFound
    from engines.progress import ProgressBar

    try:
        name, kind, phases = warm_up(args.model, loaded.settings, paths, ProgressBar())
    except ModelNotFound as exc:
        print(f"ebbtide: {exc}. `ebbtide models` lists them.", file=sys.stderr)
        return EXIT_ERROR
    took = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in phases.items())
    if kind != "torch":
        print(f"{name}: served by the {kind} engine, which compiles nothing ({took})")
    elif "compile_capture" not in phases:
        print(f"{name}: the torch engine compiles nothing on this device ({took})")
    else:
        print(f"{name}: kernels compiled and cached ({took})")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    with _client(paths, loaded) as client:
        status = client.status()
        memory = client.memory()
    held = sum(int((m or {}).get("total", 0) or 0) for m in (memory.get("models") or {}).values())
    print(f"Ebbtide is running at {client.base_url} (pid {status.get('pid', '?')}, "
          f"version {status.get('version', '?')}, memory backend {status.get('backend', '?')}).")
    total, free, others = device_figures(memory)
    if total:
        print(f"Device: {format_bytes(total)} total, {format_bytes(free)} free, "
              f"{format_bytes(others)} used by other applications.")
    print(f"Models hold {format_bytes(held)}; auto-yield is {'on' if memory.get('auto_yield') else 'off'}.")
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    with _client(paths, loaded) as client:
        client.status()  # fail with "not running" rather than print a dead address
        print(client.dashboard_url())
    return EXIT_OK


def cmd_config(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    print(f"# settings file: {loaded.path}" + ("" if loaded.path.exists() else " (not created yet: defaults)"))
    if args.path:
        return EXIT_OK
    for problem in loaded.problems:
        print(f"# ignored: {problem}")
    print(effective_toml(loaded.settings), end="")
    return EXIT_ERROR if loaded.problems else EXIT_OK


def cmd_autostart(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    from app.login_item import for_platform, tray_command

    item = for_platform()
    if args.action == "enable":
        print(f"Ebbtide will start at login ({item.enable(tray_command())}).")
    elif args.action == "disable":
        print("Ebbtide will not start at login." if item.disable() else "Start at login was already off.")
    else:
        print(f"Start at login is {'on' if item.is_enabled() else 'off'} ({item.location()}).")
    return EXIT_OK


def cmd_pull(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    """Through the daemon when one runs (the dashboard shows the bar too), else here."""
    from app.pull.cli import run_pull
    from engines.config import config_from_settings

    try:
        with _client(paths, loaded) as client:
            client.status()
            base_url: str | None = client.base_url
    except DaemonNotRunning:
        base_url = None
    cache_dir = config_from_settings(loaded.settings, models_dir=str(paths.models_dir)).resolved_hf_cache_dir()
    return run_pull(args.model, base_url, cache_dir)


def cmd_desktop(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    from app import desktop_entry
    from app.login_item import tray_command

    if not sys.platform.startswith("linux"):
        print("ebbtide: the desktop entry is for Linux; use `ebbtide autostart` elsewhere", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "install":
        for path in desktop_entry.install(tray_command()):
            print(f"wrote {path}")
    elif args.action == "uninstall":
        removed = desktop_entry.uninstall()
        print("\n".join(f"removed {p}" for p in removed) if removed else "The desktop entry was not installed.")
    else:
        print(f"The desktop entry is {'installed' if desktop_entry.is_installed() else 'not installed'} "
              f"({desktop_entry.entry_path()}).")
    return EXIT_OK


def cmd_tray(args: argparse.Namespace, paths: AppPaths, loaded: LoadedSettings) -> int:
    from app.tray.app import run_tray

    return run_tray(paths, loaded, headless=getattr(args, "headless", False))


COMMANDS: dict[str | None, Callable[[argparse.Namespace, AppPaths, LoadedSettings], int]] = {
    None: cmd_tray, "tray": cmd_tray, "serve": cmd_serve, "ps": cmd_ps, "models": cmd_models,
    "pause": cmd_model_action, "resume": cmd_model_action, "unload": cmd_model_action,
    "reclaim": cmd_reclaim, "status": cmd_status, "dashboard": cmd_dashboard, "config": cmd_config,
    "autostart": cmd_autostart, "warmup": cmd_warmup, "desktop": cmd_desktop, "pull": cmd_pull,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 with a usage message on bad input
    overrides = {key: getattr(args, key) for key in SERVE_OPTIONS.values() if getattr(args, key, None) is not None}
    loaded = load_settings(overrides=overrides)
    logging.basicConfig(level=loaded.settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control API poll is noise
    paths = app_paths().ensure()
    try:
        return COMMANDS[args.command](args, paths, loaded)
    except DaemonNotRunning as exc:
        print(f"ebbtide: {exc}. Start it with `ebbtide` (tray) or `ebbtide serve`.", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"ebbtide: {exc.message}", file=sys.stderr)
        return STATUS_EXIT.get(exc.status, EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
