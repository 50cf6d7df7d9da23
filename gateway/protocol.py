"""Wire models of the OpenAI surface: what a request must look like before it reaches vLLM.

Only what the gateway checks is declared; every other field passes through untouched
(`extra="allow"`), so parameters vLLM supports keep working without a gateway change. What is
declared is parsed strictly, as OpenAI does: `"logprobs": "yes"` or `"n": "2"` is a 400, not a guess.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(ge=1)]
MAX_MESSAGES = 2048
"""Most messages in one chat request (far more than any context holds): a body of hundreds of thousands
would otherwise take the event loop seconds to validate, for every tenant of the process."""
MAX_TOOLS = 128
"""Most tools in one chat request, as OpenAI allows."""
MAX_CONTENT_PARTS = 4096
"""Most content parts in one chat request's messages, all together; MAX_PROMPTS and MAX_PROMPT_TOKENS likewise for a
text completion: prompts in a batch, and token ids in one prompt (more than any context holds). Counted before the
items are validated: a body of millions of wrong-typed items took the event loop seconds to validate and tens of
seconds to report, for every tenant of the process."""
MAX_PROMPTS = 1024
MAX_PROMPT_TOKENS = 262_144
MAX_ANSWERS = 1024
"""Most completions one text completion request asks for, `n` times its prompts: vLLM's own limit on a batch's
prompts (`VLLM_MAX_COMPLETION_PROMPTS`), so that one request of a tenant counted by requests alone does not hold the
engines every tenant shares with up to 128 times that many sequences."""


def _count_parts(messages: Any) -> int:
    """Content parts in a chat request's `messages`, as sent (before validation)."""
    if not isinstance(messages, list) or len(messages) > MAX_MESSAGES:
        return 0  # not a list, or refused for its length without looking at its items
    return sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list))


def _prompt_too_large(prompt: Any) -> str | None:
    """Why a text completion's prompt, as sent (before validation), is too large to be validated; None if it is not."""
    if not isinstance(prompt, list) or not prompt:
        return None
    if isinstance(prompt[0], int):  # one prompt of token ids
        return f"a prompt holds more than {MAX_PROMPT_TOKENS} tokens" if len(prompt) > MAX_PROMPT_TOKENS else None
    if len(prompt) > MAX_PROMPTS:
        return f"a batch holds more than {MAX_PROMPTS} prompts"
    if any(isinstance(item, list) and len(item) > MAX_PROMPT_TOKENS for item in prompt):
        return f"a prompt holds more than {MAX_PROMPT_TOKENS} tokens"
    return None


def _needs(field: str, when: Any, other: str, value: Any = None) -> dict[str, Any]:
    """JSON Schema for what a model validator checks: `other` is required (non-null, or `value`) when
    `field` is `when` (a value, or a schema). It only describes; the validators decide."""
    condition = when if isinstance(when, dict) else {"const": when}
    required = {"const": value} if value is not None else {"not": {"type": "null"}}
    return {
        "if": {"required": [field], "properties": {field: condition}},
        "then": {"required": [other], "properties": {other: required}},
    }


class PassThrough(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(PassThrough):
    include_usage: bool | None = None


class JSONSchemaFormat(PassThrough):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(PassThrough):
    model_config = ConfigDict(json_schema_extra=_needs("type", "json_schema", "json_schema"))

    type: Literal["text", "json_object", "json_schema", "structural_tag"]  # the last vLLM's (`format` or `structures`)
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


class FunctionDefinition(PassThrough):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(PassThrough):
    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(PassThrough):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class SamplingParams(PassThrough):
    """Parameters shared by chat and text completions."""

    model_config = ConfigDict(json_schema_extra=_needs("stream_options", {"type": "object"}, "stream", True))

    token_limits: ClassVar[tuple[str, ...]] = ("max_tokens",)
    """The fields that bound how many tokens a request generates."""
    default_max_tokens: ClassVar[int | None] = None
    """The limit when the request names none (None: as many as the context holds, capped by the gateway)."""

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=128)
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: str | list[str] | None = Field(None, json_schema_extra={"maxItems": 4})
    seed: int | None = None
    user: str | None = None

    def answers(self) -> int:
        """How many completions the request generates: n, times its prompts."""
        return (self.n or 1) * self.prompts()

    def asks_best_of(self) -> bool:
        """Whether it asks for the best of several completions (`best_of` above 1), which vLLM's V1 engine does not
        do (it ignores the field): refused, rather than answered with one completion as if it had been done."""
        return False

    def prompts(self) -> int:
        return 1

    def asks_prompt_logprobs(self) -> str | None:
        """The field that makes vLLM compute the prompt's logprobs (None: nothing does): `prompt_logprobs` itself,
        on either endpoint, or `echo` (vLLM then takes the prompt's from the completion's logprobs settings)."""
        return "prompt_logprobs" if (self.model_extra or {}).get("prompt_logprobs") is not None else None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        """Checked on the field (declared after `stream`), so the error's `param` names it."""
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _at_most_four_stops(cls, value: Any) -> Any:
        """Before its items are validated (a list of a million is refused at once)."""
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("stop accepts at most 4 sequences")
        return value


