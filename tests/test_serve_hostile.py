"""`vlkit serve` tried as a hostile client would, against a live uvicorn on 127.0.0.1: no request breaks the
engine or the connection, every bad field is a 400 naming it, streams count and cancel, images are fetched and
decoded only as allowed, an API key guards the API, /metrics reports."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from test_serve import Live, http as post, png_url
from test_vlm import make
from vlkit.serve import Engine, ServeLimits, create_app

HI = {"messages": [{"role": "user", "content": "hi"}]}


def serve(tok, limits=None, api_key=None, **engine_kw):
    model, proc = make(tok)
    engine = Engine(model, proc, "tiny", **engine_kw)
    limits = limits or ServeLimits(max_images=2, max_pixels=64 * 64)
    return Live(create_app(engine, limits, api_key=api_key)), engine


@pytest.fixture(scope="module")
def live(tiny_tokenizer):
    srv, engine = serve(tiny_tokenizer)
    yield srv, engine
    srv.close()
    engine.close()


def conn(srv) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)


def ask(c: http.client.HTTPConnection, body, headers=None) -> tuple[int, dict]:
    """One request on a kept-alive connection: (status, JSON body)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    c.request("POST", "/v1/chat/completions", raw, {"content-type": "application/json", **(headers or {})})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}")


