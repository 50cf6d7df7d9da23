"""Experiments behind an alias, through the OpenAI SDK, the CLI and the admin API, on real vLLM and Redis."""

from __future__ import annotations

import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from adapters.validate import BaseModelSpec
from gateway import keys
from tests.conftest import ADMIN_KEY, Gateway, RedisServer, create_key, loragate, sync_redis_client
from tests.integration.conftest import add_synthetic, eventually

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Say hi."}]


def admin(gateway: Gateway, tenant: str, key: str = ADMIN_KEY) -> httpx.Client:
    return httpx.Client(
        base_url=f"{gateway.url}/admin/tenants/{tenant}", headers={"Authorization": f"Bearer {key}"}, timeout=120
    )


@pytest.fixture(scope="module")
def keys_of(gateway: Gateway, base_spec: BaseModelSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    found = {"exp-a": create_key(gateway.env, "exp-a"), "exp-b": create_key(gateway.env, "exp-b")}
    found["exp-b-manage"] = create_key(gateway.env, "exp-b", "--role", "manage")
    tmp = tmp_path_factory.mktemp("exp")
    with admin(gateway, "exp-a") as a:
        assert add_synthetic(a, base_spec, tmp, "helper", seed=701) == "helper@1"
        assert add_synthetic(a, base_spec, tmp, "helper", seed=702) == "helper@2"
        assert a.put("/aliases/support-bot", json={"target": "helper@1"}).status_code == 200
    return found


def ask(client: openai.OpenAI, user: str | None, model: str = "support-bot") -> tuple[str | None, str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=2,
        user=user or openai.omit,
    )
    answer = raw.parse()
    return raw.headers.get("x-loragate-arm"), answer.model, answer.id


def ask_all(
    client: openai.OpenAI, users: Iterable[str], model: str = "support-bot"
) -> dict[str, tuple[str | None, str, str]]:
    """`ask` for each user, 8 at a time (vLLM batches them): user -> (arm, model, completion id)."""
    users = list(users)
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(users, pool.map(lambda user: ask(client, user, model), users), strict=True))


def test_an_experiment_splits_sticks_moves_few_and_is_promoted(
    gateway: Gateway, keys_of: dict[str, str], redis_server: RedisServer
) -> None:
    loragate(
        gateway.env, "experiments", "create", "tone", "--tenant", "exp-a", "--alias", "support-bot",
        "--arm", "control=helper@1:50", "--arm", "treatment=helper@2:50",
    )  # fmt: skip
    client = openai.OpenAI(base_url=gateway.base_url, api_key=keys_of["exp-a"], max_retries=0)
    seen = ask_all(client, (f"u{n}" for n in range(24)))
    arms = {user: arm for user, (arm, _, _) in seen.items()}
    assert set(arms.values()) == {"control", "treatment"}, "a 50/50 split shows both arms in 24 users"
    assert all(model == ("helper@1" if arm == "control" else "helper@2") for arm, model, _ in seen.values())
    again = ask_all(client, list(arms)[:8])
    assert all(again[user][0] == arms[user] for user in again), "sticky per user"
    by_header = client.chat.completions.with_raw_response.create(
        model="support-bot",
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=2,
        extra_headers={"x-loragate-user": "u3"},
    )
    assert by_header.headers["x-loragate-arm"] == arms["u3"], "x-loragate-user names the end user too"
    store = sync_redis_client(redis_server.url, decode_responses=True)
    completion_id = seen["u0"][2]

    def logged() -> bool:
        records = [json.loads(f["r"]) for _, f in store.xrange(keys.completion_log("exp-a"))]
        return any(r["id"] == completion_id and (r["experiment"], r["arm"]) == ("tone", arms["u0"]) for r in records)

    assert eventually(logged, timeout=10), "the record names the experiment and the arm"
    store.close()
    with admin(gateway, "exp-a") as api:
        assert (
            api.put("/experiments/tone/weights", json={"weights": {"control": 100, "treatment": 0}}).status_code == 200
        )
        assert {arm for arm, _, _ in ask_all(client, arms).values()} == {"control"}, "treatment's users all moved back"
        assert (
            api.put("/experiments/tone/weights", json={"weights": {"control": 50, "treatment": 50}}).status_code == 200
        )
        assert {user: arm for user, (arm, _, _) in ask_all(client, arms).items()} == arms, "the same users as before"
        assert api.post("/experiments/tone/pause").json()["status"] == "paused"
        assert {arm for arm, _, _ in ask_all(client, list(arms)[:6]).values()} == {"control"}
        assert api.post("/experiments/tone/resume").json()["status"] == "running"
        promoted = api.post("/experiments/tone/promote", json={"arm": "treatment"})
        assert promoted.status_code == 200 and promoted.json()["status"] == "promoted"
        assert eventually(lambda: ask(client, "u0")[1:2] == ("helper@2",), timeout=3)
        assert ask(client, "u1")[0] is None, "no experiment behind the alias any more"
        shown = api.get("/experiments/tone").json()
        assert [c["action"] for c in shown["audit"]] == ["create", "weights", "weights", "pause", "resume", "promote"]
        assert shown["audit"][0]["by"].startswith("cli:") and shown["audit"][1]["by"] == "admin"
        ended = api.post("/experiments/tone/pause")
        assert ended.status_code == 409, "an ended experiment cannot be changed: as for the loser of two changes"
        assert ended.json()["error"]["code"] == "experiment_conflict"


