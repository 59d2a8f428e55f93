"""Redis refusing the user in ``REDIS_URL``, told apart from Redis being away.

A Redis that is down, restarting or slow comes back by itself: the rate limits and the chat cache
fall back, say so once, and try again. A Redis that answers but refuses the user (a wrong
password, a disabled or unknown user, a command or key its ACL does not grant) refuses it until
someone changes ``REDIS_URL`` or the ACL. Both callers log that at ERROR, with what to change,
rather than as an outage.
"""

from __future__ import annotations

from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

__all__ = ["SCRIPT_REFUSALS", "describe", "is_login_refusal", "refusal_fix", "user_of"]

# What Redis answers when the user's ACL refuses a command or key inside a script: 7.0's words,
# then 7.2's and Valkey's. Outside a script a refusal is a NOPERM reply (NoPermissionError).
SCRIPT_REFUSALS = ("The user executing the script can't", "ACL failure in script")

LOGIN_FIX = "check the user and password in REDIS_URL (no restart needed once Redis accepts them)"


def is_login_refusal(exc: BaseException) -> bool:
    """WRONGPASS (a wrong password, or a user that is unknown or disabled), NOAUTH (Redis wants a
    password the URL does not give) or AUTH sent to a Redis without one: redis-py raises all three
    as ``AuthenticationError``."""
    return isinstance(exc, AuthenticationError)


def refusal_fix(exc: BaseException, user: str) -> str | None:
    """What the operator has to change when ``exc`` is Redis refusing ``user``; ``None`` when it
    is anything else (down, slow, a connection reset), which passes by itself."""
    if is_login_refusal(exc):
        return LOGIN_FIX
    if isinstance(exc, NoPermissionError) or (
        isinstance(exc, ResponseError) and str(exc).startswith(SCRIPT_REFUSALS)
    ):
        return f"ACL SETUSER {user} with the commands and keys docs/operations.md lists"
    return None


def user_of(client: object) -> str:
    """The user a redis-py client logs in as: the URL's, or the one Redis calls a user-less
    connection's, "default"."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {})
    return kwargs.get("username") or "default"


def describe(exc: BaseException) -> str:
    """What failed, readably: redis-py's repr is "server:ResponseError", without the reason. Its
    texts hold no password: a connection error names the host and port, not the URL."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
