"""Stored responses of the Responses API: what `previous_response_id`, GET and DELETE find.

In memory, per server process, and bounded: the newest MAX_STORED responses
are kept and older ones are forgotten (as are all of them when the server
stops), the way a local server's users expect, not a database. Each entry
holds the reply as the client received it, its own input items (for
GET .../input_items) and the conversation up to and including it, as chat messages: the history of the response it continued,
then its own input, then its own output. The messages are shared, not copied,
between a response and those that continue it, so a long chain costs one list
of references per response; forgetting an old response does not break the
chains that continue it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_STORED = 1000


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the Response object, as GET returns it
    history: tuple[dict[str, Any], ...]  # the conversation through this response, as chat messages
    input_items: tuple[dict[str, Any], ...] = ()  # this request's own input, as items with ids


class ResponseStore:
    def __init__(self, max_stored: int = MAX_STORED) -> None:
        self.max_stored = max_stored
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()  # routes run on the loop; tests and tools may not

    def put(self, entry: StoredResponse) -> None:
        with self._lock:
            self._entries[entry.response["id"]] = entry
            self._entries.move_to_end(entry.response["id"])
            while len(self._entries) > self.max_stored:
                self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._entries.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._entries)
