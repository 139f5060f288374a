"""Python client of a microturn server: the async SDK (`sdk`) and the `microturn talk` CLI (`cli`)."""

from .sdk import (
    AudioChunk,
    Client,
    ConnectError,
    Event,
    ServerBusy,
    connect,
    connect_with_retry,
    parse_event,
)

__all__ = [
    "AudioChunk",
    "Client",
    "ConnectError",
    "Event",
    "ServerBusy",
    "connect",
    "connect_with_retry",
    "parse_event",
]
