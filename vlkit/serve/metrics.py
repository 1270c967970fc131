"""`GET /metrics` in the Prometheus text format (prometheus_client), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self, engine, in_flight):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vlkit_requests", "Chat-completion requests answered, by HTTP status.", ["code"],
                                registry=r)
        self.tokens = Counter("vlkit_generated_tokens", "Tokens generated (rate() of it: tokens per second).",
                              registry=r)
        self.latency = Histogram("vlkit_request_latency_seconds", "Time from request to last byte.", registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        Gauge("vlkit_queue_depth", "Requests waiting for the engine.", registry=r).set_function(
            lambda: engine.health()["queued"])
        Gauge("vlkit_in_flight", "Requests being answered (streams included).", registry=r).set_function(in_flight)
        Gauge("vlkit_engine_alive", "1 while the engine's worker runs.", registry=r).set_function(
            lambda: float(engine.health()["alive"]))
        Gauge("vlkit_engine_failed_batches", "Decoding steps or prefills that raised (their requests failed; the "
              "engine went on).", registry=r).set_function(lambda: engine.failures)
        for name, what, read in (("steps", "Decoding steps run.", lambda: engine.steps),
                                 ("rows", "Rows decoded, summed over steps (/ steps: the mean batch).",
                                  lambda: engine.rows_stepped),
                                 ("step_seconds", "Seconds spent in decoding steps.", lambda: engine.step_seconds),
                                 ("prefills", "Prefills run (each admits the requests that had arrived).",
                                  lambda: engine.prefills)):
            Gauge(f"vlkit_decode_{name}", what, registry=r).set_function(read)

    def observe(self, code: int, seconds: float, tokens: int = 0) -> None:
        self.requests.labels(code=str(code)).inc()
        self.latency.observe(seconds)
        if tokens:
            self.tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
