"""The OpenAI API's request and response bodies (the subset the server speaks), as pydantic models.

Requests keep fields they do not declare (``extra="allow"``), so :func:`unsupported_fields` can
refuse them by name instead of silently dropping them: a client that asks for ``tools`` or
``n=2`` gets a 400 that says so. :data:`IGNORED_FIELDS` are accepted and have no effect.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# accepted and ignored (bookkeeping a client may send; nothing to do with the answer)
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; images are resized anyway


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str  # base64
    format: str  # wav, flac, ogg, mp3


class AudioPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = TextPart | ImagePart | AudioPart


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, not used
    reasoning_content: str | None = None  # a previous answer's reasoning: dropped, as GLM does


class StreamOptions(_Request):
    include_usage: bool = False


class ChatCompletionRequest(_Request):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # accepted only at their neutral values (checked in unsupported_fields)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None


class EmbeddingRequest(_Request):
    model: str
    # strings, or (an extension) image_url / input_audio parts as in chat messages
    input: str | list[str | ImagePart | AudioPart] | ImagePart | AudioPart
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # refused unless it is the model's own width


def unsupported_fields(req: _Request) -> list[str]:
    """The names of fields ``req`` (and its messages) set that the server does not honour."""
    bad = [k for k in (req.model_extra or {}) if k not in IGNORED_FIELDS]
    if isinstance(req, ChatCompletionRequest):
        if req.n != 1:
            bad.append("n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                bad.append(name)
        if req.logprobs:
            bad.append("logprobs")
        if req.stream_options is not None and not req.stream:
            bad.append("stream_options")
        for i, msg in enumerate(req.messages):
            bad += [f"messages[{i}].{k}" for k in (msg.model_extra or {})]
    return bad


# -- responses ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "autoglm-phone"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
