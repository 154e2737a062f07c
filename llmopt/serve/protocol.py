"""The OpenAI request bodies the server accepts, and the shapes of its answers.

Unknown fields are refused (``extra="forbid"``), so a typo is a 422 that names the field instead of a
silently ignored option. Fields OpenAI defines that llmopt cannot honour are accepted only at the
value that means "off" (``n=1``, ``logprobs`` false, penalties 0).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4  # as OpenAI


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: Optional[str] = None


class _Sampling(BaseModel):
    """What both endpoints share: the model name, per-request sampling, streaming."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    n: Literal[1] = 1
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not stop for stop in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Literal[False] = False

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)
    echo: Literal[False] = False
    logprobs: Literal[None] = None

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _body(kind: str, request_id: str, model: str, created: int, choice: dict, finish_reason: Optional[str],
          usage_counts: Optional[dict]) -> dict:
    """OpenAI's envelope around one choice: answers and stream chunks of both endpoints."""
    body = {"id": request_id, "object": kind, "created": created, "model": model,
            "choices": [{"index": 0, **choice, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def chat_response(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return _body("chat.completion", request_id, model, int(time.time()), {"message": {"role": "assistant", "content": text}},
                 finish_reason, usage(prompt_tokens, completion_tokens))


def completion_response(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                        completion_tokens: int) -> dict:
    return _body("text_completion", request_id, model, int(time.time()), {"text": text}, finish_reason,
                 usage(prompt_tokens, completion_tokens))


def chat_chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: Optional[str] = None,
               usage_counts: Optional[dict] = None) -> dict:
    return _body("chat.completion.chunk", request_id, model, created, {"delta": delta}, finish_reason, usage_counts)


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: Optional[str] = None,
                     usage_counts: Optional[dict] = None) -> dict:
    return _body("text_completion", request_id, model, created, {"text": text}, finish_reason, usage_counts)


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
