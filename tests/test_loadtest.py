"""`microturn loadtest` against a real server (small N, short), and its measuring pieces on known inputs."""

from __future__ import annotations

import json

import httpx
import pytest
from helpers.realserver import ServerThread, warm_engine

from microturn.cli import main as cli_main
from microturn.clients.loadtest.report import histogram_quantile, parse_metrics
from microturn.clients.loadtest.session import Playback
from microturn.model.engine import Engine
from microturn.server.settings import ServerSettings

SLOTS = 4
REQUIRED = {
    "sessions",
    "duration_s",
    "first_audio_ms_p95",
    "jitter_ms_p99",
    "underruns",
    "missed_seq",
    "server_tick_ms_p99",
    "goodput",
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return warm_engine(SLOTS)


def test_playback_counts_a_chunk_later_than_the_cushion_as_one_underrun():
    playback = Playback(cushion_s=0.1)
    for t in (0.0, 0.2, 0.4, 0.65):  # the 4th is 50 ms late: inside the 100 ms cushion
        playback.arrive(t)
    assert playback.underruns == 0
    playback.arrive(0.95)  # due by 0.1 + 4 * 0.2 = 0.9
    assert playback.underruns == 1
    playback.arrive(1.15)  # re-buffered: due by 0.95 + 0.1 + 0.2
    assert playback.underruns == 1


def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus():
    def scrape(counts: dict[str, int]) -> dict[str, float]:
        lines = ["# TYPE t histogram"]
        lines += [f't_bucket{{le="{le}"}} {n}' for le, n in counts.items()]
        lines += [f"t_count {counts['+Inf']}", "t_sum 1.0"]
        return parse_metrics("\n".join(lines) + "\n")

    before = scrape({"0.1": 10, "0.2": 10, "+Inf": 10})
    after = scrape({"0.1": 60, "0.2": 110, "+Inf": 110})  # 50 new in (0, 0.1], 50 in (0.1, 0.2]
    assert histogram_quantile(before, after, "t", 0.5) == pytest.approx(0.1)
    assert histogram_quantile(before, after, "t", 0.75) == pytest.approx(0.15)
    assert histogram_quantile(before, before, "t", 0.5) is None


def _bucket_bounds(metrics: dict[str, float], q: float) -> tuple[float, float]:
    """The histogram bucket (lower, upper] in ms that holds the q-quantile of all tick times."""
    buckets = sorted(
        (float(k.split("le=")[1].rstrip("}")), v)
        for k, v in metrics.items()
        if k.startswith("microturn_tick_seconds_bucket")
    )
    total, lower = buckets[-1][1], 0.0
    for bound, count in buckets:
        if count >= q * total:
            return lower * 1000, bound * 1000
        lower = bound
    raise AssertionError("empty histogram")


def test_loadtest_json_line_matches_the_servers_metrics(engine, tmp_path, capsys):
    plot = tmp_path / "lt.png"
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:
        code = cli_main(
            [
                "loadtest",
                "--url",
                srv.ws_url,
                "--sessions",
                "3",
                "--duration",
                "2.5",
                "--ramp",
                "0.3",
                "--plot",
                str(plot),
            ]
        )
        metrics = parse_metrics(httpx.get(f"{srv.http_url}/metrics").text)
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert REQUIRED <= result.keys()
    assert result["sessions"] == result["admitted"] == 3 and result["duration_s"] == 2.5
    assert result["server_sessions"] == metrics["microturn_sessions_total"] == 3
    assert result["server_missed_ticks"] == metrics["microturn_missed_ticks_total"]
    assert result["server_ticks"] == metrics["microturn_tick_seconds_count"]
    lower, upper = _bucket_bounds(metrics, 0.99)
    assert lower <= result["server_tick_ms_p99"] <= upper
    # every session heard about one micro-turn per tick it was in: never more chunks than ticks
    assert 3 * 2.5 / 0.2 * 0.5 <= result["chunks"] <= 3 * result["server_ticks"]
    assert 0.0 <= result["goodput"] <= 1.0 and result["errors"] == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("load level: 3 sessions") for line in out)


def test_sweep_doubles_until_the_cap_and_reports_capacity(engine, tmp_path, capsys):
    with ServerThread(ServerSettings(max_sessions=SLOTS), engine) as srv:
        code = cli_main(
            [
                "loadtest",
                "--url",
                srv.ws_url,
                "--sessions",
                "1",
                "--duration",
                "1.2",
                "--ramp",
                "0.1",
                "--sweep",
                "--max-sessions",
                "2",
                "--plot",
                str(tmp_path / "s.png"),
            ]
        )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    levels = result["levels"]
    assert [lv["sessions"] for lv in levels] in ([1], [1, 2])
    passing = [lv["sessions"] for lv in levels if lv["goodput"] >= 0.99]
    assert result["capacity"] == (passing[-1] if passing else 0)
    assert len(levels) == 2 or levels[0]["goodput"] < 0.99  # it stops only at the cap or on failure


def test_loadtest_refuses_unbounded_or_non_websocket_targets(capsys):
    assert cli_main(["loadtest", "--url", "http://127.0.0.1:9/x", "--sessions", "1", "--duration", "1"]) == 2
    assert (
        cli_main(["loadtest", "--url", "ws://127.0.0.1:9/x", "--sessions", "100000", "--duration", "1"]) == 2
    )
    assert "--sessions" in capsys.readouterr().err
