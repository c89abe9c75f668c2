"""A real headless Chromium for the viewer tests, driven over the DevTools protocol (CDP).

`browser` (a pytest fixture) starts Debian's `chromium` (or $QGMIL_CHROMIUM) with `--remote-debugging-pipe`:
CDP's JSON messages go over two pipes (fds 3 and 4, NUL-terminated), so no websocket library and no port
are needed. `Browser.open(url)` gives a `Page`: evaluate JavaScript, wait for a condition, take screenshots,
and read every request the page made (CDP Network events, failed ones included).

Without a browser the tests that use the fixture skip, saying why; with QGMIL_REQUIRE_BROWSER=1 (CI, whose
`.ci/run` installs chromium) they fail instead. QGMIL_BROWSER=0 skips them on purpose.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    for name in (os.environ.get("QGMIL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


_WIRE = """import os, sys
a, b = int(sys.argv[1]), int(sys.argv[2])
os.dup2(a, 3)
os.dup2(b, 4)
os.close(a)
os.close(b)
os.execv(sys.argv[3], sys.argv[3:])
"""


def _moved_up(fd: int) -> int:
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium process; `open` makes a page (a target with its own CDP session)."""

    def __init__(self, executable: str, *, width: int = 1400, height: int = 900):
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="qgmil-chromium-")
        to_browser, self._to_browser = os.pipe()  # chromium reads commands on its fd 3
        self._from_browser, from_browser = os.pipe()  # and writes replies and events on its fd 4
        # the child's ends moved to fds >= 10, so that putting one on 3 or 4 cannot clobber the other
        to_browser, from_browser = _moved_up(to_browser), _moved_up(from_browser)
        args = [executable, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--mute-audio", f"--window-size={width},{height}"]
        if os.geteuid() == 0:  # chromium's sandbox refuses to run as root (CI)
            args.append("--no-sandbox")
        # a small Python puts the pipes on the fds chromium expects, then becomes chromium (subprocess can only
        # place stdin/out/err; dash's redirections stop at fd 9)
        self.log = Path(self.profile) / "chromium.log"  # a file, not a pipe: a full pipe would block chromium
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-c", _WIRE, str(to_browser), str(from_browser),
                                             *args, "about:blank"],
                                            pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        try:
            self.version = self.call("Browser.getVersion")["product"]
        except BaseException:  # did not start: leave no process and no profile behind
            self.close()
            raise

    # --- the protocol -------------------------------------------------------------------------------

    def _read_message(self, timeout: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_browser], [], [], timeout)
            if not ready:
                raise BrowserError(f"no message from chromium in {timeout:g} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                said = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
                raise BrowserError(f"chromium closed the pipe: {said}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, *, session: str | None = None, timeout: float = 30):
        self._next_id += 1
        ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(max(0.01, deadline - time.monotonic()))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def events(self, session: str, method: str | None = None) -> list[dict]:
        """The events of a session so far (after draining what the pipe holds)."""
        try:
            while True:
                self._events.append(self._read_message(0.05))
        except BrowserError:
            pass
        return [e for e in self._events if e.get("sessionId") == session and (method is None or e["method"] == method)]

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, target, session)
        page.call("Network.enable")
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        page.call("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (BrowserError, OSError):
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session

    def call(self, method: str, params: dict | None = None, **kw):
        return self.browser.call(method, params, session=self.session, **kw)

    def evaluate(self, expression: str, *, timeout: float = 30):
        """The value of a JavaScript expression (promises awaited); a JS exception is raised here."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           timeout=timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 20, what: str | None = None):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout:g} s waiting for {what or expression}")
            time.sleep(0.05)

    def screenshot(self, path: Path | None = None):
        """The viewport as an (H, W, 3) uint8 array (and a PNG at `path`)."""
        import io

        import numpy as np
        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        if path is not None:
            Path(path).write_bytes(data)
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    def requests(self) -> list[str]:
        """Every URL the page asked for so far (CDP Network.requestWillBeSent), failed ones included."""
        return [e["params"]["request"]["url"] for e in self.browser.events(self.session, "Network.requestWillBeSent")]

    def failed_requests(self) -> list[str]:
        failed = {e["params"]["requestId"] for e in self.browser.events(self.session, "Network.loadingFailed")}
        sent = self.browser.events(self.session, "Network.requestWillBeSent")
        return [e["params"]["request"]["url"] for e in sent if e["params"]["requestId"] in failed]

    def console_errors(self) -> list[str]:
        out = []
        for e in self.browser.events(self.session, "Runtime.exceptionThrown"):
            out.append(e["params"]["exceptionDetails"].get("exception", {}).get("description", str(e["params"])))
        for e in self.browser.events(self.session, "Runtime.consoleAPICalled"):
            if e["params"]["type"] == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"]))
        return out

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})


def _unavailable(reason: str):
    if os.environ.get("QGMIL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"a headless browser is required (QGMIL_REQUIRE_BROWSER=1) but unavailable: {reason}")
    pytest.skip(f"no headless browser: {reason}")


@pytest.fixture(scope="session")
def browser():
    if os.environ.get("QGMIL_BROWSER") == "0":
        pytest.skip("QGMIL_BROWSER=0: browser tests skipped on purpose")
    executable = find_chromium()
    if executable is None:
        _unavailable("no chromium on PATH (Debian: apt-get install chromium; or set QGMIL_CHROMIUM)")
    try:
        instance = Browser(executable)
    except (BrowserError, OSError) as err:
        _unavailable(f"{executable} does not start headless: {err}")
    yield instance
    instance.close()
