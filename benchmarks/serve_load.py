"""Bounded load test of `vlkit serve` on loopback: dynamic batching on vs off, side by side, one run.

N concurrent clients (the real `openai` client, one thread each) send held-out shapes-world questions with
their image (base64 data URL) for D seconds against the same model served twice: with dynamic batching,
then answering one request at a time. Reports requests/s, generated tokens/s, p50/p99 latency, errors.

    python benchmarks/serve_load.py [--model runs/demo/vlm_instruct/model] [--clients 32] [--duration 60]
"""

from __future__ import annotations

import argparse
import base64
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


def load(url: str, model: str, qs, clients: int, duration: float, max_tokens: int) -> dict:
    lat, toks, errors = [], [], []
    stop_at = time.monotonic() + duration
    lock = threading.Lock()

    def client(k: int):
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        i = k
        while time.monotonic() < stop_at:
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
    return {"requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": wall,
            "requests_per_s": len(lat) / wall, "tokens_per_s": sum(toks) / wall,
            "p50_latency_s": q[49], "p99_latency_s": q[98]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/vlm_instruct/model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    qs = questions()
    result = {"clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens}
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
