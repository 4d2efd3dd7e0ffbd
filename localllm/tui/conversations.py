"""Conversations kept in LOCALLLM_HOME/conversations.sqlite3 (the standard library's sqlite3).

The chat screen is the only writer; each change is its own transaction, so a
crash loses at most the reply being streamed (which is saved as it finishes,
stopped or not).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from localllm.core.requests import SamplingParams

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL,
    settings TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    stats TEXT,
    stopped INTEGER NOT NULL DEFAULT 0,
    reasoning TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


CHAT_MAX_TOKENS = 512  # a chat's reply length when no --max-tokens was given


def _chat_sampling() -> SamplingParams:
    return SamplingParams(max_tokens=CHAT_MAX_TOKENS)


@dataclass
class ChatSettings:
    """Per-chat settings: the system prompt, the sampling parameters `localllm chat` was given (all of
    them, as the requests' own type) and the runtime context; None in `n_ctx` means the model's default."""

    system: str = ""
    sampling: SamplingParams = field(default_factory=_chat_sampling)
    n_ctx: int | None = None

    @classmethod
    def starting_from(cls, params: SamplingParams, *, system: str = "", n_ctx: int | None = None) -> ChatSettings:
        """The settings a chat starts with, from the command's sampling flags."""
        return cls(system, replace(params, stop=list(params.stop), max_tokens=params.max_tokens or CHAT_MAX_TOKENS), n_ctx)

    def request_params(self) -> SamplingParams:
        """A copy for one request, so a later change to the settings never reaches a request in flight."""
        return replace(self.sampling, stop=list(self.sampling.stop))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ChatSettings:
        saved = json.loads(text or "{}")
        if "sampling" not in saved:  # saved before the settings carried SamplingParams: flat fields, "context"
            saved = {"system": saved.get("system", ""), "n_ctx": saved.get("context"),
                     "sampling": {k: v for k, v in saved.items() if k in SamplingParams.__dataclass_fields__}}
        known = {k: v for k, v in saved["sampling"].items() if k in SamplingParams.__dataclass_fields__}
        return cls(saved.get("system", ""), replace(_chat_sampling(), **known), saved.get("n_ctx"))


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    stats: dict | None = None  # ttft_s, completion_tokens, tokens_per_s, reason
    stopped: bool = False
    id: int | None = None
    reasoning: str = ""  # a reasoning model's thoughts before the answer (shown folded, never sent back)


@dataclass
class Conversation:
    id: int
    title: str
    model: str
    settings: ChatSettings = field(default_factory=ChatSettings)
    updated: float = 0.0


class ConversationStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
        if "reasoning" not in columns:  # a file written before replies kept their thoughts
            with self.db:
                self.db.execute("ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self.db.close()

    def create(self, model: str, settings: ChatSettings, title: str = "New chat") -> Conversation:
        now = time.time()
        with self.db:
            cur = self.db.execute(
                "INSERT INTO conversations (title, model, settings, created, updated) VALUES (?, ?, ?, ?, ?)",
                (title, model, settings.to_json(), now, now),
            )
        return Conversation(cur.lastrowid, title, model, settings, now)

    def get(self, conversation_id: int) -> Conversation | None:
        row = self.db.execute(
            "SELECT id, title, model, settings, updated FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        return _conversation(row) if row else None

    def list(self, search: str = "") -> list[Conversation]:
        """Newest first; `search` matches titles and message text, case-insensitively."""
        query = "SELECT id, title, model, settings, updated FROM conversations"
        args: tuple = ()
        if search.strip():
            pattern = f"%{_escape_like(search.strip())}%"
            query += (
                " WHERE title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
                " WHERE m.conversation_id = conversations.id AND m.content LIKE ? ESCAPE '\\')"
            )
            args = (pattern, pattern)
        rows = self.db.execute(query + " ORDER BY updated DESC, id DESC", args).fetchall()
        return [_conversation(r) for r in rows]

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self.db.execute(
            "SELECT id, role, content, stats, stopped, reasoning FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        ).fetchall()
        return [
            Message(role, content, json.loads(stats) if stats else None, bool(stopped), mid, reasoning)
            for mid, role, content, stats, stopped, reasoning in rows
        ]

    def add_message(self, conversation_id: int, message: Message) -> Message:
        with self.db:
            cur = self.db.execute(
                "INSERT INTO messages (conversation_id, role, content, stats, stopped, reasoning) VALUES (?, ?, ?, ?, ?, ?)",
                (conversation_id, message.role, message.content,
                 json.dumps(message.stats) if message.stats else None, int(message.stopped), message.reasoning),
            )
            self._touch(conversation_id)
        message.id = cur.lastrowid
        return message

    def delete_messages_from(self, conversation_id: int, message_id: int) -> None:
        """Forget `message_id` and everything after it (regenerate, edit and resend)."""
        with self.db:
            self.db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, message_id))
            self._touch(conversation_id)

    def rename(self, conversation_id: int, title: str) -> None:
        with self.db:
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title.strip() or "Untitled", conversation_id))

    def update(self, conversation: Conversation) -> None:
        """Save the model and settings of a conversation."""
        with self.db:
            self.db.execute(
                "UPDATE conversations SET model = ?, settings = ? WHERE id = ?",
                (conversation.model, conversation.settings.to_json(), conversation.id),
            )
            self._touch(conversation.id)

    def delete(self, conversation_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def _touch(self, conversation_id: int) -> None:
        self.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), conversation_id))


def _conversation(row) -> Conversation:
    cid, title, model, settings, updated = row
    return Conversation(cid, title, model, ChatSettings.from_json(settings), updated)


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def title_from(text: str, limit: int = 40) -> str:
    """A conversation's default title: the first line of its first message."""
    line = text.strip().splitlines()[0] if text.strip() else "New chat"
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"
