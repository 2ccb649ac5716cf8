"""What the browser tests of ``superdiff app`` share: the browser (Debian's Chromium, driven by
playwright's Python API, never a downloaded browser), a free loopback port, and page helpers."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
INSTALL_HINT = (
    "the browser tests of `superdiff app` need gradio and playwright (`pip install -e .[app,test]`) and Debian's "
    "Chromium (`apt-get install -y chromium`; never `playwright install`): "
)

# Records, in the page, each new picture the trace plot shows, with the status text shown beside it,
# so a test can tell the live updates during sampling from the final figure.
PLOT_WATCHER = """() => {
  window.__plotUpdates = [];
  const plot = document.querySelector('#trace-plot');
  const seen = new Set();
  const record = () => {
    const img = plot.querySelector('img');
    if (!img || seen.has(img.src)) return;
    seen.add(img.src);
    window.__plotUpdates.push(document.querySelector('#status textarea').value);
  };
  record();
  new MutationObserver(record).observe(plot, {subtree: true, childList: true, attributes: true});
}"""


def chromium_path() -> str:
    """The system Chromium, or a test failure saying how to install it (the tests never skip)."""
    found = next((p for p in CHROMIUM_CANDIDATES if Path(p).is_file()), None) or shutil.which("chromium")
    if found is None:
        pytest.fail(INSTALL_HINT + "no chromium binary found", pytrace=False)
    return found


def require_app_packages() -> None:
    """Fail (not skip) where gradio or playwright is missing."""
    for name in ("gradio", "playwright"):
        try:
            __import__(name)
        except ImportError as exc:
            pytest.fail(INSTALL_HINT + f"{name} is not importable ({exc})", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_text(page) -> str:
    return page.locator("#status textarea").input_value()


def wait_for_status(page, prefixes: tuple[str, ...], timeout_ms: int = 30_000, changed_from: str | None = None) -> str:
    """Wait until the status box starts with one of ``prefixes`` (and, given ``changed_from``, no
    longer reads the last run's text); returns its text."""
    checks = "(" + " || ".join(f"v.startsWith({p!r})" for p in prefixes) + ")"
    if changed_from is not None:
        checks += f" && v !== {json.dumps(changed_from)}"
    page.wait_for_function(f"() => {{ const v = document.querySelector('#status textarea').value; return {checks}; }}",
                           timeout=timeout_ms)
    return status_text(page)


def fill_form(page, prompts: list[str], mode: str, steps: int, num_images: int, seed: int,
              log_weights: str = "", expression: str = "", particles: int = 1) -> None:
    """Type the prompts (adding or removing rows to match), choose the mode and the numbers; a
    non-empty ``expression`` replaces the prompts in the app."""
    rows = page.locator("[id^=prompt-]:visible").count()
    while rows < len(prompts):
        page.click("#add-prompt")
        rows += 1
        page.locator(f"#prompt-{rows}").wait_for(state="visible")
    while rows > len(prompts):
        page.click("#remove-prompt")
        page.locator(f"#prompt-{rows}").wait_for(state="hidden")
        rows -= 1
    for i, text in enumerate(prompts):
        page.locator(f"#prompt-{i + 1} input").fill(text)
    page.locator(f'#mode input[value="{mode}"]').check()
    page.locator("#steps input").fill(str(steps))
    page.locator("#seed input").fill(str(seed))
    page.locator("#num-images input[type=number]").fill(str(num_images))
    page.locator("#num-images input[type=number]").press("Tab")
    page.locator("#log-weights input").fill(log_weights)
    page.locator("#expression input").fill(expression)
    page.locator("#particles input").fill(str(particles))


def gallery_count(page) -> int:
    return page.locator("#gallery .grid-container img").count()


def screenshot(page, folder: Path, name: str) -> Path:
    """A full-page screenshot kept as the test's artefact."""
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def offline_env() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
