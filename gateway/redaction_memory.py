"""What a `Redactor` remembers of the texts it redacted last (gateway.redaction): their redactions by their digest,
so that a conversation's earlier turns and its system prompt, which come again in every turn's request, are not
redacted again in each record."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import NamedTuple

ENTRY_CHARS = 100
"""What a remembered redaction costs besides its redacted text (the entry, the digest, the tuples), in characters."""


class Known(NamedTuple):
    """A remembered redaction."""

    redacted: str | None
    """None: the text itself, nothing found in it."""
    found: tuple[tuple[str, int], ...]
    """The findings per kind."""
    phone_checks: int
    """The phone checks it took."""


class Memory:
    """Redactions by the digest of their text (the text itself, PII and all, is not kept), the least recently seen
    forgotten first once the redacted texts kept pass `chars` characters (ENTRY_CHARS more each). Locked: records
    are built in threads where there is no record process, and two batches' threads may share one."""

    def __init__(self, chars: int) -> None:
        self.chars = chars
        self._known: OrderedDict[bytes, Known] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def recall(self, key: bytes) -> Known | None:
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
            return known

    def keep(self, key: bytes, known: Known) -> None:
        size = entry_size(known)
        with self._lock:
            if size > self.chars or key in self._known:
                return
            self._known[key] = known
            self._used += size
            while self._used > self.chars:
                self._used -= entry_size(self._known.popitem(last=False)[1])


def entry_size(known: Known) -> int:
    return len(known.redacted or "") + ENTRY_CHARS


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
