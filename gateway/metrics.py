"""Prometheus metrics: recorded in one middleware and where errors are translated, read at scrape.

The per-request part is the hot path (a benchmark compares the gateway with nginx), so it does
not go through prometheus-client's metric objects, which take a lock per update for threads
this event loop does not have: ``record_request`` adds to plain ints in a dict keyed by the
label tuple, and a ``Collector`` turns them into metric families only when ``/metrics`` is
scraped. Rare events (errors, rejections, reloads) use ordinary prometheus-client counters.

Every app has its own ``CollectorRegistry``: tests and several apps in one process never share
values. Labels are bounded: the route's prefix (never the raw path), the method from a fixed set,
the status class, the service name, fixed kinds and reasons. Requests aiohttp's parser refused
(400/431, before any middleware) are counted by ``gateway.httpserver`` as route ``malformed``.

    gateway_requests_total{route,method,status}            counter    status: 2xx, 3xx, 4xx, 5xx
    gateway_request_duration_seconds{route,method}          histogram  the whole request
    gateway_upstream_duration_seconds{service}              histogram  send until response head
    gateway_requests_in_flight                              gauge
    gateway_upstream_errors_total{service,kind}             counter    connect|timeout|reset|invalid
                                                                       (retried attempts included)
    gateway_ratelimit_rejections_total{route}               counter
    gateway_auth_failures_total{route,reason}               counter    missing|invalid|insufficient_scope
                                                                       |jwks_unavailable (the 503)
    gateway_jwks_fetch_errors_total{kind}                   counter    connect|timeout|reset|status|invalid
    gateway_validation_rejections_total{route,status}       counter    413|415|422
    gateway_spans_dropped_total                             counter    from the Zipkin reporter
    gateway_log_lines_dropped_total                         counter    stderr not keeping up
    gateway_ratelimit_fallback_active                       gauge      1 while Redis is bypassed
    gateway_ratelimit_fallbacks_total                       counter    switches to the fallback
    gateway_component_up{component}                         gauge      last /health/detailed answer
    gateway_config_reloads_total{result}                    counter    ok|rejected
    gateway_process_info{pid}                               gauge      1; tells workers apart
    process_open_fds, process_max_fds, process_resident_memory_bytes, process_cpu_seconds_total,
    ...                                                     prometheus-client's process collector
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from time import perf_counter
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .keys import route_key
from .state import status_when_cancelled

__all__ = [
    "DURATION_BUCKETS",
    "MALFORMED_ROUTE",
    "UPSTREAM_ERROR_KINDS",
    "Metrics",
    "metrics_handler",
    "metrics_key",
    "metrics_middleware",
    "route_label",
]

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "invalid")
AUTH_REASONS = frozenset({"missing", "invalid", "insufficient_scope", "jwks_unavailable"})
VALIDATION_STATUSES = frozenset({413, 415, 422})
# The route label of requests aiohttp's parser refused (malformed or oversized heads, 400/431):
# no route was looked up, and their method and path are not known.
MALFORMED_ROUTE = "malformed"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_STATUS_CLASS = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")


class _Histogram:
    """Counts per bucket (not cumulative), the sum and the count, as plain numbers."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*map(str, DURATION_BUCKETS), "+Inf"), self.buckets, strict=True):
            total += count
            out.append((bound, total))
        return out


