"""The subject and scope rules shared by the auth middleware, the config file and ``token``."""

from __future__ import annotations

import time

import jwt
import pytest

from gateway.claims import MAX_SUBJECT, is_scope_token, subject_problem
from gateway.middleware.auth import AuthError, TokenVerifier
from gateway.settings import AuthSettings

SECRET = "a-development-secret-of-at-least-32-bytes"


@pytest.mark.parametrize(
    "subject",
    [
        "alice",
        "user@example.com",
        "auth0|5f7c8ec7c33c6c004bbafe82",
        "J\u00fcrgen M\u00fcller",
        "x" * MAX_SUBJECT,
    ],
)
def test_subjects_that_identify_a_caller(subject: str) -> None:
    assert subject_problem(subject) is None


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        ("", "empty"),
        (None, "empty"),
        (42, "empty"),
        ("x" * (MAX_SUBJECT + 1), "longer than 256"),
        ("eve\r\nx-auth-subject: admin", "control character"),
        ("a\x7fb", "control character"),
        ("\ud800", "lone surrogate"),
        ("alice\udcff", "lone surrogate"),
        ("   ", "white space"),
        (" alice", "white space"),
        ("alice ", "white space"),
        ("alice\u00a0", "white space"),
    ],
)
def test_subjects_that_cannot(subject: object, problem: str) -> None:
    assert problem in (subject_problem(subject) or "")


@pytest.mark.parametrize(
    ("scope", "ok"),
    [("clusters:write", True), ("https://api.example.com/read", True), ("a b", False), ('say"hi', False),
     ("back\\slash", False), ("\u00e9crire", False), ("", False)],
)  # fmt: skip
def test_scope_tokens_are_rfc_6749s(scope: str, ok: bool) -> None:
    assert is_scope_token(scope) is ok


@pytest.mark.parametrize("subject", [" alice", "alice ", "   "])
async def test_the_gateway_refuses_a_subject_with_white_space_at_either_end(subject: str) -> None:
    # HTTP strips it from the x-auth-subject header: " alice" would reach the backend as "alice".
    verifier = TokenVerifier(AuthSettings(jwt_secret=SECRET, algorithms=("HS256",)))
    token = jwt.encode({"sub": subject, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")

    with pytest.raises(AuthError, match="subject is malformed"):
        await verifier.verify(token)