class ChatCompletionRequest(SamplingParams):
    token_limits: ClassVar[tuple[str, ...]] = ("max_completion_tokens", "max_tokens")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    """vLLM's: the last message repeated before the answer. Declared (strict) so that only `true` is read as true,
    as vLLM would also read `1` or `"yes"`, and computes the prompt's logprobs then (`asks_prompt_logprobs`)."""
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)

    def asks_prompt_logprobs(self) -> str | None:
        """On chat, `echo` alone does: vLLM takes `top_logprobs` (0 when absent) as the prompt's."""
        return super().asks_prompt_logprobs() or ("echo" if self.echo else None)

    @field_validator("messages", mode="before")
    @classmethod
    def _bounded_parts(cls, messages: Any) -> Any:
        if _count_parts(messages) > MAX_CONTENT_PARTS:
            raise ValueError(f"the messages hold more than {MAX_CONTENT_PARTS} content parts")
        return messages


PromptValue = str | list[str] | list[int] | list[list[int]]


def _not_empty(prompt: PromptValue) -> PromptValue:
    if not prompt:
        raise ValueError("the prompt is empty: send at least one character or token")
    return prompt


class CompletionRequest(SamplingParams):
    default_max_tokens: ClassVar[int | None] = 16
    """OpenAI's (and vLLM's) default for text completions."""

    prompt: Annotated[PromptValue, AfterValidator(_not_empty), Field(json_schema_extra={"minLength": 1, "minItems": 1})]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    best_of: int | None = Field(None, ge=1, le=20, description="Only 1: vLLM's engine does not pick the best of many.")

    def asks_prompt_logprobs(self) -> str | None:
        """On text completions, `echo` with `logprobs` (any number, 0 too) does."""
        return super().asks_prompt_logprobs() or ("echo" if self.echo and self.logprobs is not None else None)

    def asks_best_of(self) -> bool:
        return (self.best_of or 1) > 1

    @model_validator(mode="after")
    def _zero_only_with_echo(self) -> CompletionRequest:
        """0 generates nothing: vLLM allows it with `echo` (the prompt's logprobs, scoring without generating).
        `echo` is declared after `max_tokens`, so this is checked on the whole request, naming the field."""
        if self.max_tokens == 0 and not self.echo:
            problem = ValueError(
                "max_tokens must be at least 1, or 0 with echo true (the prompt scored, nothing generated)"
            )
            details = {"type": "value_error", "loc": ("max_tokens",), "input": 0, "ctx": {"error": problem}}
            raise ValidationError.from_exception_data(type(self).__name__, [details])  # type: ignore[list-item]
        return self

    @model_validator(mode="after")
    def _bounded_answers(self) -> CompletionRequest:
        if self.answers() > MAX_ANSWERS:
            problem = ValueError(
                f"n times the prompts of the batch ({self.n} x {self.prompts()}) must be at most {MAX_ANSWERS}"
            )
            details = {"type": "value_error", "loc": ("n",), "input": self.n, "ctx": {"error": problem}}
            raise ValidationError.from_exception_data(type(self).__name__, [details])  # type: ignore[list-item]
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _bounded_prompt(cls, value: Any) -> Any:
        if (why := _prompt_too_large(value)) is not None:
            raise ValueError(why)
        return value

    def prompts(self) -> int:
        """A batch (a list of strings or of token lists) is one prompt each; one token list is one prompt."""
        if isinstance(self.prompt, list) and not isinstance(self.prompt[0], int):
            return len(self.prompt)
        return 1


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loragate"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# What the OpenAI surface answers. The gateway passes vLLM's answers on as they are: these models
# describe them (for the OpenAPI schema) without closing them, so fields vLLM adds stay valid.


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, requests, tokens or server_error.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable name for the error (invalid_api_key, model_not_found, ...).")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every refusal and failure of the gateway has this body."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class Answer(BaseModel):
    """What every completion answer, and every event of a stream, carries."""

    id: str
    created: int
    model: str
    usage: Usage | None = None


class Choice(BaseModel):
    index: int
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class AssistantMessage(ChatDelta):
    role: str


class ChatChoice(Choice):
    message: AssistantMessage


class ChatCompletion(Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class ChatChunkChoice(Choice):
    delta: ChatDelta


class ChatCompletionChunk(Answer):
    """One event of a chat stream; the last one (with `stream_options.include_usage`) has no choices, only usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]


class CompletionChoice(Choice):
    text: str


class Completion(Answer):
    """A text completion: the whole answer, or one event of its stream."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
