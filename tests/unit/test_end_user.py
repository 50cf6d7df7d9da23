"""The end user a request names in its `x-loragate-user` header. Starlette reads header values as latin-1, but
some clients send UTF-8 (httpx given bytes, curl) and others latin-1 (`requests`, `http.client`): `José` must be
recorded as `José` either way, as the body's `user` would be, so that erasing `José` finds it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from gateway import keys
from gateway.context import MAX_USER_CHARS
from gateway.recorder import Recorder
from tests.conftest import RedisServer, sync_redis_client
from tests.unit.admin_api import BASE

CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hello"}]}


def ask(api: TestClient, user: bytes, body: dict[str, Any] = CHAT) -> tuple[int, dict[str, Any]]:
    """A chat request whose header holds `user`'s raw bytes; its status and JSON. No engine answers: a request that
    is not refused first fails when forwarded (503), after its end user is read.

    Sent to the app's ASGI interface on its own loop: the test client cannot send bytes that are not UTF-8 (httpx
    reads them as latin-1 and the client's transport encodes them again as UTF-8)."""
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    headers = [
        (b"host", b"testserver"),
        (b"content-type", b"application/json"),
        (b"authorization", f"Bearer {key}".encode()),
        (b"x-loragate-user", user),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("testclient", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def call() -> None:
        await api.app(scope, receive, send)

    assert api.portal is not None  # the fixture's client is open
    api.portal.call(call)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def logged(api: TestClient, redis_server: RedisServer) -> list[dict[str, Any]]:
    """The tenant's completion records, once the recorder has written what it holds."""
    recorder: Recorder = api.app.state.services.recorder  # type: ignore[attr-defined]
    assert api.portal is not None  # the fixture's client is open
    api.portal.call(recorder.written)
    found = sync_redis_client(redis_server.url).xrange(keys.completion_log("acme"))
    return [json.loads(fields[b"r"]) for _, fields in found]


@pytest.mark.parametrize("name", ["José", "Zoë Ångström", "用户-7", "🙂"])
def test_a_utf8_header_names_the_user_decoded_and_erasing_that_name_finds_it(
    api: TestClient, redis_server: RedisServer, name: str
) -> None:
    status, answer = ask(api, name.encode("utf-8"))
    assert status == 503, answer  # refused by no one: it reached the (absent) engine
    assert [record["user"] for record in logged(api, redis_server)] == [name]
    erased = api.post(f"/admin/tenants/acme/users/{quote(name, safe='')}/forget")  # José: Jos%C3%A9
    assert erased.status_code == 200 and erased.json()["removed"]["completions"] == 1, erased.text
    assert logged(api, redis_server) == []


def test_the_length_limit_applies_to_the_decoded_name(api: TestClient, redis_server: RedisServer) -> None:
    name = "é" * (MAX_USER_CHARS + 10)  # 532 bytes, 266 characters
    ask(api, name.encode("utf-8"))
    assert [record["user"] for record in logged(api, redis_server)] == ["é" * MAX_USER_CHARS]


def test_the_bodys_user_still_wins_over_the_header(api: TestClient, redis_server: RedisServer) -> None:
    ask(api, "José".encode(), {**CHAT, "user": "María"})
    assert [record["user"] for record in logged(api, redis_server)] == ["María"]


@pytest.mark.parametrize(("raw", "name"), [(b"Jos\xe9", "José"), (b"\xff\xfe", "ÿþ"), (b"ab\xc3", "abÃ")])
def test_a_header_that_is_not_utf8_is_read_as_latin1(
    api: TestClient, redis_server: RedisServer, raw: bytes, name: str
) -> None:
    """What `requests` and `http.client` send for `José`."""
    status, answer = ask(api, raw)
    assert status == 503, answer  # refused by no one: it reached the (absent) engine
    assert [record["user"] for record in logged(api, redis_server)] == [name]


def test_a_request_refused_for_its_body_keeps_the_headers_user(api: TestClient, redis_server: RedisServer) -> None:
    """Refused before forwarding (400), it is recorded, under its end user as the body's `user` would be (the header
    was read only once the body had passed)."""
    status, answer = ask(api, b"ana", {"model": BASE, "messages": []})
    assert status == 400, answer
    assert [(record["user"], record["status"]) for record in logged(api, redis_server)] == [("ana", 400)]
