"""Which failed requests met a connection closed under them (`gateway.engine.sessions.stale`): those are sent again
on a new connection; a refused or timed-out connect, or a disconnect after part of an answer, is not."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_parser import RawResponseMessage
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.engine.sessions import EngineSessions, stale

KEY = ConnectionKey("127.0.0.1", 8000, False, True, None, None, None)
PART = RawResponseMessage(
    aiohttp.HttpVersion11, 200, "OK", CIMultiDictProxy(CIMultiDict()), (), False, None, False, False
)
"""The head of an answer read before the disconnect."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ServerDisconnectedError(PART), False),  # type: ignore[arg-type]
        (aiohttp.ClientOSError(None, "Can not write request body for http://127.0.0.1:8000/v1/chat/completions"), True),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), True),
        (aiohttp.ClientConnectionResetError("Cannot write to closing transport"), True),
        (aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "Connection refused")), False),
        (aiohttp.ConnectionTimeoutError(), False),
        (aiohttp.SocketTimeoutError(), False),
        (aiohttp.ClientPayloadError("Response payload is not completed"), False),
        (TimeoutError(), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_only_a_connection_closed_under_a_request_before_its_answer_is_stale(
    exc: BaseException, expected: bool
) -> None:
    assert stale(exc) is expected


async def test_the_fresh_session_opens_a_connection_for_each_request_and_both_close() -> None:
    sessions = EngineSessions(2.0)
    assert sessions.fresh.connector is not None and sessions.fresh.connector.force_close
    assert sessions.pooled.connector is not None and not sessions.pooled.connector.force_close
    await sessions.close()
    assert sessions.pooled.closed and sessions.fresh.closed
