"""`microturn export`: a training checkpoint turned into a shippable one.

Contract: `main(args)` loads `--checkpoint` (validated by model/checkpoint.py), writes its
weights to `--out` stored as `--dtype` (bf16 halves the file; loading casts back to the
engine's dtype), keeps the config and the training `extra` (plus where and how it was
exported) and copies the loss plot when there is one. `--average A B ...` exports the
element-wise mean, in fp32, of `--checkpoint` and those checkpoints (same config: points
along one training run, as in checkpoint averaging). Optimiser state is not carried: an
exported checkpoint is for serving and evaluation, not for `train --resume`. Prints a JSON
line with the file size.

This module does not know how the model was trained or how it is served.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..model.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint, read_config, save_checkpoint
from ..model.config import ModelConfig
from ..model.transformer import InteractionModel
from .train import PLOT_FILE

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def average_into(model: InteractionModel, cfg: ModelConfig, others: list[Path]) -> None:
    """Replace `model`'s weights by their mean with those of `others` (fp32 sums, cast back)."""
    own = model.state_dict()
    total = {k: v.float().clone() for k, v in own.items()}
    for path in others:
        other, other_cfg = load_checkpoint(path, InteractionModel)
        if other_cfg != cfg:
            raise CheckpointError(f"{path}: its config differs from the checkpoint's; only one model's "
                                  "checkpoints can be averaged")
        for k, v in other.state_dict().items():
            total[k] += v.float()
    n = 1 + len(others)
    model.load_state_dict({k: (v / n).to(own[k].dtype) for k, v in total.items()})


def main(args: argparse.Namespace) -> int:
    source, out = Path(args.checkpoint), Path(args.out)
    model, cfg = load_checkpoint(source, InteractionModel)
    _, extra = read_config(source)
    extra = {**extra, "exported_from": str(source), "stored_dtype": args.dtype}
    if args.wait_bias is not None:
        extra["wait_bias"] = args.wait_bias
    if args.average:
        average_into(model, cfg, [Path(p) for p in args.average])
        extra["averaged_with"] = list(args.average)
    save_checkpoint(out, model, cfg, extra=extra, dtype=EXPORT_DTYPES[args.dtype])
    if (source / PLOT_FILE).is_file():
        shutil.copyfile(source / PLOT_FILE, out / PLOT_FILE)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(f"exported {source} -> {out} ({args.dtype}, {size / 2**20:.1f} MiB)")
    print(json.dumps({"checkpoint": str(out), "dtype": args.dtype, "weights_bytes": size}))
    return 0
