"""Tenants and their keys through the admin API: a key left behind by a deletion is no key of the tenant created
again under the name, durations of thousands of digits and partial logging policies are answered as the API answers
every refusal (400), and a tenant whose last deletion cannot be read is not created (503)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.testclient import TestClient

from gateway import keys
from gateway.routes import admin_tenants
from tests.conftest import ROOT, RedisServer, gateway_env, loragate, sync_redis_client
from tests.unit.admin_api import refused


def test_a_key_left_behind_by_a_deletion_is_refused_for_the_tenant_created_again(
    api: TestClient, redis_server: RedisServer
) -> None:
    """Left behind as a key created while its tenant was deleted could be, before the deletion watched for one."""
    made = api.post("/admin/tenants/acme/keys", json={"role": "manage"}).json()
    auth = {"Authorization": f"Bearer {made['key']}"}
    assert api.get("/v1/models", headers=auth).status_code == 200
    with sync_redis_client(redis_server.url) as state:
        state.srem(keys.tenant_keys("acme"), made["id"])
    assert api.delete("/admin/tenants/acme").status_code == 200
    assert api.post("/admin/tenants", json={"name": "acme"}).status_code == 201
    for method, path in (("GET", "/v1/models"), ("GET", "/admin/tenants/acme/adapters")):
        assert "Incorrect API key" in refused(api.request(method, path, headers=auth), 401, "invalid_api_key")
    rotated = api.post(f"/admin/tenants/acme/keys/{made['id']}/rotate", json={"grace": "0s"})
    refused(rotated, 404, "key_not_found")


@pytest.mark.parametrize("body", ['{"expires": "%ss"}' % ("9" * 5000), '{"expires": %s}' % ("9" * 5000)])
def test_a_duration_of_thousands_of_digits_is_a_400(api: TestClient, body: str) -> None:
    answer = api.post("/admin/tenants/acme/keys", content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text[:300]
    assert answer.json()["error"]["type"] == "invalid_request_error" and len(answer.text) < 1000
    key_id = api.post("/admin/tenants/acme/keys", json={}).json()["id"]
    grace = body.replace("expires", "grace")
    rotated = api.post(
        f"/admin/tenants/acme/keys/{key_id}/rotate", content=grace, headers={"Content-Type": "application/json"}
    )
    assert rotated.status_code == 400 and rotated.json()["error"]["type"] == "invalid_request_error", rotated.text


def test_a_partial_logging_policy_is_checked_against_the_tenants(api: TestClient) -> None:
    assert api.patch("/admin/tenants/acme", json={"logging": {"score_min": 1, "score_max": 5}}).status_code == 200
    moved = api.patch("/admin/tenants/acme", json={"logging": {"score_min": 2}})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["logging"]["score_min"], moved.json()["logging"]["score_max"]) == (2, 5)
    assert "score_min must be below score_max" in refused(
        api.patch("/admin/tenants/acme", json={"logging": {"score_min": 5}}), 400, "invalid_tenant"
    )
    assert api.patch("/admin/tenants/acme", json={"logging": {"max_records": 5}}).status_code == 400
    assert api.get("/admin/tenants/acme").json()["logging"]["score_min"] == 2


def test_a_partial_limits_object_changes_only_the_limits_it_names(api: TestClient) -> None:
    """`{"limits": {"rpm": 20}}` took the tenant's tpm away with it; null removes a limit."""
    assert api.patch("/admin/tenants/acme", json={"limits": {"rpm": 10, "tpm": 100_000}}).status_code == 200
    moved = api.patch("/admin/tenants/acme", json={"limits": {"rpm": 20}})
    assert moved.status_code == 200 and moved.json()["limits"] == {"rpm": 20, "tpm": 100_000}, moved.text
    unlimited = api.patch("/admin/tenants/acme", json={"limits": {"rpm": None}})
    assert unlimited.json()["limits"] == {"rpm": None, "tpm": 100_000}


def test_limits_past_what_redis_counts_exactly_are_refused(api: TestClient) -> None:
    """A limit of 2^63 came back in the rate-limit headers as -9223372036854775808."""
    for limit in (2**63, 10**30, 10**15 + 1):
        answer = api.patch("/admin/tenants/acme", json={"limits": {"rpm": limit}})
        assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error", answer.text
    assert api.patch("/admin/tenants/acme", json={"limits": {"tpm": 10**15}}).status_code == 200


def test_limits_stored_past_the_bound_by_an_earlier_release_are_read_as_the_bound(
    api: TestClient, redis_server: RedisServer
) -> None:
    """The release before the bound took any limit: read back, one above it failed every request of its tenant (or
    key), the tenant list, and the completion log's upkeep of every tenant."""
    key = api.post("/admin/tenants/acme/keys", json={"limits": {"rpm": 5}}).json()
    with sync_redis_client(redis_server.url, decode_responses=True) as state:
        stored = json.loads(state.get(keys.tenant("acme")))
        stored["limits"] = {"rpm": None, "tpm": 10**16}
        state.set(keys.tenant("acme"), json.dumps(stored))
        state.hset(keys.api_key(key["id"]), "rpm", str(2**63))
        state.incr(keys.state_version())
    assert api.get("/admin/tenants").status_code == 200
    assert api.get("/admin/tenants/acme").json()["limits"]["tpm"] == 10**15
    listed = {k["id"]: k for k in api.get("/admin/tenants/acme/keys").json()["data"]}
    assert listed[key["id"]]["limits"]["rpm"] == 10**15
    auth = {"Authorization": f"Bearer {key['key']}"}
    assert api.get("/v1/models", headers=auth).status_code == 200
    changed = api.patch("/admin/tenants/acme", json={"on_redis_down": "closed"})
    assert changed.status_code == 200 and changed.json()["limits"]["tpm"] == 10**15


