"""The OpenAI request fields glmc serves, checked one by one, and OpenAI's JSON error shape.

`parse(body, kind, limits)` turns a /v1/chat/completions or /v1/completions body into a `Job` (prompt ids,
sampling, stop strings, streaming) or raises `ApiError` naming the field (`param`) and what it must be.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from glmc.errors import GlmcError
from glmc.runtime.generate import MIN_TEMPERATURE

# fields glmc reads; the OpenAI fields below are accepted only at the value that changes nothing
COMMON = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user")
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "echo": False, "best_of": 1,
           "suffix": None, "tools": None, "tool_choice": None, "response_format": None, "logit_bias": None,
           "parallel_tool_calls": None, "top_logprobs": None}
FIELDS = {"chat": ("messages", "max_completion_tokens", *COMMON), "completion": ("prompt", *COMMON)}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code=code)


@dataclasses.dataclass
class Limits:
    max_input_length: int  # the longest prompt the build takes
    max_sequence_length: int  # prompt + generated tokens


@dataclasses.dataclass
class Job:
    """A checked request."""

    kind: str  # chat | completion
    chat: bool  # reply parsed as a chat message (metadata line held back)
    prompt: Any  # messages, text, or token ids
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(name, f"expected a number, got {v!r:.40}")
    if v < low or v > high or (low_open and v == low):
        raise bad(name, f"{v} is out of range ({'(' if low_open else '['}{low}, {high}])")
    return float(v)


def _integer(body: dict, name: str, low: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"expected an integer, got {v!r:.40}")
    if v < low:
        raise bad(name, f"must be at least {low}, got {v}")
    return v


def _messages(v: Any) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", f"expected system, user or assistant, got {m!r:.60}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content", "only text content parts ({type: text, text}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"expected a string, got {content!r:.40}")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt(v: Any) -> str | list[int]:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if isinstance(v, str):
        if not v:
            raise bad("prompt", "is empty")
        return v
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        return list(v)
    raise bad("prompt", "expected a string, a list of one string, or a list of token ids (one prompt per request)")


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) or len(v) > 4:
        raise bad("stop", "expected a non-empty string or a list of up to 4 non-empty strings")
    return v


def parse(body: Any, kind: str) -> Job:
    """Check a request body (kind: chat | completion)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for name in body:
        if name in NEUTRAL:
            if body[name] not in (NEUTRAL[name], None) and body[name] != []:
                raise bad(name, f"not supported by glmc serve (only {NEUTRAL[name]!r})", "unsupported_value")
        elif name not in FIELDS[kind]:
            raise bad(name, "unknown field", "unknown_parameter")
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        raise bad("n", f"only n=1 is supported (one choice per request), got {n}", "unsupported_value")
    if kind == "chat":
        if "messages" not in body:
            raise bad("messages", "is required", "missing_required_parameter")
        prompt: Any = _messages(body["messages"])
    else:
        if "prompt" not in body:
            raise bad("prompt", "is required", "missing_required_parameter")
        prompt = _prompt(body["prompt"])
    max_tokens = _integer(body, "max_completion_tokens", 1) if kind == "chat" else None
    max_tokens = _integer(body, "max_tokens", 1) if max_tokens is None else max_tokens
    if max_tokens is None and kind == "completion":
        max_tokens = 16  # OpenAI's default for completions; chat defaults to the context's room
    seed = _integer(body, "seed", -(2 ** 63))
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise bad("stream", f"expected true or false, got {stream!r:.20}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise bad("stream_options", "expected {\"include_usage\": true|false}")
    if options and not stream:
        raise bad("stream_options", "only allowed with stream: true")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    if temperature < MIN_TEMPERATURE:  # as OpenAI-style servers do: a temperature this close to 0 is greedy
        temperature = 0.0
    return Job(kind=kind, chat=kind == "chat", prompt=prompt, max_tokens=max_tokens, temperature=temperature,
               top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), seed=seed,
               stop=_stop(body.get("stop")), stream=bool(stream), include_usage=bool(options.get("include_usage")))


def check_length(prompt_tokens: int, limits: Limits, param: str) -> None:
    """A prompt over the build's limits: 400 naming the limit."""
    if prompt_tokens > limits.max_input_length:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens but this build's max_input_length is "
                            f"{limits.max_input_length} tokens; shorten it (or compile with a larger "
                            "limits.max_input_length)", param=param, code="context_length_exceeded")
    if prompt_tokens >= limits.max_sequence_length:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens but this build's max_sequence_length is "
                            f"{limits.max_sequence_length} tokens (prompt + reply); shorten it", param=param,
                       code="context_length_exceeded")


def from_glmc(e: GlmcError, param: str | None = None) -> ApiError:
    return ApiError(400, str(e), param=param, code="invalid_value")
