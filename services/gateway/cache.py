"""Exact-match response cache for deterministic requests (greedy, or with a seed).

The key is everything that decides the answer: model, prompt (and its format), and the sampling
parameters. A hit answers with the stored result, including its request id, so `GET /v1/requests/{id}`
finds the request that produced it. Only successful answers are kept; entries expire after `ttl_s`,
and the least recently used one goes when the cache is full. Each gateway has its own cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.messages import ChatRequest, ChatResult


def cache_key(request: ChatRequest) -> str:
    """A digest of what decides the answer (never the request id, deadline or caller)."""
    decisive = request.model_dump(
        mode="json",
        include={"model", "messages", "prompt_format", "max_tokens", "temperature", "top_p", "stop", "seed"},
    )
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


class ResponseCache:
    """Results by cache key, LRU-evicted at `max_entries`, each valid for `ttl_s`; counts hits and misses."""

    def __init__(self, max_entries: int, ttl_s: float, registry: CollectorRegistry | None = None) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.entries: OrderedDict[str, tuple[float, ChatResult]] = OrderedDict()
        registry = registry or CollectorRegistry()  # not the global one: tests make many
        self.lookups = Counter(
            "autoglm_gateway_cache_lookups", "Response cache lookups by outcome", ["outcome"], registry=registry
        )
        self.hit_ratio = Gauge(
            "autoglm_gateway_cache_hit_ratio", "Hits over hits plus misses since start", registry=registry
        )
        self.size = Gauge("autoglm_gateway_cache_entries", "Entries in the response cache", registry=registry)
        self.hits = self.misses = 0

    def get(self, key: str) -> ChatResult | None:
        entry = self.entries.get(key)
        if entry is not None and time.monotonic() - entry[0] > self.ttl_s:
            del self.entries[key]
            entry = None
        if entry is None:
            self.misses += 1
            self._count("miss")
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        self._count("hit")
        return entry[1]

    def put(self, key: str, result: ChatResult) -> None:
        if not result.ok or self.max_entries == 0:
            return
        self.entries[key] = (time.monotonic(), result)
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        self.size.set(len(self.entries))

    def bypassed(self) -> None:
        self.lookups.labels("bypass").inc()

    def _count(self, outcome: str) -> None:
        self.lookups.labels(outcome).inc()
        self.hit_ratio.set(self.hits / (self.hits + self.misses))
