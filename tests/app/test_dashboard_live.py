"""The dashboard in headless Chromium (Debian's, driven by Playwright) against a live daemon.

Opened the way the tray opens it (the token URL, traded for a cookie), it lists
the daemon's models, draws the memory timeline, and after `ebbtide reclaim`
shows a reclaim mark on it, fed by the event stream. Its buttons reach the
control API. A screenshot goes to docs/screenshots/dashboard.png (with EBBTIDE_UPDATE_SCREENSHOTS=1).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from desktop_support import SCREENSHOTS, LiveDaemon

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def daemon(tmp_path: Path):
    live = LiveDaemon(tmp_path / "home").start()
    yield live
    live.stop()


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        yield page
        browser.close()


def test_dashboard_shows_reclaim_on_timeline(daemon: LiveDaemon, page) -> None:
    model = daemon.load_default_model()
    page.goto(daemon.client.dashboard_url())
    page.wait_for_timeout(3000)  # a few samples while the model holds its memory
    assert page.url.endswith("/dashboard")  # the token left the address bar
    row = page.locator(f'#models tr[data-model="{model}"]')
    row.wait_for(timeout=20_000)
    assert "idle" in row.inner_text()
    page.wait_for_selector("#timeline polygon.area", timeout=20_000)
    assert page.locator("#problem").is_hidden()

    result = daemon.cli("reclaim")
    assert result.returncode == 0, result.stderr
    assert "Gave back" in result.stdout
    marker = page.locator("#timeline .reclaim-marker").first
    marker.wait_for(timeout=20_000)
    assert int(marker.get_attribute("data-bytes")) >= 0
    page.wait_for_selector("#events li.reclaim", timeout=10_000)
    page.wait_for_timeout(3000)  # a few more samples, so the drop shows after the mark
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

    # The same actions as the tray: pause the model from its row, the state follows.
    daemon.load_default_model()  # giving everything back may have unloaded it
    click_until_paused(page, row, model, "pause")
    assert {m["name"]: m for m in daemon.client.models()}[model]["state"] == "paused"
    # "Free all GPU memory, keep ready" from the row (llama.cpp has no weights rung: paused).
    daemon.load_default_model()
    daemon.client.model_action(model, "resume")
    click_until_paused(page, row, model, "weights_to_host")
    assert {m["name"]: m for m in daemon.client.models()}[model]["rung"] == "kv_on_host"


def click_until_paused(page, row, model: str, action: str) -> None:
    """Click the row's `action` button once it is enabled, and wait for the row to say paused."""
    page.wait_for_selector(f'#models tr[data-model="{model}"] button[data-action="{action}"]:not([disabled])',
                           timeout=20_000)
    row.locator(f'button[data-action="{action}"]').click()
    page.wait_for_function(
        f'document.querySelector(\'#models tr[data-model="{model}"]\').innerText.includes("paused")',
        timeout=20_000)


def test_dashboard_without_token_says_how_to_open_it(daemon: LiveDaemon, page) -> None:
    page.goto(f"{daemon.url}/dashboard")
    page.wait_for_selector("#problem:not([hidden])", timeout=20_000)
    assert "ebbtide dashboard" in page.locator("#problem").inner_text()
