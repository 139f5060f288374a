"""Replicas behind a real HAProxy on loopback: a SIGTERMed replica's sessions move to the other one.

Two `microturn serve` processes sharing a resumption key and HAProxy (deploy/haproxy.cfg.template,
rendered on free ports) in front of them; six sessions through the balancer, spread over both.
One replica is SIGTERMed: each of its sessions gets `session.go_away`, reconnects through the
balancer with its handle, lands on the other replica under the same session id and continues
(the item typed before the move is retrieved there, a question typed after it is answered); no
session of the replica that stayed up notices anything. The scenario is benchmarks/drain.py's,
which also measures it. Skipped only when haproxy is not installed.
"""

from __future__ import annotations

import subprocess

import pytest

from microturn.benchmarks import drain

pytestmark = [
    pytest.mark.skipif(not drain.Path(drain.HAPROXY).exists(), reason="haproxy is not installed"),
    pytest.mark.timeout(240),
]
SESSIONS = 6


def test_recipe_renders_a_valid_haproxy_config(tmp_path):
    config = tmp_path / "haproxy.cfg"
    servers = drain.server_lines([("a", "127.0.0.1:8001"), ("b", "127.0.0.1:8002")])
    config.write_text(drain.render_haproxy(servers, "127.0.0.1:8000"))
    subprocess.run([drain.HAPROXY, "-c", "-q", "-f", str(config)], check=True)
    subprocess.run([drain.HAPROXY, "-c", "-q", "-f", str(drain.COMPOSE_HAPROXY)], check=True)
    assert drain.COMPOSE_HAPROXY.read_text() == drain.compose_haproxy(), "run --write-compose-config"


async def test_drained_replica_sessions_resume_on_the_other(tmp_path):
    summary = await drain.run(SESSIONS, 2, tmp_path)
    assert summary["served_by"] == ["replica-a", "replica-b"], summary
    assert summary["header_matches_payload"], summary
    moving = summary["to_move"]
    assert 0 < moving < SESSIONS, summary
    assert summary["moved"] == moving and summary["lost"] == 0, summary["errors"]
    assert summary["landed_elsewhere"] and summary["same_session_id"], summary
    assert summary["retrieved_before_move"] == moving, summary
    assert summary["answered_after_move"] == moving, summary
    assert summary["bystanders"] == SESSIONS - moving and not summary["bystanders_noticed"], summary
    assert summary["victim_exit"] == 0, summary
