"""Bounded load test of `vlkit serve` on loopback: continuous batching on vs off, side by side, one run.

N concurrent clients (the real `openai` client, one thread each) send held-out shapes-world questions with
their image (base64 data URL) for D seconds against the same model served twice: with continuous batching,
then answering one request at a time. Answers are `--max-tokens` long (`ignore_eos`, as vLLM's load tests do:
the world model's own answers are a word or two). Reports requests/s, generated tokens/s, p50/p99 latency,
errors, the batching/one-at-a-time ratio; `--stream`: the clients stream, and time to first token is reported.

With --hostile K, the batched server alone is loaded and every K-th request of each client is a bad one
(malformed JSON, wrong types, unsupported fields, lone surrogates, deep nesting, huge numbers, bad images,
streams dropped mid-way), sent over plain HTTP: good requests must all succeed and no bad one may get a 5xx.

    python benchmarks/serve_load.py [--model runs/demo/vlm_instruct/model] [--clients 32] [--duration 60]
                                    [--max-tokens 64] [--stream] [--json out.json]
    python benchmarks/serve_load.py --hostile 4 --duration 60
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import socket
import statistics
import sys
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import openai

from vlkit.data.records import load_records, message_text
from vlkit.world.dataset import WorldData, build


class Server:
    """`vlkit serve MODEL` in a process of its own (as deployed: the clients' threads here do not share its
    interpreter), on a free loopback port; `stats()` reads its /metrics."""

    def __init__(self, model: str, *options: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "vlkit", "serve", model, "--port", str(self.port),
                                      "--max-in-flight", "256", "--timeout", "600", *options],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"vlkit serve exited: {self.proc.stderr.read().strip()[-2000:]}")
            try:
                with urllib.request.urlopen(self.base + "/v1/models", timeout=2) as r:
                    self.name = json.load(r)["data"][0]["id"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("vlkit serve did not start within 300 s") from None
                time.sleep(0.2)
        self.url = self.base + "/v1"

    def stats(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            lines = r.read().decode().splitlines()
        return {k: float(v) for k, v in (ln.split(" ", 1) for ln in lines if ln.startswith("vlkit_") and "{" not in ln)}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def questions(n: int = 64, world: WorldData | None = None) -> list[tuple[str, str]]:
    root = build(world or WorldData(seed=0, train_scenes=4000, test_scenes=500))
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


def load(url: str, model: str, qs, clients: int, duration: float, max_tokens: int, bad_every: int = 0,
         streaming: bool = False, ignore_eos: bool = True) -> dict:
    lat, first, toks, errors, bad_status = [], [], [], [], []
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    extra = {"ignore_eos": True} if ignore_eos else {}

    def ask(c, content) -> tuple[int, float | None]:
        """(completion tokens, seconds to the first text or None)"""
        t0 = time.perf_counter()
        kw = dict(model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": content}],
                  extra_body=extra)
        if not streaming:
            return c.chat.completions.create(**kw).usage.completion_tokens, None
        ttft, n = None, 0
        for chunk in c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return n, ttft

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
                got, ttft = ask(c, content)
                with lock:
                    lat.append(time.perf_counter() - t0)
                    toks.append(got)
                    if ttft is not None:
                        first.append(ttft)
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

    def pct(xs, p):
        return statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else float("nan")

    out = {"requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors)), "wall_s": wall,
           "requests_per_s": len(lat) / wall, "tokens_per_s": sum(toks) / wall,
           "mean_completion_tokens": statistics.mean(toks) if toks else 0,
           "p50_latency_s": pct(lat, 50), "p99_latency_s": pct(lat, 99)}
    if streaming:
        out["p50_first_token_s"], out["p99_first_token_s"] = pct(first, 50), pct(first, 99)
    if bad_every:
        out["bad_requests"] = len(bad_status)
        out["bad_statuses"] = {str(s): bad_status.count(s) for s in sorted(set(bad_status))}
        out["bad_5xx"] = sum(1 for s in bad_status if s >= 500)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/vlm_instruct/model")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stream", action="store_true", help="The clients stream their answers (time to first token).")
    ap.add_argument("--eos", action="store_true", help="Answers end at the model's end-of-sequence token (default: "
                    "they are --max-tokens long).")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--hostile", type=int, default=0, help="Every K-th request of each client is a bad one "
                    "(batched server only).")
    ap.add_argument("--world", default=None, help="train,test scenes of the question world (default 4000,500).")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    world = None
    if args.world:
        train, test = (int(x) for x in args.world.split(","))
        world = WorldData(seed=0, train_scenes=train, test_scenes=test)
    qs = questions(world=world)
    result = {"command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
              "streaming": args.stream, "ignore_eos": not args.eos}
    runs = [("batching", True)] if args.hostile else [("batching", True), ("one_at_a_time", False)]
    for name, batching in runs:
        server = Server(args.model, "--max-batch", str(args.max_batch), *([] if batching else ["--no-batching"]))
        try:
            load(server.url, server.name, qs, 2, min(3, args.duration), args.max_tokens)  # warm-up
            before = server.stats()
            result[name] = load(server.url, server.name, qs, args.clients, args.duration, args.max_tokens,
                                args.hostile, args.stream, not args.eos)
            after = server.stats()
        finally:
            server.close()
        d = {k: after[k] - before.get(k, 0) for k in after}
        steps = max(d.get("vlkit_decode_steps", 0), 1)
        result[name].update(mean_batch=d.get("vlkit_decode_rows", 0) / steps,
                            mean_step_s=d.get("vlkit_decode_step_seconds", 0) / steps,
                            engine_failures=int(d.get("vlkit_engine_failed_batches", 0)))
    if args.hostile:
        result["hostile_every"] = args.hostile
    else:
        result["tokens_per_s_ratio"] = (result["batching"]["tokens_per_s"]
                                        / max(result["one_at_a_time"]["tokens_per_s"], 1e-9))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
