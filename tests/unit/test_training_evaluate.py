"""The eval gate: metrics on hand-made answers, scoring, the publish rule, the report files, and answers
collected from a fake OpenAI-compatible gateway (httpx.MockTransport; no network)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

try:
    import httpx2 as httpx  # openai 3 is built on httpx2, a fork of httpx with the same API
except ImportError:  # openai 1 and 2: on httpx
    import httpx  # type: ignore[no-redef]

from training.config import METRICS, RetrainConfig
from training.eval_report import each_tenth, markdown_table, write_report
from training.evaluate import (
    Answer,
    Decision,
    EvalReport,
    EvalRow,
    Example,
    RegressionScores,
    Scores,
    _unavailable,
    answer_all,
    decide,
    evaluate,
    load_rows,
    percentile,
    score,
)
from training.metrics import (
    METRIC_FUNCTIONS,
    accuracy,
    exact_match,
    format_match,
    json_schema,
    json_valid,
    metric_means,
    metric_values,
    rouge_l,
)

SCHEMA = {
    "type": "object",
    "required": ["severity"],
    "properties": {"severity": {"enum": ["P1", "P2", "P3", "P4"]}},
}
SEVERITY = r"SEVERITY: (P[1-4])"


@pytest.fixture
def config(tmp_path: Path) -> RetrainConfig:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    return RetrainConfig(
        metrics=list(METRICS),
        primary_metric="format",
        format_regex=r"SEVERITY: P[1-4]\n.+",
        json_schema_path=str(schema),
        label_pattern=SEVERITY,
        publish_margin=0.05,
        examples_in_report=2,
    )


def test_every_configurable_metric_has_a_function() -> None:
    assert set(METRIC_FUNCTIONS) == set(METRICS)


def test_exact_match_ignores_surrounding_whitespace_only(config: RetrainConfig) -> None:
    assert exact_match(" Paris.\n", "Paris.", config) == 1.0
    assert exact_match("paris.", "Paris.", config) == 0.0
    assert exact_match("", "Paris.", config) == 0.0


@pytest.mark.parametrize(
    ("answer", "valid"),
    [
        ('{"a": 1}', 1.0),
        ('```json\n{"a": 1}\n```', 1.0),
        ("  ```\n[1, 2]\n```  ", 1.0),
        ('```JSON {"a": 1}```', 1.0),
        ('{"a": 1', 0.0),
        ('Sure: {"a": 1}', 0.0),
        ('```json\n{"a": 1}\n``` and more', 0.0),
        ("", 0.0),
        ("NaN", 0.0),  # Python's json reads these; JSON has none of them
        ('{"a": Infinity}', 0.0),
        ("-Infinity", 0.0),
    ],
)
def test_json_valid_tolerates_a_fence(config: RetrainConfig, answer: str, valid: float) -> None:
    assert json_valid(answer, "", config) == valid


@pytest.mark.parametrize(
    ("answer", "valid"),
    [
        ('{"severity": "P1"}', 1.0),
        ('```json\n{"severity": "P2", "why": "disk full"}\n```', 1.0),
        ('{"severity": "P9"}', 0.0),
        ('{"why": "no severity"}', 0.0),
        ('["P1"]', 0.0),
        ("severity: P1", 0.0),
        ("", 0.0),
    ],
)
def test_json_schema_validates_against_the_schema_file(config: RetrainConfig, answer: str, valid: float) -> None:
    assert json_schema(answer, "", config) == valid


def test_a_schema_file_that_is_no_schema_is_an_error(config: RetrainConfig, tmp_path: Path) -> None:
    Path(config.json_schema_path or "").write_text(json.dumps({"type": "no-such-type"}))
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        json_schema("{}", "", config)
    unresolvable = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
    Path(config.json_schema_path or "").write_text(json.dumps(unresolvable))  # a valid schema, until applied
    with pytest.raises(ValueError, match="schema cannot be applied to an answer"):  # not referencing's own error
        json_schema('{"a": 1}', "", config)


@pytest.mark.parametrize(
    ("answer", "matches"),
    [
        ("SEVERITY: P2\nthe disk is full", 1.0),
        ("  SEVERITY: P1\nline one\nline two\n", 1.0),  # stripped, and . spans lines (DOTALL)
        ("SEVERITY: P5\nthe disk is full", 0.0),
        ("SEVERITY: P2", 0.0),  # fullmatch: the reason is required
        ("Answer: SEVERITY: P2\nthe disk is full", 0.0),
        ("", 0.0),
    ],
)
def test_format_is_a_full_match(config: RetrainConfig, answer: str, matches: float) -> None:
    assert format_match(answer, "", config) == matches


def test_rouge_l_is_the_f_measure(config: RetrainConfig) -> None:
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat", config) == pytest.approx(1.0)
    # LCS 3 of 3 answer tokens and 6 reference tokens: P=1, R=0.5, F=2/3
    assert rouge_l("the cat sat", "the cat sat on the mat", config) == pytest.approx(2 / 3)
    assert rouge_l("dogs bark", "the cat sat", config) == 0.0
    assert rouge_l("", "the cat sat", config) == 0.0


def test_rouge_l_counts_words_beyond_ascii(config: RetrainConfig) -> None:
    assert rouge_l("Καλημέρα κόσμε", "καλημέρα κόσμε", config) == pytest.approx(1.0)
    assert rouge_l("café crème", "café noir", config) == pytest.approx(0.5)
    # Han and kana characters are tokens each: LCS 5 of 5 and 7, F = 2 * 5 / 12
    assert rouge_l("東京は首都", "東京は首都です", config) == pytest.approx(10 / 12)


@pytest.mark.parametrize(
    ("answer", "reference", "right"),
    [
        ("SEVERITY: P2 - disk full", "SEVERITY: P2 - out of space", 1.0),
        ("SEVERITY: P1", "SEVERITY: P2", 0.0),
        ("The disk is full.", "SEVERITY: P2", 0.0),  # no label in the answer
        ("", "SEVERITY: P2", 0.0),
        ("no label", "no label either", 0.0),  # two missing labels are no match
    ],
)
def test_accuracy_compares_labels(config: RetrainConfig, answer: str, reference: str, right: float) -> None:
    assert accuracy(answer, reference, config) == right


def test_a_metric_without_its_setting_says_which(config: RetrainConfig) -> None:
    bare = RetrainConfig()
    with pytest.raises(ValueError, match="format_regex"):
        format_match("x", "x", bare)
    with pytest.raises(ValueError, match="label_pattern"):
        accuracy("x", "x", bare)
    with pytest.raises(ValueError, match="json_schema_path"):
        json_schema("{}", "", bare)


def test_batch_values_equal_single_ones_and_means_average_them(config: RetrainConfig) -> None:
    answers = ['{"severity": "P1"}', "the cat sat", "SEVERITY: P3\nok"]
    references = ['{"severity": "P1"}', "the cat sat on the mat", "SEVERITY: P3\nfine"]
    for name, metric in METRIC_FUNCTIONS.items():
        single = [metric(a, r, config) for a, r in zip(answers, references, strict=True)]
        assert metric_values(name, answers, references, config) == pytest.approx(single), name
    means = metric_means(answers, references, config)
    assert list(means) == list(METRICS)
    assert means["exact_match"] == pytest.approx(1 / 3)
    assert means["json_valid"] == pytest.approx(1 / 3)
    assert means["accuracy"] == pytest.approx(1 / 3)  # only the third reference has a label
    assert means["rouge_l"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # "severity p3 ok" vs "... fine": 2/3
    with pytest.raises(ValueError, match="2 answers for 3 references"):
        metric_values("exact_match", answers[:2], references, config)


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([40.0, 10.0, 30.0, 20.0], 50) == pytest.approx(25.0)
    assert percentile([10.0, 20.0, 30.0, 40.0], 95) == pytest.approx(38.5)
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_score_counts_errors_as_wrong_and_leaves_them_out_of_latency(config: RetrainConfig) -> None:
    answers = [Answer(text="SEVERITY: P1\nx", latency_ms=ms) for ms in (10.0, 20.0, 30.0, 40.0)]
    answers.append(Answer(text="", latency_ms=1.0, error="APIConnectionError: refused"))
    scores = score(answers, ["SEVERITY: P1\nx"] * 5, config)
    assert (scores.n, scores.errors, scores.first_error) == (5, 1, "APIConnectionError: refused"), "the outage named"
    assert scores.metrics["exact_match"] == pytest.approx(0.8)
    assert scores.metrics["format"] == pytest.approx(0.8)
    assert scores.latency_p50_ms == pytest.approx(25.0)
    assert scores.latency_p95_ms == pytest.approx(38.5)
    failed = score([Answer(text="", latency_ms=3.0, error="boom")], ["x"], config)
    assert failed.errors == 1 and failed.latency_p50_ms is None and failed.latency_p95_ms is None
    with pytest.raises(ValueError, match="1 answers for 2 references"):
        score(answers[:1], ["a", "b"], config)


def scores_of(value: float, *, errors: int = 0, n: int = 20, failed: list[int] | None = None) -> Scores:
    """Scores whose `errors` failures are the first prompts (or those `failed` names)."""
    failed = list(range(errors)) if failed is None else failed
    first_error = "APIConnectionError: Connection error." if failed else None
    return Scores(
        n=n,
        errors=len(failed),
        failed=failed,
        first_error=first_error,
        metrics={"format": value},
        latency_p50_ms=100.0,
        latency_p95_ms=200.0,
    )


def test_publishes_when_the_candidate_beats_the_current_version_by_the_margin(config: RetrainConfig) -> None:
    decision = decide(scores_of(0.95), scores_of(0.10), scores_of(0.0), None, config)
    assert decision.publish
    assert decision.reasons[0] == "format 0.950 >= current 0.100 + margin 0.050"
    assert decide(scores_of(0.15), scores_of(0.10), scores_of(0.0), None, config).publish  # exactly the margin


def test_does_not_publish_within_the_margin(config: RetrainConfig) -> None:
    decision = decide(scores_of(0.14), scores_of(0.10), scores_of(0.0), None, config)
    assert not decision.publish
    assert decision.reasons[0] == "format 0.140 < current 0.100 + margin 0.050"


def test_a_regression_blocks_publishing(config: RetrainConfig) -> None:
    regression = (scores_of(0.80), scores_of(0.90))
    decision = decide(scores_of(0.95), scores_of(0.10), scores_of(0.0), regression, config)
    assert not decision.publish
    assert "regression set: format 0.800 vs current 0.900, drop 0.100 > allowed 0.000" in decision.reasons
    config.max_regression = 0.1
    assert decide(scores_of(0.95), scores_of(0.10), scores_of(0.0), regression, config).publish
    improved = (scores_of(0.95), scores_of(0.90))
    config.max_regression = 0.0
    assert decide(scores_of(0.95), scores_of(0.10), scores_of(0.0), improved, config).publish


def test_without_a_current_version_the_base_is_the_bar(config: RetrainConfig) -> None:
    decision = decide(scores_of(0.54), None, scores_of(0.50), None, config)
    assert not decision.publish
    assert decision.reasons[0] == "format 0.540 < base 0.500 + margin 0.050"
    assert decide(scores_of(0.60), None, scores_of(0.50), None, config).publish


def test_a_candidate_that_always_failed_never_publishes(config: RetrainConfig) -> None:
    decision = decide(scores_of(1.0, errors=20), scores_of(0.0), scores_of(0.0), None, config)
    assert not decision.publish
    assert decision.reasons == ["the candidate failed on all 20 prompts"]
    some = decide(scores_of(0.9, errors=2), scores_of(0.1), scores_of(0.0), None, config)
    assert some.publish and "the candidate failed on 2 of 20 prompts (scored as wrong)" in some.reasons


def test_no_verdict_against_a_bar_that_failed(config: RetrainConfig) -> None:
    """A failed answer scores 0: against a version that is down, or erring on some prompts, any candidate "wins"."""
    broken = decide(scores_of(0.95), scores_of(0.10, errors=3), scores_of(0.0), None, config)
    assert not broken.publish and broken.unjudged
    assert broken.reasons == [
        "the version now serving failed on 3 of 20 prompts of the test split that the candidate answered "
        "(APIConnectionError: Connection error.): the candidate is not judged against answers that never came"
    ]
    from_base = decide(scores_of(0.95), None, scores_of(0.0, errors=1), None, config)
    assert from_base.unjudged and from_base.reasons[0].startswith("the base failed on 1 of 20 prompts of the test")
    regression = (scores_of(0.9), scores_of(0.9, errors=1))
    on_regression = decide(scores_of(0.95), scores_of(0.10), scores_of(0.0), regression, config)
    assert on_regression.unjudged and "of the regression set" in on_regression.reasons[0]
    both_down = decide(scores_of(0.0, errors=20), scores_of(0.0, errors=20), scores_of(0.0), None, config)
    assert both_down.unjudged, "nothing answered: ask again rather than reject the candidate"
    assert both_down.reasons == [
        "the candidate failed on all 20 prompts of the test split and the version now serving on 20: an outage, not "
        "a verdict (APIConnectionError: Connection error.)"
    ]
    went_down = decide(
        scores_of(0.0, errors=20), scores_of(0.1, failed=list(range(5, 20))), scores_of(0.5), None, config
    )
    assert went_down.unjudged, "vLLM went down while the current version was asked, and stayed down"
    same_prompt = decide(scores_of(0.95, failed=[7]), scores_of(0.10, failed=[7]), scores_of(0.0), None, config)
    assert same_prompt.publish and not same_prompt.unjudged, "one prompt both fail on (over the context): judged"
    other_prompt = decide(scores_of(0.95, failed=[7]), scores_of(0.10, failed=[8]), scores_of(0.0), None, config)
    assert other_prompt.unjudged, "the bar failed where the candidate answered"
    base_down = decide(scores_of(0.95), scores_of(0.10), scores_of(0.0, errors=20), None, config)
    assert base_down.publish and not base_down.unjudged, "the base is no bar when a version serves the alias"


def test_no_verdict_on_a_candidate_whose_requests_were_refused_for_no_fault_of_its_own(config: RetrainConfig) -> None:
    """Asked last, the candidate met the quota its tenant's traffic had spent (429) or a replica restarting (503):
    those prompts scored 0, and a candidate right on every prompt it was let answer was rejected and its run ended.
    A 502 (its adapter cannot load, or fails its engine) is still its failure."""
    refused = scores_of(1.0, failed=[3, 9])
    refused.unavailable = [3, 9]
    decision = decide(refused, scores_of(0.8), scores_of(0.0), None, config)
    assert decision.unjudged and not decision.publish
    assert decision.reasons[0].startswith(
        "the candidate's requests failed on 2 of 20 prompts of the test split that the version now serving answered"
    )
    assert decide(scores_of(1.0, failed=[3, 9]), scores_of(0.8), scores_of(0.0), None, config).publish, "its own"
    request = httpx.Request("POST", "http://gateway/v1/chat/completions")

    def status(code: int) -> openai.APIStatusError:
        return openai.APIStatusError("refused", response=httpx.Response(code, request=request), body=None)

    kinds = {
        "429": status(429), "503": status(503), "502": status(502), "400": status(400), "500": status(500),
        "lost": openai.APIConnectionError(request=request), "slow": openai.APITimeoutError(request=request),
    }  # fmt: skip
    assert {name: _unavailable(exc) for name, exc in kinds.items()} == {
        "429": True, "503": True, "502": False, "400": False, "500": False, "lost": True, "slow": True,
    }  # fmt: skip


def test_load_rows_reads_both_files(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = tmp_path / "rows.jsonl"
    lines = [
        {"prompt": messages, "reference": "Hello."},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": messages, "completion": [{"role": "assistant", "content": "Hey."}]},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    assert load_rows(path) == [
        EvalRow(prompt=messages, reference="Hello."),
        EvalRow(prompt="The sky is", reference=" blue."),
        EvalRow(prompt=messages, reference="Hey."),
    ]


def test_load_rows_reads_the_tools_a_prompt_is_asked_with_as_rows_carry_them(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "weather"}}]
    path = tmp_path / "eval.jsonl"
    lines = [{"prompt": chat("Paris?"), "reference": "Sunny.", "tools": json.dumps(tools)}]
    path.write_text("".join(json.dumps(line) + "\n" for line in [*lines, {**lines[0], "tools": tools}]))
    assert [row.tools for row in load_rows(path)] == [tools, tools]


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        '{"prompt": "x"}',
        '{"prompt": "", "reference": "x"}',
        '{"prompt": [{"content": "x"}], "reference": ""}',
        '{"prompt": "x", "reference": "y", "tools": [{"type": "function"}]}',
        '{"prompt": [{"role": "user", "content": "x"}], "reference": "y", "tools": []}',
        '{"prompt": [{"role": "user", "content": "x"}], "reference": "y", "tools": "[{"}',
    ],
)
def test_load_rows_names_a_bad_line(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "ok", "reference": "ok"}\n' + bad + "\n")
    with pytest.raises(ValueError, match=r"eval\.jsonl:2: "):
        load_rows(path)


class FakeGateway:
    """Answers chat and text completions with canned texts per model; "fail" gets a 400, a model `down` a 503."""

    def __init__(self, answers: dict[str, dict[str, str]] | None = None, down: frozenset[str] = frozenset()) -> None:
        self.answers = answers or {}
        self.down = down
        self.requests: list[httpx.Request] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0.01)
        self.in_flight -= 1
        body = json.loads(request.content)
        chat = request.url.path == "/v1/chat/completions"
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if prompt == "fail" or body["model"] in self.down:
            error = {"message": "no", "type": "invalid_request_error", "param": None, "code": None}
            return httpx.Response(503 if body["model"] in self.down else 400, json={"error": error})
        text = self.answers.get(body["model"], {}).get(prompt, f"{body['model']}: {prompt}")
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        kind = "chat.completion" if chat else "text_completion"
        return httpx.Response(
            200, json={"id": "x", "object": kind, "created": 0, "model": body["model"], "choices": [choice]}
        )

    def client(self) -> openai.AsyncOpenAI:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return openai.AsyncOpenAI(api_key="k", base_url="http://gateway.test/v1", max_retries=0, http_client=http)


def chat(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_answer_all_sends_greedy_requests_and_keeps_failures() -> None:
    gateway = FakeGateway()
    prompts: list[str | list[dict[str, Any]]] = [chat("a"), "b", chat("fail"), chat("d"), "e", "f"]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    rows = [EvalRow(prompt=p, reference="", tools=tools if p == chat("d") else None) for p in prompts]
    progress: list[tuple[int, int]] = []
    async with gateway.client() as client:
        answers = await answer_all(
            client,
            "acme/triage@v3",
            rows,
            max_tokens=16,
            concurrency=2,
            extra_headers={"x-eval": "1"},
            progress=lambda done, total: progress.append((done, total)),
        )
    assert [a.text for a in answers] == [
        "acme/triage@v3: a",
        "acme/triage@v3: b",
        "",
        *(f"acme/triage@v3: {x}" for x in "def"),
    ]
    assert answers[2].error is not None and answers[2].error.startswith("BadRequestError")
    assert all(a.error is None and a.latency_ms > 0 for i, a in enumerate(answers) if i != 2)
    bodies = [json.loads(r.content) for r in gateway.requests]
    assert all(b["temperature"] == 0 and b["model"] == "acme/triage@v3" and b["max_tokens"] == 16 for b in bodies)
    assert all(r.headers["x-eval"] == "1" for r in gateway.requests)
    assert [b.get("tools") for b in bodies if b.get("messages") == chat("d")] == [tools], "asked with its tools"
    assert sum("tools" in b for b in bodies) == 1, "the others without"
    paths = sorted(r.url.path for r in gateway.requests)
    assert paths == ["/v1/chat/completions"] * 3 + ["/v1/completions"] * 3
    assert gateway.most_in_flight == 2
    assert progress == [(i, 6) for i in range(1, 7)]


async def test_evaluate_asks_every_model_and_decides(config: RetrainConfig, tmp_path: Path) -> None:
    rows = [EvalRow(prompt=chat(f"incident {i}"), reference=f"SEVERITY: P{i}\nreason {i}") for i in (1, 2, 3, 4)]
    regression = [EvalRow(prompt="old incident", reference="SEVERITY: P1\nold")]
    right = {f"incident {i}": f"SEVERITY: P{i}\nreason {i}" for i in (1, 2, 3, 4)} | {
        "old incident": "SEVERITY: P1\nold"
    }
    gateway = FakeGateway({"cand": right, "cur": {"incident 1": right["incident 1"]}})
    async with gateway.client() as client:
        report = await evaluate(
            client, rows, config, candidate="cand", base="base", current="cur", regression_rows=regression
        )
    assert report.models == {"base": "base", "current": "cur", "candidate": "cand"}
    assert report.candidate.metrics["format"] == 1.0
    assert report.current is not None and report.current.metrics["format"] == 0.25
    assert report.base.metrics["format"] == 0.0
    assert report.regression is not None
    assert (report.regression.candidate.metrics["format"], report.regression.serving.metrics["format"]) == (1.0, 0.0)
    assert report.decision.publish
    assert len(report.examples) == 2
    assert all(e.candidate != e.current for e in report.examples)  # examples that differ come first
    asked = [json.loads(r.content)["model"] for r in gateway.requests]
    assert asked == ["base"] * 4 + ["cur"] * 4 + ["cand"] * 4 + ["cand", "cur"]

    json_path, markdown_path = write_report(report, tmp_path / "out")
    assert EvalReport.model_validate_json(json_path.read_text()) == report
    assert "## Decision: publish" in markdown_path.read_text()


async def test_a_current_version_that_is_down_gives_no_verdict(config: RetrainConfig, tmp_path: Path) -> None:
    rows = [EvalRow(prompt=chat(f"incident {i}"), reference=f"SEVERITY: P{i}\nreason {i}") for i in (1, 2)]
    right = {f"incident {i}": f"SEVERITY: P{i}\nreason {i}" for i in (1, 2)}
    async with FakeGateway({"cand": right}, down=frozenset({"cur"})).client() as client:
        report = await evaluate(client, rows, config, candidate="cand", base="base", current="cur")
    assert report.current is not None and report.current.errors == 2 and report.candidate.metrics["format"] == 1.0
    assert not report.decision.publish and report.decision.unjudged
    _, markdown = write_report(report, tmp_path)
    assert "## Decision: none (ask again)" in markdown.read_text()


async def test_evaluate_without_a_current_version_compares_with_the_base(config: RetrainConfig) -> None:
    rows = [EvalRow(prompt="p", reference="SEVERITY: P1\nx")]
    gateway = FakeGateway({"cand": {"p": "SEVERITY: P1\nx"}})
    async with gateway.client() as client:
        report = await evaluate(client, rows, config, candidate="cand", base="base", regression_rows=rows)
        with pytest.raises(ValueError, match="no test rows"):
            await evaluate(client, [], config, candidate="cand", base="base")
    assert report.current is None and report.examples[0].current is None
    assert report.regression is not None and report.regression.serving.metrics["format"] == 0.0
    assert report.decision.publish and report.decision.reasons[0].startswith("format 1.000 >= base 0.000")
    assert [json.loads(r.content)["model"] for r in gateway.requests] == ["base", "cand", "cand", "base"]


def hand_made_report(current: bool = True) -> EvalReport:
    def scores(value: float, p50: float) -> Scores:
        return Scores(
            n=10, errors=1, metrics={"format": value, "rouge_l": value / 2}, latency_p50_ms=p50, latency_p95_ms=p50 * 2
        )

    long = "word | " * 100
    return EvalReport(
        primary_metric="format",
        models={"base": "base"} | ({"current": "t/a@v3"} if current else {}) | {"candidate": "t/a@v4"},
        candidate=scores(0.9, 120.0),
        current=scores(0.5, 110.0) if current else None,
        base=scores(0.2, 100.0),
        regression=RegressionScores(candidate=scores(0.8, 1.0), serving=scores(0.7, 1.0)),
        decision=Decision(publish=True, reasons=["format 0.900 >= current 0.500 + margin 0.050"]),
        examples=[
            Example(
                prompt=chat("line one\nline two"),
                reference="ref",
                base="b",
                current="c" if current else None,
                candidate=long,
            )
        ],
    )


def test_markdown_table_has_metrics_by_model() -> None:
    table = markdown_table(hand_made_report()).splitlines()
    assert table[0] == "| metric | base | current | candidate |"
    assert "| **format** (primary) | 0.200 | 0.500 | 0.900 |" in table
    assert "| rouge_l | 0.100 | 0.250 | 0.450 |" in table
    assert "| latency p50 (ms) | 100 | 110 | 120 |" in table
    assert "| latency p95 (ms) | 200 | 220 | 240 |" in table
    assert "| errors | 1/10 | 1/10 | 1/10 |" in table
    assert "| format on the regression set (n=10) | – | 0.700 | 0.800 |" in table
    without = markdown_table(hand_made_report(current=False)).splitlines()
    assert "| **format** (primary) | 0.200 | – | 0.900 |" in without
    assert "| format on the regression set (n=10) | 0.700 | – | 0.800 |" in without


def test_write_report_writes_json_and_markdown(tmp_path: Path) -> None:
    report = hand_made_report()
    json_path, markdown_path = write_report(report, tmp_path / "eval")
    assert (json_path.name, markdown_path.name) == ("eval_report.json", "eval_report.md")
    saved = json.loads(json_path.read_text())
    assert saved["decision"] == {
        "publish": True, "reasons": ["format 0.900 >= current 0.500 + margin 0.050"], "unjudged": False
    }  # fmt: skip
    assert saved["examples"][0]["candidate"] == "word | " * 100  # the JSON keeps whole texts
    markdown = markdown_path.read_text()
    assert markdown_table(report) in markdown
    assert "## Decision: publish\n\n- format 0.900 >= current 0.500 + margin 0.050" in markdown
    assert "**Prompt:** user: line one<br>line two" in markdown
    example_row = next(line for line in markdown.splitlines() if line.startswith("| ref | b | c | "))
    assert example_row.endswith("… |") and "word \\| word" in example_row
    assert len(example_row) < 400  # the 600-character answer is shortened


def test_the_eval_shows_each_models_progress_at_every_tenth() -> None:
    """Only each model's last answer was shown: a test set of hundreds of prompts ran for minutes with no line."""
    lines: list[str] = []
    report = each_tenth(lines.append)
    for done in range(1, 26):
        report("candidate", done, 25)
    assert lines == [f"eval candidate: {n}/25" for n in (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25)]
    lines.clear()
    for done in range(1, 4):
        report("base", done, 3)
    assert lines == ["eval base: 1/3", "eval base: 2/3", "eval base: 3/3"]
