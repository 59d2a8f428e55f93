"""What a token's subject and scopes may be.

One rule for the three places that meet them: the auth middleware (a token's ``sub``, ``scope``
and ``scp``), the config file (a route's ``scopes``) and ``python -m gateway token``. A scope a
route requires that no token can carry, or a token minted with a subject the gateway refuses,
would otherwise only show as 401s and 403s.
"""

from __future__ import annotations

import re

__all__ = ["MAX_SUBJECT", "is_scope_token", "subject_problem"]

# RFC 6749 section 3.3 scope-token: printable ASCII except space, '"' and '\'. Scopes are
# space-separated in a token, so "a b" is two scopes, never one.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A JSON escape such as "\ud800" (or argv bytes that are not UTF-8) make a lone surrogate, which
# UTF-8 cannot encode: the header to the backend and the rate-limit key could not be written.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_SUBJECT = 256


def is_scope_token(scope: str) -> bool:
    return _SCOPE_TOKEN.fullmatch(scope) is not None


def subject_problem(subject: object) -> str | None:
    """Why ``subject`` cannot identify a caller, or None when it can.

    The subject travels upstream in the ``x-auth-subject`` header: printable, bounded, and without
    white space at either end, which HTTP strips from a field value (the chat API strips it too):
    " alice" would arrive as "alice", another caller's identity, and "   " as no subject at all.
    """
    if not isinstance(subject, str) or not subject:
        return "the subject is empty"
    if len(subject) > MAX_SUBJECT:
        return f"the subject is longer than {MAX_SUBJECT} characters"
    if _CONTROL.search(subject):
        return "the subject has a control character"
    if _SURROGATE.search(subject):
        return "the subject is not valid Unicode (a lone surrogate)"
    if subject != subject.strip():
        return "the subject starts or ends with white space"
    return None
