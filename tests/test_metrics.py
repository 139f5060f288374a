"""/metrics keeps to the Prometheus naming conventions; README.md's "Metrics" table lists what it serves."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import httpx
import pytest
from helpers.realserver import ServerThread, warm_engine

from microturn import __version__
from microturn.server.metrics import Metrics
from microturn.server.settings import ServerSettings

README = Path(__file__).resolve().parents[1] / "README.md"
SLOTS = 2
ROW = re.compile(r"^\| `(microturn_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \| [^|]+ \|$")


@pytest.fixture(scope="module")
def scrape() -> str:
    with ServerThread(ServerSettings(max_sessions=SLOTS), warm_engine(SLOTS)) as srv:
        httpx.get(f"{srv.http_url}/v1/models/nope")  # one errors_total{code=...} sample
        return httpx.get(f"{srv.http_url}/metrics").text


def families(text: str) -> dict[str, str]:
    """{name: type} from the exposition's `# TYPE` lines (what Prometheus itself reads)."""
    return {m[1]: m[2] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}


def samples(text: str) -> list[tuple[str, set[str]]]:
    """(sample name, its label names) of every sample line."""
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", line)
            assert m, line
            out.append((m[1], set(re.findall(r'([a-zA-Z_]\w*)="', m[2] or ""))))
    return out


def readme_table() -> dict[str, tuple[str, set[str]]]:
    """{name: (type, label names)} of the rows under README.md's "## Metrics"."""
    text = README.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if m := ROW.match(line.strip()):
            labels = {x.strip(" `") for x in m[3].split(",")} - {"", "-", "none"}
            rows[m[1]] = (m[2], labels)
    assert rows, "no metric rows in README.md's Metrics section"
    return rows


def test_names_use_base_units_and_counters_end_in_total(scrape):
    types = families(scrape)
    assert types
    for name, kind in types.items():
        assert name.startswith("microturn_"), name
        assert not re.search(r"_(ms|milliseconds|us|ns|minutes|hours)$", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        assert not name.endswith("_created"), name  # the client's timestamp series are not scraped
    for name, _ in samples(scrape):
        assert not name.endswith(("_ms", "_created")), name


def test_build_info_and_capacity(scrape):
    assert families(scrape)["microturn_build_info"] == "gauge"
    assert families(scrape)["microturn_capacity_sessions"] == "gauge"
    info = [line for line in scrape.splitlines() if line.startswith("microturn_build_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info[0]))
    assert labels == {
        "version": __version__,
        "torch": importlib.metadata.version("torch"),
        "device": "cpu",
        "model": "preset:tiny",
    }
    assert f"microturn_capacity_sessions {float(SLOTS)}" in scrape.splitlines()
    assert "microturn_engine_up 1.0" in scrape.splitlines()


def test_readme_table_lists_exactly_the_exposed_metrics(scrape):
    table, types = readme_table(), families(scrape)
    assert set(table) == set(types)
    for name, (kind, labels) in table.items():
        assert kind == types[name], name
        seen = set().union(*(ls for s, ls in samples(scrape) if s == name or s.startswith(f"{name}_")))
        assert seen - {"le"} == labels, name


def test_input_queue_is_in_seconds():
    m = Metrics()
    assert not hasattr(m, "input_queue_ms")
    m.input_queue_seconds.set(0.4)
    assert "microturn_input_queue_seconds 0.4" in m.render().decode().splitlines()
