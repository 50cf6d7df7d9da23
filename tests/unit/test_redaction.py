"""PII redaction of logged prompts and responses: what is replaced, what must survive, and chat-message walking."""

from __future__ import annotations

import pickle
import random
import re
import time
from collections import Counter
from typing import Any

import pytest

from gateway import phones, redaction_memory
from gateway.phones import MAX_PHONE_CHECKS, phone_library
from gateway.redaction import PII_KINDS, Findings, Redactor, redact_value

TICKET = (
    "Hi support, this is Jane Doe (jane.doe@example.com). Please call me back on +44 20 7946 0958, or at my "
    "US office on (415) 555-2671 after 3pm. I was charged twice: once on my Visa 4111 1111 1111 1111 and once "
    "on the Mastercard 5555-5555-5555-4444. Refunds can go to DE89 3704 0044 0532 0130 00 or to my UK account "
    "GB82 WEST 1234 5698 7654 32. Our VPN gateway is 192.168.1.20 and the IPv6 host is 2001:db8::8a2e:370:7334."
)
TICKET_REDACTED = (
    "Hi support, this is Jane Doe ([EMAIL]). Please call me back on [PHONE], or at my "
    "US office on [PHONE] after 3pm. I was charged twice: once on my Visa [CARD] and once "
    "on the Mastercard [CARD]. Refunds can go to [IBAN] or to my UK account "
    "[IBAN]. Our VPN gateway is [IP] and the IPv6 host is [IP]."
)


def test_support_ticket_has_every_item_replaced_and_counted() -> None:
    text, counts = Redactor().redact(TICKET)
    assert text == TICKET_REDACTED
    assert counts == Counter(email=1, phone=2, card=2, iban=2, ip=2)


def test_text_beyond_ascii_gets_every_pass() -> None:
    """ASCII text skips passes by its shape (no "AA99", "9999" or "9.9" in it); any other text is scanned in full."""
    text, counts = Redactor().redact("Grüße – " + TICKET + " Merci, José.")
    assert text == "Grüße – " + TICKET_REDACTED + " Merci, José."
    assert counts == Counter(email=1, phone=2, card=2, iban=2, ip=2)


def test_invoice_email_with_compact_forms() -> None:
    text, counts = Redactor().redact(
        "Invoice 2026-0042 for ops+billing@sub.example.co.uk: card 4111111111111111 (exp 12/28), IBAN "
        "GB82WEST12345698765432. Amex 3782 822463 10005 was declined. Reply from 10.0.0.7 at 09:15."
    )
    assert text == (
        "Invoice 2026-0042 for [EMAIL]: card [CARD] (exp 12/28), IBAN "
        "[IBAN]. Amex [CARD] was declined. Reply from [IP] at 09:15."
    )
    assert counts == Counter(email=1, card=2, iban=1, ip=1)


NEGATIVES = [
    "Your order 1234567812345678 has shipped.",  # 16 digits, fails Luhn
    "Pay to DE88 3704 0044 0532 0130 00 instead.",  # the DE89 example with a broken check digit
    "Please upgrade the client to v1.2.3 before the call.",
    "The standup is at 12:30, the retro at 16:45:30.",
    "999.300.1.1 is not a host, and neither is 1.2.3.4.5 or build 10.0.19045.1234.",
    "The contract renews on 2026-11-30.",
    "We shipped 12 items on 3 pallets, 2400 units in total, worth 1500000 USD.",
    "Use std::vector<int> and Foo::bar() here; the MAC is 00:1A:2B:3C:4D:5E.",
    "Call (123) 456-7890 if the fake number in the docs works.",  # area codes never start with 1
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_survive_unchanged(text: str) -> None:
    assert Redactor().redact(text) == (text, Counter())


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("ping ::1 then [::1]:8080", "ping [IP] then [[IP]]:8080"),
        ("mapped ::ffff:192.168.1.1 and fe80::1", "mapped [IP] and [IP]"),
        ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "full [IP]."),
        ("DNS is 8.8.8.8.", "DNS is [IP]."),
        ("addr:2001:db8::1 and IPv6:fe80::2, host=fe80::3", "addr:[IP] and IPv6:[IP], host=[IP]"),
        ("x6a:2001:db8::1, cafebabe:2001:db8::1, cafe:2001:db8::1", "x6a:[IP], cafebabe:[IP], [IP]"),  # `cafe`: a group
        ("host.de:fe80::1, Dec:2001:db8:1:2:3:4:5:6, fe:::1", "host.de:[IP], Dec:[IP], fe:[IP]"),
        ("time:12:30:45, std::vector and Foo::bar", "time:12:30:45, std::vector and Foo::bar"),
    ],
)
def test_ip_addresses(text: str, redacted: str) -> None:
    assert Redactor(["ip"]).redact(text)[0] == redacted


