"""Development tokens: an HS256 secret kept in the data dir, and the ``token`` command's minting."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import jwt

from .settings import Settings, SettingsError

__all__ = ["dev_secret", "mint_token"]

DEV_SECRET_FILE = "dev-jwt-secret"


def dev_secret(data_dir: str, *, create: bool = True) -> str | None:
    """The data dir's development signing secret, created (mode 0600) on first use.

    A data dir that cannot keep it (cannot be created, is a file, is read-only) is a SettingsError
    naming ``GATEWAY_DATA_DIR``.
    """
    path = Path(data_dir) / DEV_SECRET_FILE
    try:
        try:
            return path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            if not create:
                return None
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secret + "\n")
        return secret
    except OSError as exc:
        problem = (exc.strerror or str(exc)).lower()
        raise SettingsError(
            f"GATEWAY_DATA_DIR: cannot keep the development secret in {data_dir}: {problem}"
        ) from None
    except UnicodeDecodeError:
        raise SettingsError(f"GATEWAY_DATA_DIR: {path} is not a development secret (not ASCII)") from None


def mint_token(settings: Settings, *, subject: str, scopes: list[str], ttl: int) -> str:
    secret = settings.auth.jwt_secret or dev_secret(settings.data_dir)
    now = int(time.time())
    claims: dict[str, object] = {"sub": subject, "iat": now, "nbf": now, "exp": now + ttl}
    if scopes:
        claims["scope"] = " ".join(scopes)
    if settings.auth.issuer:
        claims["iss"] = settings.auth.issuer
    if settings.auth.audience:
        claims["aud"] = settings.auth.audience
    return jwt.encode(claims, secret, algorithm="HS256")
