"""Per-tenant PII redaction of prompts and responses before they reach the completion log or feedback store.

Each finding is replaced by a placeholder (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`, `[IP]`) and counted per kind.
Regexes only find candidates; a finding is redacted only once a validator accepts it, so an order number that
fails Luhn, an IBAN with a broken mod-97 check or `999.300.1.1` survive:

- email: a practical `local@domain.tld` regex, letters of any script (internationalised addresses, RFC 6531); the
  shape is the evidence.
- iban: country code, 2 check digits and 11-30 alphanumerics, compact or in groups of 4; `stdnum.iban.is_valid`
  (mod-97, and the country's format) of its first characters at the country's length, once.
- card: 13-19 contiguous digits (of any script), or 4-4-4-4(-3) / 4-6-4(5) groups split by spaces, dashes (of any
  width), dots, underscores or zero-width spaces; `stdnum.luhn`. Card groupings rather than "digits with any
  separators", so that a card is not merged with a number beside it (`4111 1111 1111 1111 2 times`) and then lost
  to the Luhn check.
- ip: IPv4 (4 octets: not `v1.2.3`) and IPv6 (2+ colons and a decimal digit: not `12:30`, `::`); `ipaddress`.
- phone: libphonenumber's `PhoneNumberMatcher` at `Leniency.VALID` (international numbers, the tenant region's
  national ones, only allocated ranges; rphonenumbers or phonenumbers: gateway.phones). It is the slowest pass by far
  (7-16 µs a candidate with rphonenumbers, 60-75 with phonenumbers), so it sees only runs of 7+
  digits joined by the punctuation the matcher itself allows inside a number (dashes of every width, spaces, dots,
  slashes, brackets, the zero-width ones: never a line break or a tab), and a record validates at most
  MAX_PHONE_CHECKS of them: past that its remaining runs are redacted as phones unvalidated, so that a prompt full
  of numbers (a CSV, a log) costs a bounded time in the record process that every tenant's records share.

Passes run in the order email, iban, card, ip, phone: an e-mail may hold digits or an IP-like domain, an IBAN's
digit groups can look like a card, and cards and IPs must be gone before the phone matcher could eat their digits.
A pass is skipped by a cheap pre-check when it cannot match: a digit count made once per text, a character it needs,
and in ASCII text a shape it needs (an IBAN starts with 2 capitals and 2 digits, a card holds 4 digits in a row,
an IPv4 address a digit, a dot and a digit), read off one `bytes.translate` of its encoding.

Names are not detected. Presidio's name recognizer needs a spaCy model that is not on PyPI (it is downloaded from
GitHub), GLiNER downloads its model from the Hugging Face Hub at run time, and name gazetteers (names-dataset) are
lists, not detectors: common words such as "May", "Will" or "Bill" collide with them. Tenants who need names kept
out of the logs can turn off prompt/response logging entirely.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

from stdnum import iban, luhn, numdb

from gateway.json_placeholders import json_kept
from gateway.phones import MAX_PHONE_CHECKS, MAX_PHONE_RUN_CHARS, PHONE_RUN, phone_library
from gateway.redaction_memory import ENTRY_CHARS, Known, Memory, digest

PII_KINDS: tuple[str, ...] = ("email", "phone", "card", "iban", "ip")

_Spans = Iterable[tuple[int, int]]
_DIGIT = re.compile(r"\d")

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-][\w.%+'-]{0,63}@[^\W_][\w-]{0,62}(?:\.[\w-]{1,63})*\.[^\W\d_]{2,24}\b")
# Patterns open with a character class, the word-boundary check right after it, rather than with an assertion:
# `re` then skips straight to candidate characters, about twice as fast on ordinary prose.
_GAP = "[ \u00a0\u202f\u2009\\-\u2010-\u2015\u2212._\u200b\u2060]"
"""Between a card's or an IBAN's groups: a space (no-break and thin ones too), a dash of any width, a dot, an
underscore or a zero-width space or joiner."""
_IBAN = re.compile(
    rf"[A-Za-z](?<=\b[A-Za-z])[A-Za-z]\d\d(?:{_GAP}?[A-Za-z0-9]{{4}}){{2,7}}(?:{_GAP}?[A-Za-z0-9]{{1,3}})?\b"
)  # any case: people type IBANs in lower case too (the checksum is of the upper-cased letters)
_CARD = re.compile(
    rf"\d(?<![\d.,]\d)(?:\d{{12,18}}|\d{{3}}(?:{_GAP}\d{{4}}){{3}}(?:{_GAP}\d{{3}})?|\d{{3}}{_GAP}\d{{6}}{_GAP}\d{{4,5}})(?!\d)"
)
_NOT_ALNUM = re.compile(r"[^0-9A-Za-z]")
_IPV4 = re.compile(r"\d(?<![\d.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\d|\.\d)")  # `srv_10.0.0.1`, `10.0.0.1ms`
_IPV6_BODY = r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\w)"
_IPV6 = re.compile(rf"(?<![\w:.]){_IPV6_BODY}")
_IPV6_LABELLED = re.compile(rf":(?<=\w:)(?=[0-9A-Fa-f:])({_IPV6_BODY})")
"""An address after a word and a colon (`addr:2001:db8::1`, `IPv6:fe80::1`), which _IPV6 does not start at: the
colon would join them into something that reads as neither. Opens with the colon, so `re` skips to colons."""
_SHAPES = bytes.maketrans(string.digits.encode() + string.ascii_letters.encode(), b"9" * 10 + b"A" * 52)
"""An ASCII text's shape: digits as 9, capitals as A, the rest as they are. One table lookup per byte of its
encoding: about a sixth of `str.translate`'s cost, which goes through a dict per character."""


