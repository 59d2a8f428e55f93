"""The gateway's middlewares; ``gateway.app`` composes them in order.

Middlewares that only look at a request before passing it on (routing, CORS, body checks, auth
when there is nothing to verify, the rate limits with the in-process limiter, schema checks on a
route without a schema) are plain functions that *return* ``handler(request)`` instead of
awaiting it: aiohttp awaits whatever a middleware returns, so such a layer leaves no frame on the
stack. Every frame that stays is crossed twice each time the request waits on a socket, and on a
proxied call that waiting is most of its life. Layers with work after the handler (tracing,
metrics, errors) stay coroutines.
"""

from .tracing import inject_trace_headers, tracing_middleware

__all__ = ["inject_trace_headers", "tracing_middleware"]
