"""OpenAI-compatible request and response bodies, shared by the replica and the gateway.

Requests are strict: an unknown field is a 400 (as OpenAI does), a value of the wrong JSON type
too (``"max_tokens": "3"``, ``"stream": "yes"``: no coercion), every numeric parameter has a
documented range, and the bounds on lengths keep a single request from taking the server down.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported_parameter"  # the error type (and OpenAI error code) of those below

MAX_STOP_SEQUENCES = 4
# The output length a request without ``max_tokens`` gets (at most: less when the context has
# less room): OpenAI's 16 for completions; chat has no such default, 256 keeps a reply bounded.
DEFAULT_MAX_TOKENS_CHAT = 256
DEFAULT_MAX_TOKENS_COMPLETIONS = 16
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class StreamOptions(_Strict):
    include_usage: StrictBool = False  # a last chunk with ``usage`` and no choices, before [DONE]


class SamplingFields(_Strict):
    """Parameters shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)
    temperature: StrictFloat = Field(default=1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(default=1, ge=1, le=1)  # one choice per request (n > 1 is refused)
    user: str | None = Field(default=None, max_length=256)
    # vLLM's extension: generate ``max_tokens`` tokens whatever the model's end-of-sequence says
    # (load tests replaying a trace's output lengths)
    ignore_eos: StrictBool = False
    # OpenAI parameters this server does not implement: taken at their neutral values (clients
    # such as LangChain send them), refused otherwise (400, code ``unsupported_parameter``).
    presence_penalty: StrictFloat | StrictInt | None = None
    frequency_penalty: StrictFloat | StrictInt | None = None
    logit_bias: dict[str, StrictFloat | StrictInt] | None = None
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None
    echo: StrictBool | None = None

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, v: object, info: ValidationInfo) -> object:
        """``null`` for these means the default, as OpenAI takes it."""
        if v is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return v

    @model_validator(mode="after")
    def _only_neutral_unsupported(self) -> SamplingFields:
        neutral = {
            "presence_penalty": self.presence_penalty in (None, 0),
            "frequency_penalty": self.frequency_penalty in (None, 0),
            "logit_bias": not self.logit_bias,
            "logprobs": self.logprobs is None or self.logprobs is False,
            "top_logprobs": self.top_logprobs in (None, 0),
            "echo": not self.echo,
        }
        for name, ok in neutral.items():
            if not ok:
                raise PydanticCustomError(
                    UNSUPPORTED,
                    "{name} is not supported by this server (only its neutral value)",
                    {"name": name},
                )
        return self

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop sequences must be 1..{MAX_STOP_CHARS} characters")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_list(self) -> tuple[str, ...]:
        stop = self.stop
        if stop is None:
            return ()
        return (stop,) if isinstance(stop, str) else tuple(stop)


class CompletionRequest(SamplingFields):
    """``max_tokens`` left out (or null) is OpenAI's 16 for completions, or the room the prompt
    leaves in the context if that is less (the server's ``_sampling``)."""

    prompt: str | list[str] = Field(max_length=MAX_PROMPT_CHARS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request")
        text = v if isinstance(v, str) else v[0]
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt longer than {MAX_PROMPT_CHARS} characters")
        _check_utf8(text)
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Strict):
    """A content part of a chat message; text is the only kind a text model takes."""

    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]  # (developer: OpenAI's system)
    content: str | list[TextPart] = Field(max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(default=None, max_length=64)

    @field_validator("content")
    @classmethod
    def _utf8(cls, v: str | list[TextPart]) -> str | list[TextPart]:
        text = v if isinstance(v, str) else "\n".join(p.text for p in v)
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"content longer than {MAX_PROMPT_CHARS} characters")
        _check_utf8(text)
        return v

    def text(self) -> str:
        """The message's text (content parts joined by newlines)."""
        return (
            self.content
            if isinstance(self.content, str)
            else "\n".join(p.text for p in self.content)
        )


def _check_utf8(text: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``) that are no text: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode at position {e.start}") from e


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # OpenAI's newer name for max_tokens in chat; either may be given, not two different values.
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_length_limit(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: give one")
            self.max_tokens = self.max_completion_tokens
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    adapter_version: int | None  # the adapter version that produced every token of this reply


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    adapter_version: int | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "collm-fl"
    root: str  # the base model
    adapter_version: int | None  # the version new requests are served with


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
