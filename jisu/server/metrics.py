"""Prometheus metrics for `GET /metrics`: counters and latency histograms the server updates,
plus engine state (queue, running sequences, KV blocks, prefix cache) read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        sched, bm = self.engine.scheduler, self.engine.block_manager
        gauges = [
            ("jisu_num_requests_waiting", "sequences waiting to be scheduled (queue depth)", len(sched.waiting)),
            ("jisu_num_requests_running", "sequences holding KV-cache blocks", len(sched.running)),
            ("jisu_kv_cache_blocks_used", "KV-cache blocks referenced by sequences", bm.num_used_blocks),
            ("jisu_kv_cache_blocks_total", "KV-cache blocks in the pool", bm.num_blocks),
            ("jisu_prefix_cache_hit_rate", "prompt tokens found in the prefix cache / prompt tokens looked up",
             bm.hit_rate),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("jisu_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                  value=bm.num_queried_tokens)
        yield CounterMetricFamily("jisu_prefix_cache_hits", "prompt tokens found in the prefix cache",
                                  value=bm.num_hit_tokens)
        yield CounterMetricFamily("jisu_num_preemptions", "sequences preempted for lack of KV blocks",
                                  value=sched.num_preemptions)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("jisu_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("jisu_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("jisu_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("jisu_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("jisu_inter_token_latency_seconds", "time between a sample's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jisu_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