def test_card_next_to_another_number_is_still_found() -> None:
    assert Redactor().redact("charged 4111 1111 1111 1111 2 times")[0] == "charged [CARD] 2 times"


def test_phone_numbers_of_the_region_and_international() -> None:
    us = Redactor(["phone"])
    assert us.redact("Call 650-253-0000 or +1 (212) 736-5000.")[0] == "Call [PHONE] or [PHONE]."
    assert us.redact("UK office: 020 7946 0958") == ("UK office: 020 7946 0958", Counter())  # national, not US
    uk = Redactor(["phone"], phone_region="GB")
    assert uk.redact("UK office: 020 7946 0958") == ("UK office: [PHONE]", Counter(phone=1))


@pytest.mark.parametrize(
    "text",
    [
        "Call 415\u2013555\u20130132 now",  # en dashes, as word processors write them
        "Call 415\u200b555\u200b0132 now",  # zero-width spaces
        "Call \uff08415\uff09555-0132 now",  # full-width brackets
        "Call 415[555]0132 now",
        "Call 415/555.0132 now",
    ],
)
def test_phone_numbers_in_any_punctuation_the_matcher_knows(text: str) -> None:
    assert Redactor(["phone"]).redact(text) == ("Call [PHONE] now", Counter(phone=1))


@pytest.mark.parametrize(
    "text", ["write to jane.müller@example.de", "write to josé@correo.es", "write to иван@почта.рф"]
)
def test_addresses_in_any_script_are_redacted_whole(text: str) -> None:
    assert Redactor(["email"]).redact(text + " today") == ("write to [EMAIL] today", Counter(email=1))


def test_cards_and_ibans_in_the_spaces_and_dashes_of_word_processors() -> None:
    text = "Visa 4111\u20131111\u20131111\u20131111, IBAN DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000."
    assert Redactor().redact(text) == ("Visa [CARD], IBAN [IBAN].", Counter(card=1, iban=1))
    for text, kept in (  # an IBAN runs on into what follows it: the IBAN is redacted, the rest kept
        ("Pay ES91 2100 0418 4502 0005 1332-EUR now", "Pay [IBAN]-EUR now"),
        ("ES9121000418450200051332-EUR", "[IBAN]-EUR"),
        ("BE71 0961 2345 6769-2026", "[IBAN]-2026"),
        ("ES91 2100 0418 4502 0005 1332 EUR", "[IBAN] EUR"),
    ):
        assert Redactor().redact(text) == (kept, Counter(iban=1)), text
    assert Redactor().redact("order AB12-3456-7890 of 2026-05-01")[0] == "order AB12-3456-7890 of 2026-05-01"
    for gap in ("-", "\u2009", "\u2013"):  # dashes and thin spaces, as between a card's groups
        text = f"IBAN DE89{gap}3704{gap}0044{gap}0532{gap}0130{gap}00, thanks."
        assert Redactor().redact(text) == ("IBAN [IBAN], thanks.", Counter(iban=1)), repr(gap)
    assert Redactor().redact("Visa 4111\u20131111\u20131111\u20131112")[1] == Counter(), "still Luhn-checked"


