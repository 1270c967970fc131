"""The request schema of `POST /v1/chat/completions`, validated field by field (pydantic, as vLLM's protocol does).

Every field is typed strictly: a string where a number belongs, a number out of range, a lone surrogate in a
text, JSON nested too deep or a number too long to read is an OpenAI-style 400 naming the field, never a 500.
Fields of the OpenAI API that this server does not implement (logprobs, tools, response_format, penalties,
n > 1, ...) are refused by name rather than ignored.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, \
    field_validator

from vlkit.serve.errors import APIError

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (as vLLM does): 1e-300 would make NaN probabilities
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
               "response_format", "frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias",
               "best_of", "echo", "suffix", "prediction", "audio", "modalities", "service_tier", "store", "metadata",
               "reasoning_effort", "web_search_options")
IGNORED = ("user",)  # accepted and ignored: it changes nothing a client could observe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, StrictStr]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[Part]]
    name: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # strict: an int is a number, "0.5" and true are not


class ChatRequest(_Strict):
    model: StrictStr | None = None
    messages: list[Message] = Field(..., min_length=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, validate_default=True)
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1)
    user: StrictStr | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens tokens (load tests)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        return stops

    @property
    def greedy(self) -> bool:
        return self.temperature is None or self.temperature < GREEDY_BELOW


@functools.cache
def _fields() -> frozenset[str]:
    models = (ImageURL, TextPart, ImagePart, Message, StreamOptions, ChatRequest)
    return frozenset(name for m in models for name in m.model_fields)


def _where(loc: tuple) -> str:
    """A pydantic error location as the field a client wrote (messages[0].content[1].text): union branches and
    tags are left out."""
    fields, out, last = _fields(), "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in fields and part != last:
            out += ("." if out else "") + part
        last = part
    return out


def _first(errors: list[dict]) -> dict:
    """The most specific of pydantic's errors (a union reports one per branch: the deepest is the one meant)."""
    return max(errors, key=lambda e: (len(e["loc"]), e["type"] != "string_type"))


def _bad_text(req: ChatRequest) -> str | None:
    """The field of the first text that is not valid Unicode (a lone surrogate cannot be encoded, or tokenised)."""
    for i, m in enumerate(req.messages):
        parts = [(f"messages[{i}].content", m.content)] if isinstance(m.content, str) else \
            [(f"messages[{i}].content[{j}].text", p.text) for j, p in enumerate(m.content) if isinstance(p, TextPart)]
        for where, text in parts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return where
    for j, s in enumerate(req.stop):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return f"stop[{j}]"
    return None


def parse_request(raw: bytes) -> ChatRequest:
    """Bytes of a request body -> a validated ChatRequest, or an APIError (400) naming what is wrong."""
    try:
        body: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise APIError(400, f"the request body holds a value that cannot be read ({str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key in UNSUPPORTED:
        if key in body and body[key] not in (None, False, [], {}):
            raise APIError(400, f"'{key}' is not supported by this server; leave it out", param=key,
                           code="unsupported_parameter")
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool) and body["n"] != 1:
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    body = {k: v for k, v in body.items() if not (k in UNSUPPORTED and v in (None, False, [], {}))}
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        err = _first(e.errors())
        loc = err["loc"]
        if err["type"] == "extra_forbidden":  # the unknown field itself is the one to name
            base = _where(loc[:-1])
            where = f"{base}.{loc[-1]}" if base else str(loc[-1])
        else:
            where = _where(loc) or "(body)"
        msg = {"extra_forbidden": "unknown field; this server does not support it",
               "union_tag_invalid": "content parts must be 'text' or 'image_url'",
               "union_tag_not_found": "content parts must be 'text' or 'image_url' (a 'type' is missing)",
               }.get(err["type"], err["msg"])
        raise APIError(400, f"{where}: {msg}", param=where) from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply") from None
    bad = _bad_text(req)
    if bad:
        raise APIError(400, f"{bad}: not valid Unicode text (a lone surrogate?)", param=bad)
    if req.temperature is not None and not math.isfinite(req.temperature):
        raise APIError(400, "temperature: must be a finite number", param="temperature")
    return req
