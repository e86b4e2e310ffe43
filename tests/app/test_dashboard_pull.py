"""The dashboard in headless Chromium: a model fetched from its form shows a progress bar that
fills (fed by the event stream's "pull" events), then its row. (Remote models on the
dashboard: tests/app/test_remote_engine.py, which has the second server.)"""
from __future__ import annotations

from pathlib import Path

import pytest

from desktop_support import SCREENSHOTS, LiveDaemon
from hub_server import BUNDLED_REPO, hub_for_daemons
from test_dashboard_live import page  # noqa: F401  (the Chromium page fixture)

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server, _ = hub_for_daemons(monkeypatch, tmp_path / "hf-cache")
    live = LiveDaemon(tmp_path / "home")
    settings = tmp_path / "home" / "config" / "settings.toml"
    settings.write_text(settings.read_text().replace("scan_hf_cache = false", "scan_hf_cache = true"))
    yield live.start()
    live.stop()
    server.shutdown()
    server.server_close()


def test_pull_progress_on_the_dashboard(daemon: LiveDaemon, page) -> None:  # noqa: F811
    page.goto(daemon.client.dashboard_url())
    wanted = f"hf.co/{BUNDLED_REPO}:Q4_1"
    page.fill("#pull-name", wanted)
    page.click("#pull-form button[type=submit]")
    bar = page.locator(f'.pulls .pull[data-model="{wanted}"]')
    bar.wait_for(timeout=20_000)
    page.wait_for_function(
        f'document.querySelector(\'.pulls .pull[data-model="{wanted}"]\').innerText.includes("success")',
        timeout=60_000)
    progress = bar.locator("progress")
    assert float(progress.get_attribute("value")) == float(progress.get_attribute("max")) > 1
    page.locator(f'#models tr[data-model="hf.co/{BUNDLED_REPO}:SmolLM2-135M-Instruct-Q4_1"]').wait_for(timeout=20_000)
    assert page.locator("#problem").is_hidden()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "dashboard-pull.png"), full_page=True)
