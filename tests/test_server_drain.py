"""SIGTERM drain of a real `microturn serve` process: not ready, new sessions refused, go_away, clean exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import websockets

STARTUP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_sigterm_drains_live_sessions():
    port = _free_port()
    env = {**os.environ, "MICROTURN_DRAIN_TIMEOUT_S": "20", "MICROTURN_MAX_SESSIONS": "2"}
    cmd = [sys.executable, "-m", "microturn.cli", "serve", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/realtime"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
        async with websockets.connect(url, max_queue=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            proc.send_signal(signal.SIGTERM)
            go_away = None
            while go_away is None:
                message = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(message, str) and json.loads(message)["type"] == "session.go_away":
                    go_away = json.loads(message)
            assert 0 < go_away["time_left_ms"] <= 20_000
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{base}/readyz")).status_code == 503
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(url):
                    pass
            assert refused.value.response.status_code == 503
            assert proc.poll() is None  # the live session is still being served
        assert proc.wait(timeout=15) == 0  # the last session left: the server exits at once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        output = proc.stdout.read() if proc.stdout else ""
    assert "demo page http://" in output