def test_a_text_full_of_numbers_costs_a_bounded_number_of_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line of a CSV is a run of its own (the matcher never joins lines), and past MAX_PHONE_CHECKS candidates
    in one record the rest are redacted unvalidated: a prompt of numbers cannot stall the record process."""
    checked: list[str] = []
    library = phone_library()
    real = library.PhoneNumberMatcher

    def matcher(text: str, region: str, leniency: Any) -> Any:
        checked.append(text)
        return real(text, region, leniency)

    monkeypatch.setattr(library, "PhoneNumberMatcher", matcher)
    rows = [f"{1_700_000_000_000 + 7919 * i},12.5" for i in range(MAX_PHONE_CHECKS + 10)]
    csv = "call 415-555-0132\n" + "\n".join(rows)
    text, counts = Redactor(["phone"]).redact(csv)
    lines = text.split("\n")
    assert lines[0] == "call [PHONE]", "found while there are checks left"
    assert lines[1:MAX_PHONE_CHECKS] == rows[: MAX_PHONE_CHECKS - 1], "validated, and not phones: kept"
    assert all(line == "[PHONE],12.5" for line in lines[MAX_PHONE_CHECKS:]), "past the checks: redacted, unchecked"
    assert len(checked) == MAX_PHONE_CHECKS
    assert [m.group() for m in phones.PHONE_RUN.finditer("12.5\n1700000000000\t12.5")] == ["1700000000000"]
    assert counts == Counter(phone=1 + 11)
    record_counts = Findings()
    Redactor(["phone"]).redact_into(csv, record_counts)
    assert Redactor(["phone"]).redact_into("call 415-555-0132", record_counts) == "call [PHONE]", "the same record"
    assert record_counts["phone"] == 13


def test_phone_runs_are_the_runs_of_the_plain_pattern() -> None:
    """PHONE_RUN opens with a character class (for speed); it finds what its plain form finds, in any text."""
    plain = re.compile(rf"[+\uff0b(\uff08\[\uff3b]?\d(?:[{phones.PHONE_PUNCTUATION}]*\d){{6,}}")
    rng = random.Random(3)
    alphabet = "0123456789" * 3 + "+(([ )]-./ \u00a0\uff0b\uff08\uff3bx\n\t" + "٣４"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["call +1 (415) 555-0100 or (020) 7946 0958, [030] 1234567", "a(1234567)b ++12345678 [[1234567 +(1) 2"]
    for text in texts:
        assert [m.span() for m in phones.PHONE_RUN.finditer(text)] == [m.span() for m in plain.finditer(text)], text
    assert sum(1 for text in texts if plain.search(text)) > 1000


def test_only_the_chosen_kinds_are_redacted() -> None:
    redactor = Redactor(["email", "iban"])
    assert redactor.kinds == frozenset({"email", "iban"})
    text, counts = redactor.redact(TICKET)
    assert "[EMAIL]" in text and "[IBAN]" in text
    assert "+44 20 7946 0958" in text and "4111 1111 1111 1111" in text and "192.168.1.20" in text
    assert counts == Counter(email=1, iban=2)


def test_no_kinds_leaves_text_unchanged() -> None:
    assert Redactor([]).redact(TICKET) == (TICKET, Counter())
    assert Redactor().kinds == frozenset(PII_KINDS)


def test_unknown_kind_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'name'.*email, phone, card, iban, ip"):
        Redactor(["email", "name"])
    with pytest.raises(ValueError, match="phone region"):
        Redactor(phone_region="XX")


def test_redact_value_walks_chat_messages() -> None:
    messages = [
        {"role": "system", "content": "You are a helpful billing assistant."},
        {"role": "user", "content": "My e-mail is bob@example.org and my card is 4111-1111-1111-1111."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Wire it to GB82 WEST 1234 5698 7654 32, or call +44 20 7946 0958."},
                {"type": "image_url", "image_url": {"url": "https://cdn.example.com/receipt.png"}},
            ],
        },
        {"role": "assistant", "content": None, "weight": 0.5, "n": 4111111111111111, "done": True},
        {"alice@example.com": "a key holding an e-mail is redacted too"},
    ]
    redacted, counts = redact_value(Redactor(), messages)
    assert redacted == [
        {"role": "system", "content": "You are a helpful billing assistant."},
        {"role": "user", "content": "My e-mail is [EMAIL] and my card is [CARD]."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Wire it to [IBAN], or call [PHONE]."},
                {"type": "image_url", "image_url": {"url": "https://cdn.example.com/receipt.png"}},
            ],
        },
        {"role": "assistant", "content": None, "weight": 0.5, "n": "[CARD]", "done": True},
        {"[EMAIL]": "a key holding an e-mail is redacted too"},
    ]
    assert counts == Counter(email=2, card=2, iban=1, phone=1), "a number is a card whether quoted or not"
    assert messages[1]["content"].startswith("My e-mail is bob@")  # the input is not modified


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"phone": 2025550143}', '{"phone": "[PHONE]"}'),
        ('{"phone": -2025550143, "n": [-1, -4155552671]}', '{"phone": "[PHONE]", "n": [-1, "[PHONE]"]}'),  # signs
        ('{"p": 2025550143.5, "c": [4111111111111111e0, 1.5]}', '{"p": "[PHONE]", "c": ["[CARD]", 1.5]}'),  # the rest
        ('[4111111111111111, "a@b.io", "x [PHONE] y"]', '["[CARD]", "[EMAIL]", "x [PHONE] y"]'),
        ('{"ip": 10.1.2.3 }', '{"ip": [IP] }'),  # not JSON before: left as redaction made it
        ('{"n": "ring \\" 2025550143"}', '{"n": "ring \\" [PHONE]"}'),  # inside a string (an escaped quote before)
        ("call 2025550143 [1]", "call [PHONE] [1]"),
        ("2025550143", "[PHONE]"),  # one number: no object or array to keep
        ('{"to": [2025550143], "cc": 4155552671}', '{"to": ["[PHONE]"], "cc": "[PHONE]"}'),  # `[` not the number's
        ("[[2025550143]]", '[["[PHONE]"]]'),  # the matcher found nothing between square brackets
        ("call (2025550143) now or [415] 555-2671", "call ([PHONE]) now or [PHONE]"),  # brackets a number closes
    ],
)
def test_json_stays_json_where_a_bare_number_was_redacted(text: str, expected: str) -> None:
    redacted, _ = Redactor().redact(text)
    assert redacted == expected


def test_json_nested_too_deep_to_read_is_redacted_as_text() -> None:
    text = "[" * 3000 + '"ann@example.com", 2025550143' + "]" * 3000  # past what json.loads recurses into
    assert Redactor().redact(text)[0] == "[" * 3000 + '"[EMAIL]", [PHONE]' + "]" * 3000


def test_redact_value_on_scalars() -> None:
    assert redact_value(Redactor(), "mail a@b.io") == ("mail [EMAIL]", Counter(email=1))
    assert redact_value(Redactor(), 42) == (42, Counter())


def test_a_long_run_of_numbers_is_redacted_whole_in_bounded_time() -> None:
    """100,000 characters of `12 12 12 ...` are one run for the phone pass: the matcher took seconds over it (any
    tenant could send it as a correction). A run longer than a phone number can be is redacted whole, unvalidated."""
    text = "call " + "12 " * 33_000 + "thanks"
    started = time.perf_counter()
    redacted, found = Redactor(frozenset({"phone"})).redact(text)
    assert time.perf_counter() - started < 1.0
    assert redacted == "call [PHONE] thanks" and found == {"phone": 1}


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("pay to de89 3704 0044 0532 0130 00 please", "pay to [IBAN] please"),
        ("iban: gb82 West 1234 5698 7654 32.", "iban: [IBAN]."),
        ("card4111111111111111", "card[CARD]"),
        ("4111111111111111exp 12/29", "[CARD]exp 12/29"),
        ("srv_192.168.1.10 is down", "srv_[IP] is down"),
        ("ping 10.0.0.1ms", "ping [IP]ms"),
        ("v1.2.3 costs 1,234,567.89 for order 1234567890123", "v1.2.3 costs 1,234,567.89 for order 1234567890123"),
    ],
)
def test_lower_case_ibans_and_numbers_glued_to_words(text: str, redacted: str) -> None:
    """Typed as people type them: an IBAN in lower case, a card or an address run into a word or a unit."""
    assert Redactor(frozenset(PII_KINDS)).redact(text)[0] == redacted


def test_iban_shaped_codes_cost_one_checksum_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, each IBAN-shaped match that failed was checked again with one character fewer, down to 15: a text of
    such codes took seconds (3.5 s for 33 KB) in the record process every tenant's records share."""
    from gateway import redaction

    checks = []
    real = redaction.iban.is_valid  # looked up at each call, compiled (gateway.native) or not
    monkeypatch.setattr(redaction.iban, "is_valid", lambda candidate: checks.append(candidate) or real(candidate))
    text = "GB12ABCDEFGHIJKLMNOPQRSTUVWXYZ12 " * 200 + "DE12 ABCD EFGH IJKL MNOP QR " * 200 + "XX12ABCDEFGHIJKLMNOP"
    assert Redactor(["iban"]).redact(text) == (text, Counter())
    assert len(checks) == 400, "one check per match, none for a country without IBANs"


