"""Checkpoints: a directory holding `model.safetensors` (weights) and `config.json`.

`config.json` is `{"format": ..., "format_version": ..., "config": ModelConfig.to_dict(),
"extra": {...}}`; `extra` is free-form JSON for the caller (training step, data, notes).
Loading validates everything before any weight is copied and raises `CheckpointError`
naming the file and the mismatch: missing files, corrupt or truncated safetensors,
invalid or unknown config, missing, unexpected or mis-shaped tensors. Weights are cast
to the dtype of the factory-built model. Files are written to a temporary name and
renamed, so an interrupted save never leaves a half-written file under the final name.

This module knows nothing about the network's layout: the caller supplies the
factory that builds a module from a config. Tied (shared-storage) weights are not
supported; the interaction model has none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "microturn-checkpoint"
FORMAT_VERSION = 1
MAX_NAMES_IN_ERROR = 8  # keep error messages readable when many tensors differ
CHECKPOINT_KEYS = frozenset({"format", "format_version", "config", "extra"})


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and what is wrong."""


def save_checkpoint(
    path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig, extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `path/model.safetensors` and `path/config.json`; returns the directory.

    `dtype` stores floating-point tensors in that type (e.g. bf16 to halve a shipped file)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    weights = directory / WEIGHTS_FILE
    _write_atomic(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME}))
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "extra": extra or {},
    }
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    _write_atomic(directory / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return directory


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The checkpoint's config and its `extra` dict, without touching the weights."""
    file = Path(path) / CONFIG_FILE
    _require_directory(Path(path))
    if not file.is_file():
        raise CheckpointError(f"{file}: config file not found")
    try:
        document = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: invalid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(document).__name__}")
    unknown = sorted(set(document) - CHECKPOINT_KEYS)
    if unknown:
        raise CheckpointError(f"{file}: unknown top-level fields {unknown}")
    if document.get("format") != FORMAT_NAME or document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format {document.get('format')!r} version {document.get('format_version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    fields, extra = document.get("config"), document.get("extra", {})
    if not isinstance(fields, dict) or not isinstance(extra, dict):
        raise CheckpointError(f"{file}: 'config' and 'extra' must be JSON objects")
    try:
        config = ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: bad model config: {exc}") from exc
    return config, extra


def load_checkpoint(
    path: str | os.PathLike,
    model_factory: Callable[[ModelConfig], torch.nn.Module],
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, ModelConfig]:
    """Build a model from the checkpoint's config, load its weights, move it to `device`.

    The module's train/eval mode is left as the factory made it.
    """
    config, _ = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    model = model_factory(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as reader:
            found = {name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()}
            _check_names_and_shapes(weights, expected, found)
            tensors = {name: reader.get_tensor(name) for name in found}
    except SafetensorError as exc:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file: {exc}") from exc
    model.load_state_dict(tensors, strict=True)
    return model.to(device), config


def _check_names_and_shapes(
    file: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} tensors missing: {_names(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{file}: {len(unexpected)} unexpected tensors: {_names(unexpected)}")
    mismatched = [name for name in sorted(expected) if expected[name] != found[name]]
    if mismatched:
        detail = "; ".join(
            f"{name}: expected {list(expected[name])}, found {list(found[name])}"
            for name in mismatched[:MAX_NAMES_IN_ERROR]
        )
        raise CheckpointError(f"{file}: {len(mismatched)} tensors with the wrong shape: {detail}")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_ERROR])
    more = len(names) - MAX_NAMES_IN_ERROR
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _require_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint directory not found")


def _write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    os.replace(tmp, target)
