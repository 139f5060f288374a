"""A measured drain: replicas behind a real HAProxy, one SIGTERMed, its sessions moving to the others.

`python -m microturn.benchmarks.drain [--sessions 6 --replicas 2]` starts the replicas
(`microturn serve` processes sharing one `MICROTURN_RESUME_KEYS`), renders
deploy/haproxy.cfg.template for them on free loopback ports and starts HAProxy. Every
session connects through the balancer (`?resumable=1&audio=binary`), types a question and
waits for its answer; then the replica holding the first session is SIGTERMed. Each of its
sessions waits for `session.go_away`, reconnects through the balancer with the newest handle
it got, and closes its old socket once the new one speaks; it then retrieves the item it typed
before the move and types a new question. The other replicas' sessions are watched all along
for anything they might notice (an error, a go_away, a close, a gap in their output seq).

Prints a table, then one JSON object last: `sessions`, `moved`, `lost`, `go_away_to_audio_ms`
p50/p95 (go_away received -> the first output micro-turn on the new replica), `answered_after_move`,
`retrieved_before_move`, `bystanders_noticed`, `victim_exit`. tests/test_replicas_haproxy.py
runs the same scenario and checks it. This module knows nothing about the server's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import httpx
import numpy as np
import websockets

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "haproxy.cfg.template"
DEMO_CHECKPOINT = ROOT / "checkpoints" / "tiny-demo"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
MICROTURN = [sys.executable, "-c", "import sys; from microturn.cli import main; sys.exit(main(sys.argv[1:]))"]
READY_TIMEOUT_S = 180.0  # a replica's engine process loads and warms up
BALANCER_TIMEOUT_S = 10.0  # HAProxy up and every replica's health check passed
TURN_TIMEOUT_S = 30.0  # a typed question until its response.done
MOVE_TIMEOUT_S = 20.0  # go_away until the session speaks on its new replica
RETRY_S = 0.1  # between reconnect attempts that found no replica ready
DRAIN_TIMEOUT_S = 20  # the victim's MICROTURN_DRAIN_TIMEOUT_S
CHECK_INTER = "300ms"  # health-check period in the test's rendering (production: 2s)
QUESTION = "Hi!"  # what the demo checkpoint answers (it was trained on greetings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# docker/compose.yaml's scale-out profile: up to 8 replicas of the `replica` service, found by Docker's DNS
# (`docker compose --profile scale up --scale replica=N`); docker/haproxy.cfg is this rendering
COMPOSE_SERVERS = """    server-template replica 1-8 replica:8000 check resolvers docker init-addr none