def test_cards_in_other_scripts_digits_and_separators() -> None:
    """`\\d` found them, but the Luhn check saw only ASCII digits: full-width (Japanese and Chinese input) and
    Arabic-Indic cards, and cards grouped by dots, underscores or zero-width spaces, were kept whole."""
    for card in (
        "４１１１１１１１１１１１１１１１",
        "٤١١١١١١١١١١١١١١١",
        "4111.1111.1111.1111",
        "4111_1111_1111_1111",
        "4111\u200b1111\u200b1111\u200b1111",
    ):
        assert Redactor(["card"]).redact(f"card {card} ok") == ("card [CARD] ok", Counter(card=1)), card
    assert Redactor().redact("pi 3.1415 9265 3589 7932")[1] == Counter(), "fails Luhn: kept"


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("write to o'brien@example.com today", "write to [EMAIL] today"),
        ("quoted 'john@example.com' here", "quoted '[EMAIL]' here"),
    ],
)
def test_an_apostrophe_in_an_address_keeps_nothing_of_it(text: str, redacted: str) -> None:
    assert Redactor(["email"]).redact(text)[0] == redacted


def test_findings_start_empty_and_copy_and_pickle_as_a_counter() -> None:
    """Each record's findings start without Counter's own (costly) update; made from counts (copy, pickle), they
    take them as a Counter does, and each starts with the whole budget of phone checks."""
    found = Findings()
    assert found == Counter() and found.phone_checks_left == MAX_PHONE_CHECKS
    found["email"] += 2
    found.phone_checks_left -= 1
    for made in (found.copy(), pickle.loads(pickle.dumps(found)), Findings(email=2)):
        assert type(made) is Findings and made == Counter(email=2) and made.phone_checks_left == MAX_PHONE_CHECKS
    assert Findings().phone_checks_left == MAX_PHONE_CHECKS, "one record's checks are not another's"


