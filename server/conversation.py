"""A session's conversation as OpenAI Realtime items: ids, order, and what truncate/delete/retrieve see.

`Conversation` holds the items the session announced with `conversation.item.added`
(user messages typed or spoken, assistant messages of the model's responses, function
calls and their outputs), in order, each as the OpenAI item object it was sent as. Item
ids are the client's where it gave one (`conversation.item.create` with `item.id`),
else the server's; `previous_item_id` places a client item after another, as OpenAI
does. It is bounded (`MAX_ITEMS`: sessions never end, the oldest items fall off) and
refuses a duplicate or unknown id with `ProtocolError`. It is the record the client sees;
what the interaction model already read stays in its own context whatever is deleted
here. This module knows nothing about sockets, the engine or responses.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from .errors import ErrorCode, ProtocolError

MAX_ITEMS = 2_000  # items kept per session; older ones can no longer be retrieved or truncated
MAX_ITEM_ID_CHARS = 64  # OpenAI's limit on a client-chosen item id
_ITEM_ID = re.compile(r"[A-Za-z0-9_\-:.]+")


class Conversation:
    """Ordered, bounded OpenAI items of one session."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last_id(self) -> str | None:
        return next(reversed(self._items), None)

    def newest(self) -> Iterator[dict[str, Any]]:
        """The stored items, newest first (for a resumption record, which keeps the newest that fit)."""
        return reversed(self._items.values())

    def check_new_id(self, item_id: str, event_id: str | None) -> None:
        """Refuse a client item id that is malformed or already in use, before anything is changed."""
        if len(item_id) > MAX_ITEM_ID_CHARS or not _ITEM_ID.fullmatch(item_id):
            message = f"item id must be 1-{MAX_ITEM_ID_CHARS} characters of [A-Za-z0-9_-:.]"
            raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "item.id")
        if item_id in self._items:
            message = f"item {item_id!r} already exists"
            raise ProtocolError(ErrorCode.INVALID_EVENT, message, event_id, "item.id")

    def check_previous(self, previous_item_id: str | None, event_id: str | None) -> None:
        if previous_item_id is not None and previous_item_id not in self._items:
            message = f"previous item {previous_item_id!r} is not in the conversation"
            raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, message, event_id, "previous_item_id")

    def add(self, item: dict[str, Any], previous_item_id: str | None = None, first: bool = False
            ) -> str | None:
        """Append `item` (or place it after `previous_item_id`, or `first`); returns the id before it."""
        item_id = item["id"]
        if first:
            self._items[item_id] = item
            self._items.move_to_end(item_id, last=False)
            return None
        if previous_item_id is None or previous_item_id == self.last_id:
            before = self.last_id
            self._items[item_id] = item
        else:
            before = previous_item_id
            items = list(self._items.items())
            at = next(i for i, (key, _) in enumerate(items) if key == previous_item_id) + 1
            items.insert(at, (item_id, item))
            self._items = OrderedDict(items)
        while len(self._items) > MAX_ITEMS:
            self._items.popitem(last=False)
        return before

    def get(self, item_id: str, event_id: str | None = None) -> dict[str, Any]:
        """The item as it stands now (a copy), or ITEM_NOT_FOUND."""
        return copy.deepcopy(self._find(item_id, event_id))

    def live(self, item_id: str) -> dict[str, Any] | None:
        """The stored item itself, for its owner to update in place (None when it fell off or was deleted)."""
        return self._items.get(item_id)

    def delete(self, item_id: str, event_id: str | None = None) -> None:
        self._find(item_id, event_id)
        del self._items[item_id]

    def _find(self, item_id: str, event_id: str | None) -> dict[str, Any]:
        item = self._items.get(item_id)
        if item is None:
            message = f"item {item_id!r} is not in the conversation"
            raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, message, event_id, "item_id")
        return item
