"""OAuth 2.0 bearer tokens (RFC 6750): JWTs verified against the issuer's JWKS or a dev secret.

Which key verifies a token is decided by the key, never by the token alone:

- ``HS*`` tokens verify only against ``AUTH_JWT_SECRET``; an HMAC secret never comes from the
  JWKS, so a token "signed" with an RSA public key's PEM can find nothing to verify against.
- every other ``alg`` verifies only against a JWKS key whose type fits it (RSA: RS*/PS*, EC:
  ES* on its curve, OKP: EdDSA), and against the key's own ``alg`` when it declares one.
- ``alg`` must be in ``AUTH_ALGORITHMS``; ``none`` never is. Keys come from ``AUTH_JWKS_URL``
  and ``AUTH_JWT_SECRET`` only, so a token carrying ``jku``, ``jwk``, ``x5u`` or ``x5c`` (a key,
  or where to fetch one) is refused; ``kid``, ``x5t`` and ``x5t#S256`` only name a key and pass.
  A token without ``kid`` is matched to the JWK with its ``x5t#S256`` or ``x5t``; one that
  names no key that way either is checked against each JWK that fits its ``alg``, the first
  ``MAX_KEYS_PER_TOKEN`` in the JWKS's order, as Envoy's ``jwt_authn`` tries every key. Of JWKs
  that share a ``kid`` (RFC 7517 section 4.5), those that fit the token's ``alg`` are used.
- ``exp`` and ``sub`` are required; ``exp``/``nbf``/``iat`` get ``LEEWAY`` seconds of clock skew;
  ``iss`` and ``aud`` are checked when configured.

Verified tokens are cached by their raw text (LRU, ``CACHE_SIZE`` entries) until their ``exp``.
A cached token is accepted only while its ``kid`` is still in the current JWKS, so a key removed
from the JWKS stops being accepted at the JWKS refresh (``JwksCache.max_age``), cached or not.

Route modes: ``required`` (no token: 401 ``WWW-Authenticate: Bearer realm="gateway"``),
``optional`` (no token: anonymous; a bad token is still a 401), ``none`` (the Authorization
header is not looked at). ``scopes`` must all be granted (``scope``: space-separated, ``scp``:
list or string); on ``optional`` routes they are checked whenever a token is presented.

Where the token comes from: the ``Authorization: Bearer`` header, or, on GET and HEAD only, the
``access_token`` query parameter (RFC 6750 section 2.3). A browser's ``WebSocket`` and
``EventSource`` cannot send a header, so without it the realtime routes could not be used from
a page; Envoy's ``jwt_authn`` reads the same parameter by default, Kong's ``jwt`` plugin one
named ``jwt``. Only the literal name counts, once; with a header as well it is a 400 (the RFC:
one method per request). The proxy takes the parameter out of the query it forwards, so the
token does not reach the backend's URL logs; the access log and spans never carry a query.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler

from ..claims import is_scope_token, subject_problem
from ..errors import ApiError
from ..jwks import MAX_KEYS_PER_TOKEN, THUMBPRINT_PARAMS, JwksCache, JwksUnavailable, fits
from ..keys import auth_key, query_token_key, route_key
from ..settings import AuthSettings, Route

__all__ = [
    "AuthError",
    "Identity",
    "TokenVerifier",
    "auth_middleware",
    "identity_headers",
    "presented_token",
    "without_query_token",
]

log = logging.getLogger("gateway.auth")

QUERY_TOKEN = "access_token"
LEEWAY = 30.0
CACHE_SIZE = 10_000
SUBJECT_HEADER = "x-auth-subject"
SCOPES_HEADER = "x-auth-scopes"
REALM = "gateway"

_HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
# RFC 7515 section 4.1.2-4.1.6: the token brings its own key. It was made for a verifier that
# takes keys from tokens, or made to find one; this one never looks at them.
_KEY_SOURCE_PARAMS = frozenset({"jku", "jwk", "x5u", "x5c"})
# PyJWT compares ``exp`` as an int, so one beyond float's range is valid (and never comes).
_NEVER = sys.float_info.max
# A JWS in compact serialization (RFC 7515 section 7.1): three base64url segments, padding
# tolerated as PyJWT tolerates it. Checked before PyJWT sees the token: aiohttp hands header bytes
# that are not UTF-8 over as surrogate escapes, which PyJWT cannot even encode.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]*\.[A-Za-z0-9_=-]*")


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    scopes: frozenset[str]
    claims: Mapping[str, Any] = field(repr=False, compare=False)


class AuthError(Exception):
    """A token was rejected; ``description`` is safe to show to the client."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


@dataclass(slots=True)
class _Cached:
    identity: Identity
    expires: float  # the token's exp, wall clock
    kid: str | None  # JWKS key it verified with; None for the HMAC secret