@pytest.mark.parametrize("body,field", [
    ({**HI, "temperature": "hot"}, "temperature"), ({**HI, "temperature": [1]}, "temperature"),
    ({**HI, "top_p": "x"}, "top_p"), ({**HI, "seed": "abc"}, "seed"), ({**HI, "seed": 2 ** 70}, "seed"),
    ({**HI, "seed": [1]}, "seed"), ({**HI, "seed": {"a": 1}}, "seed"), ({**HI, "max_tokens": 0}, "max_tokens"),
    ({**HI, "stream_options": "yes"}, "stream_options"), ({**HI, "logprobs": True}, "logprobs"),
    ({**HI, "tools": [{"type": "function"}]}, "tools"), ({**HI, "response_format": {"type": "json_object"}},
                                                          "response_format"),
    ({**HI, "frequency_penalty": 0.5}, "frequency_penalty"), ({**HI, "n": 2}, "n"), ({**HI, "stop": 5}, "stop"),
    ({**HI, "max_tokens": True}, "max_tokens"), ({**HI, "bogus": 1}, "bogus"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
])
def test_every_bad_field_is_a_400_naming_it_on_a_connection_that_stays_usable(live, body, field):
    srv, _ = live
    c = conn(srv)
    status, err = ask(c, body)
    assert status == 400 and err["error"]["param"] == field, err
    assert ask(c, HI)[0] == 200  # the same connection serves the next request


@pytest.mark.parametrize("raw,says", [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "not valid Unicode"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", "cannot be read"),
])
def test_bodies_that_break_parsers_are_400s(live, raw, says):
    srv, _ = live
    c = conn(srv)
    status, err = ask(c, raw)
    assert status == 400 and says in err["error"]["message"], err
    assert ask(c, HI)[0] == 200


def test_a_vanishing_temperature_decodes_greedily_and_the_default_max_tokens_fits_the_context(live):
    srv, _ = live
    c = conn(srv)
    s1, a = ask(c, {**HI, "temperature": 1e-300})  # 1/1e-300 would make NaN probabilities
    s2, b = ask(c, {**HI, "temperature": 0})
    assert s1 == s2 == 200 and a["choices"][0]["message"] == b["choices"][0]["message"]
    # no max_tokens: as many as the 128-token context leaves, not a fixed 256 that never fits
    s3, r = ask(c, {"messages": [{"role": "user", "content": "word " * 30}]})
    assert s3 == 200 and r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= 128


def test_no_request_stops_the_engine_and_a_500_keeps_the_connection(live, monkeypatch):
    import vlkit.serve.engine as E

    srv, engine = live
    real = E.prepare

    def flaky(model, proc, convs, *a, **k):
        if any("boom" in json.dumps(c) for c in convs):
            raise RuntimeError("boom")
        return real(model, proc, convs, *a, **k)

    monkeypatch.setattr(E, "prepare", flaky)
    before = engine.failures
    c = conn(srv)
    status, err = ask(c, {"messages": [{"role": "user", "content": "boom"}]})
    assert status == 500 and err["error"]["type"] == "server_error"
    assert ask(c, HI)[0] == 200 and engine.failures == before + 1  # the next request, on the same connection
    assert post(srv.url + "/health")[0] == 200


def test_an_internal_error_outside_the_engine_is_a_json_500_not_a_dropped_connection(tiny_tokenizer, monkeypatch):
    srv, engine = serve(tiny_tokenizer)
    try:
        real = engine.prompt_tokens
        monkeypatch.setattr(engine, "prompt_tokens", lambda conv, n: 1 // 0 if "crash" in json.dumps(conv)
                            else real(conv, n))
        c = conn(srv)
        status, err = ask(c, {"messages": [{"role": "user", "content": "crash"}]})
        assert status == 500 and "internal server error" in err["error"]["message"]
        assert ask(c, HI)[0] == 200
    finally:
        srv.close()
        engine.close()


def test_health_reports_a_dead_or_stuck_engine_and_shutdown_does_not_wait_for_it(tiny_tokenizer, monkeypatch):
    import uvicorn

    import vlkit.serve.engine as E

    model, proc = make(tiny_tokenizer)
    engine = Engine(model, proc, "tiny")
    release = threading.Event()
    real = E.prepare
    monkeypatch.setattr(E, "prepare", lambda *a, **k: release.wait(60) and real(*a, **k))
    app = create_app(engine, ServeLimits(stuck_after_s=0.3, timeout_s=30))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        assert post(url + "/health")[1]["status"] == "ok"
        threading.Thread(target=post, args=(url + "/v1/chat/completions", json.dumps(HI).encode()),
                         daemon=True).start()
        time.sleep(0.8)
        status, h = post(url + "/health")
        assert status == 503 and h["status"] == "stuck" and h["in_flight"] == 1
        t0 = time.monotonic()
        server.should_exit = True  # what SIGTERM does: the stuck request gets 1 s, then the server stops
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - t0 < 5
    finally:
        release.set()
        engine.close()
    srv, engine = serve(tiny_tokenizer)
    try:
        engine.close()  # the worker is gone
        status, h = post(srv.url + "/health")
        assert status == 503 and h["status"] == "dead"
    finally:
        srv.close()


def test_streams_count_against_the_limit_and_a_disconnect_cancels_the_generation(tiny_tokenizer, monkeypatch):
    import vlkit.serve.engine as E

    seen: list = []
    steps = [0]

    def slow(batch):  # a step of 20 ms that never ends a stream by itself
        time.sleep(0.02)
        steps[0] += 1
        for a in batch.answers:
            if a.cancelled.is_set() and not a.done:
                a.finish = "cancelled"
                seen.append(steps[0])
            elif not a.tag.streaming:  # (the request after the test's streams)
                a.finish = "length"
        return ["" if a.done else "w " for a in batch.answers]

    monkeypatch.setattr(E.Batch, "step", slow)
    srv, engine = serve(tiny_tokenizer, ServeLimits(max_in_flight=2, max_images=2, max_pixels=64 * 64))
    try:
        held = []
        for _ in range(2):
            c = conn(srv)
            c.request("POST", "/v1/chat/completions", json.dumps({**HI, "stream": True, "ignore_eos": True}).encode(),
                      {"content-type": "application/json"})
            r = c.getresponse()
            assert r.status == 200 and r.readline().startswith(b"data: ")
            held.append((c, r))
        for c, r in held:  # both decoding: their steps' text arrives
            while b'"w "' not in r.readline():
                pass
        status, err = post(srv.url + "/v1/chat/completions", json.dumps(HI).encode())
        assert status == 429 and post(srv.url + "/health")[1]["in_flight"] == 2
        for c, r in held:  # the clients go away mid-stream
            r.close()
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
        deadline = time.monotonic() + 10
        while (not seen or post(srv.url + "/health")[1]["in_flight"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        # both streams (decoding in one batch) stopped early, within steps of their clients going away
        assert len(seen) == 2 and max(seen) < 200, seen
        assert post(srv.url + "/health")[1]["in_flight"] == 0
        assert post(srv.url + "/v1/chat/completions", json.dumps(HI).encode())[0] == 200
    finally:
        srv.close()
        engine.close()


def test_the_engine_queue_is_bounded(tiny_tokenizer, monkeypatch):
    import vlkit.serve.engine as E
    from vlkit.models.generate import GenerationConfig

    release = threading.Event()
    real = E.prepare
    monkeypatch.setattr(E, "prepare", lambda *a, **k: release.wait(30) and real(*a, **k))
    model, proc = make(tiny_tokenizer)
    engine = Engine(model, proc, "tiny", max_queue=2, batching=False)
    try:
        reqs = [E.Request([{"role": "user", "content": "x"}], [], GenerationConfig(max_new_tokens=2))
                for _ in range(4)]
        engine.submit(reqs[0])
        time.sleep(0.3)  # the worker holds the first; two may wait
        engine.submit(reqs[1])
        engine.submit(reqs[2])
        with pytest.raises(E.EngineBusy):
            engine.submit(reqs[3])
    finally:
        release.set()
        engine.close()


def test_one_heavy_request_does_not_stall_the_others(live):
    srv, _ = live
    body = json.dumps({"messages": [{"role": "user", "content": "x"}] * 100_000}).encode()  # ~4 MB
    assert len(body) > 3_000_000
    done = threading.Event()

    def heavy():
        post(srv.url + "/v1/chat/completions", body)
        done.set()

    threading.Thread(target=heavy, daemon=True).start()
    waits = []
    while not done.is_set() and len(waits) < 200:
        t0 = time.perf_counter()
        assert post(srv.url + "/health")[0] == 200
        waits.append(time.perf_counter() - t0)
        time.sleep(0.02)
    assert waits and max(waits) < 1.0, max(waits)


def _image_url(fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fmt,ok", [("PNG", True), ("JPEG", True), ("WEBP", True), ("GIF", True), ("BMP", False),
                                    ("TIFF", False), ("EPS", False)])
def test_only_png_jpeg_webp_and_gif_are_decoded(live, fmt, ok):
    srv, _ = live
    msg = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(fmt)}},
                                                     {"type": "text", "text": "what?"}]}]}
    status, err = ask(conn(srv), msg)
    assert (status == 200) == ok, err
    if not ok:
        assert "PNG, JPEG, WebP or GIF" in err["error"]["message"]


