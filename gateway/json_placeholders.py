"""Redacted text that was JSON stays JSON: tool-call arguments, a JSON-mode answer, a correction of one.

Redaction replaces what it finds in place, and a number it finds outside any JSON string (`{"phone": 2025550143}`)
would leave a bare placeholder (`{"phone": [PHONE]}`): no longer JSON, so exports could not read the arguments as an
object and a model trained on them would learn to write such JSON. Each placeholder outside a string is quoted
(`{"phone": "[PHONE]"}`), and what was left of its number goes with it (`-2025550143.5` is `"[PHONE]"` too, not
`-"[PHONE]".5`). Text that was not JSON, or that redaction left valid, is kept as it is.
"""

from __future__ import annotations

import json
from collections.abc import Collection

NUMBER_CHARS = frozenset("0123456789+-.eE")
"""What a JSON number is written with: outside a string, these beside a placeholder are the rest of its number."""


def json_kept(original: str, redacted: str, placeholders: Collection[str]) -> str:
    """`redacted` (`original` with findings replaced by `placeholders`), valid JSON again where `original` was a JSON
    object or array (a text that is one number is no JSON to keep: `[PHONE]` it is)."""
    if original.lstrip()[:1] not in ("{", "[") or _is_json(redacted) or not _is_json(original):
        return redacted
    quoted = _quoted(redacted, placeholders)
    return quoted if _is_json(quoted) else redacted


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError; nesting too deep to read is no JSON
        return False
    return True


def _quoted(text: str, placeholders: Collection[str]) -> str:
    """`text` with each placeholder that stands outside a JSON string put in quotes, and what is left of the number it
    was part of (a sign, a fraction, an exponent) dropped (each placeholder opens with `[`, as gateway.redaction's
    do)."""
    parts: list[str] = []
    last, i, inside, escaped = 0, 0, False, False
    while i < len(text):
        char = text[i]
        if inside:
            escaped, inside = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            inside = True
        elif char == "[" and (found := next((p for p in placeholders if text.startswith(p, i)), None)):
            start, end = i, i + len(found)
            while start > last and text[start - 1] in NUMBER_CHARS:
                start -= 1
            while end < len(text) and text[end] in NUMBER_CHARS:
                end += 1
            parts += [text[last:start], f'"{found}"']
            last = i = end
            continue
        i += 1
    return "".join(parts) + text[last:]
