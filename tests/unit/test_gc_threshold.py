"""A serving process collects its young objects less often than Python's default (`LORAGATE_GC_THRESHOLD`),
from when it has started until it stops."""

from __future__ import annotations

import gc
from pathlib import Path

from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import RedisServer


def test_the_default_is_above_pythons() -> None:
    assert Settings.model_fields["gc_threshold"].default > 700


def test_a_serving_process_uses_the_setting_and_gives_the_old_one_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    before = gc.get_threshold()
    settings = Settings(home=tmp_path, redis_url=redis_server.url, gc_threshold=12_345)
    with TestClient(create_app(settings, engine_urls=["http://127.0.0.1:9"])):
        assert gc.get_threshold() == (12_345, *before[1:])  # the older generations keep Python's
    assert gc.get_threshold() == before