class _Images(http.server.BaseHTTPRequestHandler):
    png = base64.b64decode(png_url(8).split(",", 1)[1])

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "image/png")
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *a):
        pass


def test_remote_images_reach_only_allowed_public_hosts_after_every_redirect(tiny_tokenizer):
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port = origin.server_address[1]
    direct = f"http://127.0.0.1:{port}/a.png"
    hop = f"http://127.0.0.1:{port}/redirect?to=http://localhost:{port}/a.png"

    def status_of(srv, url):
        msg = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": "what?"}]}]}
        return ask(conn(srv), msg)

    try:
        for hosts, url, ok, says in [([], direct, False, "non-public address"),  # loopback: never by default
                                     (["127.0.0.1"], direct, True, ""),
                                     (["127.0.0.1"], hop, False, "'localhost' is not among"),
                                     (["127.0.0.1"], "ftp://127.0.0.1/a.png", False, "refused")]:
            srv, engine = serve(tiny_tokenizer, ServeLimits(max_images=2, allow_remote_images=True, image_hosts=hosts))
            try:
                status, err = status_of(srv, url)
                assert (status == 200) == ok and says in json.dumps(err), (hosts, url, err)
            finally:
                srv.close()
                engine.close()
    finally:
        origin.shutdown()


def test_an_api_key_guards_the_api_and_metrics_report(tiny_tokenizer):
    srv, engine = serve(tiny_tokenizer, api_key="s3cret")
    try:
        c = conn(srv)
        assert ask(c, HI)[0] == 401
        status, err = ask(c, HI, {"authorization": "Bearer wrong"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert ask(c, HI, {"authorization": "Bearer s3cret"})[0] == 200
        assert ask(c, {**HI, "top_p": 7}, {"authorization": "Bearer s3cret"})[0] == 400
        assert post(srv.url + "/health")[0] == 200  # health stays open for load balancers
        c.request("GET", "/metrics")
        r = c.getresponse()
        assert r.status == 401 and r.read()
        c.request("GET", "/metrics", headers={"authorization": "Bearer s3cret"})
        r = c.getresponse()
        text = r.read().decode()
        assert r.status == 200 and r.getheader("content-type").startswith("text/plain")
        for needle in ('vlkit_requests_total{code="200"} 1.0', 'vlkit_requests_total{code="400"} 1.0',
                       'vlkit_requests_total{code="401"} 2.0', "vlkit_request_latency_seconds_bucket",
                       "vlkit_queue_depth 0.0", "vlkit_in_flight 0.0", "vlkit_generated_tokens_total",
                       "vlkit_engine_alive 1.0"):
            assert needle in text, needle
    finally:
        srv.close()
        engine.close()


def test_fuzzed_request_bodies_are_answers_or_400s_never_crashes():
    from hypothesis import given, settings, strategies as st

    from vlkit.serve.errors import APIError
    from vlkit.serve.protocol import ChatRequest, parse_request

    keys = st.sampled_from(["messages", "temperature", "top_p", "max_tokens", "stop", "seed", "stream",
                            "stream_options", "n", "model", "logprobs", "tools", "user", "x"])
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=8)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                     "content": st.one_of(st.text(max_size=10), values)})
    bodies = st.dictionaries(keys, values, max_size=6).flatmap(
        lambda d: st.lists(message, max_size=3).map(lambda m: {**d, "messages": m} if m else d))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.one_of(bodies, values))
    def check(body):
        try:
            raw = json.dumps(body).encode()
        except ValueError:  # NaN/inf are JSON extensions: send them as Python's json writes them
            raw = json.dumps(body, allow_nan=True).encode()
        try:
            assert isinstance(parse_request(raw), ChatRequest)
        except APIError as e:
            assert e.status in (400, 404) and e.message

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(st.binary(max_size=64))
    def check_bytes(raw):
        try:
            parse_request(raw)
        except APIError as e:
            assert e.status == 400

    check()
    check_bytes()


