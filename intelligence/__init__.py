"""The intelligence engine's chat API: sessions and messages, PostgreSQL as truth."""

__version__ = "0.1.0"
