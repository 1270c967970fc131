"""The OpenAI-compatible server, against a live uvicorn on 127.0.0.1 with the real `openai` client."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from test_vlm import make  # tests/ is on sys.path under pytest
from vlkit.serve import Engine, ServeLimits, create_app


def png_url(size=32, seed=0) -> str:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def http(url: str, body: bytes | None = None, ctype: str = "application/json") -> tuple[int, dict | str]:
    """Plain HTTP (for requests the openai client cannot send): (status, parsed JSON or text)."""
    req = urllib.request.Request(url, data=body, headers={"content-type": ctype}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


class Live:
    """A uvicorn server in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(tok, limits=None, guard=None, **engine_kw):
    model, proc = make(tok)
    engine = Engine(model, proc, "tiny", **engine_kw)
    return Live(create_app(engine, limits or ServeLimits(max_tokens=16, max_images=2, max_pixels=64 * 64), guard)), \
        engine


@pytest.fixture(scope="module")
def live(tiny_tokenizer):
    srv, engine = serve(tiny_tokenizer, batch_window_ms=50)
    yield srv, engine
    srv.close()
    engine.close()


def ask(client, content, **kw):
    return client.chat.completions.create(model=kw.pop("model", "tiny"), max_tokens=kw.pop("max_tokens", 8),
                                          messages=[{"role": "user", "content": content}], **kw)


def test_text_image_usage_models_and_health(live):
    srv, _ = live
    r = ask(srv.client, "describe the image.")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    img = ask(srv.client, [{"type": "image_url", "image_url": {"url": png_url()}},
                           {"type": "text", "text": "what color is the circle?"}])
    assert img.usage.prompt_tokens > 4  # the 4 visual tokens count as prompt tokens
    assert [m.id for m in srv.client.models.list().data] == ["tiny"]
    assert http(srv.url + "/health")[1]["status"] == "ok"
    assert "vlkit chat" in http(srv.url + "/")[1]


def test_streaming_equals_the_whole_answer(live):
    srv, _ = live
    content = [{"type": "image_url", "image_url": {"url": png_url(seed=3)}}, {"type": "text", "text": "describe."}]
    whole = ask(srv.client, content, max_tokens=10).choices[0].message.content
    chunks = list(ask(srv.client, content, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0


def test_concurrent_requests_are_batched_and_answered_as_alone(live):
    srv, engine = live
    prompts = [f"describe picture {i}." for i in range(6)]
    alone = [ask(srv.client, p).choices[0].message.content for p in prompts]
    engine.largest_batch = 0
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda p: ask(srv.client, p).choices[0].message.content, prompts))
    assert together == alone
    assert engine.largest_batch > 1  # shared forward passes, not one at a time


@pytest.mark.parametrize("bad,status,needle", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], 400, "invalid base64"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}],
     400, "not a readable image"),
    ([{"type": "image_url", "image_url": {"url": png_url(size=65)}}], 400, "over this server's limit"),
    ([{"type": "image_url", "image_url": {"url": png_url()}}] * 3, 400, "more than 2 images"),
    ([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}], 400, "remote image URLs"),
    ([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}], 400, "local image paths"),
    ([{"type": "audio", "audio": "x"}], 400, "must be 'text' or 'image_url'"),
])
def test_bad_content_is_an_openai_error_and_the_server_keeps_serving(live, bad, status, needle):
    srv, _ = live
    with pytest.raises(openai.APIStatusError) as e:
        ask(srv.client, bad)
    assert e.value.status_code == status and needle in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    assert ask(srv.client, "hello").choices[0].message is not None


def test_other_bad_requests(live):
    srv, _ = live
    with pytest.raises(openai.NotFoundError, match="not served here"):
        srv.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 16"):
        ask(srv.client, "hi", max_tokens=17)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        ask(srv.client, "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(srv.client, "word " * 200)
    for body, ctype in ((b"{not json", "application/json"), (b"hello", "text/plain"), (b"[1, 2]", "application/json")):
        status, err = http(srv.url + "/v1/chat/completions", body, ctype)
        assert status == 400 and err["error"]["type"] == "invalid_request_error"
    status, err = http(srv.url + "/v1/chat/completions",
                       json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode())
    assert status == 400 and "last message" in err["error"]["message"]
    assert ask(srv.client, "hello").choices[0].message is not None


def test_limits_body_in_flight_and_timeout(tiny_tokenizer):
    srv, engine = serve(tiny_tokenizer, ServeLimits(max_tokens=32, max_in_flight=1, max_body_bytes=2000),
                        batching=False)
    try:
        status, err = http(srv.url + "/v1/chat/completions",
                           json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode())
        assert status == 413 and err["error"]["code"] == "request_too_large"
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(ask, srv.client, f"tell me {i}", max_tokens=32) for i in range(6)]
            errors = [f.exception() for f in futures]
        assert any(isinstance(e, openai.RateLimitError) for e in errors) and any(e is None for e in errors)
    finally:
        srv.close()
        engine.close()
    srv, engine = serve(tiny_tokenizer, ServeLimits(max_tokens=16, timeout_s=0.0001))
    try:
        with pytest.raises(openai.APIStatusError) as e:
            ask(srv.client, "hi")
        assert e.value.status_code == 504
    finally:
        srv.close()
        engine.close()


