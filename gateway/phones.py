"""Phone numbers for redaction (gateway.redaction): which runs of a text are checked, how many, and which
implementation of Google's libphonenumber checks them.

- `rphonenumbers` (the default): the `phonenumbers` API on rlibphonenumber, a Rust port of libphonenumber. Its
  `PhoneNumberMatcher` takes 7-16 µs where `phonenumbers`' takes 60-75 (a number in a sentence, on the AVX2 kind):
  phone checks were about a quarter of the record process's building time averaged over all records.
- `phonenumbers`: the pure-Python port, the reference (`LORAGATE_PHONE_MATCHER=phonenumbers`).

Both find the same numbers in text as people write them: tests/unit/test_phones.py compares them over every region's
example numbers, written the ways people write them (rphonenumbers' own differential suite makes about 6.7 million
comparisons against `phonenumbers`). They differ on a few runs of digits and punctuation that no one writes
(`+387 1(728/5/3 336642)5`: about 6 in 10,000 random ones), where `phonenumbers` looks for a number inside a
candidate it rejected (`_extract_inner_match`) and rlibphonenumber, following libphonenumber's C++, finds another
part or none. rphonenumbers is young (0.1.0, alpha): it is pinned, and the pure-Python port stays one setting away.
It carries libphonenumber's metadata of its release (9.0.41, `rphonenumbers.__phonenumbers_version__`): ranges
allocated since are found by `phonenumbers` (at least 9.0.43) and not by it until it is updated.

The setting is read from the environment (not the YAML file), by each gateway process at its start, which refuses
to start on a value it cannot use, and by the record processes it starts, which inherit it.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from types import ModuleType

LIBRARIES = ("rphonenumbers", "phonenumbers")
"""The implementations, the default first."""
ENV = "LORAGATE_PHONE_MATCHER"
PHONE_PUNCTUATION = (
    " \u00a0\u00ad\u200b\u2060\u3000().\\-/\u2010-\u2015\u2212\u30fc\uff0d-\uff0f\uff08\uff09\uff3b\uff3d\\[\\]~"
    "\u2053\u223c\uff5e"
)
"""What libphonenumber accepts between the digits of a number (its `_VALID_PUNCTUATION`, but the `x` of extensions)."""
PHONE_RUN = re.compile(rf"[+\uff0b(\uff08\[\uff3b\d](?:(?<=\d)|\d)(?:[{PHONE_PUNCTUATION}]*\d){{6,}}")
"""A run of 7+ digits joined by that punctuation, a plus or an opening bracket (of either width) before it
(`[+＋(（[［]?\\d(?:[P]*\\d){6,}`), written to open with a character class (the opener or the first digit; then, after
an opener, a digit), so that `re` skips straight to the characters that can start one, as gateway.redaction's
patterns do: 1.4-1.7x faster over prose with numbers in it, the same runs."""
MAX_PHONE_CHECKS = 64
"""Phone candidates validated per record (or per feedback); the rest are redacted unvalidated."""
MAX_PHONE_RUN_CHARS = 64
"""A longer run of digits and separators is no one phone number (a list, a table row): redacted whole, unvalidated;
the matcher takes seconds over a run of 100,000 characters."""


def phone_library(name: str | None = None) -> ModuleType:
    """The implementation named (by default, `LORAGATE_PHONE_MATCHER`, or the first of LIBRARIES); ValueError for
    a name that is none of them or a package that cannot be imported."""
    chosen = name or os.environ.get(ENV) or LIBRARIES[0]
    if chosen not in LIBRARIES:
        raise ValueError(f"{ENV}={chosen!r}: expected one of {', '.join(LIBRARIES)}")
    try:
        library = importlib.import_module(chosen)
    except ImportError as exc:
        other = next(name for name in LIBRARIES if name != chosen)
        raise ValueError(f"{ENV}: {chosen} cannot be imported ({exc}); reinstall loragate, or set {other}") from exc
    if chosen == "phonenumbers":  # its metadata regexes kept compiled, not looked up in `re`'s cache each time (or
        library.enable_pattern_cache()  # recompiled once evicted): 15-35% less per candidate
    return library


@functools.cache
def supported_regions() -> frozenset[str]:
    """The regions both implementations read national numbers of: what a tenant's `phone_region` may be, whichever
    the setting chooses, now or later."""
    return frozenset.intersection(*(frozenset(phone_library(name).SUPPORTED_REGIONS) for name in LIBRARIES))
