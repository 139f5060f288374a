"""microturn/cli.py: the installed console script and the subcommand dispatch."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from microturn import cli
from microturn.model import params
from microturn.model.config import preset

SCRIPT = Path(sys.executable).parent / "microturn"


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["tiny", "interaction-small"])
def test_params_prints_a_table_then_json_consistent_with_params_py(name: str) -> None:
    result = _run("params", name)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) > 2 and "total params" in result.stdout
    last = json.loads(lines[-1])
    assert last == {"preset": name, **params.report(preset(name)).to_dict()}
    assert last["active_params"] < last["total_params"]


def test_params_unknown_preset_fails_with_the_choices() -> None:
    result = _run("params", "huge")
    assert result.returncode != 0
    assert "unknown preset 'huge'" in result.stderr and "interaction-small" in result.stderr


def test_every_subcommand_parses_its_design_flags() -> None:
    parser = cli.build_parser()
    serve = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--checkpoint", "ck"])
    assert (serve.host, serve.port, serve.checkpoint) == ("0.0.0.0", 9000, "ck")
    assert serve.preset is None and serve.device is None  # unset: the server's MICROTURN_* settings apply
    bench = parser.parse_args(["bench", "engine", "--seconds", "2", "--max-sessions", "8", "--device", "cpu"])
    assert (bench.seconds, bench.max_sessions, bench.device) == (2.0, 8, "cpu")
    load = parser.parse_args(["loadtest", "--url", "ws://h/v1/realtime", "--sessions", "3", "--duration", "4",
                              "--ramp", "0.5", "--wav", "in.wav", "--sweep"])
    assert (load.sessions, load.duration, load.ramp, load.wav, load.sweep) == (3, 4.0, 0.5, "in.wav", True)
    talk = parser.parse_args(["talk", "--url", "ws://h", "--wav", "a.wav", "--out", "b.wav", "--text", "hi"])
    assert (talk.wav, talk.out, talk.text) == ("a.wav", "b.wav", "hi")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench"])


def test_targets_are_module_function_references() -> None:
    for command in cli.COMMANDS:
        if isinstance(command.target, str):
            module, _, function = command.target.partition(":")
            assert module.startswith("microturn.") and function.isidentifier(), command.path


def test_absent_target_module_is_reported_but_a_broken_one_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = cli._params_flags
    assert cli._resolve(cli.Command(("nothing",), "microturn.no_such_tool:main", flags, "")) is None
    assert "microturn nothing: not available" in capsys.readouterr().err
    (tmp_path / "broken_tool.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        cli._resolve(cli.Command(("broken",), "broken_tool:main", flags, ""))


def test_a_command_whose_extra_is_missing_names_the_extra_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pip install .` without the training extra: eval duplex says what to install (exit 2)."""
    (tmp_path / "needs_extra_tool.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tool = cli.Command(("eval", "x"), "needs_extra_tool:main", cli._params_flags, "", extra="training")
    monkeypatch.setattr(cli, "COMMANDS", [tool])
    assert cli.main(["eval", "x", "tiny"]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'training' extra" in err and "no_such_dependency_xyz" in err and "microturn[training]" in err


def test_eval_duplex_declares_the_training_extra_and_serve_none() -> None:
    extras = {command.path: command.extra for command in cli.COMMANDS}
    assert extras[("eval", "duplex")] == "training" and extras[("serve",)] is None


@pytest.mark.parametrize("argv", [["export", "--out", "unused"], ["eval", "duplex"]])
def test_a_bad_checkpoint_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str]
) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert cli.main([*argv, "--checkpoint", str(tmp_path)]) == cli.EXIT_BAD_CHECKPOINT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid JSON" in err and str(tmp_path) in err


# --- failing politely: one line on stderr, a documented exit code, nothing started first -------------

EXIT_FAILURE, EXIT_USAGE = 1, 2  # the README's "Command line" table
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-demo"


