"""`superdiff app` in a real headless Chromium: the embedded shapes model composed from the page,
with live plots, downloads that equal `superdiff generate`'s files, the library's messages for bad
input, Stop, a closed tab, and two tabs at once. The browser tests fail (never skip) where the
browser or the app extra is missing; see tests/app_helpers.py."""

import json
import math
import re
import sys
import time

import click
import pytest
from click.testing import CliRunner

from app_helpers import (
    PLOT_WATCHER,
    chromium_path,
    fill_form,
    free_port,
    gallery_count,
    offline_env,
    require_app_packages,
    screenshot,
    status_text,
    wait_for_status,
)
from superdiff.combine import make_combiner
from superdiff_cli.errors import BadInput
from superdiff_cli.generate import check_items
from superdiff_cli.main import cli

LONG_RUN = 1000  # steps: the embedded models' training timesteps, far longer than any Stop takes


def test_app_help_lists_its_options():
    r = CliRunner().invoke(cli, ["app", "--help"])
    assert r.exit_code == 0, r.output
    for option in ("--model", "--host", "--port", "--device", "--out"):
        assert option in r.output


def test_app_without_gradio_exits_2_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    r = CliRunner().invoke(cli, ["app"])
    assert r.exit_code == 2, r.output
    assert "pip install superdiff[app]" in r.output


# --- in the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free loopback port with the embedded shapes model, once for the module."""
    require_app_packages()
    offline_env()
    from superdiff_cli.app import Studio, build_blocks, launch

    studio = Studio.load("embedded-shapes", device="cpu", out_root=tmp_path_factory.mktemp("app-runs"))
    port = free_port()
    blocks = launch(build_blocks(studio), "127.0.0.1", port, block=False, allowed=[studio.out_root])
    yield studio, f"http://127.0.0.1:{port}/"
    blocks.close()


@pytest.fixture(scope="module")
def browser(served):
    path = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.goto(url)
    page.wait_for_selector("#generate")
    return page


@pytest.fixture
def page(browser, served):
    page = open_page(browser, served[1])
    yield page
    page.close()


def test_two_prompts_and_generate_plots_live_and_downloads_what_generate_writes(page, served, tmp_path):
    fill_form(page, ["blue", "square"], "and", steps=4, num_images=3, seed=5)
    page.evaluate(PLOT_WATCHER)
    page.click("#generate")
    status = wait_for_status(page, ("Done", "Error", "Stopped"))
    screenshot(page, tmp_path, "app.png")
    assert status.startswith("Done: 3 images, 4 steps, seed 5"), status
    assert gallery_count(page) == 3
    # The plot changed with the status still saying "Sampling": live updates, before the final figure.
    updates = page.evaluate("window.__plotUpdates")
    live = [s for s in updates if s.startswith("Sampling: step")]
    assert len(live) >= 2, updates
    assert updates[-1].startswith("Done"), updates

    with page.expect_download() as download:
        page.locator('#files a[download="image_001.json"]').click()
    from_app = json.loads(open(download.value.path(), encoding="utf-8").read())

    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-shapes", "--and", "blue", "--and", "square",
                                 "--steps", "4", "--num-images", "3", "--seed", "5", "--device", "cpu",
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    from_cli = json.loads((out / "image_001.json").read_text(encoding="utf-8"))
    assert from_app["kappa_trace"] == from_cli["kappa_trace"]
    assert from_app["log_density_trace"] == from_cli["log_density_trace"]
    assert from_app == from_cli  # the same settings too: the same file