def test_the_cli_stops_within_seconds_on_sigterm(monkeypatch, tmp_path, tiny_tokenizer):
    """`vlkit serve` gives in-flight requests 5 s at shutdown, then stops whatever is stuck."""
    import uvicorn

    from vlkit.cli import serve as serve_cmd
    from vlkit.models.io import save_vlm

    model, proc = make(tiny_tokenizer)
    save_vlm(model, tmp_path / "m", proc)
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    serve_cmd(tmp_path / "m", guard=None, name=None, host="127.0.0.1", port=0, max_batch=4, batch_window_ms=1.0,
              no_batching=False, max_tokens=16, max_images=2, max_pixels=4096, max_body_bytes=10_000, max_in_flight=2,
              timeout=10.0, allow_remote_images=False, image_host=None, allow_local_images=False, api_key=None,
              expert=None, expert_template="world", device="cpu", dtype="auto", visual_cache=64)
    assert seen["timeout_graceful_shutdown"] == 5


def test_a_stream_gives_back_its_slot_even_when_it_never_started(tiny_tokenizer):
    """A client gone before the first byte: the response is cancelled while its start is being sent."""
    import asyncio

    srv_model, proc = make(tiny_tokenizer)
    engine = Engine(srv_model, proc, "tiny")
    app = create_app(engine, ServeLimits(max_in_flight=2))
    body = json.dumps({**HI, "stream": True}).encode()

    async def one():
        sent = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive():
            msg = next(sent, None)
            if msg is None:
                await asyncio.sleep(0.01)
                return {"type": "http.disconnect"}
            return msg

        async def send(message):
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.2)  # a slow socket: the disconnect arrives first

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")], "client": ("x", 1),
                 "server": ("127.0.0.1", 80), "scheme": "http", "root_path": ""}
        try:
            await app(scope, receive, send)
        except Exception:  # noqa: BLE001 (whatever the server does with a vanished client, the slot must come back)
            pass

    try:
        for _ in range(3):
            asyncio.run(one())
        assert app.state.slots.n == 0
    finally:
        engine.close()