class TokenVerifier:
    """Verify raw bearer tokens into an Identity, or raise AuthError (the token is refused) or
    JwksUnavailable (it cannot be judged: no JWKS key set could be loaded yet)."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        jwks: JwksCache | None = None,
        leeway: float = LEEWAY,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        algorithms = frozenset(settings.algorithms) - {"none"}
        if not algorithms:
            raise ValueError("AUTH_ALGORITHMS: no signing algorithm allowed")
        if jwks is None and settings.jwks_url:
            jwks = JwksCache(settings.jwks_url)
        # Enabled with no key source at all is allowed (and warned about at start): every token
        # is then refused, which is the safe reading of that configuration.
        self._algorithms = algorithms
        self._secret = settings.jwt_secret
        self._jwks = jwks
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._leeway = leeway
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock
        self._options: Any = {
            "require": ["exp", "sub"],
            "verify_iss": bool(self._issuer),
            # Without AUTH_AUDIENCE a token's aud is not ours to judge (PyJWT would reject it).
            "verify_aud": bool(self._audience),
        }

    async def verify(self, token: str) -> Identity:
        cached = self._cache.get(token)
        if cached is not None:
            if self._jwks is not None:
                self._jwks.touch()
            if cached.expires > self._clock() and (cached.kid is None or self._jwks_has(cached.kid)):
                self._cache.move_to_end(token)
                return cached.identity
            del self._cache[token]

        if not _COMPACT_JWS.fullmatch(token):
            raise AuthError("The token is malformed")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("The token is malformed") from None
        except jwt.PyJWTError:
            # Readable but refused before any key is looked at: a ``kid`` that is no string, a
            # ``crit`` naming an extension PyJWT does not implement. PyJWT's own message would
            # quote the token into our WWW-Authenticate header.
            raise AuthError("The token's header is invalid") from None
        except (ValueError, TypeError):  # not raised for a compact JWS today; a 500 if ever it is
            raise AuthError("The token is malformed") from None
        if not _KEY_SOURCE_PARAMS.isdisjoint(header):
            raise AuthError("The token's jku, jwk, x5u or x5c header is not accepted")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthError("The token's signing algorithm is not accepted")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("The token's key id is malformed")
        thumbprints = {param: header[param] for param in THUMBPRINT_PARAMS if param in header}
        if not all(isinstance(value, str) for value in thumbprints.values()):
            raise AuthError("The token's key id is malformed")

        keys: tuple[Any, ...]
        if alg in _HMAC_ALGS:
            if not self._secret:
                raise AuthError("The token's signing algorithm is not accepted")
            keys = (self._secret,)
        else:
            if self._jwks is None:
                raise AuthError("The token's signing algorithm is not accepted")
            named = await self._jwks.candidates(kid, thumbprints, alg)
            if not named:
                raise AuthError("The token's signing key is unknown")
            keys = tuple(key for key in named if fits(key, alg))[:MAX_KEYS_PER_TOKEN]
            if not keys:
                raise AuthError("The token's signing algorithm does not match its key")

        # More than one key for a token that names none while several fit its alg (or for keys
        # that share its kid): the first whose signature verifies is the token's, as in Envoy.
        for tried, key in enumerate(keys, 1):
            try:
                claims = self._decode(token, key, alg)
                break
            except jwt.InvalidSignatureError:
                if tried == len(keys):
                    raise AuthError("The token's signature is invalid") from None
        if alg in _HMAC_ALGS or self._jwks is None:
            used_kid = None
        else:
            used_kid = kid if kid is not None else _kid_of(self._jwks, key)

        identity = _identity(claims)
        exp = claims["exp"]
        if isinstance(exp, int | float):
            self._cache[token] = _Cached(identity, float(min(exp, _NEVER)), used_kid)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        """The token's claims as ``key`` verifies them, or AuthError; a signature ``key`` did not
        make is left a ``jwt.InvalidSignatureError`` for the caller, which may have another key."""
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("The token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("The token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise AuthError("The token is not meant for this audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("The token has the wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"The token has no '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("The token is invalid") from None

    def knows(self, token: str) -> bool:
        """Whether ``token`` was verified before and still holds: a dict lookup, no crypto."""
        cached = self._cache.get(token)
        return (
            cached is not None
            and cached.expires > self._clock()
            and (cached.kid is None or self._jwks_has(cached.kid))
        )

    @property
    def jwks(self) -> JwksCache | None:
        return self._jwks

    def _jwks_has(self, kid: str) -> bool:
        return self._jwks is not None and self._jwks.has(kid)

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()


def _kid_of(jwks: JwksCache, key: jwt.PyJWK) -> str | None:
    for kid, candidates in jwks.keys.items():
        if any(candidate is key for candidate in candidates):
            return kid
    return None


def _identity(claims: Mapping[str, Any]) -> Identity:
    subject = claims.get("sub")
    if subject_problem(subject) is not None:
        raise AuthError("The token's subject is malformed")
    scopes: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        scopes.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        scopes.update(scp.split())
    elif isinstance(scp, list):
        scopes.update(s for s in scp if isinstance(s, str))
    # Anything in a scope claim that is not a scope-token is not a grant.
    return Identity(subject, frozenset(s for s in scopes if is_scope_token(s)), claims)


def _challenge(error: str | None = None, description: str | None = None, scope: str | None = None) -> str:
    if error is None:
        # RFC 6750 section 3: the scheme "MUST be followed by one or more auth-param values", and
        # a request that sent no token gets no error attribute; realm is the one left to send.
        return f'Bearer realm="{REALM}"'
    parts = [f'error="{error}"']
    if description:
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


def _missing() -> ApiError:
    # A new error each time: layers on the way out add their own headers to it.
    return ApiError(
        401, "Authentication required", headers={"WWW-Authenticate": _challenge()}, reason="missing"
    )


def auth_middleware(settings: AuthSettings, *, verifier: TokenVerifier | None = None) -> Any:
    """Authenticate routed requests per their route's ``auth`` and ``scopes``.

    Sets ``request[auth_key]`` to the Identity when a token was verified. With
    ``settings.enabled`` false every request passes anonymously. The verifier owns an HTTP
    session for the JWKS: close it on cleanup (``app.on_cleanup``) with ``verifier.close()``.
    """
    if not settings.enabled:

        @web.middleware
        def auth_disabled(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
            return handler(request)

        return auth_disabled

    verifier = TokenVerifier(settings) if verifier is None else verifier
    verify = verifier.verify

    @web.middleware
    def auth(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        route = request.get(route_key)
        if route is None or route.auth == "none":
            return handler(request)  # nothing to verify: no frame of ours stays on the stack
        return authenticated(request, handler, route)

    async def authenticated(request: web.Request, handler: Handler, route: Route) -> web.StreamResponse:
        values = request.headers.getall("Authorization", ())
        if len(values) > 1:
            raise _invalid_request(
                "Only one Authorization header is allowed", "Only one Authorization header"
            )
        in_query = _query_tokens(request)
        if in_query:
            if len(in_query) > 1:
                raise _invalid_request("Only one access_token parameter is allowed", "Only one access_token")
            if values:
                raise _invalid_request(
                    "Send the token in the Authorization header or the access_token parameter, not both",
                    "More than one way of sending the token",
                )
            token = in_query[0]
            request[query_token_key] = True
        else:
            scheme, _, token = values[0].strip().partition(" ") if values else ("", "", "")
            if scheme.lower() != "bearer":
                if route.auth == "optional" and not values:
                    return await handler(request)
                raise _missing()
            token = token.strip()
        try:
            identity = await verify(token)
        except AuthError as exc:
            raise ApiError(
                401,
                "Invalid token",
                headers={"WWW-Authenticate": _challenge("invalid_token", exc.description)},
                reason="invalid",
            ) from None
        except JwksUnavailable as exc:
            # Not a 401: the token may be good, and a 401 tells every client to throw it away
            # and log in again, all at once at an issuer that is likely in trouble already.
            raise ApiError(
                503,
                "The token cannot be verified now: the issuer's signing keys are unavailable",
                headers={"Retry-After": str(exc.retry_after)},
                reason="jwks_unavailable",
            ) from None
        if route.scopes and not identity.scopes.issuperset(route.scopes):
            needed = " ".join(route.scopes)
            raise ApiError(
                403,
                "Insufficient scope",
                headers={
                    "WWW-Authenticate": _challenge(
                        "insufficient_scope", "The token lacks a required scope", needed
                    )
                },
                reason="insufficient_scope",
            )
        request[auth_key] = identity
        return await handler(request)

    return auth


def _query_tokens(request: web.Request) -> list[str]:
    # A substring test first: most requests have no such parameter, and this runs for each.
    if QUERY_TOKEN not in request.raw_path or request.method not in ("GET", "HEAD"):
        return []
    pairs = (part.partition("=") for part in request.raw_path.partition("?")[2].split("&"))
    return [unquote(value) for name, _, value in pairs if name == QUERY_TOKEN]


def presented_token(request: web.Request) -> str:
    """The bearer token ``request`` presents, from the header or the query ("" when none)."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    in_query = _query_tokens(request)
    return in_query[0] if len(in_query) == 1 else ""


def without_query_token(path: str) -> str:
    """``path`` (with its query) without the ``access_token`` parameter, the rest byte for byte."""
    base, _, query = path.partition("?")
    kept = "&".join(part for part in query.split("&") if part.partition("=")[0] != QUERY_TOKEN)
    return f"{base}?{kept}" if kept else base


def _invalid_request(detail: str, description: str) -> ApiError:
    return ApiError(
        400,
        detail,
        headers={"WWW-Authenticate": _challenge("invalid_request", description)},
        reason="invalid",
    )


def identity_headers(request: web.Request) -> dict[str, str]:
    """Headers the proxy adds upstream for an authenticated request (empty when anonymous).

    Client-sent copies of these are already removed by ``gateway.headers.upstream_headers``.
    """
    identity = request.get(auth_key)
    if identity is None:
        return {}
    return {SUBJECT_HEADER: identity.subject, SCOPES_HEADER: " ".join(sorted(identity.scopes))}
