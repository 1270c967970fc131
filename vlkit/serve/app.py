"""An OpenAI-compatible chat-completions server for vlkit models (FastAPI).

    POST /v1/chat/completions   text + image_url parts (base64 `data:` URLs), stream, temperature, top_p,
                                max_tokens, stop, n=1; usage counts
    GET  /v1/models             the served model
    GET  /health                {"status": "ok", ...}

Limits (ServeLimits) protect the server: body bytes, images per request, pixels per image, max_tokens,
context tokens, requests in flight (more get HTTP 429) and a per-request timeout (HTTP 504). Remote
image URLs and local paths are refused unless allowed (server-side request forgery). Errors use the
OpenAI error format: {"error": {"message", "type", "param", "code"}}.

With a guard: the user's input is checked before generation (blocked: HTTP 400, code
"content_filter", the categories in the message); the reply is checked after generation (blocked:
replaced by a refusal naming the categories, finish_reason "content_filter"). A guarded streaming
request is generated in full and checked before its first chunk is sent: the client still receives
chunks, but only once the reply is known to pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image

from vlkit.data.images import to_rgb
from vlkit.errors import VlkitError
from vlkit.models.generate import GenerationConfig
from vlkit.serve.engine import Engine, Request


@dataclass
class ServeLimits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_images: int = 4
    max_pixels: int = 4096 * 4096
    max_tokens: int = 512
    max_in_flight: int = 64
    timeout_s: float = 120.0
    allow_remote_images: bool = False
    allow_local_images: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def decode_image(url: str, limits: ServeLimits, where: str) -> Image.Image:
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head or not head[5:].startswith("image/"):
            raise APIError(400, f"{where}: only base64 image data URLs (data:image/...;base64,...) are accepted",
                           param=where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the image data URL", param=where) from None
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise APIError(400, f"{where}: remote image URLs are refused by this server (start it with "
                           "--allow-remote-images to fetch them); send a base64 data URL", param=where)
        source = _fetch(url, limits, where)
    else:
        if not limits.allow_local_images:
            raise APIError(400, f"{where}: local image paths are refused by this server; send a base64 data URL",
                           param=where)
        source = url[7:] if url.startswith("file://") else url
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise APIError(400, f"{where}: image is {w}x{h} = {w * h} pixels, over this server's limit of "
                               f"{limits.max_pixels}", param=where)
            img.load()
            return to_rgb(img)
    except APIError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise APIError(400, f"{where}: not a readable image", param=where) from None


def _fetch(url: str, limits: ServeLimits, where: str) -> io.BytesIO:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (allowed explicitly by the operator)
            data = resp.read(limits.max_body_bytes + 1)
    except OSError as e:
        raise APIError(400, f"{where}: could not fetch the image ({e})", param=where) from None
    if len(data) > limits.max_body_bytes:
        raise APIError(400, f"{where}: image larger than {limits.max_body_bytes} bytes", param=where)
    return io.BytesIO(data)


def parse_messages(body: dict, limits: ServeLimits) -> tuple[list[dict], list[Image.Image]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    conv: list[dict] = []
    images: list[Image.Image] = []
    system: list[dict] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role must be system, user or assistant", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image_url":
                    iu = p.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        raise APIError(400, f"{where}: image_url needs a 'url' string", param=where)
                    if len(images) >= limits.max_images:
                        raise APIError(400, f"{where}: more than {limits.max_images} images in one request",
                                       param=where)
                    images.append(decode_image(url, limits, where))
                    parts.append({"type": "image"})
                else:
                    raise APIError(400, f"{where}: content parts must be 'text' or 'image_url'", param=where)
        else:
            raise APIError(400, f"messages[{i}]: content must be a string or a list of parts",
                           param=f"messages[{i}]")
        if m["role"] == "system":  # the world chat template has no system turn: it opens the next user turn
            system += parts + [{"type": "text", "text": "\n"}]
        elif m["role"] == "user":
            conv.append({"role": "user", "content": system + parts})
            system = []
        else:
            conv.append({"role": "assistant", "content": parts})
    if not conv or conv[-1]["role"] != "user" or system:
        raise APIError(400, "the last message must come from the user", param="messages")
    return conv, images


def generation_settings(body: dict, limits: ServeLimits) -> GenerationConfig:
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or min(256, limits.max_tokens)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    temperature = body.get("temperature", 0.0)
    top_p = body.get("top_p", 1.0)
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=float(temperature or 0.0),
                           top_p=float(1.0 if top_p is None else top_p), stop=stop, seed=body.get("seed"))
    try:
        gen.check()
    except VlkitError as e:
        raise APIError(400, str(e), param="temperature" if "temperature" in str(e) else "top_p") from None
    return gen


def text_of(conversation: list[dict]) -> list[dict]:
    """The conversation as plain text (for the guard): image parts become "[image]"."""
    return [{"role": m["role"], "content": "".join(p["text"] if p["type"] == "text" else "[image] "
                                                  for p in m["content"])} for m in conversation]


def _include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def create_app(engine: Engine, limits: ServeLimits | None = None, guard=None):
    limits = limits or ServeLimits()
    app = FastAPI(title="vlkit", version="1")
    in_flight = {"n": 0}
    lock = threading.Lock()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "in_flight": in_flight["n"], "guard": guard is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "vlkit"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (Path(__file__).parent / "page.html").read_text()

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        raw = await http.body()
        if len(raw) > limits.max_body_bytes:
            raise APIError(413, f"request body of {len(raw)} bytes is over this server's limit of "
                           f"{limits.max_body_bytes}", code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, engine.name):
            raise APIError(404, f"model {body.get('model')!r} is not served here; GET /v1/models lists "
                           f"{engine.name!r}", param="model", code="model_not_found")
        with lock:
            if in_flight["n"] >= limits.max_in_flight:
                raise APIError(429, f"server busy: {limits.max_in_flight} requests in flight; retry later",
                               type_="rate_limit_error", code="rate_limit_exceeded")
            in_flight["n"] += 1
        try:
            return await _complete(body)
        finally:
            with lock:
                in_flight["n"] -= 1

    async def _complete(body: dict):
        conv, images = parse_messages(body, limits)
        if images and not engine.takes_images:
            raise APIError(400, f"model {engine.name!r} is a text-only LM: it takes no images", param="messages")
        gen = generation_settings(body, limits)
        try:
            prompt_tokens = engine.prompt_tokens(conv, len(images))
        except VlkitError as e:
            raise APIError(400, str(e), param="messages") from None
        max_ctx = engine.processor.config.max_length
        if prompt_tokens + gen.max_new_tokens > max_ctx:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({gen.max_new_tokens}) is "
                           f"over the model's context of {max_ctx} tokens", param="messages",
                           code="context_length_exceeded")
        loop = asyncio.get_running_loop()
        if guard is not None:
            verdict = await loop.run_in_executor(None, guard.check_input, text_of(conv))
            if verdict is not None and verdict.blocked:
                cats = ", ".join(verdict.names) or verdict.verdict
                raise APIError(400, f"the input was blocked by the guard ({cats})", code="content_filter",
                               param="messages")
        rid, stamp = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        streaming = bool(body.get("stream")) and guard is None
        req = engine.submit(Request(conv, images, gen, streaming=streaming))
        if streaming:
            return StreamingResponse(_sse(req, rid, stamp, prompt_tokens, body), media_type="text/event-stream")
        try:
            out = await asyncio.wait_for(asyncio.wrap_future(req.future), limits.timeout_s)
        except asyncio.TimeoutError:
            raise APIError(504, f"generation took longer than {limits.timeout_s}s", type_="timeout",
                           code="timeout") from None
        text, finish = out["text"], out["finish_reason"]
        if guard is not None:
            verdict = await loop.run_in_executor(None, guard.check_output, text_of(conv), text)
            if verdict is not None and verdict.blocked:
                cats = ", ".join(verdict.names) or verdict.verdict
                text = f"I can't help with that: the reply was blocked by the guard ({cats})."
                finish = "content_filter"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": out["tokens"],
                 "total_tokens": prompt_tokens + out["tokens"]}
        if body.get("stream"):  # guarded streaming: checked in full, then sent as chunks
            return StreamingResponse(_replay(text, finish, rid, stamp, usage, body), media_type="text/event-stream")
        return {"id": rid, "object": "chat.completion", "created": stamp, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}], "usage": usage}

    def _chunk(rid, stamp, delta, finish=None, usage=None):
        c = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": engine.name,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            c["usage"] = usage
        return f"data: {json.dumps(c)}\n\n"

    async def _sse(req, rid, stamp, prompt_tokens, body):
        loop = asyncio.get_running_loop()
        yield _chunk(rid, stamp, {"role": "assistant", "content": ""})
        it = engine.iterate(req, limits.timeout_s)
        text, done = "", object()
        while True:
            try:
                piece = await loop.run_in_executor(None, next, it, done)
            except Exception as e:  # noqa: BLE001 (reported to the client in the stream)
                yield f"data: {json.dumps(APIError(500, f'generation failed: {e}', 'server_error').body())}\n\n"
                return
            if piece is done:
                break
            text += piece
            yield _chunk(rid, stamp, {"content": piece})
        n = engine.count_tokens(text)
        finish = "length" if n >= req.gen.max_new_tokens else "stop"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        yield _chunk(rid, stamp, {}, finish, usage if _include_usage(body) else None)
        yield "data: [DONE]\n\n"

    async def _replay(text, finish, rid, stamp, usage, body):
        yield _chunk(rid, stamp, {"role": "assistant", "content": ""})
        for word in re.findall(r"\S+\s*|\s+", text):
            yield _chunk(rid, stamp, {"content": word})
        yield _chunk(rid, stamp, {}, finish, usage if _include_usage(body) else None)
        yield "data: [DONE]\n\n"

    app.state.engine, app.state.limits = engine, limits
    return app