def _is_card(candidate: str) -> bool:
    """Luhn, over the digits of any script (`\\d` found them: full-width `４１１１…` is a card too)."""
    return bool(luhn.is_valid("".join(str(unicodedata.decimal(c)) for c in candidate if c.isdecimal())))


def _is_iban(candidate: str) -> bool:
    return bool(iban.is_valid(_NOT_ALNUM.sub("", candidate)))


_ALNUM_AT = re.compile(r"[0-9A-Za-z]")


@functools.cache
def _iban_length(country: str) -> int | None:
    """The length of `country`'s IBANs (from python-stdnum's registry), None for a country without them."""
    found = dict(numdb.get("iban").info(country + "00")[0][1]).get("bban")
    return 4 + sum(int(n) for n in re.findall(r"\d+", found)) if isinstance(found, str) else None


def _ibans(text: str, _phones: Phones, _findings: Findings) -> _Spans:
    """Each IBAN's span. A match may have run on into what follows a dash or a space
    (`ES91 2100 0418 4502 0005 1332-EUR`): only its prefix of its country's exact length is checked, once (so a
    random code rarely passes, and that over-redacts, never leaks; and a text of IBAN-shaped codes costs one
    checksum each, not one per character dropped)."""
    for match in _IBAN.finditer(text):
        candidate = match.group()
        length = _iban_length(candidate[:2].upper())
        if length is None:
            continue
        ends = [m.end() for m in _ALNUM_AT.finditer(candidate)]
        if len(ends) >= length and _is_iban(candidate[: ends[length - 1]]):
            yield match.start(), match.start() + ends[length - 1]


def _ipv6s(text: str, _phones: Phones, _findings: Findings) -> _Spans:
    """Each IPv6 address's span, labelled ones (`host:fe80::1`: the address alone) among them, in order. Where a
    labelled address and an unlabelled one overlap (`cafe:2001:db8::1` reads as both), their union is redacted:
    never less than either."""
    spans = [m.span() for m in _IPV6.finditer(text) if _is_ip(m.group())]
    spans += [m.span(1) for m in _IPV6_LABELLED.finditer(text) if _is_ip(m.group(1))]
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


class Findings(Counter[str]):
    """Findings per kind for one record (or one feedback), and how many phone candidates it may still validate."""

    def __init__(self, *counts: Any, **kinds: int) -> None:
        self.phone_checks_left = MAX_PHONE_CHECKS
        if counts or kinds:  # copy(), pickle: as a Counter is made; empty (each record's), without Counter's
            super().__init__(*counts, **kinds)  # own update of nothing (0.5 µs a record)


