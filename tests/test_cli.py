"""microturn/cli.py: the installed console script and the subcommand dispatch."""

from __future__ import annotations

import json
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
