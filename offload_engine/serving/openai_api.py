"""OpenAI's wire format: request bodies checked into prompts and sampling settings, and the response shapes.

Unknown fields are ignored, as OpenAI's servers do; a known field of the wrong type or out of its range is an
ApiError (400) naming it in `param`. Nothing here touches the engine's thread: app.py submits what `prepare`
returns and shapes the handle's pieces with the functions below.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..logprobs import MAX_TOP_LOGPROBS

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's default is the rest of the context


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    best_of: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


@dataclass(frozen=True)
class Prepared:
    """A checked request: the prompt's token ids and the keyword arguments of Scheduler.submit."""

    prompt_ids: list[int]
    sampling: dict
    stream: bool
    include_usage: bool


def parse(model: type[_Strict], raw: bytes) -> _Strict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(str(x) for x in first["loc"][1:])
        detail = f"{first['msg']}" + (f" (at {param}.{where})" if where else "")
        raise ApiError(400, f"invalid value for '{param}': {detail}" if param else detail, param=param,
                       code="invalid_value" if first["type"] != "missing" else "missing_required_parameter") from None


def prepare(request: _Sampling, tokenizer, context: int) -> Prepared:
    """Token ids and sampling settings for a parsed request; `context`: the tokens a sequence may hold."""
    if request.n not in (None, 1):
        raise ApiError(400, f"n={request.n} is not supported: this server returns one choice per request (n=1)",
                       param="n", code="unsupported_value")
    if request.best_of not in (None, 1):
        raise ApiError(400, f"best_of={request.best_of} is not supported: this server samples one completion per "
                       "request (best_of=1)", param="best_of", code="unsupported_value")
    logprobs = _logprobs(request)
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4:
        raise ApiError(400, f"stop holds {len(stop)} strings; at most 4 are allowed", param="stop")
    if isinstance(request, ChatRequest):
        ids, where = _chat_ids(request, tokenizer), "messages"
        max_tokens, default = request.max_completion_tokens or request.max_tokens, context
    else:
        if request.echo:
            raise ApiError(400, "echo is not supported by this server", param="echo", code="unsupported_value")
        ids, where = _completion_ids(request.prompt, tokenizer), "prompt"
        max_tokens, default = request.max_tokens, COMPLETION_MAX_TOKENS
    if len(ids) >= context:
        raise ApiError(400, f"the {where} is {len(ids)} tokens long, more than fits this server's context of "
                            f"{context} tokens with room for one new token; shorten it",
                       param=where, code="context_length_exceeded")
    max_tokens = max_tokens or min(default, context - len(ids))  # not given: as many as fit, up to the default
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"the {where}'s {len(ids)} tokens plus max_tokens={max_tokens} exceed this server's "
                            f"context of {context} tokens; ask for at most {context - len(ids)} tokens or shorten "
                            f"the {where}", param="max_tokens", code="context_length_exceeded")
    sampling = dict(max_new_tokens=max_tokens, temperature=1.0 if request.temperature is None else request.temperature,
                    top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed, stop=stop,
                    logprobs=logprobs)
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Prepared(ids, sampling, bool(request.stream), include_usage)


def _logprobs(request: _Sampling) -> int | None:
    """The alternatives per token the request asks logprobs for (submit's `logprobs`), None for none."""
    if not isinstance(request, ChatRequest):
        return request.logprobs
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return (request.top_logprobs or 0) if request.logprobs else None


def _completion_ids(prompt, tokenizer) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"a list of {len(prompt)} prompts is not supported: send one prompt per request",
                           param="prompt", code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        ids = tokenizer(prompt)["input_ids"]
    else:
        ids = prompt
    if not ids:
        raise ApiError(400, "the prompt is empty; give at least one token", param="prompt")
    return list(ids)


def _chat_ids(request: ChatRequest, tokenizer) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template, so /v1/chat/completions cannot build a "
                            "prompt; use /v1/completions with the text as the prompt", param="messages",
                       code="chat_template_missing")
    messages = []
    for m in request.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(
            part.text or "" for part in m.content if part.type == "text")
        messages.append({"role": m.role, "content": content or ""})
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja's TemplateError, or a template's own raise_exception: the messages' fault
        raise ApiError(400, f"the model's chat template refused these messages ({str(e).splitlines()[0][:200]})",
                       param="messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -- responses ----------------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(chat: bool, rid: str, model: str, text: str, finish_reason: str, use: dict,
             logprobs: dict | None = None) -> dict:
    """`logprobs`: openai_logprobs.LogprobsWriter's shape, when the request asked."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish_reason: str | None = None,
          use: dict | None = None, first: bool = False, logprobs: dict | None = None) -> dict:
    """One streamed chunk; text None with `use`: the usage-only last chunk (choices empty, as OpenAI sends it)."""
    if text is None:
        choices = []
    elif chat:
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
        choices = [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": use}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
