"""The two implementations of libphonenumber redaction can use (gateway.phones): the same numbers found in text as
people write them, the default and the setting that chooses, and what each redacts in a record."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.phones import ENV, LIBRARIES, phone_library
from gateway.redaction import Redactor
from gateway.settings import Settings
from tests.conftest import RedisServer
from tests.unit.admin_api import BASE

FORMATS = (PhoneNumberFormat.NATIONAL, PhoneNumberFormat.INTERNATIONAL, PhoneNumberFormat.E164)
TYPES = (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE)
WRITTEN = ("Call me at {} today.", "({})", "tel: {}, ok")


def written_numbers() -> list[tuple[str, str]]:
    """(text, region) pairs: every region's example numbers of TYPES in FORMATS, with spaces, dashes or dots, in a
    few sentences, read in their own region and as a US tenant would read them. Only numbers both libraries' metadata
    hold valid: an example of a range allocated after rphonenumbers' metadata release (`phonenumbers` is newer) is a
    difference of data, not of how numbers are found (at most 1% of them, or the metadata is too far apart)."""
    fast = phone_library("rphonenumbers")
    cases, newer = [], 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in TYPES:
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, PhoneNumberFormat.E164)
            if not fast.is_valid_number(fast.parse(e164)):
                newer += 1
                continue
            for fmt in FORMATS:
                number = phonenumbers.format_number(example, fmt)
                for i, variant in enumerate((number, number.replace(" ", "-"), number.replace(" ", "."))):
                    text = WRITTEN[i].format(variant)
                    cases += [(text, region), (text, "US")]
    assert newer <= len(cases) / 18 / 100, f"{newer} examples rphonenumbers' metadata does not hold valid"
    return cases


def test_both_libraries_find_the_same_numbers_as_people_write_them() -> None:
    """Over 10,000 texts (every region's examples), redaction with rphonenumbers is redaction with phonenumbers."""
    redactors: dict[tuple[str, str], Redactor] = {}

    def redact(text: str, region: str, library: str) -> tuple[str, object]:
        if (region, library) not in redactors:
            redactors[region, library] = Redactor(["phone"], region, phone_library_name=library)
        return redactors[region, library].redact(text)

    cases = written_numbers()
    assert len(cases) > 10_000
    found = 0
    for text, region in cases:
        redacted = redact(text, region, "rphonenumbers")
        assert redacted == redact(text, region, "phonenumbers"), (text, region)
        found += redacted[0].count("[PHONE]")
    assert found > len(cases) * 0.6, "most examples are found (national ones read as US numbers are not)"


def test_rphonenumbers_is_the_default_and_the_setting_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert phone_library().__name__ == LIBRARIES[0] == "rphonenumbers"
    monkeypatch.setenv(ENV, "phonenumbers")
    assert phone_library() is phonenumbers
    assert phone_library("rphonenumbers").__name__ == "rphonenumbers", "a name given wins over the setting"
    monkeypatch.setenv(ENV, "libphonenumber")
    with pytest.raises(ValueError, match="LORAGATE_PHONE_MATCHER='libphonenumber': expected one of"):
        Redactor()


def test_a_record_process_started_with_the_setting_uses_that_library() -> None:
    """The record process reads the setting as the gateway does (it inherits the gateway's environment)."""
    code = "from gateway.redaction import Redactor; print(Redactor()._phones.library.__name__)"
    for name in LIBRARIES:
        env = {**os.environ, ENV: name}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == name


@pytest.mark.parametrize("name", LIBRARIES)
def test_each_library_redacts_valid_numbers_and_keeps_the_rest(name: str) -> None:
    redactor = Redactor(["phone"], "GB", phone_library_name=name)
    text = "Ring 020 7946 0958 or +1 415-555-2671; order 1234567 shipped; the 07:30-09:00 slot."
    assert redactor.redact(text) == (
        "Ring [PHONE] or [PHONE]; order 1234567 shipped; the 07:30-09:00 slot.",
        {"phone": 2},
    )


def test_every_region_a_tenant_may_set_is_one_both_libraries_read() -> None:
    """A tenant's `phone_region` is checked against phonenumbers' regions (gateway.records); a redactor refuses a
    region its library does not know, and a record it cannot build is dropped: the two lists must be the same."""
    assert {name: phone_library(name).SUPPORTED_REGIONS for name in LIBRARIES} == dict.fromkeys(
        LIBRARIES, phonenumbers.SUPPORTED_REGIONS
    )


def test_a_gateway_does_not_start_on_a_setting_it_cannot_use(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at the start, rather than failing each record's redaction (records dropped) and each rating."""
    monkeypatch.setenv(ENV, "libphonenumber")
    settings = Settings(home=tmp_path, redis_url=redis_server.url, served_model_name=BASE)
    with pytest.raises(ValueError, match="LORAGATE_PHONE_MATCHER='libphonenumber'"):
        with TestClient(create_app(settings, engine_urls=["http://127.0.0.1:9"])):
            pass


def test_a_library_that_cannot_be_imported_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> ModuleType:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(
        ValueError, match="LORAGATE_PHONE_MATCHER: rphonenumbers cannot be imported .* set phonenumbers"
    ):
        phone_library("rphonenumbers")


def test_a_redactor_that_does_not_look_for_phone_numbers_does_not_read_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV, "libphonenumber")
    assert Redactor(["email"]).redact("mail ann@example.com or +1 415-555-2671") == (
        "mail [EMAIL] or +1 415-555-2671",
        {"email": 1},
    )
