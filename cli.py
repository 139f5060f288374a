"""The `microturn` command line: one entry point, one subcommand per tool.

Flags are declared here (the README's "Command line" table); the work is done by a target
function `main(args: argparse.Namespace) -> int | None` in another module, imported only when
its subcommand runs, so `microturn params` never imports torch, FastAPI or the server. To add a
subcommand: write its flags function and add one `Command` to `COMMANDS`. A command that needs
an optional dependency group names it as `extra`; where that group is not installed, the command
says so in one line and exits 2. This module knows nothing about what the targets do.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_PRESET = "tiny"
DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}/v1/realtime"
# Exit codes (the README's "Command line" table): 1 = the arguments are fine but the world is not
# (a missing file, a refused connection, a model that cannot load); 2 = the command line itself is
# wrong (argparse's usage errors, an unknown value) or the command is not installed.
EXIT_FAILURE = 1
EXIT_BAD_CHECKPOINT = EXIT_FAILURE  # --checkpoint names a missing or damaged checkpoint
EXIT_UNAVAILABLE = 2  # a subcommand whose module is not installed (argparse also uses 2 for usage errors)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (unless its help already says it, or it has none) and keeps the
    epilog's example lines as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def _device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def _params_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("preset", help="model preset name, e.g. tiny or interaction-small")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV-cache element (bf16 = 2)")


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    # No argparse defaults: an unset flag is None so MICROTURN_* settings (server/settings.py) apply.
    parser.add_argument("--host", default=None, help=f"interface to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=None, help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--preset", default=None, help=f"model preset (default {DEFAULT_PRESET})")
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: random weights)")
    parser.add_argument("--device", default=None, help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None,
                        help="auto (default: bf16 on CUDA, fp32 on CPU), float32, bfloat16")


def _bench_engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration after warm-up")
    parser.add_argument("--max-sessions", type=int, default=None, help="cap on the session counts tried")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--wav", default=None, help="16 kHz mono PCM16 speech to feed (default: espeak-ng)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    _device(parser)


def _bench_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="checkpoints/tiny-demo", help="checkpoint both runs serve")
    parser.add_argument("--engine-seconds", type=float, default=5.0, help="bench engine: seconds per level")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds each load level streams")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds a level's starts spread over")
    parser.add_argument("--cushion-ms", type=float, default=200.0, help="client playback cushion (underruns)")
    parser.add_argument("--wav", default=None, help="input speech file (default: generated)")
    parser.add_argument("--engine-threads", type=int, default=0,
                        help="MICROTURN_ENGINE_THREADS of the server (0 = one per CPU it may use)")
    parser.add_argument("--engine-cpus", default="", help="MICROTURN_ENGINE_CPUS of the server (e.g. 1)")
    parser.add_argument("--max-sessions", type=int, default=None, help="cap on bench engine's session counts")
    _device(parser)


def _bench_background_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--sessions", type=int, default=4, help="real-time sessions streaming speech")
    parser.add_argument("--tasks", type=int, default=16, help="background tasks streaming at once")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per phase")
    _device(parser)


def _loadtest_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help="realtime WebSocket URL")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent real-time sessions")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds each session streams")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which starts are staggered")
    parser.add_argument("--wav", default=None, help="input speech file (default: generated)")
    parser.add_argument("--sweep", action="store_true", help="raise the session count to find capacity")
    parser.add_argument("--plot", default=None, help="write a PNG plot of tick and latency here")
    parser.add_argument("--max-sessions", type=int, default=256, help="--sweep stops at this session count")
    parser.add_argument("--cushion-ms", type=float, default=200.0, help="client playback cushion (underruns)")
    parser.add_argument("--api-key", default=None, help="API key (default: $MICROTURN_API_KEY)")


def _talk_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help="realtime WebSocket URL")
    parser.add_argument("--wav", default=None, help="speech to stream in real time")
    parser.add_argument("--out", default=None, help="write the spoken reply here (WAV)")
    parser.add_argument("--text", default=None, help="text to send as the user's message")
    parser.add_argument("--task", default=None, help="a background task to start (task.create)")
    parser.add_argument("--tail", type=float, default=2.0, help="seconds of reply recorded after the input")
    parser.add_argument("--api-key", default=None, help="API key (default: $MICROTURN_API_KEY)")


def _train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--checkpoint", default=None, help="start from these weights (fresh optimiser)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--steps", type=int, default=1000, help="total optimiser steps")
    parser.add_argument("--batch", type=int, default=8, help="conversations per step")
    parser.add_argument("--turns", type=int, default=32, help="micro-turns per conversation (200 ms each)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    parser.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                        help="adamw, or muon: Muon for the layers' attention and expert matrices, AdamW for "
                             "the rest, at the same --lr (training/muon.py)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
    parser.add_argument("--save-every", type=int, default=200, help="checkpoint period in steps")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--data-workers", type=int, default=1,
                        help="processes making batches (1 = a thread beside the step; more for a GPU)")
    from microturn.training.curricula import CURRICULA  # names only: no torch

    parser.add_argument("--curriculum", choices=tuple(CURRICULA), default="base",
                        help="what conversations are made of (training/curricula.py): base is the first "
                             "stage of the demo recipe; refine (its second stage) adds sums, pauses, digit "
                             "strings; numbers asks for digit strings as numbers; sums is numbers with more "
                             "sums; greetings is sums with greetings holding number-sounding words; hear is "
                             "greetings with half the user speech from festival voices, room and mic "
                             "augmentation and out-of-domain turns answered with the fallback sentence; "
                             "hear-wide (an experiment) is hear with 70%% festival and wider voice warps; "
                             "hear-speakers is hear with 55%% festival and 60%% of utterances turned into "
                             "other speakers (formants, pitch and intonation range moved apart); "
                             "hear-colours is hear-speakers whose in-domain questions share the "
                             "out-of-domain ones' openers and closers, with more colour questions; "
                             "hear-people is hear-colours with 60%% festival, a third of it kal and slt "
                             "and the rest eight Czech, Finnish and Italian speakers saying the English "
                             "respelled (an accent)")
    parser.add_argument("--ear-channels", type=int, default=0,
                        help="a convolutional ear of this many channels over the user's audio "
                             "(model/ear.py): part of a --preset model, or grown onto a --checkpoint with "
                             "its output starting at zero; 0 = none / keep the checkpoint's shapes")
    parser.add_argument("--heard-weight", type=float, default=0.0,
                        help="weight of the CTC loss transcribing the user's speech on the audio-in "
                             "positions (training/heard.py); 0 = off")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                        help="bf16: autocast matmuls to bfloat16 (weights and optimiser stay fp32); auto: "
                             "bf16 only where the device runs it natively (CUDA, AMX / AVX512-BF16 CPUs), "
                             "else fp32")
    _device(parser)


def _eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--conversations", type=int, default=96, help="conversations, one episode each")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="heldout: held-out voices and phrasings (the reported figures); train: the "
                             "training ones in new conversations (pick a --seed no training run used), so "
                             "the gap between the two is what fails to generalise")
    parser.add_argument("--voices", choices=("heldout", "train"), default=None,
                        help="whose voices speak the questions (default: the --split's own); "
                             "--split heldout --voices train measures held-out phrasings alone")
    parser.add_argument("--synth", nargs="+", choices=("espeak", "festival"), default=["espeak", "festival"],
                        help="synthesisers speaking the user's side, each the same scenarios and seed, "
                             "reported one by one and together; festival's held-out voice (ked) is one no "
                             "curriculum trains on")
    parser.add_argument("--batch", type=int, default=16, help="conversations run side by side")
    parser.add_argument("--wait-bias", type=float, default=0.0,
                        help="turn-taking eagerness offset in nats over the checkpoint's own (SamplingParams."
                             "wait_bias): > 0 waits longer before taking the turn; calibrate it with --split "
                             "train, never on the held-out set")
    _device(parser)


def _export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="training checkpoint directory")
    parser.add_argument("--out", required=True, help="directory of the exported checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="storage dtype of the weights")
    parser.add_argument("--wait-bias", type=float, default=None,
                        help="the checkpoint's calibrated turn-taking bias in nats (default: keep the "
                             "source's); engines add it to every session's SamplingParams.wait_bias")
    parser.add_argument("--average", nargs="+", default=[], metavar="CHECKPOINT",
                        help="export the mean of --checkpoint's weights and these checkpoints' (same config)")


def params_main(args: argparse.Namespace) -> int:
    from microturn.model import params
    from microturn.model.config import preset

    try:
        config = preset(args.preset)
    except ValueError as exc:
        print(f"microturn params: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    report = params.report(config, bytes_per_element=args.kv_bytes)
    rows = [(name, f"{count:,}") for name, count in params.param_breakdown(config).items()]
    rows += [
        ("total params", f"{report.total_params:,} ({report.total_params / 1e9:.2f} B)"),
        ("active params / token", f"{report.active_params:,} ({report.active_params / 1e9:.2f} B)"),
        ("KV bytes / token", f"{report.kv_bytes_per_token:,}"),
        ("KV bytes / session", f"{report.kv_bytes_per_session:,} (window {config.window})"),
        ("positions / micro-turn", str(report.positions_per_turn)),
        ("GFLOP / micro-turn / session", f"{report.flops_per_turn / 1e9:,.2f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"preset {args.preset}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(json.dumps({"preset": args.preset, **report.to_dict()}))
    return 0


Target = str | Callable[[argparse.Namespace], int | None]


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]  # the words that name it: ("bench", "engine")
    target: Target  # "module:function", imported only when it runs, or a function of this module
    flags: Callable[[argparse.ArgumentParser], None]  # declares its flags
    help: str
    extra: str | None = None  # the optional dependency group (pyproject.toml) it needs beyond the core
    example: str = ""  # one invocation shown at the end of its --help


COMMANDS: list[Command] = [
    Command(("params",), params_main, _params_flags, "parameter, KV-memory and FLOP arithmetic of a preset",
            example="microturn params interaction-small"),
    Command(("serve",), "microturn.server.cli:serve_main", _serve_flags, "run the realtime server",
            example="microturn serve --checkpoint checkpoints/tiny-demo --port 8000"),
    Command(("bench", "engine"), "microturn.benchmarks.engine_capacity:main", _bench_engine_flags,
            "sessions held in real time",
            example="microturn bench engine --preset tiny --seconds 5 --device cpu"),
    Command(("bench", "server"), "microturn.benchmarks.server_capacity:main", _bench_server_flags,
            "sessions the server holds end to end vs its engine",
            example="microturn bench server --checkpoint checkpoints/tiny-demo --duration 20"),
    Command(("bench", "background"), "microturn.benchmarks.background_overhead:main", _bench_background_flags,
            "tick time with background tasks streaming",
            example="microturn bench background --sessions 4 --tasks 16"),
    Command(("loadtest",), "microturn.clients.loadtest.cli:main", _loadtest_flags,
            "real-time sessions vs a server",
            example="microturn loadtest --url ws://127.0.0.1:8000/v1/realtime --sessions 8"),
    Command(("talk",), "microturn.clients.python.cli:talk_main", _talk_flags,
            "stream a WAV file, record the reply",
            example="microturn talk --wav question.wav --out reply.wav"),
    Command(("train",), "microturn.training.train:main", _train_flags,
            "train a model and write a checkpoint",
            example="microturn train --preset tiny --out runs/demo --steps 1000"),
    Command(("export",), "microturn.training.export:main", _export_flags,
            "store a checkpoint for shipping (bf16)",
            example="microturn export --checkpoint runs/demo --out checkpoints/my-demo"),
    Command(("eval", "duplex"), "microturn.training.evaluate:main", _eval_flags,
            "duplex behaviour of a checkpoint", extra="training",
            example="microturn eval duplex --checkpoint checkpoints/tiny-demo"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microturn", description=__doc__.splitlines()[0])
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command")}
    groups[()].required = True
    for command in COMMANDS:
        path = command.path
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                group_parser = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} tools")
                groups[prefix] = group_parser.add_subparsers(dest="_".join(prefix) + "_tool", required=True)
        epilog = f"example:\n  {command.example}" if command.example else None
        sub = groups[path[:-1]].add_parser(path[-1], help=command.help, description=command.help,
                                           epilog=epilog, formatter_class=HelpFormatter)
        command.flags(sub)
        sub.set_defaults(_command=command)
    return parser


def _resolve(command: Command) -> Callable[[argparse.Namespace], int | None] | None:
    """The command's function, or None (after one line on stderr) when it cannot run in this install."""
    if callable(command.target):
        return command.target
    name = " ".join(command.path)
    module_name, _, function = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            print(f"microturn {name}: not available ({module_name} is not installed)", file=sys.stderr)
            return None
        # a dependency the core install lacks: name the extra that brings it; anything else is a real
        # error and surfaces with its traceback
        if command.extra is None:
            raise
        print(f"microturn {name}: needs the '{command.extra}' extra (no module named {exc.name!r}); "
              f"install it with: pip install 'microturn[{command.extra}]'", file=sys.stderr)
        return None
    return getattr(module, function)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args._command
    name = " ".join(command.path)
    function = _resolve(command)
    if function is None:
        return EXIT_UNAVAILABLE
    try:
        return int(function(args) or 0)
    except Exception as exc:
        # a bad --checkpoint is the user's input: one line, not a traceback. Looked up, not imported,
        # so clients that never touch torch do not load it to start.
        checkpoint = sys.modules.get("microturn.model.checkpoint")
        if checkpoint is None or not isinstance(exc, checkpoint.CheckpointError):
            raise
        print(f"microturn {name}: {exc}", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT


if __name__ == "__main__":
    sys.exit(main())