def test_a_json_body_is_read_whatever_its_content_type(api: TestClient) -> None:
    """As the completion routes read theirs: the README's `curl -d` examples send a form's Content-Type."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    made = api.post("/admin/tenants", content='{"name": "formed", "limits": {"rpm": 600}}', headers=form)
    assert made.status_code == 201 and made.json()["limits"]["rpm"] == 600, made.text
    not_json = api.post("/admin/tenants", content="name=x", headers=form)
    assert not_json.status_code == 400 and "could not parse the JSON body" in not_json.json()["error"]["message"]


def test_the_key_is_checked_before_the_body_is_parsed(api: TestClient) -> None:
    """A body that does not parse is a 401 without a key and a 403 with one that cannot manage the tenant, as a body
    that does: the gateway is not made to read a stranger's body, and OpenAI checks the key first too."""
    api.post("/admin/tenants", json={"name": "other"})
    other = api.post("/admin/tenants/other/keys", json={"role": "manage"}).json()["key"]
    for body in ("{bad", '{"name": 1e400}'):
        assert refused(api.post("/admin/tenants", content=body, headers={"Authorization": ""}), 401, "invalid_api_key")
        weights = "/admin/tenants/acme/experiments/ab/weights"
        assert api.put(weights, content=body, headers={"Authorization": f"Bearer {other}"}).status_code == 403
        assert (
            api.put(
                "/admin/tenants/acme/aliases/a", content=body, headers={"Authorization": "Bearer sk-lg-x"}
            ).status_code
            == 401
        )
        parsed = api.post("/admin/tenants", content=body)
        assert parsed.status_code == 400 and "JSON" in parsed.json()["error"]["message"], "the admin key: why it failed"
    key_id = api.post("/admin/tenants/acme/keys", json={}).json()["id"]
    keys_before = api.get("/admin/tenants/acme/keys").json()["data"]
    for method, path in (("post", "/keys"), ("post", f"/keys/{key_id}/rotate"), ("patch", "")):  # every field defaults
        sent = api.request(method.upper(), f"/admin/tenants/acme{path}", content="{bad")
        assert sent.status_code == 400 and "JSON" in sent.json()["error"]["message"], (path, sent.text)
    assert api.get("/admin/tenants/acme/keys").json()["data"] == keys_before, "no key made or rotated by a bad body"
    unknown_field = api.post("/admin/tenants", json={"name": "x", "colour": 1})
    assert unknown_field.status_code == 400 and "colour" in unknown_field.text, "a body that parses: refused as before"


def test_a_key_whose_rotation_grace_ended_cannot_be_rotated(api: TestClient) -> None:
    """Each rotation of it made a key that never expires, from a key that no longer works."""
    key_id = api.post("/admin/tenants/acme/keys", json={}).json()["id"]
    assert api.post(f"/admin/tenants/acme/keys/{key_id}/rotate", json={"grace": 0}).status_code == 201
    again = api.post(f"/admin/tenants/acme/keys/{key_id}/rotate", json={"grace": 0})
    assert "has expired" in refused(again, 400, "invalid_key_request")


@pytest.mark.parametrize("expires", ["\u0663\u0660d", "\uff13\uff10d"])  # 30d in Arabic-Indic, full-width digits
def test_durations_take_ascii_digits_only(api: TestClient, expires: str) -> None:
    answer = api.post("/admin/tenants/acme/keys", json={"expires": expires})
    assert "Invalid duration" in refused(answer, 400, "invalid_key_request")


def test_a_long_tenant_name_is_not_echoed_whole(api: TestClient) -> None:
    name = "x" * 5000
    message = refused(api.get(f"/admin/tenants/{name}"), 400, "invalid_tenant")
    assert "Invalid tenant name" in message and len(message) < 300


def test_a_tenants_phone_region_is_a_region_phone_numbers_know(api: TestClient) -> None:
    assert api.get("/admin/tenants/acme").json()["logging"]["phone_region"] == "US"
    moved = api.patch("/admin/tenants/acme", json={"logging": {"phone_region": "GB"}})
    assert moved.status_code == 200 and moved.json()["logging"]["phone_region"] == "GB", moved.text
    wrong = api.patch("/admin/tenants/acme", json={"logging": {"phone_region": "XX"}})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "logging.phone_region"
    assert "region code such as US or GB" in wrong.json()["error"]["message"]
    assert api.get("/admin/tenants/acme").json()["logging"]["phone_region"] == "GB"


def test_a_tenant_whose_last_deletion_cannot_be_read_is_not_created(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Created by this host's clock alone, it could date itself before the deleted tenant's records."""

    async def away(*_: object) -> None:
        raise RedisConnectionError("the records Redis is away")

    monkeypatch.setattr(admin_tenants, "tenant_deleted", away)
    answer = api.post("/admin/tenants", json={"name": "beta"})
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "state_unavailable") and "Try again" in error["message"]
    assert api.get("/admin/tenants/beta").status_code == 404


def test_the_cli_sets_a_tenants_phone_region(redis_server: RedisServer, tmp_path: Path) -> None:
    env = gateway_env(tmp_path, redis_server.url, 0)
    loragate(env, "tenants", "create", "cli-region", "--exist-ok")
    assert json.loads(loragate(env, "tenants", "logging", "cli-region", "--phone-region", "DE"))["phone_region"] == "DE"
    wrong = subprocess.run(
        [sys.executable, "-m", "gateway", "tenants", "logging", "cli-region", "--phone-region", "ZZ"],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert wrong.returncode != 0 and "region code such as US or GB" in wrong.stderr
