"""A page as a person sees it: an HTML file opened in headless Chromium, checked, and photographed.

:func:`inspect_page` returns what the browser saw (every image decoded, the causal tree drawn and the size of
its smallest node label on screen, console errors) and can save a screenshot; :func:`problems` lists what a
reader would notice is wrong. ``tests/test_report_browser.py`` checks the demo's ``report.html`` with them, and
``benchmarks/report_screenshot.py`` photographs it.

The browser is Debian's ``chromium`` (``make setup`` installs it when missing), driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``): no Python package beyond the standard library.
"""

from __future__ import annotations

import base64
import json
import math
import os
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MISSING = (
    "Chromium not found (looked for {names} on PATH): install it with 'make setup' or, as root, "
    "'apt-get install -y chromium' (Debian)"
)
MIN_LABEL_PX = 10.0  # the smallest node label a reader can still read, in CSS pixels at 100% zoom

# Evaluated in the page once it has loaded: what a reader would see, as plain JSON.
_CHECKS = """
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const box = r => ({width: r.width, height: r.height});
  const svgs = [...document.querySelectorAll('svg')].map(svg => {
    const r = svg.getBoundingClientRect(), vb = svg.viewBox.baseVal;
    const scale = vb && vb.width ? r.width / vb.width : 1;
    const sizes = [...svg.querySelectorAll('g.node text')].map(t => parseFloat(t.getAttribute('font-size')
      || getComputedStyle(t).fontSize) * scale);
    const container = svg.parentElement;
    return {...box(r), nodes: svg.querySelectorAll('g.node').length, edges: svg.querySelectorAll('g.edge').length,
            drawn_nodes: [...svg.querySelectorAll('g.node')].filter(g => {
              const b = g.getBoundingClientRect(); return b.width > 0 && b.height > 0; }).length,
            min_label_px: sizes.length ? Math.min(...sizes) : null,
            container_width: container.clientWidth, container_scroll_width: container.scrollWidth,
            container_overflow_x: getComputedStyle(container).overflowX};
  });
  return {
    title: document.title,
    h2: [...document.querySelectorAll('h2')].map(h => h.textContent),
    images: imgs.map(i => ({alt: i.alt, complete: i.complete, natural_width: i.naturalWidth,
                            natural_height: i.naturalHeight, ...box(i.getBoundingClientRect())})),
    svgs: svgs,
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
    page_width: document.documentElement.scrollWidth,
    viewport_width: window.innerWidth,
    text: document.body.innerText,
  };
})()
"""


