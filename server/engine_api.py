"""What the server needs of the engine, as a typed Protocol.

`model/engine.py`'s `Engine` (in this process) and `model/engine_process.py`'s `ProcessEngine`
(the engine core in its own process) satisfy it structurally. Calls go through the tick thread
only (server/tick_loop.py): neither is thread-safe. An engine whose calls can raise `EngineDied`
also offers `restart()`, which the tick thread calls then. This module knows nothing about how
the engine computes a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from ..model.config import ModelConfig
    from ..model.slots import SamplingParams, SlotInput, SlotOutput
    from ..model.tokenizer import ByteTokenizer


class EngineAPI(Protocol):
    @property
    def tokenizer(self) -> ByteTokenizer:
        """The text tokenizer of the model's text-in / text-out ids."""

    @property
    def config(self) -> ModelConfig:
        """The model's shapes and micro-turn layout (text_in_slots, text_out_slots, ...)."""

    @property
    def hears(self) -> bool:
        """The text head transcribes the user's speech (SlotOutput.heard_tokens mean something)."""

    @property
    def max_slots(self) -> int:
        """Sessions the engine can hold at once."""

    @property
    def device(self) -> torch.device | str:
        """Where the model runs (reported by benchmarks)."""

    @property
    def rows(self) -> int:
        """Rows each step computes: the engine's own count, which must equal the live sessions."""

    def join(self, instructions: str = "", sampling: SamplingParams | None = None) -> int:
        """A free slot with a fresh conversation; raises RuntimeError (EngineFull) when none is free."""

    def leave(self, slot: int) -> None:
        """Free the slot."""

    def step(self, inputs: dict[int, SlotInput]) -> dict[int, SlotOutput]:
        """One micro-turn for every joined slot; slots missing from `inputs` get silence."""

    def warmup(self, turns: int = 2, cuda_graphs: bool = True) -> None:
        """Pay first-call costs before serving."""

    def close(self) -> None:
        """Release what the engine holds outside this process (its process, shared memory)."""
