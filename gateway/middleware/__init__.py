"""The gateway's middlewares; ``gateway.app`` composes them in order."""

from .tracing import inject_trace_headers, tracing_middleware

__all__ = ["inject_trace_headers", "tracing_middleware"]
