"""Wire models of the OpenAI surface: what a request must look like before it reaches vLLM.

Only what the gateway checks is declared; every other field passes through untouched
(`extra="allow"`), so parameters vLLM supports keep working without a gateway change. What is
declared is parsed strictly, as OpenAI does: `"logprobs": "yes"` or `"n": "2"` is a 400, not a guess.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(ge=1)]


class PassThrough(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(PassThrough):
    include_usage: bool | None = None


class JSONSchemaFormat(PassThrough):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(PassThrough):
    type: Literal["text", "json_object", "json_schema"]
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

    token_limits: ClassVar[tuple[str, ...]] = ("max_tokens",)
    """The fields that bound how many tokens a request generates."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def answers(self) -> int:
        """How many completions the request generates: n (or vLLM's best_of), times its prompts."""
        best_of = (self.model_extra or {}).get("best_of")
        per_prompt = max(self.n, best_of if isinstance(best_of, int) and not isinstance(best_of, bool) else 0)
        return per_prompt * self.prompts()

    def prompts(self) -> int:
        return 1

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop accepts at most 4 sequences")
        return self


class ChatCompletionRequest(SamplingParams):
    token_limits: ClassVar[tuple[str, ...]] = ("max_completion_tokens", "max_tokens")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None


class CompletionRequest(SamplingParams):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None

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