class Phones(NamedTuple):
    """Where a redactor finds phone numbers: the libphonenumber implementation, and the region of national numbers."""

    library: ModuleType | None
    """None where the redactor does not look for phone numbers (the setting is not read then)."""
    region: str


_Finder = Callable[[str, Phones, Findings], _Spans]


def _regex(pattern: re.Pattern[str], valid: Callable[[str], bool] | None = None) -> _Finder:
    """A finder listing the spans of `pattern`'s matches that `valid` accepts (all of them without one)."""

    def find(text: str, _phones: Phones, _findings: Findings) -> _Spans:
        return [m.span() for m in pattern.finditer(text) if valid is None or valid(m.group())]

    return find


def _phones(text: str, phones: Phones, findings: Findings) -> _Spans:
    """The matcher parses every number-like candidate (tens of µs each) and text is full of short ones (times, years,
    counts), so it sees only runs of 7+ digits, with 4 characters of context either side for its boundary checks;
    past the record's MAX_PHONE_CHECKS, or past MAX_PHONE_RUN_CHARS, a run is taken whole, unvalidated."""
    last = 0
    for run in PHONE_RUN.finditer(text):
        if findings.phone_checks_left <= 0 or run.end() - run.start() > MAX_PHONE_RUN_CHARS:
            spans: Iterable[tuple[int, int]] = (run.span(),)
        else:
            findings.phone_checks_left -= 1
            lo = max(0, run.start() - 4)
            library = phones.library
            assert library is not None  # the phone pass runs only where the redactor was made with one
            window = text[lo : run.end() + 4].translate(_SQUARE_AS_SPACE)
            matches = library.PhoneNumberMatcher(window, phones.region, library.Leniency.VALID)
            spans = [(lo + match.start, lo + match.end) for match in matches]
        for start, end in (_own_brackets(text, *span) for span in spans):
            if start >= last:  # keep spans disjoint where two runs' contexts overlap
                last = end
                yield start, end


_SQUARE_AS_SPACE = str.maketrans("[]\uff3b\uff3d", "    ")
"""What the matcher reads square brackets as: JSON's arrays (`[[2025550143]]` it did not find at all, and it took the
`[` of `[2025550143]` into the number, leaving `[PHONE]]`)."""


_OPENERS, _CLOSERS = "([\uff08\uff3b", ")]\uff09\uff3d"


def _own_brackets(text: str, start: int, end: int) -> tuple[int, int]:
    """A phone span with the brackets that belong to it: not an opening one it does not close (`(2025550143` of
    `(2025550143)`), and the one before it that it does close (`[415] 555-2671`)."""
    if end - start > 1 and text[start] in _OPENERS and not any(c in _CLOSERS for c in text[start:end]):
        return start + 1, end
    if start > 0 and text[start - 1] in _OPENERS and any(c in _CLOSERS for c in text[start:end]):
        return start - 1, end
    return start, end


@dataclass(frozen=True, slots=True)
class _Pass:
    kind: str
    placeholder: str
    find: _Finder
    min_digits: int = 0
    needle: str = ""
    """A character the text must hold for the pass to run ("" is in every text)."""
    shape: bytes = b""
    """What an ASCII text's shape (`_SHAPES`) must hold for the pass to run: every match of the pass holds it."""


_PASSES: tuple[_Pass, ...] = (  # in the order they run
    _Pass("email", "[EMAIL]", _regex(_EMAIL), needle="@"),
    _Pass("iban", "[IBAN]", _ibans, min_digits=2, shape=b"AA99"),
    _Pass("card", "[CARD]", _regex(_CARD, _is_card), min_digits=13, shape=b"9999"),
    _Pass("ip", "[IP]", _ipv6s, min_digits=1, needle=":"),  # first: IPv4-mapped ::ffff:1.2.3.4
    _Pass("ip", "[IP]", _regex(_IPV4, _is_ip), min_digits=4, needle=".", shape=b"9.9"),
    _Pass("phone", "[PHONE]", _phones, min_digits=7),
)