def _fails_in_one_line(result: subprocess.CompletedProcess[str], exit_code: int, *names: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "demo page" not in result.stdout + err  # the banner comes only once the server is up
    for name in names:
        assert name in err, err
    return err


def _closed_port() -> int:
    """A port nothing listens on: bound by us a moment ago, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_missing_checkpoint_fails_before_starting() -> None:
    result = _run("serve", "--checkpoint", "/missing", "--port", str(_closed_port()))
    _fails_in_one_line(result, EXIT_FAILURE, "microturn serve:", "/missing", "checkpoint directory not found")


def test_serve_checkpoint_without_config_fails_before_starting(tmp_path: Path) -> None:
    result = _run("serve", "--checkpoint", str(tmp_path), "--port", str(_closed_port()))
    _fails_in_one_line(result, EXIT_FAILURE, str(tmp_path), "config.json")


def test_serve_unknown_preset_names_the_choices() -> None:
    result = _run("serve", "--preset", "huge", "--port", str(_closed_port()))
    _fails_in_one_line(result, EXIT_USAGE, "unknown preset 'huge'", "tiny")


def test_serve_cuda_that_is_not_there_fails_before_starting() -> None:
    from microturn.server.cli import cuda_device_count  # here: the server's imports are not light

    count = cuda_device_count()  # CPU-only torch: 0; on a GPU machine ask for one past the last
    device = "cuda" if count == 0 else f"cuda:{count}"
    result = _run("serve", "--device", device, "--port", str(_closed_port()))
    expected = "CUDA is not available" if count == 0 else f"only {count} CUDA device"
    _fails_in_one_line(result, EXIT_FAILURE, f"--device {device}", expected)


def test_serve_damaged_weights_are_caught_when_the_engine_loads_them(tmp_path: Path) -> None:
    """Past the cheap checks (the config is there), the engine process's load error is one line too."""
    shutil.copy(DEMO_CHECKPOINT / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    result = _run("serve", "--checkpoint", str(tmp_path), "--port", str(_closed_port()))
    _fails_in_one_line(result, EXIT_FAILURE, "the model could not load", "model.safetensors")


def test_serve_on_a_taken_port_says_so() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = _run("serve", "--port", str(port))
    _fails_in_one_line(result, EXIT_FAILURE, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_talk_refused_connection_fails_at_once() -> None:
    url = f"ws://127.0.0.1:{_closed_port()}/v1/realtime"
    result = _run("talk", "--url", url)
    _fails_in_one_line(result, EXIT_FAILURE, "microturn talk:", url, "connection refused")


def test_talk_http_url_asks_for_ws() -> None:
    result = _run("talk", "--url", "http://127.0.0.1:8000/v1/realtime")
    _fails_in_one_line(result, EXIT_USAGE, "http://127.0.0.1:8000/v1/realtime", "ws://", "wss://")


def test_talk_missing_wav_fails_before_connecting(tmp_path: Path) -> None:
    wav = tmp_path / "nope.wav"
    result = _run("talk", "--wav", str(wav), "--url", f"ws://127.0.0.1:{_closed_port()}/v1/realtime")
    _fails_in_one_line(result, EXIT_FAILURE, str(wav), "file not found")


def test_talk_raw_pcm_as_wav_names_the_fix(tmp_path: Path) -> None:
    raw = tmp_path / "speech.pcm"
    raw.write_bytes(bytes(range(256)) * 64)  # headerless PCM16: soundfile cannot tell its rate
    result = _run("talk", "--wav", str(raw), "--url", f"ws://127.0.0.1:{_closed_port()}/v1/realtime")
    _fails_in_one_line(result, EXIT_FAILURE, str(raw), "not a sound file", "header")


@pytest.mark.parametrize("path", [command.path for command in cli.COMMANDS], ids=" ".join)
def test_every_subcommand_help_shows_defaults_and_an_example(path: tuple[str, ...]) -> None:
    result = _run(*path, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout.lower()
    assert "default" in text and "example:\n  microturn " + " ".join(path) in text, result.stdout