def find_chromium() -> str:
    """The Chromium binary, or a :class:`FileNotFoundError` saying how to install it."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(MISSING.format(names=", ".join(BROWSERS)))


class _Browser:
    """Headless Chromium over ``--remote-debugging-pipe``: NUL-separated JSON, commands on fd 3, replies on fd 4."""

    def __init__(self, width: int, height: int, timeout: float) -> None:
        self.timeout, self.events, self._id, self._buf = timeout, [], 0, b""
        self.profile = tempfile.TemporaryDirectory(prefix="circuitsae-chromium-")
        self.log = open(Path(self.profile.name) / "stderr.log", "wb")  # closed in close()
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()
        args = [
            find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--mute-audio", f"--window-size={width},{height}",
            "--force-device-scale-factor=1", "about:blank",
        ]  # fmt: skip
        actions = [
            (os.POSIX_SPAWN_DUP2, cmd_r, 3),
            (os.POSIX_SPAWN_DUP2, out_w, 4),
            (os.POSIX_SPAWN_DUP2, self.log.fileno(), 1),
            (os.POSIX_SPAWN_DUP2, self.log.fileno(), 2),
        ]
        self.pid = os.posix_spawn(args[0], args, os.environ, file_actions=actions, setsid=True)
        os.close(cmd_r)
        os.close(out_w)
        self._w, self._r = cmd_w, out_r

    def send(self, method: str, params: "dict | None" = None, session: "str | None" = None) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._next()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"Chromium: {method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, since: int) -> dict:
        while True:
            for e in self.events[since:]:
                if e.get("method") == method:
                    return e
            self.events.append(self._next())

    def _next(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout:.0f} s ({self.stderr()[-500:]})")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.stderr()[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def stderr(self) -> str:
        self.log.flush()
        return (Path(self.profile.name) / "stderr.log").read_text(errors="replace")

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        if not self._reaped(5.0):
            for sig in (signal.SIGTERM, signal.SIGKILL):  # its own process group: the browser and its helpers
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    break
                if self._reaped(5.0):
                    break
        os.close(self._w)
        os.close(self._r)
        self.log.close()
        self.profile.cleanup()

    def _reaped(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return True
            time.sleep(0.05)
        return False


def _errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads the page produced."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(
                "console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("uncaught: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
    return out


def inspect_page(html_path: "str | Path", png: "str | Path | None" = None, width: int = 1280, height: int = 900,
                 script: "str | None" = None, timeout: float = 60.0) -> dict:  # fmt: skip
    """Open ``html_path`` in headless Chromium at ``width`` CSS pixels; return what the page shows.

    Keys: ``images`` (each with ``natural_width``: 0 if it did not decode), ``svgs`` (rendered size, ``nodes``,
    ``drawn_nodes``, ``min_label_px``: the smallest node label on screen, in CSS px), ``errors`` (console
    errors, uncaught exceptions, failed loads), ``page_width`` vs ``viewport_width``, ``h2``, ``links``, ``text``.
    With ``png``, also writes a screenshot of the whole page (``width`` wide) there. ``script``, a JavaScript
    expression evaluated after the checks and the screenshot (e.g. clicking a button), puts its JSON value
    under ``script``; errors it causes are in ``errors`` too.
    """
    uri = Path(html_path).resolve().as_uri()
    b = _Browser(width, height, timeout)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            b.send(method, session=session)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        b.send("Emulation.setDeviceMetricsOverride", metrics, session)
        since = len(b.events)
        nav = b.send("Page.navigate", {"url": uri}, session)
        if nav.get("errorText"):
            raise RuntimeError(f"Chromium could not open {uri}: {nav['errorText']}")
        b.wait_event("Page.loadEventFired", since)
        res = b.send("Runtime.evaluate", {"expression": _CHECKS, "awaitPromise": True, "returnByValue": True},
                     session)  # fmt: skip
        if "exceptionDetails" in res:
            raise RuntimeError(f"the page checks failed: {res['exceptionDetails']}")
        seen, failed = res["result"]["value"], []
        if png is not None:
            size = b.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": width, "height": math.ceil(size["height"]), "scale": 1}
            shot = b.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                          session)  # fmt: skip
            Path(png).parent.mkdir(parents=True, exist_ok=True)
            Path(png).write_bytes(base64.b64decode(shot["data"]))
            seen["screenshot"] = str(png)
        if script is not None:
            res = b.send("Runtime.evaluate", {"expression": script, "awaitPromise": True, "returnByValue": True},
                         session)  # fmt: skip
            seen["script"] = res.get("result", {}).get("value")
            if "exceptionDetails" in res:
                d = res["exceptionDetails"]
                failed.append("script: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        time.sleep(0.2)  # late console messages
        b.send("Runtime.evaluate", {"expression": "0"}, session)
        seen["errors"] = _errors(b.events) + failed
    finally:
        b.close()
    return seen


def problems(seen: dict, min_label_px: float = MIN_LABEL_PX) -> list[str]:
    """What a reader would notice in :func:`inspect_page`'s answer, one sentence each (empty: nothing)."""
    out = [f"image {i['alt']!r} did not decode" for i in seen["images"] if not i["natural_width"]]
    out += [f"image {i['alt']!r} is not shown (0 px)" for i in seen["images"] if i["natural_width"] and not i["width"]]
    for s in seen["svgs"]:
        if not (s["width"] > 0 and s["height"] > 0 and s["nodes"] > 0 and s["drawn_nodes"] == s["nodes"]):
            out.append(f"the SVG diagram is not drawn ({s['width']:.0f}x{s['height']:.0f} px, "
                       f"{s['drawn_nodes']} of {s['nodes']} nodes)")  # fmt: skip
        if s["min_label_px"] is not None and s["min_label_px"] < min_label_px:
            out.append(f"the SVG diagram's node labels are {s['min_label_px']:.1f} px high on screen "
                       f"(under {min_label_px:g} px: unreadable)")  # fmt: skip
        if s["width"] > s["container_width"] + 1 and s["container_overflow_x"] not in ("auto", "scroll"):
            out.append("the SVG diagram is wider than its box and cannot be scrolled to")
    if seen["page_width"] > seen["viewport_width"] + 1:
        out.append(f"the page is {seen['page_width']} px wide in a {seen['viewport_width']} px window")
    out += [f"error: {e}" for e in seen["errors"]]
    return out
