"""Bounded load test of `vlkit serve` on loopback: dynamic batching on vs off, side by side, one run.

N concurrent clients (the real `openai` client, one thread each) send held-out shapes-world questions with
their image (base64 data URL) for D seconds against the same model served twice: with dynamic batching,
then answering one request at a time. Reports requests/s, generated tokens/s, p50/p99 latency, errors.

With --hostile K, the batched server alone is loaded and every K-th request of each client is a bad one
(malformed JSON, wrong types, unsupported fields, lone surrogates, deep nesting, huge numbers, bad images,
streams dropped mid-way), sent over plain HTTP: good requests must all succeed and no bad one may get a 5xx.

    python benchmarks/serve_load.py [--model runs/demo/vlm_instruct/model] [--clients 32] [--duration 60]
    python benchmarks/serve_load.py --hostile 4 --duration 60
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import openai
import uvicorn

from vlkit.data.records import load_records, message_text
from vlkit.serve import Engine, ServeLimits, create_app
from vlkit.world.dataset import WorldData, build


def start(app) -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


def questions(n: int = 64) -> list[tuple[str, str]]:
    root = build(WorldData(seed=0, train_scenes=4000, test_scenes=500))
    recs = [r for r in load_records(root / "test.jsonl") if r["task"] == "vqa"][:n]
    out = []
    for r in recs:
        url = "data:image/png;base64," + base64.b64encode(Path(r["images"][0]).read_bytes()).decode()
        out.append((url, message_text(r["messages"][0])))
    return out


HI = [{"role": "user", "content": "hi"}]
BAD: list[bytes] = [b"{not json", b"[1, 2]", b"[" * 50_000 + b"]" * 50_000,
                    json.dumps({"messages": HI, "temperature": "hot"}).encode(),
                    json.dumps({"messages": HI, "seed": [1]}).encode(),
                    json.dumps({"messages": HI, "seed": 2 ** 70}).encode(),
                    json.dumps({"messages": HI, "max_tokens": 0}).encode(),
                    json.dumps({"messages": HI, "logprobs": True}).encode(),
                    json.dumps({"messages": HI, "n": 3}).encode(),
                    json.dumps({"messages": HI, "stream_options": "yes", "stream": True}).encode(),
                    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                    b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 5000 + b"}",
                    json.dumps({"messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}).encode(),
                    json.dumps({"messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]}).encode(),
                    json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode()]
DROPPED_STREAM = json.dumps({"messages": HI, "stream": True, "max_tokens": 64}).encode()


def hostile(port: int, k: int) -> int:
    """One bad request (or a stream dropped after its first line): its HTTP status (0: dropped on purpose)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        bad = BAD[k % (len(BAD) + 1)] if k % (len(BAD) + 1) < len(BAD) else None
        c.request("POST", "/v1/chat/completions", bad or DROPPED_STREAM, {"content-type": "application/json"})
        r = c.getresponse()
        if bad is None:
            r.readline()
            return 0
        r.read()
        return r.status
    finally:
        c.close()


def load(url: str, model: str, qs, clients: int, duration: float, max_tokens: int, bad_every: int = 0) -> dict:
    lat, toks, errors, bad_status = [], [], [], []
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    port = int(url.rsplit(":", 1)[1].split("/")[0])

    def client(k: int):
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        i, n = k, 0
        while time.monotonic() < stop_at:
            n += 1
            if bad_every and n % bad_every == 0:
                s = hostile(port, k + n // bad_every)  # each client walks through every kind of bad request
                with lock:
                    bad_status.append(s)
                continue
            img, q = qs[i % len(qs)]
            i += clients
            t0 = time.perf_counter()
            try:
                content = [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": q}]
                r = c.chat.completions.create(model=model, max_tokens=max_tokens,
                                              messages=[{"role": "user", "content": content}])
                with lock:
                    lat.append(time.perf_counter() - t0)
                    toks.append(r.usage.completion_tokens)
            except openai.OpenAIError as e:
                with lock:
                    errors.append(type(e).__name__)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    out = {"requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": wall,
           "requests_per_s": len(lat) / wall, "tokens_per_s": sum(toks) / wall,
           "p50_latency_s": q[49], "p99_latency_s": q[98]}
    if bad_every:
        out["bad_requests"] = len(bad_status)
        out["bad_statuses"] = {str(s): bad_status.count(s) for s in sorted(set(bad_status))}
        out["bad_5xx"] = sum(1 for s in bad_status if s >= 500)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/vlm_instruct/model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hostile", type=int, default=0, help="Every K-th request of each client is a bad one "
                    "(batched server only).")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    qs = questions()
    result = {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens}
    if args.hostile:
        engine = Engine.load(args.model, max_batch=32, batch_window_ms=10)
        server, url = start(create_app(engine, ServeLimits(max_in_flight=256, timeout_s=600)))
        load(url, engine.name, qs, 2, 3, args.max_tokens)  # warm-up
        result["hostile_every"] = args.hostile
        result["batching"] = load(url, engine.name, qs, args.clients, args.duration, args.max_tokens, args.hostile)
        result["engine_failures"] = engine.failures
        server.should_exit = True
        engine.close()
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return
    for name, batching in (("batching", True), ("one_at_a_time", False)):
        engine = Engine.load(args.model, max_batch=32, batch_window_ms=10, batching=batching)
        server, url = start(create_app(engine, ServeLimits(max_in_flight=256, timeout_s=600)))
        load(url, engine.name, qs, 2, 3, args.max_tokens)  # warm-up
        result[name] = load(url, engine.name, qs, args.clients, args.duration, args.max_tokens)
        if batching:
            result[name]["mean_batch"] = statistics.mean(engine.batches) if engine.batches else 0
        server.should_exit = True
        engine.close()
        time.sleep(0.5)
    result["tokens_per_s_ratio"] = result["batching"]["tokens_per_s"] / max(result["one_at_a_time"]["tokens_per_s"],
                                                                            1e-9)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
