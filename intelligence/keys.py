"""Typed keys for what the chat app keeps on the application, gathered in one place."""

from __future__ import annotations

import aiopg
from aiohttp import web

from .cache import ChatCache
from .persistence import ChatPersistenceService
from .settings import IntelligenceSettings

__all__ = ["cache_key", "pool_key", "service_key", "settings_key"]

settings_key = web.AppKey("intelligence_settings", IntelligenceSettings)
pool_key = web.AppKey("postgres_pool", aiopg.Pool)
cache_key = web.AppKey("chat_cache", ChatCache)
service_key = web.AppKey("chat_service", ChatPersistenceService)