def test_waiting_streams_hold_no_worker_thread(tiny_tokenizer, monkeypatch):
    import vlkit.serve.engine as E

    release = threading.Event()
    real = E.prepare
    monkeypatch.setattr(E, "prepare", lambda *a, **k: release.wait(30) and real(*a, **k))
    srv, engine = serve(tiny_tokenizer, ServeLimits(max_in_flight=40, max_images=2, max_pixels=64 * 64))
    try:
        held = []
        for _ in range(24):  # more than the default executor's threads
            c = conn(srv)
            c.request("POST", "/v1/chat/completions", json.dumps({**HI, "stream": True}).encode(),
                      {"content-type": "application/json"})
            held.append(c)
        time.sleep(0.5)
        t0 = time.perf_counter()
        status, err = post(srv.url + "/v1/chat/completions", json.dumps({**HI, "top_p": 9}).encode())
        assert status == 400 and time.perf_counter() - t0 < 2.0  # validated at once, not after the streams
    finally:
        release.set()
        for c in held:
            c.close()
        srv.close()
        engine.close()


def test_a_client_that_disconnects_cancels_its_generation(tiny_tokenizer, monkeypatch):
    import vlkit.serve.engine as E

    seen = []

    def waits_for_cancel(batch):  # steps of 20 ms that end no answer until its client is gone
        time.sleep(0.02)
        if all(a.cancelled.is_set() for a in batch.answers):
            seen.append("cancelled")
            for a in batch.answers:
                a.finish = "cancelled"
        return ["" for _ in batch.answers]

    monkeypatch.setattr(E.Batch, "step", waits_for_cancel)
    srv, engine = serve(tiny_tokenizer)
    try:
        c = conn(srv)
        c.request("POST", "/v1/chat/completions", json.dumps({**HI, "ignore_eos": True}).encode(),
                  {"content-type": "application/json"})
        time.sleep(0.3)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == ["cancelled"]
        assert post(srv.url + "/health")[1]["in_flight"] == 0
    finally:
        srv.close()
        engine.close()


def test_a_body_declared_too_big_is_refused_before_it_is_read(live):
    srv, _ = live
    c = conn(srv)
    c.putrequest("POST", "/v1/chat/completions")
    c.putheader("content-type", "application/json")
    c.putheader("content-length", str(50 * 1024 * 1024))
    c.endheaders()
    c.send(b'{"messages": ')  # and nothing more: the 413 must not wait for the 50 MB
    r = c.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("url,says", [
    ("http://example.com:abc/x", "not a valid URL"), ("http://example.com:99999/", "not a valid URL"),
    ("http://[::1/", "not a valid URL"), ("http://\udc80.com/", "cannot resolve"),
    ("http://[::127.0.0.1]/a.png", "non-public"), ("http://[64:ff9b::7f00:1]/a.png", "non-public"),
    ("http://[::ffff:10.0.0.1]/a.png", "non-public"), ("http://[2002:7f00:1::]/a.png", "non-public"),
    ("http://127.1/a.png", "non-public"), ("http://evil@127.0.0.1/a.png", "non-public"),
    ("http://2130706433/a.png", "non-public"),
])
def test_remote_urls_that_are_malformed_or_reach_inside_are_400s(url, says):
    from vlkit.serve.errors import APIError
    from vlkit.serve.images import ImagePolicy, decode_image

    with pytest.raises(APIError) as e:
        decode_image(url, ImagePolicy(allow_remote=True), "messages[0].content[0]")
    assert e.value.status == 400 and says in e.value.message