def test_a_remembering_redactor_redacts_and_counts_a_text_seen_again_as_the_first_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The conversation so far comes again in every turn's request: its texts' redactions are remembered, the same
    text, the same counts and the same phone checks taken from the record each time, without the matcher."""
    remembering, plain = Redactor(remember_chars=1 << 20), Redactor()
    texts = [TICKET, "no candidate in this one at all", "order 1234567 and mail me at bob@example.org"]
    for text in texts:  # first seen: as a redactor that remembers nothing makes it
        counts, expected = Findings(), Findings()
        assert remembering.redact_into(text, counts) == plain.redact_into(text, expected)
        assert counts == expected and counts.phone_checks_left == expected.phone_checks_left
    calls: list[str] = []
    library = phone_library()
    matcher = library.PhoneNumberMatcher

    def counting(text: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(text)
        return matcher(text, *args, **kwargs)

    monkeypatch.setattr(library, "PhoneNumberMatcher", counting)
    counts = Findings()
    assert remembering.redact_into(TICKET, counts) == TICKET_REDACTED and not calls, "remembered: not matched again"
    assert counts == Counter(email=1, phone=2, card=2, iban=2, ip=2)
    assert counts.phone_checks_left == MAX_PHONE_CHECKS - 2, "the checks it took, taken from the record all the same"
    assert plain.redact_into(TICKET, Findings()) == TICKET_REDACTED and len(calls) == 2, "(the matcher is counted)"


def test_a_remembered_redaction_is_used_only_where_a_fresh_one_would_make_it() -> None:
    """Past the record's checks a run is redacted unvalidated. Such a redaction is that record's, not the text's: it
    is not remembered; and a remembered one, validated in full, is used only while the record has the checks it took,
    so that what a record holds never depends on what other records (another tenant's) held."""
    remembering, plain, text = Redactor(remember_chars=1 << 20), Redactor(), "ids 1234567 and 7654321 in the batch"

    def both(left: int) -> tuple[str, int]:
        counts, expected = Findings(), Findings()
        counts.phone_checks_left = expected.phone_checks_left = left
        made = remembering.redact_into(text, counts)
        assert made == plain.redact_into(text, expected) and counts == expected
        assert counts.phone_checks_left == expected.phone_checks_left
        return made, counts.phone_checks_left

    assert both(1) == ("ids 1234567 and [PHONE] in the batch", 0), "the second unvalidated: not remembered"
    assert both(MAX_PHONE_CHECKS) == (text, MAX_PHONE_CHECKS - 2), "validated in full: not phones; remembered"
    assert both(1) == ("ids 1234567 and [PHONE] in the batch", 0), "a record with one check left: as fresh"
    assert both(0) == ("ids [PHONE] and [PHONE] in the batch", 0), "a record with none left: as fresh"
    assert both(2) == (text, 0), "one with the two it takes: remembered, and they are taken"


def test_a_remembering_redactor_forgets_the_least_recently_seen_past_its_characters() -> None:
    texts = [f"write to user{n}@example.com today, please do it now" for n in range(3)]
    size = len("write to [EMAIL] today, please do it now") + redaction_memory.ENTRY_CHARS  # redacted text, entry
    redactor = Redactor(remember_chars=2 * size + 10)
    for text in texts[:2]:
        redactor.redact_into(text, Findings())
    redactor.redact_into(texts[0], Findings())  # seen again: the most recent
    redactor.redact_into(texts[2], Findings())
    memory, kept = redactor._memory, [redaction_memory.digest(texts[0]), redaction_memory.digest(texts[2])]
    assert list(memory._known) == kept and memory._used == 2 * size
    assert all(text.encode() not in repr(memory._known).encode() for text in texts), "digests, not the texts"
    longer = "::1 " * (size // 3)  # its redaction, [IP] for each ::1, is longer than all it may remember
    assert redactor.redact_into(longer, Findings()) == "[IP] " * (size // 3)
    assert list(memory._known) == kept, "not kept, and nothing forgotten for it"