resolvers docker
    nameserver dns 127.0.0.11:53
    hold valid 5s"""
COMPOSE_HAPROXY = ROOT / "docker" / "haproxy.cfg"
COMPOSE_HEADER = ("# Generated from deploy/haproxy.cfg.template (edit that, then run\n"
                  "# `python -m microturn.benchmarks.drain --write-compose-config`).\n")


def server_lines(servers: list[tuple[str, str]]) -> str:
    """HAProxy `server` lines for (name, host:port) pairs."""
    return "\n".join(f"    server {name} {address} check" for name, address in servers)


def compose_haproxy() -> str:
    return COMPOSE_HEADER + render_haproxy(COMPOSE_SERVERS, "*:8000")


def render_haproxy(servers: str, bind: str, check_inter: str = "2s", check_fastinter: str = "500ms",
                   maxconn: int = 4_000, server_maxconn: int = 256) -> str:
    """deploy/haproxy.cfg.template with `servers` (its backend's server lines) listening on `bind`;
    `maxconn` is bounded by the file descriptors HAProxy may open (twice the sockets, plus checks)."""
    return Template(TEMPLATE.read_text()).substitute(
        bind=bind, servers=servers, check_inter=check_inter, check_fastinter=check_fastinter, maxconn=maxconn,
        server_maxconn=server_maxconn)


class Replica:
    """`microturn serve` on a free loopback port, named `name`, sharing `resume_key`."""

    def __init__(self, name: str, resume_key: str, max_sessions: int, log_dir: Path) -> None:
        self.name, self.port = name, free_port()
        env = {**os.environ, "MICROTURN_REPLICA_NAME": name, "MICROTURN_RESUME_KEYS": resume_key,
               "MICROTURN_MAX_SESSIONS": str(max_sessions), "MICROTURN_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
               "MICROTURN_CHECKPOINT": str(DEMO_CHECKPOINT), "MICROTURN_BACKGROUND_TEXT_IN": "result",
               "MICROTURN_ENGINE_THREADS": "1"}
        self.log = (log_dir / f"{name}.log").open("w")
        cmd = [*MICROTURN, "serve", "--port", str(self.port), "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient() as http:
            while True:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"replica {self.name} did not come up (see {self.log.name})")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://{self.address}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Balancer:
    """HAProxy in the foreground on a free port, configured from the template for `replicas`."""

    def __init__(self, replicas: list[Replica], log_dir: Path) -> None:
        self.port = free_port()
        servers = server_lines([(r.name, r.address) for r in replicas])
        config = render_haproxy(servers, f"127.0.0.1:{self.port}", check_inter=CHECK_INTER,
                                check_fastinter=CHECK_INTER)
        self.config = log_dir / "haproxy.cfg"
        self.config.write_text(config)
        self.log = (log_dir / "haproxy.log").open("w")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def ready(self, replicas: int) -> None:
        """Every replica's health check passed: /readyz through the balancer named each of them."""
        seen: set[str] = set()
        deadline = time.monotonic() + BALANCER_TIMEOUT_S
        async with httpx.AsyncClient() as http:
            while len(seen) < replicas:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not route to every replica (saw {sorted(seen)})")
                with contextlib.suppress(httpx.TransportError):
                    response = await http.get(f"http://127.0.0.1:{self.port}/readyz")
                    if response.status_code == 200:
                        seen.add(response.headers["x-microturn-replica"])
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


class Link:
    """One WebSocket of a session: every event and output frame it received, read as they come."""

    def __init__(self, ws: websockets.ClientConnection, created: dict) -> None:
        self.ws = ws
        self.created = created
        self.replica = created["session"]["replica"]
        self.header_replica = ws.response.headers.get("x-microturn-replica")
        self.handle = created.get("resumption", {}).get("handle")
        self.events: list[dict] = []
        self.seqs: list[int] = []
        self.arrivals: list[float] = []  # of each output frame
        self.first_frame_at: float | None = None
        self.go_away = asyncio.Event()
        self.go_away_at = 0.0
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.seqs.append(int.from_bytes(message[2:6], "big"))
                    self.arrivals.append(time.monotonic())
                    self.first_frame_at = self.first_frame_at or time.monotonic()
                    continue
                event = json.loads(message)
                self.events.append(event)
                if event["type"] == "session.resumption_update":
                    self.handle = event["handle"]
                elif event["type"] == "session.go_away":
                    self.go_away_at = time.monotonic()
                    self.go_away.set()
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        self._changed.set()

    async def send(self, **event: object) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, kind: str, timeout: float, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = next((e for e in self.events[since:] if e["type"] == kind), None)
            if found is not None:
                return found
            if self._reader.done() or time.monotonic() > deadline:
                raise TimeoutError(f"no {kind} on {self.replica}: {[e['type'] for e in self.events[-5:]]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())

    async def ask(self, text: str, item_id: str | None = None) -> dict:
        """Type `text`; its response.done."""
        since = len(self.events)
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        if item_id is not None:
            item["id"] = item_id
        await self.send(type="conversation.item.create", item=item)
        return await self.until("response.done", TURN_TIMEOUT_S, since)

    def noticed(self) -> list[str]:
        """What a session that should notice nothing noticed: errors, go_away, closes, output seq gaps."""
        seen = [f"{e['type']}:{e.get('error', {}).get('code', '')}" for e in self.events
                if e["type"] in ("error", "session.go_away")]
        gaps = sum(b - a - 1 for a, b in itertools.pairwise(self.seqs) if b != a + 1)
        return seen + ([f"seq_gaps:{gaps}"] if gaps else []) + (["closed"] if self._reader.done() else [])

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def connect(url: str, query: str, deadline_s: float) -> Link:
    """Connect through the balancer, retrying while it finds no ready replica (503, busy, draining)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            ws = await websockets.connect(f"{url}?{query}", max_queue=None, max_size=2**24)
            created = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if created["type"] == "session.created":
                return Link(ws, created)
            await ws.close()
            if not created["error"]["code"].startswith(("server_", "engine_")):
                raise RuntimeError(f"refused: {created['error']}")
        except (websockets.InvalidStatus, OSError, websockets.ConnectionClosed):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no replica took {query[:40]}...")
        await asyncio.sleep(RETRY_S)


@dataclass
class Moved:
    index: int
    ok: bool = False
    go_away_to_audio_ms: float | None = None
    go_away_to_created_ms: float | None = None  # the handshake part of it
    resumed_on: str | None = None
    same_session: bool = False
    retrieved_before: bool = False
    answered_after: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)


async def move(index: int, link: Link, url: str) -> tuple[Moved, Link | None]:
    """Wait for go_away, resume through the balancer, close the old socket once the new one speaks."""
    result = Moved(index)
    try:
        await asyncio.wait_for(link.go_away.wait(), MOVE_TIMEOUT_S)
        new = await connect(url, f"audio=binary&resume_handle={link.handle}", MOVE_TIMEOUT_S)
        result.go_away_to_created_ms = round((time.monotonic() - link.go_away_at) * 1000, 1)
        while new.first_frame_at is None:
            if time.monotonic() - link.go_away_at > MOVE_TIMEOUT_S:
                raise TimeoutError("the resumed session sent no audio")
            await asyncio.sleep(0.005)
        result.go_away_to_audio_ms = round((new.first_frame_at - link.go_away_at) * 1000, 1)
        await link.close()
        result.resumed_on = new.replica
        result.same_session = new.created["session"]["id"] == link.created["session"]["id"]
        since = len(new.events)
        await new.send(type="conversation.item.retrieve", item_id=f"before_{index}")
        retrieved = await new.until("conversation.item.retrieved", 10, since)
        result.retrieved_before = retrieved["item"]["content"][0]["text"] == QUESTION
        done = await new.ask(QUESTION)
        result.answered_after = done["response"]["status"] == "completed" and bool(done["response"]["output"])
        result.ok = True
        return result, new
    except (TimeoutError, RuntimeError, KeyError, IndexError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result, None


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def run(sessions: int, replicas: int, log_dir: Path) -> dict:
    """The scenario; its summary (the JSON line)."""
    key = secrets.token_urlsafe(32)
    fleet = [Replica(f"replica-{chr(97 + i)}", key, sessions + 2, log_dir) for i in range(replicas)]
    balancer: Balancer | None = None
    links: list[Link] = []
    try:
        await asyncio.gather(*(r.ready() for r in fleet))
        balancer = Balancer(fleet, log_dir)
        await balancer.ready(replicas)
        for _ in range(sessions):  # one after another: leastconn spreads them
            links.append(await connect(balancer.url, "resumable=1&audio=binary", 10))
        await asyncio.gather(*(link.ask(QUESTION, f"before_{i}") for i, link in enumerate(links)))
        victim = next(r for r in fleet if r.name == links[0].replica)
        moving = [i for i, link in enumerate(links) if link.replica == victim.name]
        staying = [i for i, link in enumerate(links) if link.replica != victim.name]
        watched_from = {i: len(links[i].seqs) for i in staying}
        started = time.monotonic()
        victim.proc.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*(move(i, links[i], balancer.url) for i in moving))
        moved_s = time.monotonic() - started
        victim_exit = await asyncio.to_thread(victim.proc.wait, DRAIN_TIMEOUT_S + 10)
        before = [b - a for i in staying for a, b in itertools.pairwise(links[i].arrivals[:watched_from[i]])]
        for i in staying:  # from just before the SIGTERM: what the drain could have disturbed
            links[i].seqs = links[i].seqs[max(0, watched_from[i] - 1):]
            links[i].arrivals = links[i].arrivals[max(0, watched_from[i] - 1):]
        bystanders = {i: links[i].noticed() for i in staying}
        gaps = [b - a for i in staying for a, b in itertools.pairwise(links[i].arrivals)]
        resumed = [m for m, _ in outcomes]
        for _, new in outcomes:
            if new is not None:
                links.append(new)
        latencies = [m.go_away_to_audio_ms for m in resumed if m.go_away_to_audio_ms is not None]
        handshakes = [m.go_away_to_created_ms for m in resumed if m.go_away_to_created_ms is not None]
        return {
            "sessions": sessions,
            "replicas": replicas,
            "served_by": sorted({link.replica for link in links[:sessions]}),
            "header_matches_payload": all(link.header_replica == link.replica for link in links),
            "victim": victim.name,
            "to_move": len(moving),
            "moved": sum(m.ok for m in resumed),
            "lost": sum(not m.ok for m in resumed),
            "landed_elsewhere": all(m.resumed_on not in (None, victim.name) for m in resumed),
            "same_session_id": all(m.same_session for m in resumed),
            "go_away_to_audio_ms_p50": _percentile(latencies, 50),
            "go_away_to_audio_ms_p95": _percentile(latencies, 95),
            "go_away_to_created_ms_p50": _percentile(handshakes, 50),
            "go_away_to_created_ms_p95": _percentile(handshakes, 95),
            "retrieved_before_move": sum(m.retrieved_before for m in resumed),
            "answered_after_move": sum(m.answered_after for m in resumed),
            "bystanders": len(staying),
            "bystanders_noticed": {str(i): n for i, n in bystanders.items() if n},
            # the longest wait between two output micro-turns of a bystander (200 ms when nothing stalls)
            "bystander_max_gap_ms": round(max(gaps) * 1000, 1) if gaps else None,
            "bystander_max_gap_before_ms": round(max(before) * 1000, 1) if before else None,  # the baseline
            "all_moved_s": round(moved_s, 2),
            "victim_exit": victim_exit,
            "errors": [m.error for m in resumed if m.error],
        }
    finally:
        for link in links:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.close(), 5)
        if balancer is not None:
            balancer.stop()
        for replica in fleet:
            replica.stop()


def table(summary: dict) -> str:
    rows = [
        ("sessions (replicas)", f"{summary['sessions']} ({summary['replicas']})"),
        ("to move / moved / lost", f"{summary['to_move']} / {summary['moved']} / {summary['lost']}"),
        ("go_away -> resumed audio p50 ms", summary["go_away_to_audio_ms_p50"]),
        ("go_away -> resumed audio p95 ms", summary["go_away_to_audio_ms_p95"]),
        ("go_away -> session.created p50/p95", f"{summary['go_away_to_created_ms_p50']} / "
                                               f"{summary['go_away_to_created_ms_p95']}"),
        ("retrieved / answered after move", f"{summary['retrieved_before_move']} / "
                                            f"{summary['answered_after_move']}"),
        ("bystanders that noticed", f"{len(summary['bystanders_noticed'])} of {summary['bystanders']}"),
        ("bystanders' longest gap ms (before)", f"{summary['bystander_max_gap_ms']} "
                                                  f"({summary['bystander_max_gap_before_ms']})"),
        ("victim exit code", summary["victim_exit"]),
    ]
    return "\n".join(f"{label:<38}{value}" for label, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--write-compose-config", action="store_true",
                        help=f"write {COMPOSE_HAPROXY.relative_to(ROOT)} from the template and exit")
    args = parser.parse_args(argv)
    if args.write_compose_config:
        COMPOSE_HAPROXY.write_text(compose_haproxy())
        return 0
    with tempfile.TemporaryDirectory(prefix="microturn-drain-") as tmp:
        summary = asyncio.run(run(args.sessions, args.replicas, Path(tmp)))
    print(table(summary))
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 and not summary["bystanders_noticed"] else 1


if __name__ == "__main__":
    sys.exit(main())