def test_an_expression_replaces_the_prompts_and_downloads_what_generate_expr_writes(page, tmp_path):
    text = '("red" | "blue") * !"circle"'
    fill_form(page, ["ignored"], "and", steps=3, num_images=2, seed=2, expression=text, particles=3)
    before = status_text(page)
    page.click("#generate")
    status = wait_for_status(page, ("Done", "Error", "Stopped"), changed_from=before)
    assert status.startswith("Done: 2 images, 3 steps, seed 2"), status
    with page.expect_download() as download:
        page.locator('#files a[download="image_001.json"]').click()
    from_app = json.loads(open(download.value.path(), encoding="utf-8").read())
    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["generate", "--model", "embedded-shapes", "--expr", text, "--particles", "3",
                                 "--steps", "3", "--num-images", "2", "--seed", "2", "--device", "cpu", "--out",
                                 str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    from_cli = json.loads((out / "image_001.json").read_text(encoding="utf-8"))
    assert from_app["prompts"] == ["red", "blue", "", "circle"]  # leaves in order; NOT lists its reference first
    assert from_app["particles"] == 3 and "log_weight" in from_app and "ess_trace" in from_app
    assert from_app == from_cli

    fill_form(page, ["red"], "and", steps=2, num_images=1, seed=0, expression='"red" & & "circle"')
    before = status_text(page)
    page.click("#generate")
    shown = wait_for_status(page, ("Error", "Done"), changed_from=before)
    assert shown.startswith("Error: expected a prompt in quotes") and "(at position 8)" in shown, shown
    assert "Traceback" not in page.content()


def library_message(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except BadInput as exc:
        return exc.message
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{fn.__name__}{args} accepted its input")


def test_bad_input_shows_the_library_message_and_no_traceback(page):
    cases = [
        (["red", "  "], "and", "", library_message(check_items, ["red", "  "], "prompt")),
        (["red"], "and", "", library_message(make_combiner, "and", 1, 1.0, None, what="prompts")),
        (["red", "circle"], "or", "nan, 0",
         library_message(make_combiner, "or", 2, 1.0, [math.nan, 0.0], what="prompts")),
    ]
    for prompts, mode, weights, expected in cases:
        fill_form(page, prompts, mode, steps=2, num_images=1, seed=0, log_weights=weights)
        before = status_text(page)
        page.click("#generate")
        shown = wait_for_status(page, ("Error", "Done"), changed_from=before)
        assert shown == f"Error: {expected}"
        assert "Traceback" not in page.content()
    assert gallery_count(page) == 0


def steps_done(status: str) -> int:
    return int(re.match(r"Stopped after (\d+) of", status).group(1))


def test_stop_ends_a_long_run_early(page, served):
    studio = served[0]
    fill_form(page, ["red", "circle"], "or", steps=LONG_RUN, num_images=1, seed=1)
    page.click("#generate")
    wait_for_status(page, ("Sampling: step",))
    page.click("#stop")
    status = wait_for_status(page, ("Stopped", "Done", "Error"))
    assert status.startswith("Stopped after"), status
    taken = steps_done(status)
    assert 0 < taken < LONG_RUN
    assert gallery_count(page) == 1  # the interrupted (still noisy) image is shown, as diffusers returns it
    assert studio.runs[-1].outcome == "stopped" and studio.runs[-1].steps_taken == taken


def test_closing_the_tab_stops_its_run(browser, served):
    studio = served[0]
    page = open_page(browser, served[1])
    fill_form(page, ["red", "circle"], "and", steps=LONG_RUN, num_images=1, seed=2)
    before = len(studio.runs)
    page.click("#generate")
    wait_for_status(page, ("Sampling: step",))
    page.close()
    deadline = time.monotonic() + 30
    while len(studio.runs) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(studio.runs) > before, "the run of the closed tab did not end"
    assert studio.runs[-1].outcome == "stopped" and studio.runs[-1].steps_taken < LONG_RUN


def test_two_tabs_at_once_queue_and_keep_their_own_outputs(browser, served):
    first, second = open_page(browser, served[1]), open_page(browser, served[1])
    try:
        fill_form(first, ["red", "circle"], "and", steps=3, num_images=1, seed=11)
        fill_form(second, ["blue", "square"], "or", steps=3, num_images=2, seed=12)
        first.click("#generate")
        second.click("#generate")
        assert wait_for_status(first, ("Done", "Error")).startswith("Done: 1 image, 3 steps, seed 11")
        assert wait_for_status(second, ("Done", "Error")).startswith("Done: 2 images, 3 steps, seed 12")
        assert (gallery_count(first), gallery_count(second)) == (1, 2)
        with second.expect_download() as download:
            second.locator('#files a[download="image_000.json"]').click()
        side = json.loads(open(download.value.path(), encoding="utf-8").read())
        assert (side["prompts"], side["mode"], side["seed"]) == (["blue", "square"], "or", 12)
        assert status_text(first).startswith("Done: 1 image,")
    finally:
        first.close()
        second.close()


def test_the_particles_cap_names_the_particles_field():
    """The form's cap counts images x particles and names the field to lower, not a number of images
    the user never entered."""
    from superdiff_cli.app import check_run_request, composition_from_expression

    composition = composition_from_expression("embedded-shapes", '"red" * "circle"')
    with pytest.raises(BadInput, match="number of images 4 x particles 300 is 1200 samples in one batch, more than "
                                       "1024; use particles 256 or fewer"):
        check_run_request("embedded-shapes", composition, 50, 5, 0, 4, {"particles": 300})


# --- serving: logins, the address, the network warning (no browser) ------------------------------

@pytest.fixture
def no_studio(monkeypatch):
    """Loading a model fails the test: the serving options are checked before one loads."""
    import superdiff_cli.app as app_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the serving options were checked")

    monkeypatch.setattr(app_module.Studio, "load", staticmethod(refuse))


@pytest.mark.parametrize("args, file_text, needle", [
    (["--auth", "alice"], None, "--auth value 1 has no ':'; write USER:PASSWORD"),
    (["--auth", "alice:s3cret", "--auth", ":s3cret"], None, "--auth value 2 has an empty user name"),
    (["--auth", "alice:"], None, "--auth value 1 gives user 'alice' an empty password"),
    (["--auth", "alice:s3cret", "--auth", "alice:s3cret2"], None, "name user 'alice' more than once"),
    ([], "# logins\nalice:s3cret\n\nbob s3cret\n", "line 4 has no ':'"),
    ([], "# only a comment\n", "holds no USER:PASSWORD line"),
    ([], b"alice:\xff\n", "cannot be read"),
])
def test_malformed_logins_exit_2_before_loading(tmp_path, no_studio, args, file_text, needle):
    if file_text is not None:
        path = tmp_path / "logins.txt"
        path.write_bytes(file_text if isinstance(file_text, bytes) else file_text.encode())
        args = [*args, "--auth-file", str(path)]
    r = CliRunner().invoke(cli, ["app", *args])
    assert r.exit_code == 2, r.output
    assert needle in " ".join(r.output.split()) and "Traceback" not in r.output
    assert "s3cret" not in r.output  # a password is never echoed


def test_a_busy_port_or_a_host_not_of_this_machine_exits_2_before_loading(no_studio):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = CliRunner().invoke(cli, ["app", "--port", str(port)])
    assert r.exit_code == 2 and f"--port {port} is in use on 127.0.0.1" in r.output, r.output
    for host, needle in [("999.1.1.1", "is neither an IP address nor a name that resolves here"),
                         ("192.0.2.1", "is not an address of this machine")]:  # 192.0.2.0/24: documentation only
        r = CliRunner().invoke(cli, ["app", "--host", host])
        assert r.exit_code == 2 and f"--host {host!r} {needle}" in r.output, r.output
        assert "Cannot find empty port" not in r.output and "Traceback" not in r.output


@pytest.fixture
def fake_launch(monkeypatch, tmp_path):
    """Studio.load, build_blocks and launch stand-ins: what launch was given, and the stderr lines
    written before the model loaded."""
    import superdiff_cli.app as app_module

    seen: dict = {}

    class FakeStudio:
        out_root = tmp_path

    def load(*args, **kwargs):
        click.echo("LOADING", err=True)
        return FakeStudio()

    monkeypatch.setattr(app_module.Studio, "load", staticmethod(load))
    monkeypatch.setattr(app_module, "build_blocks", lambda studio: "blocks")
    monkeypatch.setattr(app_module, "launch", lambda blocks, host, port, **kw: seen.update(host=host, port=port, **kw))
    return seen


def test_a_network_host_is_warned_about_and_the_logins_reach_gradio(tmp_path, fake_launch):
    port = free_port()
    r = CliRunner().invoke(cli, ["app", "--port", str(port)])
    assert r.exit_code == 0, r.output
    assert "Warning" not in r.stderr and fake_launch["auth"] == [] and fake_launch["port"] == port

    r = CliRunner().invoke(cli, ["app", "--host", "0.0.0.0", "--port", str(port)])
    assert r.exit_code == 0, r.output
    warning, loading = r.stderr.index("Warning: --host 0.0.0.0"), r.stderr.index("LOADING")
    assert warning < loading  # said before the model loads, not lost above its logs
    text = " ".join(r.stderr.split())
    assert "with no login: anyone who can reach this machine on port" in text
    assert "download every run's images and sidecars" in text and "--auth USER:PASSWORD or --auth-file PATH" in text
    assert fake_launch["auth"] == [] and fake_launch["host"] == "0.0.0.0"

    logins = tmp_path / "logins.txt"
    logins.write_text("# team\nbob : pass word \n\n")
    r = CliRunner().invoke(cli, ["app", "--host", "0.0.0.0", "--port", str(port), "--auth", "alice:a:b",
                                 "--auth-file", str(logins)])
    assert r.exit_code == 0, r.output
    assert fake_launch["auth"] == [("alice", "a:b"), ("bob", " pass word")]  # the name is stripped, as gradio does
    assert "over plain HTTP" in r.stderr and "with no login" not in r.stderr


def test_gradio_asks_the_login_before_the_page_s_config_answers():
    """launch(auth=...) on a loopback port: the config (the page and its API read it) answers only after
    a login with the right password."""
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    require_app_packages()
    offline_env()
    import gradio as gr

    from superdiff_cli.app import launch

    with gr.Blocks() as blocks:
        gr.Markdown("hello")
    port = free_port()
    launch(blocks, "127.0.0.1", port, block=False, auth=[("alice", "s3cret")])
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        url = f"http://127.0.0.1:{port}"

        def status(path: str, form: dict | None = None) -> int:
            data = None if form is None else urllib.parse.urlencode(form).encode()
            try:
                with opener.open(url + path, data=data, timeout=20) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("/config") == 401
        assert status("/login", {"username": "alice", "password": "wrong"}) == 400
        assert status("/config") == 401
        assert status("/login", {"username": "alice", "password": "s3cret"}) == 200
        assert status("/config") == 200
    finally:
        blocks.close()


def test_a_collapse_of_the_particles_weights_shows_in_the_status(tiny_model, tmp_path, monkeypatch):
    """The app says what `generate` prints: the run is done, and its particles' weights collapsed. The bound
    is moved so the tiny random model's weights surely count as collapsed (1: every ESS below K) or never (0)."""
    import superdiff.particles
    from superdiff_cli.app import Studio

    studio = Studio.load(tiny_model, device="cpu", out_root=tmp_path)
    statuses, expression = [], '"a red circle" * "a blue square"'
    for fraction in (1.0, 0.0):
        monkeypatch.setattr(superdiff.particles, "COLLAPSE_FRACTION", fraction)
        updates = list(studio.run([], "and", 1, None, 5, 7.5, 1, 1, f"tab {fraction}", expression=expression,
                                  options={"particles": 3}))
        statuses.append(updates[-1]["status"])
    collapsed, fine = statuses
    assert collapsed.startswith("Done: 1 image") and "\nWarning: the particles' weights collapsed" in collapsed
    assert fine.startswith("Done: 1 image") and "Warning" not in fine, fine
