"""The server's Prometheus metrics, in a registry of their own (one per app), served at GET /metrics."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a first token takes milliseconds on a GPU and can wait seconds in a full queue.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds between two tokens of one sequence: a decode step, plus any prefill that ran between steps.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("blitzgen_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("blitzgen_prompt_tokens", "Prompt tokens of accepted requests",
                                     registry=registry)
        self.generation_tokens = Counter("blitzgen_generation_tokens", "Tokens generated", registry=registry)
        self.cancelled = Counter("blitzgen_cancelled_sequences",
                                 "Sequences cancelled before they finished (client gone or request failed)",
                                 registry=registry)
        self.queue_depth = Gauge("blitzgen_queue_depth", "Sequences waiting for a cache slot", registry=registry)
        self.batch_size = Gauge("blitzgen_batch_size", "Sequences in the last decode step", registry=registry)
        self.time_to_first_token = Histogram("blitzgen_time_to_first_token_seconds",
                                             "From the request's arrival to its first token",
                                             buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("blitzgen_inter_token_latency_seconds",
                                             "Between consecutive tokens of one sequence",
                                             buckets=ITL_BUCKETS, registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
