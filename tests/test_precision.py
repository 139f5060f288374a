"""bf16 only where the device runs it natively: `--precision auto` picks fp32 on an AVX2-only CPU,
an explicit bf16 there is honoured with a warning, and the recipe records what ran.

The CPU's features are forced with monkeypatch (this host has one set; the other is the point),
which is the only mocking here: training and the engine are real."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from microturn.cli import main as cli_main
from microturn.model import precision
from microturn.model.checkpoint import read_config
from microturn.model.engine import resolve_dtype
from microturn.model.precision import native_bf16, resolve_precision, slow_bf16_warning

CPU = torch.device("cpu")


def _cpu_has_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(precision.torch.cpu, probe, lambda: native, raising=False)


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    _cpu_has_bf16(monkeypatch, native)
    assert native_bf16(CPU) is native
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    warning = slow_bf16_warning(CPU)
    assert (warning is None) is native
    if warning:
        assert "fp32" in warning and "cpu" in warning


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", CPU)


def test_the_probe_matches_this_host() -> None:
    """Without the mock: the answer agrees with what torch reports of this CPU."""
    host = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert native_bf16(CPU) is bool(host)


def _train(tmp_path: Path, capsys: pytest.CaptureFixture, prec: str) -> tuple[dict, str]:
    out = tmp_path / prec
    flags = ["--out", str(out), "--batch", "1", "--turns", "4", "--warmup", "1", "--save-every", "1",
             "--steps", "1", "--device", "cpu", "--precision", prec]
    assert cli_main(["train", *flags]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["steps"] == 1
    return read_config(out)[1]["recipe"], captured.err


def test_train_auto_records_fp32_on_a_cpu_without_bf16(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_has_bf16(monkeypatch, False)
    recipe, err = _train(tmp_path, capsys, "auto")
    assert recipe["precision"] == "fp32" and "warning" not in err
    recipe, err = _train(tmp_path, capsys, "bf16")
    assert recipe["precision"] == "bf16" and "no native bfloat16" in err


def test_train_auto_records_bf16_where_native(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _cpu_has_bf16(monkeypatch, True)
    recipe, err = _train(tmp_path, capsys, "auto")
    assert recipe["precision"] == "bf16" and "warning" not in err


def test_engine_bf16_on_a_cpu_without_it_warns(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    _cpu_has_bf16(monkeypatch, False)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("auto", CPU) == torch.float32
        assert resolve_dtype("float32", CPU) == torch.float32
    assert not caplog.records