_PLACEHOLDERS = frozenset(p.placeholder for p in _PASSES)


def _splice(text: str, spans: _Spans, placeholder: str) -> tuple[str, int]:
    """`text` with every span (ascending, disjoint) replaced by `placeholder`, and how many there were."""
    parts: list[str] = []
    pos = 0
    for start, end in spans:
        parts += (text[pos:start], placeholder)
        pos = end
    if not parts:
        return text, 0
    parts.append(text[pos:])
    return "".join(parts), len(parts) // 2


class Redactor:
    """Replaces the PII kinds it was built for with placeholders; one per tenant, reused for every record.

    With `remember_chars`, it remembers the redactions of the texts it saw last that held a candidate for some pass
    (`Memory`): a chat request carries the whole conversation so far, so each turn's record holds the earlier turns'
    messages again, and the application's system prompt, and a phone number in the first turn would be validated
    again in every record after it (tens of µs each). A remembered redaction is what redacting afresh would make:
    it is used only while the record has the phone checks it took (`Findings`), which it takes from the record, and
    a text whose redaction ran out of them is not remembered (its unvalidated findings are that record's)."""

    def __init__(
        self,
        kinds: Iterable[str] = PII_KINDS,
        phone_region: str = "US",
        remember_chars: int = 0,
        phone_library_name: str | None = None,
    ) -> None:
        wanted = frozenset(kinds)
        unknown = wanted.difference(PII_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kind(s) {sorted(unknown)}; valid kinds are {', '.join(PII_KINDS)}")
        library = phone_library(phone_library_name) if "phone" in wanted else None
        if library is not None and phone_region not in library.SUPPORTED_REGIONS:
            raise ValueError(f"unknown phone region {phone_region!r}; expected an ISO 3166 code such as 'US'")
        self._kinds = wanted
        self._phones = Phones(library, phone_region)
        self._passes = tuple(p for p in _PASSES if p.kind in wanted)
        self._memory = Memory(remember_chars)

    @property
    def kinds(self) -> frozenset[str]:
        return self._kinds

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with each finding replaced by its kind's placeholder, and the number of findings per kind."""
        counts = Findings()
        return self.redact_into(text, counts), counts

    def redact_into(self, text: str, counts: Findings) -> str:
        """`text` redacted, its findings added to `counts` (one per record: records hold many strings)."""
        if not self._passes or not text:
            return text
        shape = text.encode().translate(_SHAPES) if text.isascii() else b""  # other texts: every pass its regex
        digits = shape.count(b"9") if shape else len(_DIGIT.findall(text))
        for p in self._passes:
            if digits >= p.min_digits and p.needle in text and (not shape or p.shape in shape):
                break
        else:  # nothing it holds could be a finding (most texts): known without looking anything up
            return text
        key = digest(text) if ENTRY_CHARS < self._memory.chars else None
        known = self._memory.recall(key) if key is not None else None
        if known is not None and counts.phone_checks_left >= known.phone_checks:
            redacted, found = text if known.redacted is None else known.redacted, known.found
            counts.phone_checks_left -= known.phone_checks
        else:
            left = counts.phone_checks_left
            redacted, found = self._redact(text, shape, digits, counts)
            if key is not None and counts.phone_checks_left > 0:
                checks = left - counts.phone_checks_left
                self._memory.keep(key, Known(None if redacted is text else redacted, found, checks))
        for kind, n in found:
            counts[kind] += n
        return redacted

    def _redact(
        self, text: str, shape: bytes, digits: int, counts: Findings
    ) -> tuple[str, tuple[tuple[str, int], ...]]:
        found: list[tuple[str, int]] = []
        redacted = text
        for p in self._passes:
            if digits < p.min_digits or p.needle not in redacted or (shape and p.shape not in shape):
                continue
            redacted, n = _splice(redacted, p.find(redacted, self._phones, counts), p.placeholder)
            if n:
                found.append((p.kind, n))
        return (json_kept(text, redacted, _PLACEHOLDERS) if found else redacted), tuple(found)


LABELS: dict[str, re.Pattern[str]] = {
    "role": re.compile(r"system|developer|user|assistant|tool|function"),
    "type": re.compile(r"[a-z_]{1,32}"),  # text, image_url, input_audio, file, function, json_schema, ...
    # call_8f3c, chatcmpl-tool-9a1; at least one letter: a bare phone number, IP address or card is no label
    "tool_call_id": re.compile(r"(?=[^A-Za-z]*[A-Za-z])[A-Za-z0-9]{1,64}(?:[-_.:][A-Za-z0-9]{1,64}){0,4}"),
}
"""Keys whose string values are the API's own labels, never what a user wrote, when they have a label's shape:
`map_strings` leaves those as they are (an id's digits are not a phone number). Any other value is redacted (a
`metadata` field named `role` holds what the application put there)."""
CALL_LABELS: dict[str, re.Pattern[str]] = {**LABELS, "id": LABELS["tool_call_id"]}
"""LABELS in a tool call (a dict of `type` function whose `function` is a dict): its `id` is the label a tool message's
`tool_call_id` names, kept or redacted as that is, so that the two still match in a record (`call_4155552671`, not
`call_[PHONE]` beside the tool message's `call_4155552671`)."""
_PLAIN_KEY = re.compile(r"[A-Za-z_]{1,64}")
"""A dict key that holds nothing to redact (no digit, no `@`): left as it is, the rest are redacted like values."""


def redact_value(redactor: Redactor, value: object) -> tuple[object, Counter[str]]:
    """Redact every string in a JSON-like value (dicts, lists, strings), such as chat `messages` whose content is
    a string or a list of parts. Plain dict keys, LABELS and other scalars but long numbers are left as they are."""
    counts = Findings()
    return map_strings(value, lambda text: redactor.redact_into(text, counts)), counts


def _label_or(key: str, text: str, change: Callable[[str], str], labels: dict[str, re.Pattern[str]]) -> str:
    label = labels.get(key)
    return text if label is not None and label.fullmatch(text) else change(text)


_SCALARS = frozenset({int, float, bool, type(None)})
"""Left as they are, without a call (most of a request's parameters)."""
_API_KEYS = frozenset({"role", "content", "name", "type", "text", "tool_calls", "tool_call_id", "function", "id"})
"""Plain keys (`_PLAIN_KEY`) of every message: known without a regex."""


LONG_NUMBER = 1_000_000
"""A number from here on (7 digits, the shortest phone number PHONE_RUN finds) goes through `change` as the digits of
its whole part: `{"phone": 2025550143}` is a phone number whether the client quoted it or not, as it is in JSON text
(`JsonPlaceholders`)."""


def _is_long(value: object) -> bool:
    return (type(value) is int or type(value) is float) and not -LONG_NUMBER < value < LONG_NUMBER  # type: ignore[operator]


def _number(value: Any, change: Callable[[str], str]) -> Any:
    """A long number as it is, or what `change` made of its whole part's digits where it found something there (a
    placeholder: sign and fraction go with it, as in JSON text). Typed Any: compiled, a `float` parameter is a C
    double, and an int passed as one came back a float (1234567.0), past 1e16 in exponent form, unread."""
    digits = str(abs(value)).partition(".")[0]  # as JSON writes it (1e+300 holds no run of digits)
    if not digits.isdigit():
        return value
    changed = change(digits)
    return value if changed == digits else changed


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of a JSON-like value with `change` applied to each of its strings, long whole numbers (`_number`) and
    dict keys but the values of LABELS (CALL_LABELS in a tool call) of a label's shape and plain keys (the value
    itself is not modified)."""
    if isinstance(value, str):
        return change(value)
    if _is_long(value):
        return _number(value, change)
    if isinstance(value, dict):
        labels = CALL_LABELS if value.get("type") == "function" and isinstance(value.get("function"), dict) else LABELS
        return {
            (key if key in _API_KEYS or _PLAIN_KEY.fullmatch(key) else change(key)): (
                _label_or(key, item, change, labels)
            )
            if isinstance(item, str)
            else item
            if type(item) in _SCALARS and not _is_long(item)
            else map_strings(item, change)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [change(item) if isinstance(item, str) else map_strings(item, change) for item in value]
    return value
