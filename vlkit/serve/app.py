"""An OpenAI-compatible chat-completions server for vlkit models (FastAPI).

    POST /v1/chat/completions   text + image_url parts (base64 `data:` URLs), stream, temperature, top_p,
                                max_tokens, stop, seed, n=1, ignore_eos (vLLM's extension); usage counts
    GET  /v1/models             the served model
    GET  /health                {"status": "ok" | "dead" | "stuck", ...}; 503 unless ok
    GET  /metrics               Prometheus text format
    GET  /                      a chat page

Every request field is validated by a typed schema (vlkit.serve.protocol): what is wrong is an OpenAI-style
400 naming the field, and fields this server does not implement are refused by name. Limits (ServeLimits)
protect the server: body bytes, images per request, pixels per image, max_tokens (by default what fits the
context), requests in flight, streams included (more get HTTP 429), a per-request timeout (HTTP 504; the
generation is cancelled), and a client that disconnects cancels its generation. JSON parsing, image
decoding and tokenising run off the event loop, so one heavy request does not stall the others. An error
inside the server is a JSON 500 on a connection that stays usable. Remote image URLs and local paths are
refused unless allowed (vlkit.serve.images). With an API key, /v1/* and /metrics need
`Authorization: Bearer <key>` (compared in constant time).

With a guard: the user's input is checked before generation (blocked: HTTP 400, code "content_filter", the
categories in the message); the reply is checked after generation (blocked: replaced by a refusal naming the
categories, finish_reason "content_filter"). A guarded streaming request is generated in full and checked
before its first chunk is sent: the client still receives chunks, but only once the reply is known to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from vlkit.errors import VlkitError
from vlkit.models.generate import GenerationConfig
from vlkit.serve.engine import Engine, EngineBusy, EngineStopped, Request
from vlkit.serve.errors import APIError
from vlkit.serve.images import ImagePolicy, decode_image
from vlkit.serve.metrics import CONTENT_TYPE, ServeMetrics
from vlkit.serve.protocol import ChatRequest, ImagePart, TextPart, parse_request

log = logging.getLogger("vlkit.serve")

__all__ = ["APIError", "ServeLimits", "create_app", "parse_messages"]


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
    image_hosts: list[str] = field(default_factory=list)  # remote images: only these hosts (empty: public ones)
    stuck_after_s: float | None = None  # /health says "stuck" past this on one batch (default: 2 x timeout_s)

    def images(self) -> ImagePolicy:
        return ImagePolicy(self.max_pixels, self.max_body_bytes, self.allow_remote_images, self.allow_local_images,
                           list(self.image_hosts))


def parse_messages(body: dict | ChatRequest, limits: ServeLimits) -> tuple[list[dict], list]:
    """The request's messages as a vlkit conversation and its images (decoded). A system message opens the next
    user turn (the world chat template has no system turn)."""
    req = body if isinstance(body, ChatRequest) else parse_request(json.dumps(body).encode())
    policy = limits.images()
    conv: list[dict] = []
    images: list = []
    system: list[dict] = []
    for i, m in enumerate(req.messages):
        raw = [TextPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        parts = []
        for j, p in enumerate(raw):
            where = f"messages[{i}].content[{j}]"
            if isinstance(p, ImagePart):
                if len(images) >= limits.max_images:
                    raise APIError(400, f"{where}: more than {limits.max_images} images in one request", param=where)
                images.append(decode_image(p.url, policy, where))
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": p.text})
        if m.role == "system":
            system += parts + [{"type": "text", "text": "\n"}]
        elif m.role == "user":
            conv.append({"role": "user", "content": system + parts})
            system = []
        else:
            conv.append({"role": "assistant", "content": parts})
    if not conv or conv[-1]["role"] != "user" or system:
        raise APIError(400, "the last message must come from the user", param="messages")
    return conv, images


def text_of(conversation: list[dict]) -> list[dict]:
    """The conversation as plain text (for the guard): image parts become "[image]"."""
    return [{"role": m["role"], "content": "".join(p["text"] if p["type"] == "text" else "[image] "
                                                  for p in m["content"])} for m in conversation]


@dataclass
class Prepared:
    req: ChatRequest
    conversation: list[dict]
    images: list
    gen: GenerationConfig
    prompt_tokens: int


def prepare(raw: bytes, engine: Engine, limits: ServeLimits) -> Prepared:
    """Everything about a request that costs CPU but no generation: JSON, schema, images, tokens, settings."""
    req = parse_request(raw)
    if req.model not in (None, engine.name):
        raise APIError(404, f"model {req.model!r} is not served here; GET /v1/models lists {engine.name!r}",
                       param="model", code="model_not_found")
    conv, images = parse_messages(req, limits)
    if images and not engine.takes_images:
        raise APIError(400, f"model {engine.name!r} is a text-only LM: it takes no images", param="messages")
    try:
        conv = engine.with_experts(conv, images)
    except VlkitError as e:  # an expert that failed is the server's fault, not the request's
        raise APIError(500, str(e), type_="server_error") from None
    try:
        prompt_tokens = engine.prompt_tokens(conv, images)
    except VlkitError as e:
        raise APIError(400, str(e), param="messages") from None
    ctx = engine.processor.config.max_length
    room = ctx - prompt_tokens
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens {asked} is over this server's limit of {limits.max_tokens}",
                       param="max_tokens")
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked or 1}) is over the model's "
                       f"context of {ctx} tokens", param="messages", code="context_length_exceeded")
    gen = GenerationConfig(max_new_tokens=asked or min(limits.max_tokens, room),  # default: what fits
                           temperature=0.0 if req.greedy else float(req.temperature),
                           top_p=1.0 if req.top_p is None else float(req.top_p), stop=list(req.stop), seed=req.seed,
                           ignore_eos=req.ignore_eos)
    return Prepared(req, conv, images, gen, prompt_tokens)


def _waker(loop: asyncio.AbstractEventLoop, event: asyncio.Event):
    """A function another thread calls to set `event` on `loop` (a no-op once the loop has closed)."""
    def wake():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(event.set)
    return wake


class Slots:
    """Requests in flight, streams included, against a limit (thread-safe)."""

    def __init__(self, limit: int):
        self.limit, self.n, self._lock = limit, 0, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.n >= self.limit:
                return False
            self.n += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.n -= 1


class Stream(StreamingResponse):
    """A streamed response that runs `on_close` however it ends, even when it never started (a client gone
    before the first byte): the slot it holds is always given back."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def read_body(http: HTTPRequest, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to be over `limit`: from Content-Length before any
    byte is read, else while it streams in."""
    declared = http.headers.get("content-length")
    too_big = APIError(413, f"request body over this server's limit of {limit} bytes", code="request_too_large")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise too_big
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class KeepServing:
    """ASGI middleware: an exception anywhere becomes a JSON 500 (or the end of a stream already under way),
    never an exception that makes the server drop the connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False}

        async def tracked(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 (logged; the client gets an answer and keeps its connection)
            log.exception("error while answering %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                body = json.dumps(APIError(500, "internal server error; the request was not answered",
                                           "server_error").body()).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            elif not state["ended"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def create_app(engine: Engine, limits: ServeLimits | None = None, guard=None, api_key: str | None = None):
    limits = limits or ServeLimits()
    app = FastAPI(title="vlkit", version="1")
    app.add_middleware(KeepServing)
    slots = Slots(limits.max_in_flight)
    metrics = ServeMetrics(engine, lambda: slots.n)
    created = int(time.time())
    stuck_after = limits.stuck_after_s if limits.stuck_after_s is not None else 2 * limits.timeout_s

    def authorise(http: HTTPRequest) -> None:
        if api_key is None:
            return
        given = http.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        h = engine.health()
        status = "dead" if not h["alive"] else "stuck" if h["busy_s"] > stuck_after else "ok"
        body = {"status": status, "model": engine.name, "in_flight": slots.n, "queued": h["queued"],
                "busy_s": round(h["busy_s"], 3), "guard": guard is not None}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus(http: HTTPRequest):
        authorise(http)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        authorise(http)
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": created,
                                            "owned_by": "vlkit"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (Path(__file__).parent / "page.html").read_text()

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        t0, code, tokens = time.perf_counter(), 200, 0
        streamed = False
        try:
            authorise(http)
            raw = await read_body(http, limits.max_body_bytes)
            if not slots.take():
                raise APIError(429, f"server busy: {limits.max_in_flight} requests in flight; retry later",
                               type_="rate_limit_error", code="rate_limit_exceeded")
            try:
                p = await asyncio.get_running_loop().run_in_executor(None, prepare, raw, engine, limits)
                response, tokens, streamed = await _complete(p, t0, http)
                return response
            finally:
                if not streamed:
                    slots.give()
        except APIError as e:
            code = e.status
            raise
        except Exception:
            code = 500
            raise
        finally:
            if not streamed:
                metrics.observe(code, time.perf_counter() - t0, tokens)

    async def _complete(p: Prepared, t0: float, http: HTTPRequest):
        """(response, tokens generated, whether a stream now holds the slot)"""
        loop = asyncio.get_running_loop()
        conv = p.conversation
        if guard is not None:
            verdict = await loop.run_in_executor(None, guard.check_input, text_of(conv))
            if verdict is not None and verdict.blocked:
                cats = ", ".join(verdict.names) or verdict.verdict
                raise APIError(400, f"the input was blocked by the guard ({cats})", code="content_filter",
                               param="messages")
        rid, stamp = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        include_usage = bool(p.req.stream_options and p.req.stream_options.include_usage)
        streaming = p.req.stream and guard is None
        ready = asyncio.Event()  # set by the engine's thread when a stream's next piece is queued
        try:
            req = engine.submit(Request(conv, p.images, p.gen, streaming=streaming,
                                        waker=_waker(loop, ready) if streaming else None))
        except EngineBusy as e:
            raise APIError(429, f"server busy: {e}; retry later", type_="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="engine_unavailable") from None
        if streaming:
            state = {"code": 200, "text": "", "closed": False}

            def close():  # once, from the generator's end or the response's, whichever comes first
                if not state["closed"]:
                    state["closed"] = True
                    req.cancel()
                    slots.give()
                    metrics.observe(state["code"], time.perf_counter() - t0,
                                    engine.count_tokens(state["text"]) if state["text"] else 0)
            return Stream(_sse(req, ready, rid, stamp, p.prompt_tokens, include_usage, state, close), close,
                          media_type="text/event-stream"), 0, True
        out = await _wait(req, http)
        text, finish = out["text"], out["finish_reason"]
        if guard is not None:
            verdict = await loop.run_in_executor(None, guard.check_output, text_of(conv), text)
            if verdict is not None and verdict.blocked:
                cats = ", ".join(verdict.names) or verdict.verdict
                text = f"I can't help with that: the reply was blocked by the guard ({cats})."
                finish = "content_filter"
        usage = {"prompt_tokens": p.prompt_tokens, "completion_tokens": out["tokens"],
                 "total_tokens": p.prompt_tokens + out["tokens"]}
        if p.req.stream:  # guarded streaming: checked in full, then sent as chunks
            return StreamingResponse(_replay(text, finish, rid, stamp, usage, include_usage),
                                     media_type="text/event-stream"), out["tokens"], False
        return {"id": rid, "object": "chat.completion", "created": stamp, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}], "usage": usage}, out["tokens"], False

    def _chunk(rid, stamp, delta, finish=None, usage=None):
        c = {"id": rid, "object": "chat.completion.chunk", "created": stamp, "model": engine.name,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            c["usage"] = usage
        return f"data: {json.dumps(c)}\n\n"

    async def _wait(req: Request, http: HTTPRequest) -> dict:
        """The engine's answer; a client that disconnects meanwhile, or the timeout, cancels the generation."""
        fut = asyncio.wrap_future(req.future)
        deadline = time.monotonic() + limits.timeout_s
        while True:
            done, _ = await asyncio.wait({fut}, timeout=max(min(0.25, deadline - time.monotonic()), 0))
            if done:
                break
            if time.monotonic() >= deadline:
                req.cancel()
                raise APIError(504, f"generation took longer than {limits.timeout_s}s", type_="timeout",
                               code="timeout")
            if await http.is_disconnected():
                req.cancel()
                raise APIError(499, "the client closed the connection", code="client_closed")
        try:
            return fut.result()
        except Exception as e:  # noqa: BLE001 (the engine failed this request; it serves the next)
            raise APIError(500, f"generation failed ({type(e).__name__}); the request was not answered",
                           "server_error") from None

    async def _sse(req, ready, rid, stamp, prompt_tokens, include_usage, state, close):
        """A stream holds its slot until it ends; a client that goes away cancels its generation. The engine's
        pieces are read here, on the event loop, woken by `ready`, so waiting streams hold no worker thread."""
        deadline = time.monotonic() + limits.timeout_s
        try:
            yield _chunk(rid, stamp, {"role": "assistant", "content": ""})
            sent: list[str] = []  # the chunks of the pieces queued so far, sent together (one write under load)
            while True:
                try:
                    item = req.pieces.get_nowait()
                except queue.Empty:
                    if sent:
                        yield "".join(sent)
                        sent.clear()
                        continue
                    if time.monotonic() > deadline:
                        state["code"] = 504
                        err = APIError(504, f"generation took longer than {limits.timeout_s}s", "timeout",
                                       code="timeout")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    ready.clear()
                    if req.pieces.empty():  # (a piece queued before the clear is read at once)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(ready.wait(), timeout=0.25)
                    continue
                if isinstance(item, BaseException):
                    state["code"] = 500
                    err = APIError(500, f"generation failed ({type(item).__name__})", "server_error")
                    yield "".join(sent) + f"data: {json.dumps(err.body())}\n\n"
                    break
                if item is None:  # the engine's answer says how it ended (a cancelled one: counted here)
                    done = req.future.result() if req.future.done() else None
                    n = done["tokens"] if done else engine.count_tokens(state["text"])
                    finish = done["finish_reason"] if done else "length" if n >= req.gen.max_new_tokens else "stop"
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                    yield "".join(sent) + _chunk(rid, stamp, {}, finish, usage if include_usage else None)
                    break
                state["text"] += item
                sent.append(_chunk(rid, stamp, {"content": item}))
            yield "data: [DONE]\n\n"
        finally:  # the end of the stream, however it ends (a disconnect closes this generator)
            close()

    async def _replay(text, finish, rid, stamp, usage, include_usage):
        yield _chunk(rid, stamp, {"role": "assistant", "content": ""})
        for word in re.findall(r"\S+\s*|\s+", text):
            yield _chunk(rid, stamp, {"content": word})
        yield _chunk(rid, stamp, {}, finish, usage if include_usage else None)
        yield "data: [DONE]\n\n"

    app.state.engine, app.state.limits, app.state.slots = engine, limits, slots
    return app