def test_the_guard_in_front(tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from vlkit.guard import Guard, GuardMiddleware
    from vlkit.guard.taxonomy import Category, Taxonomy

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, pad_token_id=tiny_tokenizer.pad_token_id)).eval()
    tax = Taxonomy(name="t", categories=[Category(name="Spam", description="ads")])
    strict = Guard(lm, tiny_tokenizer, tax, threshold=0.0)  # P(unsafe) >= 0: everything is blocked
    srv, engine = serve(tiny_tokenizer, guard=GuardMiddleware(strict))
    try:
        with pytest.raises(openai.BadRequestError) as e:
            ask(srv.client, "hello")
        assert e.value.body["code"] == "content_filter" and "blocked by the guard" in e.value.message
    finally:
        srv.close()
        engine.close()
    srv, engine = serve(tiny_tokenizer, guard=GuardMiddleware(strict, check_inputs=False))
    try:
        r = ask(srv.client, "hello")
        assert r.choices[0].finish_reason == "content_filter" and "blocked by the guard" in r.choices[0].message.content
        chunks = list(ask(srv.client, "hello", stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "blocked by the guard" in text and chunks[-1].choices[0].finish_reason == "content_filter"
    finally:
        srv.close()
        engine.close()


def test_vlkit_chat_talks_to_a_running_server(live, tmp_path):
    import subprocess
    import sys

    srv, _ = live
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    out = subprocess.run([sys.executable, "-m", "vlkit.cli", "chat", "--url", srv.url, "--image", str(img),
                          "--prompt", "describe.", "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    direct = ask(srv.client, [{"type": "image_url", "image_url": {"url": _png_of(img)}},
                              {"type": "text", "text": "describe."}], max_tokens=6).choices[0].message.content
    assert out.stdout.strip() == direct
    bad = subprocess.run([sys.executable, "-m", "vlkit.cli", "chat", "--url", "http://127.0.0.1:9", "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no OpenAI-compatible server" in bad.stderr


def _png_of(path) -> str:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_plain_hf_causal_lm_is_served_text_only(tiny_lm):
    engine = Engine.load(tiny_lm)
    srv = Live(create_app(engine, ServeLimits(max_tokens=8)))
    try:
        r = srv.client.chat.completions.create(model=engine.name, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6)
        assert r.usage.completion_tokens > 0 and not engine.takes_images
        with pytest.raises(openai.BadRequestError, match="text-only"):
            ask(srv.client, [{"type": "image_url", "image_url": {"url": png_url()}}], model=engine.name)
    finally:
        srv.close()
        engine.close()


def test_system_messages_open_the_next_user_turn():
    from vlkit.serve.app import APIError, parse_messages

    conv, images = parse_messages({"messages": [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "hi"}]}, ServeLimits())
    assert images == [] and conv == [{"role": "user", "content": [
        {"type": "text", "text": "be brief"}, {"type": "text", "text": "\n"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(APIError, match="last message must come from the user"):
        parse_messages({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]},
                       ServeLimits())


def test_a_conversations_images_are_encoded_once_and_answers_do_not_change(tiny_tokenizer):
    """Turn 2 re-sends turn 1's image (the API is stateless): the cache encodes it once; the answers, streamed or
    batched, equal those of an engine without the cache."""
    from vlkit.models.generate import GenerationConfig
    from vlkit.serve.engine import Request

    model, proc = make(tiny_tokenizer)
    a, b = (Image.fromarray(np.random.default_rng(s).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for s in (1, 2))
    q = [{"type": "image"}, {"type": "text", "text": "what is it?"}]
    turn1 = [{"role": "user", "content": q}]
    turn2 = turn1 + [{"role": "assistant", "content": "a shape"}, {"role": "user", "content": q}]
    encoded = []
    hook = model.vision.encoders[0].register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    answers = {}
    try:
        for cache in (64, 0):
            engine = Engine(model, proc, "tiny", visual_cache=cache)
            try:
                got = []
                for conv, imgs, streaming in ((turn1, [a], False), (turn2, [a, b], False), (turn2, [a, b], True)):
                    r = engine.submit(Request(conv, imgs, GenerationConfig(max_new_tokens=4), streaming=streaming))
                    if streaming:
                        got.append("".join(iter(lambda: r.pieces.get(timeout=60), None)))
                    else:
                        got.append(r.future.result(timeout=60)["text"])
                answers[cache] = got
                if cache:
                    assert encoded == [1, 1] and engine.visual.hits == 3 and engine.visual.misses == 2
            finally:
                engine.close()
    finally:
        hook.remove()
    assert answers[64][:2] == answers[0][:2] and answers[64][2].strip() == answers[0][2].strip()


def test_requests_join_a_running_batch_and_get_the_answers_they_get_served_one_at_a_time(tiny_tokenizer):
    """Continuous batching: requests that arrive while a long answer decodes join its batch between steps and
    leave it when they are done (their own max_tokens, stop strings, sampling seed; streams too); every answer
    equals the one the same request gets from an engine serving one request at a time."""
    from vlkit.models.generate import GenerationConfig
    from vlkit.serve.engine import Request

    model, proc = make(tiny_tokenizer)
    pics = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (32, 32, 3), dtype=np.uint8))
            for s in range(4)]
    gens = [GenerationConfig(max_new_tokens=40, ignore_eos=True),  # the long one, running when the others arrive
            GenerationConfig(max_new_tokens=3), GenerationConfig(max_new_tokens=12, stop=[" "]),
            GenerationConfig(max_new_tokens=9, temperature=1.2, top_p=0.9, seed=5, ignore_eos=True),
            GenerationConfig(max_new_tokens=6, ignore_eos=True), GenerationConfig(max_new_tokens=20)]

    def requests():
        return [Request([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"what is {i}?"}]}],
                        [pics[i % 4]], g, streaming=i in (2, 4)) for i, g in enumerate(gens)]

    answers, order = {}, {}
    for batching in (True, False):
        engine = Engine(model, proc, "tiny", batching=batching, batch_window_ms=0)
        try:
            first, *rest = requests()
            ended: list[int] = []
            first.future.add_done_callback(lambda f: ended.append(0))
            engine.submit(first)
            deadline = time.monotonic() + 30
            while engine.steps < 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            for i, r in enumerate(rest, 1):
                r.future.add_done_callback(lambda f, i=i: ended.append(i))
                engine.submit(r)
            got = []
            for r in [first, *rest]:
                streamed = "".join(iter(lambda: r.pieces.get(timeout=60), None)) if r.streaming else None
                out = r.future.result(timeout=60)
                assert streamed is None or streamed.strip() == out["text"]
                got.append(out)
            answers[batching], order[batching] = got, ended
            if batching:
                assert engine.prefills == 2 and engine.largest_batch > 1  # (an answer may end at its prefill)
        finally:
            engine.close()
    assert answers[True] == answers[False]
    assert [a["tokens"] for a in answers[True]][0] == 40 and answers[True][1]["tokens"] <= 3
    assert order[True][-1] == 0 and order[False][0] == 0  # batched, the long answer ended last; alone, first


def test_an_adapter_model_serves_requests_of_different_lengths_together(tiny_tokenizer):
    """An adapter's fusion acts at every decoding step on per-row state: its batch takes no rows in and lets none
    leave (finished rows are fed padding until all are done); every answer equals the one served alone."""
    from test_adapter import make as make_adapter, perturb
    from vlkit.models.fusion.adapter import AdapterConfig
    from vlkit.models.generate import GenerationConfig
    from vlkit.serve.engine import Request

    model, proc = make_adapter(tiny_tokenizer, num_hidden_layers=3)
    model.add_fusion("adapter", AdapterConfig(prompt_length=4, bias_scale="none"))
    perturb(model.fusion("adapter"))
    pics = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for s in (1, 2)]
    q = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    got = {}
    for batching in (True, False):
        engine = Engine(model, proc, "tiny", batching=batching, batch_window_ms=200)
        try:
            reqs = [Request(q, [pics[i]], GenerationConfig(max_new_tokens=n, ignore_eos=True), streaming=i == 0)
                    for i, n in enumerate((3, 9))]
            for r in reqs:
                engine.submit(r)
            streamed = "".join(iter(lambda: reqs[0].pieces.get(timeout=60), None))
            got[batching] = [r.future.result(timeout=60) for r in reqs]
            assert streamed.strip() == got[batching][0]["text"] and engine.failures == 0
            if batching:
                assert engine.largest_batch == 2 and engine.prefills == 1
        finally:
            engine.close()
    assert got[True] == got[False] and [g["tokens"] for g in got[True]] == [3, 9]