def test_internal_errors_are_counted_as_500s(tiny_tokenizer, monkeypatch):
    srv, engine = serve(tiny_tokenizer)
    try:
        monkeypatch.setattr(engine, "prompt_tokens", lambda conv, n: 1 // 0)
        assert ask(conn(srv), HI)[0] == 500
        c = conn(srv)
        c.request("GET", "/metrics")
        assert 'vlkit_requests_total{code="500"} 1.0' in c.getresponse().read().decode()
    finally:
        srv.close()
        engine.close()


def test_a_failure_while_requests_join_fails_them_at_once_and_the_engine_goes_on(tiny_tokenizer, monkeypatch):
    import vlkit.serve.engine as E
    from vlkit.models.generate import GenerationConfig

    model, proc = make(tiny_tokenizer)
    engine = Engine(model, proc, "tiny", batch_window_ms=0)
    conv = [{"role": "user", "content": "hi"}]
    try:
        monkeypatch.setattr(E.Batch, "join", lambda self, other: 1 // 0)
        running = engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=100, ignore_eos=True)))
        deadline = time.monotonic() + 30
        while engine.steps < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        late = engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=5, ignore_eos=True)))
        for r in (late, running):  # both answered at once (with the error), neither left to time out
            with pytest.raises(ZeroDivisionError):
                r.future.result(timeout=10)
        monkeypatch.undo()
        assert engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=3))).future.result(timeout=30)
        assert engine.failures == 1
    finally:
        engine.close()


def test_a_failure_in_the_failure_path_does_not_end_the_worker_and_a_closed_engine_leaves_nothing_waiting(
        tiny_tokenizer, monkeypatch):
    import contextlib

    import vlkit.serve.engine as E
    from vlkit.models.generate import GenerationConfig

    model, proc = make(tiny_tokenizer)
    engine = Engine(model, proc, "tiny", batch_window_ms=0, batching=False)
    conv = [{"role": "user", "content": "hi"}]
    real = E.Batch.step

    def broken(self):  # the step fails, and so does closing the context the batch held open
        stack = contextlib.ExitStack()
        stack.callback(lambda: 1 // 0)
        engine._context = stack
        raise RuntimeError("step")

    try:
        monkeypatch.setattr(E.Batch, "step", broken)
        with pytest.raises(RuntimeError, match="step"):
            engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=5))).future.result(timeout=30)
        monkeypatch.setattr(E.Batch, "step", real)
        assert engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=3))).future.result(timeout=30)
        assert engine.health()["alive"] and engine.failures == 2 and engine._context is None
        monkeypatch.setattr(E.Batch, "step", lambda self: (time.sleep(0.05), real(self))[1])  # a long answer
        long = engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=100, ignore_eos=True)))
        queued = engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=3)))
        streamed = engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=3), streaming=True))
        deadline = time.monotonic() + 30
        while engine.steps < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        engine.close()
    for r in (long, queued):  # answered with the error at once, not left to the server's timeout
        with pytest.raises(E.EngineStopped, match="engine stopped"):
            r.future.result(timeout=5)
    assert isinstance(streamed.pieces.get(timeout=5), E.EngineStopped)  # a queued stream ends with the error
    with pytest.raises(E.EngineStopped, match="has stopped"):
        engine.submit(E.Request(conv, [], GenerationConfig(max_new_tokens=3)))


def test_a_stopped_engine_is_a_503(tiny_tokenizer):
    srv, engine = serve(tiny_tokenizer)
    try:
        engine.close()
        status, err = ask(conn(srv), HI)
        assert status == 503 and err["error"]["code"] == "engine_unavailable"
    finally:
        srv.close()
