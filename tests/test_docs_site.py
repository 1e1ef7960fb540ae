"""The built documentation site works in a real browser: pages load without console
errors, offline, and the maths is rendered by the bundled KaTeX.

The site is built with ``mkdocs build --strict`` (or taken from ``DIFFKIT_SITE_DIR``),
served by ``http.server`` on 127.0.0.1 in a thread, and opened in headless Chromium,
driven over the Chrome DevTools protocol (``websockets``). Without Chromium the test
skips, unless ``DIFFKIT_DOCS_SITE_REQUIRED=1`` (CI sets it), where it fails.
"""

import contextlib
import functools
import http.server
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DIFFKIT_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("DIFFKIT_DOCS_SITE_REQUIRED", "0") == "1"

# (path, what must be on it) -- the home page, a concept page with maths, an API page,
# tutorials with the figures their code produced at build time.
PAGES = {
    "home": ("", "img"),
    "concept": ("concepts/forward-reverse/", ".katex"),
    "api": ("api/schedules/", ".doc-heading"),
    "tutorial": ("tutorials/train-on-digits/", "img"),
    "tutorial-output": ("tutorials/write-your-own/", "img"),  # its printed output and digits
}


def _missing(what: str) -> None:
    if REQUIRED:
        pytest.fail(f"{what} (DIFFKIT_DOCS_SITE_REQUIRED=1)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("DIFFKIT_SITE_DIR")
    if given:
        path = Path(given)
        if not (path / "index.html").is_file():
            pytest.fail(f"DIFFKIT_SITE_DIR={given} holds no built site")
        return path
    if not (ROOT / "mkdocs.yml").is_file():
        pytest.skip("no mkdocs.yml (not running from a source checkout)")
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        # Without the figure cache the build draws the figures, one of them a shortened
        # `diffkit demo` run (~50 s of CPU time; a few minutes on a loaded machine).
        timeout=1800,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def base_url(site_dir: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class DevTools:
    """A minimal synchronous Chrome DevTools protocol client over one websocket."""

    def __init__(self, url: str) -> None:
        from websockets.sync.client import connect

        self._stack = contextlib.ExitStack()
        self.ws = self._stack.enter_context(connect(url, max_size=None, open_timeout=30))
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self._stack.close()

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile are kept."""
        ident = next(self.ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + 60
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for an event (it may already have arrived)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {method} event within {timeout}s")
            with contextlib.suppress(TimeoutError):
                self.events.append(json.loads(self.ws.recv(timeout=remaining)))

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late console messages, font loads)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=remaining)))
            except TimeoutError:
                return


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevTools]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        import websockets.sync.client  # noqa: F401
    except ImportError:
        _missing("the 'websockets' package is not installed (dev extra)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    # stderr to a file, not a pipe: an unread pipe that fills up would stall the browser.
    log_path = tmp_path_factory.mktemp("chromium-log") / "stderr.txt"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
        if process.poll() is not None:
            log.close()
            err = log_path.read_text(errors="replace")
            pytest.fail(f"chromium exited with {process.returncode}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("chromium did not open its DevTools port within 60s")
        time.sleep(0.1)
    port, path = port_file.read_text().splitlines()[:2]
    client = DevTools(f"ws://127.0.0.1:{port}{path}")
    try:
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def _problems(events: list[dict[str, Any]], origin: str) -> list[str]:
    """Console errors, uncaught exceptions, failed and off-site requests among the events."""
    found: list[str] = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            found.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in {"error", "assert"}:
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            found.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(
                f"log error ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}"
            )
        elif method == "Network.responseReceived":
            response = params.get("response", {})
            if response.get("status", 200) >= 400:
                found.append(f"HTTP {response['status']}: {response.get('url')}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            found.append(f"request failed: {params.get('errorText')}")
        elif method == "Network.requestWillBeSent":
            url = params.get("request", {}).get("url", "")
            if not url.startswith((origin, "data:", "blob:", "about:")):
                found.append(f"request leaves the site (must render offline): {url}")
    return found


def _open(browser: DevTools, url: str) -> tuple[str, str, list[dict[str, Any]]]:
    """Open ``url`` in a new tab; returns (target id, session id, the events list)."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.call(f"{domain}.enable", session)
    browser.events.clear()
    browser.call("Page.navigate", session, url=url)
    browser.wait_for("Page.loadEventFired")
    return target, session, browser.events


def _eval(browser: DevTools, session: str, expression: str) -> Any:
    result = browser.call(
        "Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True
    )
    if "exceptionDetails" in result:
        raise AssertionError(f"{expression!r} raised {result['exceptionDetails']}")
    return result["result"].get("value")


@pytest.mark.parametrize("page", list(PAGES))
def test_docs_page_loads_in_chromium_without_console_errors(
    page: str, base_url: str, browser: DevTools
) -> None:
    """Home, a concept page, an API page and a tutorial load with no console error and
    no request leaving 127.0.0.1; maths is typeset by KaTeX with its bundled fonts, and
    every image of the page (the build's figures) loads and decodes."""
    path, selector = PAGES[page]
    target, session, events = _open(browser, base_url + path)
    try:
        # Let deferred scripts (instant navigation, KaTeX auto-render, search worker) run.
        _eval(browser, session, "document.fonts.ready.then(() => true)")
        browser.drain(1.0)
        title = _eval(browser, session, "document.title")
        assert "diffkit" in title, f"{path}: unexpected title {title!r}"
        if selector is not None:
            count = _eval(browser, session, f"document.querySelectorAll('{selector}').length")
            assert count > 0, f"{path}: no '{selector}' element rendered"
        if selector == ".katex":
            unrendered = _eval(
                browser,
                session,
                "[...document.querySelectorAll('.arithmatex')]"
                ".filter(e => !e.querySelector('.katex')).length",
            )
            assert unrendered == 0, f"{path}: {unrendered} maths elements were not typeset"
            errors = _eval(browser, session, "document.querySelectorAll('.katex-error').length")
            assert errors == 0, f"{path}: {errors} KaTeX parse errors"
            fonts = _eval(
                browser,
                session,
                "[...document.fonts].filter(f => f.family.includes('KaTeX')"
                " && f.status === 'loaded').length",
            )
            assert fonts > 0, f"{path}: no bundled KaTeX font was loaded"
        broken = _eval(
            browser,
            session,
            "Promise.all([...document.images].map(i => i.decode().then("
            "() => i.naturalWidth > 0 ? null : i.src, () => i.src)))"
            ".then(r => r.filter(Boolean))",
        )
        assert not broken, f"{path}: images that did not load: {broken}"
        problems = _problems(events, base_url.rstrip("/"))
        assert not problems, f"{path}:\n" + "\n".join(problems)
    finally:
        browser.call("Target.closeTarget", targetId=target)