class Metrics:
    """The app's registry and everything recorded into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.in_flight = 0
        # (route, method, status class) -> count; (route, method) -> histogram; service -> histogram
        self._requests: dict[tuple[str, str, str], int] = {}
        self._durations: dict[tuple[str, str], _Histogram] = {}
        self._upstream: dict[str, _Histogram] = {}
        # Read at scrape time: zero cost until then.
        self.spans_dropped: Callable[[], int] = lambda: 0
        self.log_lines_dropped: Callable[[], int] = lambda: 0
        self.fallback_active: Callable[[], bool] = lambda: False
        self.fallbacks: Callable[[], int] = lambda: 0
        self.components: Callable[[], dict[str, str]] = dict
        self.jwks_fetch_errors: Callable[[], Mapping[str, int]] = dict
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures, by kind: connect, timeout, reset (closed or cut off), invalid",
            ["service", "kind"],
            registry=self.registry,
        )
        self.ratelimit_rejections = Counter(
            "gateway_ratelimit_rejections", "Requests answered 429", ["route"], registry=self.registry
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Requests refused by authentication, by reason",
            ["route", "reason"],
            registry=self.registry,
        )
        self.validation_rejections = Counter(
            "gateway_validation_rejections",
            "Requests refused for their body (413, 415, 422)",
            ["route", "status"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads", "Configuration reloads, by result", ["result"], registry=self.registry
        )
        self.registry.register(_Collector(self))
        # The standard process_* families (CPU, memory, open and maximum file descriptors), read
        # from /proc at scrape time: running out of descriptors at accept is otherwise silent.
        ProcessCollector(registry=self.registry)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "OTHER"
        key = (route, method, _STATUS_CLASS[status // 100] if 100 <= status < 600 else "5xx")
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        histogram = self._durations.get((route, method))
        if histogram is None:
            histogram = self._durations[route, method] = _Histogram()
        histogram.observe(seconds)

    def record_upstream(self, service: str, seconds: float) -> None:
        histogram = self._upstream.get(service)
        if histogram is None:
            histogram = self._upstream[service] = _Histogram()
        histogram.observe(seconds)

    def record_rejection(self, route: str, status: int, reason: str | None) -> None:
        """A request the gateway refused itself: its own 4xx answers, and 5xx ones with a reason."""
        if status == 429:
            self.ratelimit_rejections.labels(route).inc()
        elif reason in AUTH_REASONS:
            self.auth_failures.labels(route, reason).inc()
        elif status in VALIDATION_STATUSES:
            self.validation_rejections.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "gateway_requests", "Requests answered, by route prefix, method and status class",
            labels=["route", "method", "status"],
        )  # fmt: skip
        for labels, count in list(m._requests.items()):
            requests.add_metric(labels, count)
        yield requests
        durations = HistogramMetricFamily(
            "gateway_request_duration_seconds", "Whole-request latency, by route prefix and method",
            labels=["route", "method"],
        )  # fmt: skip
        for labels, histogram in list(m._durations.items()):
            durations.add_metric(labels, histogram.cumulative(), histogram.sum)
        yield durations
        upstream = HistogramMetricFamily(
            "gateway_upstream_duration_seconds",
            "Upstream latency from sending the request to the response head, by service",
            labels=["service"],
        )
        for service, histogram in list(m._upstream.items()):
            upstream.add_metric([service], histogram.cumulative(), histogram.sum)
        yield upstream
        yield GaugeMetricFamily("gateway_requests_in_flight", "Requests being handled", value=m.in_flight)
        jwks_errors = CounterMetricFamily(
            "gateway_jwks_fetch_errors",
            "Failed fetches of the issuer's signing keys (AUTH_JWKS_URL), by kind: connect, timeout,"
            " reset, status (not 200), invalid (not a JWKS)",
            labels=["kind"],
        )
        for kind, count in m.jwks_fetch_errors().items():
            jwks_errors.add_metric([kind], count)
        yield jwks_errors
        yield CounterMetricFamily(
            "gateway_spans_dropped", "Trace spans dropped by the Zipkin reporter", value=m.spans_dropped()
        )
        yield CounterMetricFamily(
            "gateway_log_lines_dropped",
            "Log lines dropped because stderr was not being read fast enough",
            value=m.log_lines_dropped(),
        )
        yield GaugeMetricFamily(
            "gateway_ratelimit_fallback_active",
            "1 while the shared (Redis) rate-limit store is unreachable and in-process limits apply",
            value=1 if m.fallback_active() else 0,
        )
        yield CounterMetricFamily(
            "gateway_ratelimit_fallbacks",
            "Switches from the shared (Redis) rate-limit store to in-process limits",
            value=m.fallbacks(),
        )
        components = GaugeMetricFamily(
            "gateway_component_up",
            "1 when the component was healthy at the last /health/detailed probe, 0 when not",
            labels=["component"],
        )
        for name, status in m.components().items():
            components.add_metric([name], 0 if status == "unhealthy" else 1)
        yield components
        info = GaugeMetricFamily("gateway_process_info", "The worker process that answered", labels=["pid"])
        info.add_metric([str(os.getpid())], 1)
        yield info


metrics_key = web.AppKey("metrics", Metrics)


def metrics_middleware(metrics: Metrics, *, proxy: Handler) -> Any:
    """Count and time every request in one place; just inside tracing, so it sees final statuses.

    ``proxy`` is the catch-all handler: routed requests are labelled with their route's prefix,
    the gateway's own endpoints with their path, and requests no route matched with ``unmatched``.
    """
    record = metrics.record_request

    @web.middleware
    async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
        metrics.in_flight += 1
        started = perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = status_when_cancelled(request)
            raise
        finally:
            metrics.in_flight -= 1
            route = request.get(route_key)
            record(
                route.prefix if route is not None else _own_label(request, proxy),
                request.method,
                status,
                perf_counter() - started,
            )

    return measure


def _own_label(request: web.Request, proxy: Handler) -> str:
    """The gateway's own endpoints by their path; anything no route took is ``unmatched``."""
    match_info = request.match_info
    resource = match_info.route.resource
    if match_info.handler is proxy or resource is None:
        return "unmatched"
    return resource.canonical


def route_label(request: web.Request) -> str:
    route = request.get(route_key)
    return route.prefix if route is not None else "unmatched"


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[metrics_key].render()
    # text/plain; version=0.0.4 is the format Prometheus scrapes.
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
