"""The platform's API gateway: a streaming reverse proxy on aiohttp."""

__version__ = "0.1.0"
