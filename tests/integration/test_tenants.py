"""Tenants kept apart, through the OpenAI SDK, the admin API and the CLI, on real vLLM and Redis.

Tenant `iso-a` and tenant `iso-b` each own a `support-bot`; `iso-b` also owns `secret-bot`, an alias
to it, and `shared-bot`, which the admin shares with `iso-a` only.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from adapters.validate import BaseModelSpec
from tests.conftest import ADMIN_KEY, MODEL, ROOT, Gateway, create_key
from tests.integration.conftest import add_synthetic, loaded_on

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Tenant:
    name: str
    key: str
    manage_key: str

    def client(self, gateway: Gateway) -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.base_url, api_key=self.key, max_retries=0)


def admin_of(gateway: Gateway, tenant: str, key: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(
        base_url=f"{gateway.url}/admin/tenants/{tenant}", headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


@pytest.fixture(scope="module")
def world(gateway: Gateway, base_spec: BaseModelSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tenant]:
    tmp = tmp_path_factory.mktemp("iso")
    tenants = {}
    for name in ("iso-a", "iso-b", "iso-c"):
        key = create_key(gateway.env, name)
        tenants[name] = Tenant(name, key, create_key(gateway.env, name, "--role", "manage"))
    with admin_of(gateway, "iso-a") as a, admin_of(gateway, "iso-b") as b:
        add_synthetic(a, base_spec, tmp, "support-bot", seed=301)
        add_synthetic(b, base_spec, tmp, "support-bot", seed=302)
        add_synthetic(b, base_spec, tmp, "secret-bot", seed=303)
        add_synthetic(b, base_spec, tmp, "shared-bot", seed=304)
        assert b.put("/aliases/b-prod", json={"target": "secret-bot@1"}).status_code == 200
        assert b.put("/adapters/shared-bot/share", json={"tenants": ["iso-a"]}).status_code == 200
    return tenants


def not_found_bodies(client: openai.OpenAI, model: str) -> tuple[bytes, bytes]:
    """The 404 bodies of a completion and of /v1/models/{model}."""
    with pytest.raises(openai.NotFoundError) as completion:
        client.chat.completions.create(model=model, messages=HI, max_tokens=2)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as retrieval:
        client.models.retrieve(model)
    return completion.value.response.content, retrieval.value.response.content


B_NAMES = ["secret-bot", "secret-bot@1", "b-prod", "iso-b/secret-bot", "iso-b/secret-bot@1", "iso-b/support-bot"]


def test_another_tenants_models_are_404s_like_names_that_never_existed(
    gateway: Gateway, world: dict[str, Tenant]
) -> None:
    a = world["iso-a"].client(gateway)
    never = not_found_bodies(a, "never-existed-anywhere")
    for name in B_NAMES:
        expected = tuple(body.replace(b"never-existed-anywhere", name.encode()) for body in never)
        assert not_found_bodies(a, name) == expected, name
    listed = {m.id for m in a.models.list()}
    assert not listed & set(B_NAMES)
    assert {"support-bot", "support-bot@1", "iso-b/shared-bot", "iso-b/shared-bot@1", MODEL} <= listed


def test_two_tenants_own_the_same_name_and_vllm_never_mixes_them(gateway: Gateway, world: dict[str, Tenant]) -> None:
    a, b = world["iso-a"].client(gateway), world["iso-b"].client(gateway)
    answer_a = a.chat.completions.create(model="support-bot", messages=HI, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    answer_b = b.chat.completions.create(model="support-bot", messages=HI, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert answer_a.model == answer_b.model == "support-bot@1", "each sees its own name"
    assert answer_a.choices[0].message.content != answer_b.choices[0].message.content
    held = set().union(*(loaded_on(port, "iso-a") for port in gateway.engine_ports))
    assert "support-bot@1" in held
    held_b = set().union(*(loaded_on(port, "iso-b") for port in gateway.engine_ports))
    assert "support-bot@1" in held_b


def test_aliases_and_shares(gateway: Gateway, world: dict[str, Tenant]) -> None:
    a, b, c = (world[t].client(gateway) for t in ("iso-a", "iso-b", "iso-c"))
    aliased = b.chat.completions.create(model="b-prod", messages=HI, max_tokens=2)  # type: ignore[arg-type]
    assert aliased.model == "secret-bot@1", "responses name the version that served"
    shared = a.chat.completions.create(model="iso-b/shared-bot", messages=HI, max_tokens=2)  # type: ignore[arg-type]
    assert shared.model == "iso-b/shared-bot@1"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="iso-b/shared-bot", messages=HI, max_tokens=2)  # type: ignore[arg-type]


def test_a_manage_key_manages_only_its_own_tenant(gateway: Gateway, world: dict[str, Tenant]) -> None:
    manage_a = world["iso-a"].manage_key
    with admin_of(gateway, "iso-a", manage_a) as own:
        assert own.get("/adapters").status_code == 200
        assert own.put("/aliases/a-prod", json={"target": "support-bot@1"}).status_code == 200
        assert own.get("/aliases").json()["data"] == [{"alias": "a-prod", "target": "support-bot@1"}]
    forbidden = []
    for tenant in ("iso-b", "iso-zzz-never"):
        with admin_of(gateway, tenant, manage_a) as other:
            forbidden += [
                other.get("/adapters"),
                other.get("/aliases"),
                other.put("/aliases/x", json={"target": MODEL}),
                other.delete("/adapters/secret-bot@1"),
                other.put("/adapters/secret-bot/pin", json={"version": 1}),
                other.post("/adapters", params={"name": "x"}, content=b"x"),
            ]
    assert {r.status_code for r in forbidden} == {403}
    assert len({r.content for r in forbidden}) == 1, "the same refusal whether the tenant exists or not"
    for path in ("/admin/tenants", "/admin/tenants/iso-a/keys"):
        assert httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {manage_a}"}).status_code == 403
    inference = httpx.get(
        f"{gateway.url}/admin/tenants/iso-a/adapters", headers={"Authorization": f"Bearer {world['iso-a'].key}"}
    )
    assert inference.status_code == 403
    admin_on_v1 = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin_on_v1.status_code == 403, "the admin key belongs to no tenant"
    admin_chat = httpx.post(  # the completion routes resolve their caller themselves (routes/direct.py): the same rule
        f"{gateway.base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert admin_chat.status_code == 403 and admin_chat.json()["error"]["code"] == "permission_denied"


def cli(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], env=gateway.env, capture_output=True, text=True, cwd=ROOT
    )


def test_bad_input_gets_clear_refusals(gateway: Gateway, world: dict[str, Tenant], tmp_path: Path) -> None:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        for bad in ("Acme", "a:b", "a/b", "a.b", ""):
            resp = admin.post("/admin/tenants", json={"name": bad})
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_tenant", bad
        assert admin.post("/admin/tenants", json={"name": "iso-a"}).status_code == 409
        role = admin.post("/admin/tenants/iso-a/keys", json={"role": "root"})
        assert role.status_code == 400 and role.json()["error"]["param"] == "role"
        assert admin.post("/admin/tenants/iso-a/keys", json={"expires": "soon"}).json()["error"]["param"] == "expires"
        assert admin.post("/admin/tenants/nobody/keys", json={}).json()["error"]["code"] == "tenant_not_found"
        assert admin.delete("/admin/tenants/iso-b/keys/ffffffff").status_code == 404
        expired = admin.post("/admin/tenants/iso-a/keys", json={"expires": 1}).json()["key"]
    clash = admin_of(gateway, "iso-b").put("/aliases/secret-bot", json={"target": "secret-bot@1"})
    assert clash.status_code == 409
    nowhere = admin_of(gateway, "iso-b").put("/aliases/x", json={"target": "iso-a/support-bot@1"})
    assert nowhere.status_code == 400 and nowhere.json()["error"]["code"] == "invalid_alias_target"
    time.sleep(1.1)
    gone = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {expired}"})
    assert gone.status_code == 401 and "expired" in gone.json()["error"]["message"]
    for args, said in (
        (("tenants", "create", "Bad:Name"), "lowercase letters"),
        (("keys", "create", "--tenant", "nobody"), "does not exist"),
        (("keys", "create", "--tenant", "iso-a", "--role", "root"), "Unknown role"),
        (("keys", "revoke", "ffffffff"), "does not exist"),
    ):
        done = cli(gateway, *args)
        assert done.returncode == 1 and said in done.stderr, (args, done.stderr)