def test_experiments_are_refused_when_wrong_and_hidden_from_other_tenants(
    gateway: Gateway, keys_of: dict[str, str]
) -> None:
    with admin(gateway, "exp-a") as api:
        arms = [{"name": "a", "target": "helper@1", "weight": 1}, {"name": "b", "target": "nope@9", "weight": 1}]
        bad_arm = {"name": "x", "alias": "other-bot", "control": "a", "arms": arms}
        resp = api.post("/experiments", json=bad_arm)
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_arm"
        one_arm = {**bad_arm, "arms": arms[:1]}
        assert api.post("/experiments", json=one_arm).status_code == 400
        assert api.get("/experiments/never").status_code == 404
    with admin(gateway, "exp-a", keys_of["exp-b-manage"]) as theirs:
        assert theirs.get("/experiments").status_code == 403
        assert theirs.post("/experiments/tone/rollback").status_code == 403
    other = openai.OpenAI(base_url=gateway.base_url, api_key=keys_of["exp-b"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model="support-bot", messages=ASK, max_tokens=2)  # type: ignore[arg-type]


def _break(gateway: Gateway, tenant: str, version: str) -> None:
    """Flip a byte of a stored version's weights, so that it can never be loaded: its arm fails every request."""
    name, number = version.split("@")
    root = Path(gateway.env["LORAGATE_HOME"]) / "adapters" / tenant / name / f"v{number}"
    weights = root / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def _experiment(api: httpx.Client, name: str, alias: str, control: str, candidate: tuple[str, str]) -> None:
    arms = [
        {"name": "control", "target": control, "weight": 90},
        {"name": candidate[0], "target": candidate[1], "weight": 10},
    ]
    rails = {"auto_promote": True, "max_error_rate": 0.5, "guard_min_requests": 3, "min_samples": 10}
    body = {"name": name, "alias": alias, "control": "control", "arms": arms, **rails}
    created = api.post("/experiments", json=body)
    assert created.status_code == 201, created.text


def _split_traffic(client: openai.OpenAI) -> dict[str, list[str]]:
    """Users call `bot` (90/10 control/better) and `bot2` (90/10 control/broken), 16 users at a time,
    until the small arms have enough: 10 answers from better (the guard rails' min_samples), 3 failures
    of broken (after which `bot2` is left alone: the guard rail has what it needs). Returns the
    completion ids per arm."""
    served: dict[str, list[str]] = {"control": [], "better": [], "broken": []}

    def both(user: str) -> None:
        arm, _, completion_id = ask(client, user, "bot")
        assert arm is not None
        served[arm].append(completion_id)
        if len(served["broken"]) >= 3:
            return
        try:
            ask(client, user, "bot2")
        except openai.InternalServerError as exc:
            assert exc.status_code == 503
            served["broken"].append(user)

    first = 1
    with ThreadPoolExecutor(16) as pool:
        while len(served["better"]) < 10 or len(served["broken"]) < 3:
            assert first < 600, "the split never reached the small arms"
            list(pool.map(both, (f"g{n}" for n in range(first, first + 16))))
            first += 16
    share = len(served["better"]) / (len(served["better"]) + len(served["control"]))
    assert 0.02 < share < 0.3, f"a 90/10 split sent {share:.0%} to the 10% arm"
    return served


def test_a_90_10_experiment_reaches_a_verdict_rolls_back_a_failing_arm_and_promotes_the_winner(
    gateway: Gateway, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    key = create_key(gateway.env, "exp-g")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    with admin(gateway, "exp-g") as api:
        for seed in (711, 712, 713):
            add_synthetic(api, base_spec, tmp_path, "helper", seed=seed)
        _break(gateway, "exp-g", "helper@3")
        answers = {
            version: client.chat.completions.create(model=version, messages=ASK, max_tokens=8, temperature=0)  # type: ignore[arg-type]
            .choices[0]
            .message.content
            for version in ("helper@1", "helper@2")
        }
        assert answers["helper@1"] != answers["helper@2"], "the two versions answer differently"
        for alias in ("bot", "bot2"):
            assert api.put(f"/aliases/{alias}", json={"target": "helper@1"}).status_code == 200
        _experiment(api, "rails", "bot", "helper@1", ("better", "helper@2"))
        _experiment(api, "faulty", "bot2", "helper@1", ("broken", "helper@3"))
        served = _split_traffic(client)
        assert eventually(lambda: api.get("/experiments/faulty").json()["arms"][1]["weight"] == 0, timeout=30)
        moved = ask_all(client, (f"g{n}" for n in range(1, 30)), "bot2")
        assert {arm for arm, _, _ in moved.values()} == {"control"}, "broken's users moved"
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            for arm, ids in (("control", served["control"][:30]), ("better", served["better"])):
                for completion_id in ids:
                    thumbs = "up" if arm == "better" else "down"
                    resp = http.post("/v1/feedback", json={"completion_id": completion_id, "thumbs": thumbs})
                    assert resp.status_code == 200, resp.text
        results = api.get("/experiments/rails/results").json()
        assert results["arms"]["better"]["positive_rate"] == 1.0 and results["arms"]["control"]["positive_rate"] == 0.0
        assert eventually(lambda: api.get("/experiments/rails").json()["status"] == "promoted", timeout=30)
        assert eventually(lambda: ask(client, "g1", "bot")[1] == "helper@2", timeout=5), "the alias serves the winner"
        for name, reason in (("faulty", "error rate"), ("rails", "better wins")):
            audit = api.get(f"/experiments/{name}").json()["audit"]
            assert [c["by"] for c in audit[1:]] == ["guard rail"] and reason in audit[1]["detail"], audit
        page = api.get("/experiments/rails/page")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        _check_page(page.text, tmp_path)


def _check_page(html: str, tmp_path: Path) -> None:
    """The page, rendered by a real headless browser, holds a chart of both arms over time."""
    import matplotlib.image

    from tests.integration.browser import render

    page = tmp_path / "rails.html"
    page.write_text(html)
    shown = render(page)
    assert 'class="main-svg"' in shown.dom, "plotly drew its SVG: the script ran"
    assert shown.dom.count('class="js-line"') >= 4, "lines for each arm's rate and the difference"
    for text in ("Positive rate by arm", "Difference from control", "winner: better", ">control<", ">better<"):
        assert text in shown.dom, text
    pixels = matplotlib.image.imread(shown.screenshot)[..., :3]
    for colour in ("#636efa", "#EF553B"):  # plotly's first two colours: control, better
        rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        close = (abs(pixels - rgb) < 0.02).all(axis=-1).sum()
        assert close > 200, f"the chart shows {colour} ({close} pixels)"
