"""DPO's preference pairs of one export (gateway.export), made as the log is read, in bounded memory.

A correction is chosen over its completion's own answer at once. Rated answers wait until the whole log is
read: then, per prompt, the best-rated answer (the oldest of the best) is chosen over each negative one (judged
below 0.5). Answers are as rows hold them (`conversation.answer`: an assistant message, with its tool calls, for a
chat prompt; the text for a text prompt). What waits is kept in a private temporary SQLite database (SQLite writes
it to a temporary file past a page cache of CACHE_KIB, and deletes it when the pairs are closed): each prompt once (with
its tools), each rated answer and its judgement, and a digest of each pair made, so that no pair is written twice.
The export's memory is then that of a page of the log, whatever the log holds: 100,000 rated answers of 2 kB are
200 MB on disk, not in memory.

Texts are stored as their UTF-8 (a lone surrogate, which a record may hold, passed through as its bytes): on disk they
take what they take in the log.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from gateway.conversation import Answer, Prompt, tools_field

CACHE_KIB = 4096
"""SQLite's page cache for the pairs' database; what exceeds it is on disk."""
POSITIVE = 0.5
"""A judgement at or above this is positive (gateway.export)."""

_SCHEMA = """
PRAGMA journal_mode = OFF;
PRAGMA synchronous = OFF;
CREATE TABLE prompts (id INTEGER PRIMARY KEY, digest BLOB UNIQUE NOT NULL, prompt BLOB NOT NULL);
CREATE TABLE answers (id INTEGER PRIMARY KEY, prompt INTEGER NOT NULL, text BLOB NOT NULL, value REAL NOT NULL);
CREATE INDEX answers_by_prompt ON answers (prompt, value DESC, id);
CREATE TABLE made (digest BLOB PRIMARY KEY) WITHOUT ROWID;
"""
_NEGATIVES = """
SELECT p.digest, p.prompt, a.text, (
    SELECT b.text FROM answers b WHERE b.prompt = a.prompt AND b.value >= :positive ORDER BY b.value DESC, b.id LIMIT 1
)
FROM answers a JOIN prompts p ON p.id = a.prompt
WHERE a.value < :positive
ORDER BY p.id, a.id
"""


class PreferencePairs:
    """One export's pairs; `close` (or `with`) deletes what waited. Used from one thread at a time, `close` too: never
    while another thread is in a call (SQLite would crash the process; gateway.export runs them all in one thread).
    A prompt's best answer is found through an index in the order it is chosen by (judgement, then age): one lookup
    per negative answer, not a sort of the prompt's positive ones (every thumbs-up ties at 1.0)."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False)  # "": private, temporary, on disk past its cache
        self._db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self._db.executescript(_SCHEMA)

    def __enter__(self) -> PreferencePairs:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def correction(
        self, prompt: Prompt, key: str, chosen: Answer, rejected: Answer, tools: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """The pair of a correction (`chosen`) over its completion's answer, unless made already."""
        return self._pair(_digest(key), _head(prompt, tools), _json(chosen), _json(rejected))

    def rated(self, prompt: Prompt, key: str, given: Answer, judgement: float, tools: str | None = None) -> None:
        """Keep a rated answer of the prompt whose canonical JSON (with its tools) is `key`, for `rest`."""
        digest = _digest(key)
        stored = _utf8(json.dumps(_head(prompt, tools), ensure_ascii=False))
        self._db.execute("INSERT OR IGNORE INTO prompts (digest, prompt) VALUES (?, ?)", (digest, stored))
        self._db.execute(
            "INSERT INTO answers (prompt, text, value) SELECT id, ?, ? FROM prompts WHERE digest = ?",
            (_utf8(_json(given)), judgement, digest),
        )

    def rest(self, stop: threading.Event | None = None) -> Iterator[dict[str, Any]]:
        """Each prompt's best-rated answer over each of its negative ones, prompts in the order they came, and
        each prompt's negative answers in the order they came; none past `stop` (checked at every answer read, not
        only at every pair made: millions of negative answers may make none)."""
        for digest, prompt, rejected, chosen in self._db.execute(_NEGATIVES, {"positive": POSITIVE}):
            if stop is not None and stop.is_set():
                return
            if chosen is not None:
                yield from self._pair(digest, json.loads(_text(prompt)), _text(chosen), _text(rejected))

    def _pair(self, prompt_digest: bytes, head: dict[str, Any], chosen: str, rejected: str) -> Iterator[dict[str, Any]]:
        """The pair of two answers (as JSON) after the row's `head` (its prompt, and tools), unless made already."""
        if chosen == rejected:
            return
        made = hashlib.sha256(prompt_digest + _utf8(json.dumps([chosen, rejected]))).digest()
        if self._db.execute("INSERT OR IGNORE INTO made (digest) VALUES (?)", (made,)).rowcount:
            yield {**head, "chosen": json.loads(chosen), "rejected": json.loads(rejected)}


def _head(prompt: Prompt, tools: str | None) -> dict[str, Any]:
    """What a prompt's rows open with: the prompt, and its tools when it had any."""
    return {"prompt": prompt, **tools_field(tools)}


def _json(given: Answer) -> str:
    """An answer's JSON: equal answers, equal text."""
    return json.dumps(given, sort_keys=True, ensure_ascii=False)


def _digest(key: str) -> bytes:
    return hashlib.sha256(_utf8(key)).digest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(stored: bytes) -> str:
    return stored.decode("utf-8", "surrogatepass")
