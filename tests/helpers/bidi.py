"""Headless Firefox (Debian's firefox-esr) driven over its built-in WebDriver BiDi, no geckodriver.

Firefox starts with `--remote-debugging-port 0 --headless` on a fresh profile whose user.js holds the
prefs: fake media devices without a permission prompt, audio allowed to start without a gesture, and
no updates, telemetry or other traffic beyond loopback (every other host goes to a dead loopback
proxy). It prints the BiDi address on stderr; `Firefox` connects there with a synchronous websocket,
opens a session and works one browsing context: navigate, evaluate, wait for a condition, click (a real
pointer click through input.performActions, so the page gets a user gesture). Uncaught page
exceptions and console errors (log.entryAdded) are gathered in `problems`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import websockets.sync.client

FIREFOX = Path("/usr/bin/firefox-esr")
START_TIMEOUT_S = 60.0  # a cold first start on a slow 2-core VM
COMMAND_TIMEOUT_S = 30.0
DEAD_PROXY_PORT = 9  # discard: nothing listens there, so a request for another host fails at once

PREFS: dict[str, object] = {
    # fake microphone and camera, no permission prompt
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    # audio (and Web Audio) may start without a user gesture
    "media.autoplay.default": 0,
    "media.autoplay.blocking_policy": 0,
    "media.autoplay.block-webaudio": False,
    # no first-run pages, updates, telemetry, safe browsing, remote settings or other traffic
    "app.update.auto": False,
    "app.update.enabled": False,
    "app.update.checkInstallTime": False,
    "app.normandy.enabled": False,
    "app.shield.optoutstudies.enabled": False,
    "browser.aboutwelcome.enabled": False,
    "browser.discovery.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.ping-centre.telemetry": False,
    "browser.region.update.enabled": False,
    "browser.region.network.url": "",
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    "browser.search.update": False,
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.page": 0,
    "browser.tabs.warnOnClose": False,
    "captivedetect.canonicalURL": "",
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.update.enabled": False,
    "extensions.blocklist.enabled": False,
    "geo.provider.network.url": "",
    "media.gmp-manager.url": "",
    "media.gmp-gmpopenh264.enabled": False,
    "media.gmp-widevinecdm.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.predictor.enabled": False,
    "network.trr.mode": 5,
    "services.settings.server": "",
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.server": "",
    "toolkit.telemetry.archive.enabled": False,
    # any host but loopback goes to a proxy that is not there (loopback is never proxied)
    "network.proxy.type": 1,
    "network.proxy.http": "127.0.0.1",
    "network.proxy.http_port": DEAD_PROXY_PORT,
    "network.proxy.ssl": "127.0.0.1",
    "network.proxy.ssl_port": DEAD_PROXY_PORT,
    "network.proxy.socks_remote_dns": True,
    "network.proxy.allow_hijacking_localhost": False,
}


class BidiError(RuntimeError):
    """A BiDi command answered with an error, or a wait ran out."""


def write_profile(path: Path, prefs: dict[str, object]) -> None:
    lines = [f"user_pref({json.dumps(k)}, {json.dumps(v)});" for k, v in prefs.items()]
    (path / "user.js").write_text("\n".join(lines) + "\n")


class Firefox:
    """One headless Firefox and one BiDi session on its first tab. Use as a context manager."""

    def __init__(self, prefs: dict[str, object] | None = None, executable: Path = FIREFOX) -> None:
        self.prefs = {**PREFS, **(prefs or {})}
        self.executable = executable
        self.problems: list[str] = []
        self.log: list[dict] = []
        self._ids = itertools.count(1)
        self._profile: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self._ws = None
        self._stderr: list[str] = []
        self.context: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> Firefox:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="microturn-firefox-")
        profile = Path(self._profile.name)
        write_profile(profile, self.prefs)
        env = {**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1", "MOZ_DISABLE_AUTO_SAFE_MODE": "1"}
        self._proc = subprocess.Popen(
            [str(self.executable), "--headless", "--no-remote", "--profile", str(profile),
             "--remote-debugging-port", "0", "--remote-allow-hosts", "127.0.0.1", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        address: list[str] = []
        found = threading.Event()

        def read_stderr() -> None:
            for line in self._proc.stderr:
                self._stderr.append(line.rstrip())
                m = re.search(r"WebDriver BiDi listening on (ws://\S+)", line)
                if m and not address:
                    address.append(m.group(1))
                    found.set()
            found.set()

        threading.Thread(target=read_stderr, daemon=True).start()
        if not found.wait(START_TIMEOUT_S) or not address:
            raise BidiError("firefox did not open its BiDi port:\n" + "\n".join(self._stderr[-20:]))
        self._ws = websockets.sync.client.connect(
            address[0].rstrip("/") + "/session", open_timeout=COMMAND_TIMEOUT_S, max_size=None
        )
        self.command("session.new", {"capabilities": {"alwaysMatch": {"acceptInsecureCerts": False}}})
        self.command("session.subscribe", {"events": ["log.entryAdded"]})
        tree = self.command("browsingContext.getTree", {"maxDepth": 0})
        self.context = tree["contexts"][0]["context"]

    def close(self) -> None:
        if self._ws is not None:
            try:
                self.command("session.end", {}, timeout=5)
            except Exception:
                pass
            self._ws.close()
            self._ws = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(15)
            self._proc = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    # -- protocol ------------------------------------------------------------------------------

    def command(self, method: str, params: dict, timeout: float = COMMAND_TIMEOUT_S) -> dict:
        """Send one command and return its result; events that arrive meanwhile are recorded."""
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BidiError(f"{method}: no answer in {timeout:.0f} s")
            try:
                message = json.loads(self._ws.recv(timeout=left))
            except TimeoutError:
                continue
            if message.get("type") == "event":
                self._event(message)
            elif message.get("id") == ident:
                if message.get("type") == "error":
                    raise BidiError(f"{method}: {message.get('error')}: {message.get('message')}")
                return message["result"]

    def _event(self, message: dict) -> None:
        if message.get("method") != "log.entryAdded":
            return
        entry = message["params"]
        self.log.append(entry)
        if entry.get("level") == "error":
            self.problems.append(f"{entry.get('type')}: {entry.get('text')}")

    # -- page ----------------------------------------------------------------------------------

    def goto(self, url: str) -> None:
        self.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT_S):
        """The value of a JavaScript expression in the page (promises are awaited), as plain Python."""
        result = self.command(
            "script.evaluate",
            {"expression": expression, "target": {"context": self.context}, "awaitPromise": True,
             "resultOwnership": "none"},
            timeout=timeout,
        )
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise BidiError(f"{expression!r} threw: {details.get('text')}")
        return deserialize(result["result"])

    def wait_for(self, expression: str, timeout: float, poll: float = 0.1) -> None:
        """Until the expression is truthy in the page, or BidiError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise BidiError(f"{expression!r} still false after {timeout:.0f} s")
            time.sleep(poll)

    def text(self, selector: str) -> str:
        return self.evaluate(f"document.querySelector({json.dumps(selector)}).innerText")

    def fill(self, selector: str, value: str) -> None:
        self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.value = "
                      f"{json.dumps(value)}; el.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")

    def click(self, selector: str) -> None:
        """A real left click in the middle of the element (a user gesture, as a person's click is)."""
        found = self.command(
            "script.evaluate",
            {"expression": f"document.querySelector({json.dumps(selector)})", "awaitPromise": False,
             "target": {"context": self.context}, "resultOwnership": "root"},
        )
        node = found["result"]
        if node.get("type") != "node":
            raise BidiError(f"no element matches {selector!r}")
        # as a person scrolls to what they click: the pointer moves only inside the viewport
        self.evaluate(f"document.querySelector({json.dumps(selector)}).scrollIntoView({{block: 'center'}})")
        origin = {"type": "element", "element": {"sharedId": node["sharedId"]}}
        self.command("input.performActions", {"context": self.context, "actions": [{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                        {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}],
        }]})
        self.command("input.releaseActions", {"context": self.context})

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.command("browsingContext.captureScreenshot", {"context": self.context})["data"]
        path.write_bytes(base64.b64decode(data))


def deserialize(value: dict):
    """A BiDi RemoteValue as plain Python (objects and arrays recursively; other kinds as their type)."""
    kind = value.get("type")
    if kind in ("undefined", "null"):
        return None
    if kind in ("string", "boolean"):
        return value["value"]
    if kind == "number":
        v = value["value"]
        return float(v) if isinstance(v, str) else v  # "NaN", "Infinity", "-0"
    if kind == "array":
        return [deserialize(v) for v in value.get("value", [])]
    if kind == "object":
        items = value.get("value", [])
        return {k if isinstance(k, str) else str(deserialize(k)): deserialize(v) for k, v in items}
    return f"<{kind}>"
