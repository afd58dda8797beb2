"""Request and response bodies of the HTTP API (pydantic), built per server so that the limits
it enforces (messages, n, max_tokens ...) are the limits its OpenAPI schema states.

Requests are strict: unknown fields, wrong JSON types ("1" for 1) and out-of-range values are
400s, as OpenAI's API does. Responses follow OpenAI's shapes.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from echolm.serve.limits import Limits  # the models are built for these (and importable here)

TOP_LOGPROBS_MAX = 20
COMPLETION_LOGPROBS_MAX = 5
MAX_STOP = 4
MAX_STOP_CHARS = 64


STRICT = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "echolm"
    stage: str
    checkpoint: str
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    auth: bool
    engine: dict[str, int]
    limits: dict[str, int]


class RankedResponse(BaseModel):
    id: int
    text: str
    finish_reason: Literal["stop", "length"]


class SampleResult(BaseModel):
    prompt_id: int
    prompt: str
    model: str
    stage: str
    checkpoint: str
    sampling: dict
    responses: list[RankedResponse]


class RankingRequest(BaseModel):
    model_config = STRICT
    prompt_id: int = Field(ge=1, le=2**63 - 1)
    response_ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(
        min_length=2, max_length=16, description="the responses, best first")
    annotator: str = Field(min_length=1, max_length=100, pattern=r"\S")


class RankingResult(BaseModel):
    ranking_id: int
    counts: dict[str, int]


class PrefCounts(BaseModel):
    path: str
    counts: dict[str, int]


def request_models(limits: Limits) -> SimpleNamespace:
    """The request bodies, with this server's limits in their fields."""

    class TextPart(BaseModel):
        model_config = STRICT
        type: Literal["text"]
        text: str

    class ChatMessage(BaseModel):
        model_config = STRICT
        role: Literal["system", "developer", "user", "assistant"] = Field(
            description="'developer' is read as 'system'")
        content: str | list[TextPart] = Field(description="text, or text parts (joined)")

    class StreamOptions(BaseModel):
        model_config = STRICT
        include_usage: bool = False

    stop_field = Field(None, description=f"up to {MAX_STOP} strings; the text ends before the "
                       "first one and does not contain it")
    stop_str = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
    stop_type = stop_str | Annotated[list[stop_str], Field(max_length=MAX_STOP)] | None

    class Sampling(BaseModel):
        model_config = STRICT
        model: str = Field(description="one of /v1/models: echo-base, echo-sft, echo-rl, "
                           "echo-rlhf, echo-dpo")
        temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
        top_p: float | None = Field(None, ge=0, le=1, description="nucleus sampling; default 1")
        top_k: int | None = Field(None, ge=0, le=1_000_000,
                                  description="Echo's extension: sample among the k likeliest "
                                  "tokens (0 = off)")
        n: int | None = Field(None, ge=1, le=limits.max_n, description="choices (default 1)")
        stop: stop_type = stop_field
        seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                                 description="reproducible sampling (best effort)")
        stream: bool | None = Field(None, description="server-sent events, OpenAI's chunks, "
                                    "then 'data: [DONE]'")
        stream_options: StreamOptions | None = None
        user: str | None = Field(None, description="accepted for compatibility; unused")

    class ChatCompletionRequest(Sampling):
        messages: list[ChatMessage] = Field(min_length=1, max_length=limits.max_messages)
        max_tokens: int | None = Field(
            None, ge=1, le=limits.max_tokens,
            description="the longest answer (default: the rest of the context, at most "
                        f"{limits.max_tokens}); generation also ends at the model's context")
        max_completion_tokens: int | None = Field(None, ge=1, le=limits.max_tokens,
                                                  description="the same as max_tokens")
        logprobs: bool | None = Field(None, description="log-probabilities of each answer token "
                                      "under the model (temperature 1)")
        top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX,
                                         description="alternatives per token (needs logprobs)")

    class CompletionRequest(Sampling):
        prompt: str | list[str] = Field(description="text the model continues (a document "
                                        "start is added); a list gives n choices per prompt")
        max_tokens: int | None = Field(None, ge=1, le=limits.max_tokens,
                                       description="default 16, as OpenAI's")
        logprobs: int | None = Field(None, ge=0, le=COMPLETION_LOGPROBS_MAX,
                                     description="log-probabilities of each token and this "
                                     "many alternatives")

    class SampleRequest(BaseModel):
        model_config = STRICT
        model: str
        prompt: str = Field(min_length=1, max_length=20_000, pattern=r"\S",
                            description="a user message")
        n: int = Field(4, ge=2, le=limits.max_n, description="answers to rank")
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, ge=0, le=1)
        max_tokens: int | None = Field(None, ge=1, le=limits.max_tokens)
        seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)

    return SimpleNamespace(ChatCompletionRequest=ChatCompletionRequest,
                           CompletionRequest=CompletionRequest, SampleRequest=SampleRequest,
                           ChatMessage=ChatMessage)
