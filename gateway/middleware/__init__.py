"""The gateway's middlewares; ``gateway.app`` composes them in order."""

from .request_id import request_id_middleware

__all__ = ["request_id_middleware"]
