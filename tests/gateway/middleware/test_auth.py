from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.headers import upstream_headers
from gateway.jwks import JwksCache
from gateway.middleware.auth import AuthError, TokenVerifier
from gateway.settings import AuthSettings
from tests.helpers import wait_for

from .app import make_app

ISSUER = "https://issuer.test"
AUDIENCE = "gateway"
SECRET = "dev-secret-" + "x" * 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _jwk(private_key, kid: str) -> dict:
    public = private_key.public_key()
    algo = jwt.algorithms.RSAAlgorithm if isinstance(public, rsa.RSAPublicKey) else jwt.algorithms.ECAlgorithm
    data = algo.to_jwk(public, as_dict=True)
    data.update(kid=kid, use="sig")
    return data


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


def claims(**overrides):
    now = int(time.time())
    base = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(private_key, alg="RS256", kid="rsa-1", headers=None, **overrides) -> str:
    return jwt.encode(
        claims(**overrides), private_key, algorithm=alg, headers={"kid": kid, **(headers or {})}
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
async def issuer(aiohttp_server, keys):
    """A real JWKS endpoint on loopback, whose key set a test can change, counting fetches."""
    state = {"keys": [_jwk(keys["rsa"], "rsa-1"), _jwk(keys["ec"], "ec-1")], "hits": 0, "attacker_hits": 0}

    async def jwks(request: web.Request) -> web.Response:
        state["hits"] += 1
        await asyncio.sleep(0.05)  # slow enough for concurrent misses to overlap
        return web.json_response({"keys": state["keys"]})

    async def attacker(request: web.Request) -> web.Response:
        state["attacker_hits"] += 1
        return web.json_response({"keys": [_jwk(keys["attacker"], "evil")]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    app.router.add_get("/evil", attacker)
    server = await aiohttp_server(app)
    state["url"] = str(server.make_url("/jwks"))
    state["evil_url"] = str(server.make_url("/evil"))
    return state


def settings(issuer, **overrides) -> AuthSettings:
    values = dict(
        jwks_url=issuer["url"],
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=("RS256", "ES256", "HS256"),
        jwt_secret=SECRET,
    )
    values.update(overrides)
    return AuthSettings(**values)


@pytest.fixture
async def gateway(aiohttp_client, issuer):
    """Build a test client; returns (client, verifier, jwks, clock)."""
    made = []

    async def build(**overrides):
        clock = Clock()
        cfg = settings(issuer, **overrides)
        jwks = JwksCache(cfg.jwks_url, clock=clock, min_refetch=30, max_age=300) if cfg.jwks_url else None
        verifier = TokenVerifier(cfg, jwks=jwks)
        made.append(verifier)
        client = await aiohttp_client(make_app(auth=cfg, verifier=verifier))
        return client, verifier, jwks, clock

    yield build
    for verifier in made:
        await verifier.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def assert_invalid(response, description_part: str) -> None:
    assert response.status == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    assert description_part in challenge
    assert (await response.json())["detail"] == "Invalid token"


# -- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "alg", "kid"), [("rsa", "RS256", "rsa-1"), ("ec", "ES256", "ec-1")])
async def test_valid_token_sets_identity_and_upstream_headers(gateway, keys, key, alg, kid):
    client, *_ = await gateway()
    token = mint(keys[key], alg, kid, scope="clusters:read reports:write", scp=["extra"])
    response = await client.get("/api/required/x", headers=bearer(token))
    assert response.status == 200
    body = await response.json()
    assert body["subject"] == "alice"
    assert body["scopes"] == ["clusters:read", "extra", "reports:write"]
    assert body["upstream"] == {
        "x-auth-subject": "alice",
        "x-auth-scopes": "clusters:read extra reports:write",
    }


async def test_hs256_development_token_is_accepted(gateway):
    client, *_ = await gateway()
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert (await client.get("/api/required", headers=bearer(token))).status == 200


async def test_expiry_within_the_leeway_is_accepted(gateway, keys):
    client, *_ = await gateway()
    token = mint(keys["rsa"], exp=int(time.time()) - 10)
    assert (await client.get("/api/required", headers=bearer(token))).status == 200


# -- rejected ----------------------------------------------------------------------------------


async def test_missing_token_on_required_route_is_401_with_a_realm_challenge(gateway):
    client, *_ = await gateway()
    response = await client.get("/api/required")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
    assert response.headers["Content-Type"].startswith("application/json")
    assert (await response.json()) == {"detail": "Authentication required"}


async def test_other_scheme_counts_as_missing(gateway):
    client, *_ = await gateway()
    response = await client.get("/api/required", headers={"Authorization": "Basic YTpi"})
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'


@pytest.mark.parametrize(
    ("overrides", "description"),
    [
        ({"exp": int(time.time()) - 120}, "expired"),
        ({"nbf": int(time.time()) + 120}, "not valid yet"),
        ({"iss": "https://evil.test"}, "wrong issuer"),
        ({"aud": "someone-else"}, "audience"),
        ({"exp": None}, "'exp'"),
        ({"sub": None}, "'sub'"),
        ({"sub": "eve\r\nx-auth-subject: admin"}, "subject is malformed"),
        ({"sub": "\ud800"}, "subject is malformed"),  # a lone surrogate: no header, no Redis key
        ({"sub": "a\udce9"}, "subject is malformed"),
    ],
)
async def test_bad_claims_are_rejected(gateway, keys, overrides, description):
    client, *_ = await gateway()
    response = await client.get("/api/required", headers=bearer(mint(keys["rsa"], **overrides)))
    await assert_invalid(response, description)


async def test_exp_beyond_the_range_of_a_float_is_accepted_and_cached(gateway, keys):
    client, verifier, *_ = await gateway()
    token = mint(keys["rsa"], exp=10**400)  # valid to PyJWT, which compares it as an int
    for _ in range(2):  # verified, then from the verification cache
        response = await client.get("/api/required", headers=bearer(token))
        assert response.status == 200
    assert verifier.knows(token)


async def test_alg_none_is_rejected(gateway):
    client, *_ = await gateway()
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "algorithm")


async def test_hs256_signed_with_the_rsa_public_key_pem_is_rejected(gateway, keys):
    client, *_ = await gateway()  # HS256 is allowed and a (different) secret is configured
    pem = (
        keys["rsa"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
        + "."
        + b64(json.dumps(claims()).encode())
    )
    signature = b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    response = await client.get("/api/required", headers=bearer(f"{signing_input}.{signature}"))
    await assert_invalid(response, "signature")


async def test_hs256_is_refused_when_no_secret_is_configured(gateway):
    client, *_ = await gateway(jwt_secret=None)
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "algorithm")


async def test_algorithm_outside_the_allow_list_is_rejected(gateway, keys):
    client, *_ = await gateway(algorithms=("ES256",))
    await assert_invalid(await client.get("/api/required", headers=bearer(mint(keys["rsa"]))), "algorithm")


async def test_token_whose_alg_does_not_fit_its_key_is_rejected(gateway, keys):
    client, *_ = await gateway()
    token = mint(keys["ec"], "ES256", "rsa-1")  # an EC signature naming the RSA key
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "does not match")


async def test_unknown_kid_is_rejected(gateway, keys):
    client, *_ = await gateway()
    token = mint(keys["rsa2"], kid="nobody")
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "unknown")


async def test_tampered_payload_is_rejected(gateway, keys):
    client, *_ = await gateway()
    header, _, signature = mint(keys["rsa"]).split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    response = await client.get("/api/required", headers=bearer(f"{header}.{forged}.{signature}"))
    await assert_invalid(response, "signature")


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "ü.ü.ü"])
async def test_malformed_tokens_are_rejected(gateway, garbage):
    client, *_ = await gateway()
    response = await client.get("/api/required", headers={"Authorization": f"Bearer {garbage}"})
    assert response.status == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize("param", ["jku", "jwk", "x5u", "x5c"])
async def test_a_token_that_brings_its_own_key_is_refused(gateway, keys, issuer, param):
    client, *_ = await gateway()
    evil = _jwk(keys["attacker"], "evil")
    value = {"jku": issuer["evil_url"], "x5u": issuer["evil_url"], "jwk": evil, "x5c": ["MIIB"]}[param]
    # Signed with the real key, so only the header parameter can be what is refused.
    for token in (
        mint(keys["rsa"], headers={param: value}),
        jwt.encode(claims(), SECRET, headers={param: value}),
    ):
        response = await client.get("/api/required", headers=bearer(token))
        await assert_invalid(response, "jku, jwk, x5u or x5c header is not accepted")
    assert issuer["attacker_hits"] == 0


async def test_a_token_whose_thumbprint_names_its_key_is_accepted(gateway, keys):
    client, *_ = await gateway()
    token = mint(keys["rsa"], headers={"x5t": "dGh1bWI", "x5t#S256": "dGh1bWItMjU2"})
    assert (await client.get("/api/required", headers=bearer(token))).status == 200


async def test_two_authorization_headers_are_a_bad_request(gateway, keys):
    client, *_ = await gateway()
    headers = CIMultiDict([("Authorization", f"Bearer {mint(keys['rsa'])}"), ("Authorization", "Bearer x")])
    response = await client.get("/api/required", headers=headers)
    assert response.status == 400
    assert 'error="invalid_request"' in response.headers["WWW-Authenticate"]


# -- scopes and route modes --------------------------------------------------------------------


async def test_missing_scope_is_403_with_the_required_scopes(gateway, keys):
    client, *_ = await gateway()
    response = await client.get("/api/scoped", headers=bearer(mint(keys["rsa"], scope="clusters:read")))
    assert response.status == 403
    assert response.headers["WWW-Authenticate"] == (
        'Bearer error="insufficient_scope", error_description="The token lacks a required scope", '
        'scope="clusters:read clusters:write"'
    )
    assert (await response.json())["detail"] == "Insufficient scope"


async def test_scopes_may_come_from_scope_and_scp_together(gateway, keys):
    client, *_ = await gateway()
    token = mint(keys["rsa"], scope="clusters:read", scp=["clusters:write"])
    assert (await client.get("/api/scoped", headers=bearer(token))).status == 200


async def test_optional_route(gateway, keys):
    client, *_ = await gateway()
    anonymous = await client.get("/api/optional")
    assert anonymous.status == 200
    assert (await anonymous.json())["subject"] is None
    identified = await client.get("/api/optional", headers=bearer(mint(keys["rsa"])))
    assert (await identified.json())["subject"] == "alice"
    bad = await client.get("/api/optional", headers=bearer(mint(keys["rsa"], exp=int(time.time()) - 120)))
    await assert_invalid(bad, "expired")


async def test_none_route_ignores_any_token(gateway):
    client, *_ = await gateway()
    response = await client.get("/api/open", headers=bearer("garbage"))
    assert response.status == 200
    assert (await response.json()) == {
        "subject": None,
        "scopes": None,
        "upstream": {},
        "client_ip": "127.0.0.1",
    }


async def test_auth_disabled_passes_everything_anonymously(aiohttp_client):
    client = await aiohttp_client(make_app(auth=AuthSettings(enabled=False)))
    response = await client.get("/api/scoped", headers=bearer("garbage"))
    assert response.status == 200
    assert (await response.json())["subject"] is None


def test_client_sent_identity_headers_never_reach_upstream():
    incoming = CIMultiDictProxy(
        CIMultiDict([("X-Auth-Subject", "admin"), ("x-auth-scopes", "*"), ("Accept", "a/b")])
    )
    out = upstream_headers(incoming, remote="127.0.0.1", scheme="http", host="gw")
    assert "x-auth-subject" not in out
    assert "x-auth-scopes" not in out
    assert out["Accept"] == "a/b"


async def test_enabled_auth_without_any_key_source_refuses_every_token():
    verifier = TokenVerifier(AuthSettings(enabled=True, algorithms=("HS256", "RS256")))
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        await verifier.verify(token)
    await verifier.close()


# -- JWKS fetching, rotation, caching ----------------------------------------------------------


async def test_concurrent_cold_start_fetches_the_jwks_once(gateway, keys, issuer):
    client, *_ = await gateway()
    token = mint(keys["rsa"])
    responses = await asyncio.gather(*(client.get("/api/required", headers=bearer(token)) for _ in range(20)))
    assert [r.status for r in responses] == [200] * 20
    assert issuer["hits"] == 1


async def test_rotation_new_kid_is_accepted_after_a_refetch(gateway, keys, issuer):
    client, _, _, clock = await gateway()
    assert (await client.get("/api/required", headers=bearer(mint(keys["rsa"])))).status == 200
    issuer["keys"].append(_jwk(keys["rsa2"], "rsa-2"))
    new_token = mint(keys["rsa2"], kid="rsa-2", sub="bob")
    clock.now += 31  # the last fetch is older than the refetch interval
    response = await client.get("/api/required", headers=bearer(new_token))
    assert response.status == 200
    assert (await response.json())["subject"] == "bob"
    assert issuer["hits"] == 2


async def test_key_rotated_in_right_after_the_cold_fetch_is_accepted_at_once(gateway, keys, issuer):
    client, _, _, clock = await gateway()
    assert (await client.get("/api/required", headers=bearer(mint(keys["rsa"])))).status == 200
    issuer["keys"].append(_jwk(keys["rsa2"], "rsa-2"))
    clock.now += 1  # well within the refetch interval of the cold fetch
    response = await client.get("/api/required", headers=bearer(mint(keys["rsa2"], kid="rsa-2", sub="bob")))
    assert response.status == 200
    assert issuer["hits"] == 2
    # That refetch starts the interval: another unknown kid right after fetches nothing.
    unknown = mint(keys["attacker"], kid="k-other")
    assert (await client.get("/api/required", headers=bearer(unknown))).status == 401
    assert issuer["hits"] == 2


async def test_unknown_kid_storm_fetches_at_most_once_per_interval(gateway, keys, issuer):
    client, _, _, clock = await gateway()
    assert (await client.get("/api/required", headers=bearer(mint(keys["rsa"])))).status == 200
    clock.now += 31
    storm = [mint(keys["attacker"], kid=f"k-{uuid.uuid4()}") for _ in range(30)]
    responses = await asyncio.gather(*(client.get("/api/required", headers=bearer(t)) for t in storm))
    assert {r.status for r in responses} == {401}
    assert issuer["hits"] == 2  # the storm shared one refetch
    for token in storm[:5]:  # later misses within the interval fetch nothing
        assert (await client.get("/api/required", headers=bearer(token))).status == 401
    assert issuer["hits"] == 2
    clock.now += 31
    assert (await client.get("/api/required", headers=bearer(storm[0]))).status == 401
    assert issuer["hits"] == 3


async def test_issuer_down_keeps_the_last_good_keys(gateway, keys, issuer):
    client, _, jwks, clock = await gateway()
    assert (await client.get("/api/required", headers=bearer(mint(keys["rsa"])))).status == 200
    jwks.url = issuer["url"].replace("/jwks", "/missing")  # 404 from now on
    clock.now += 301
    for sub in ("a", "b"):  # stale keys still serve while the refresh fails
        assert (await client.get("/api/required", headers=bearer(mint(keys["rsa"], sub=sub)))).status == 200
    assert jwks.has("rsa-1")


async def test_removed_key_stops_being_accepted_even_for_cached_tokens(gateway, keys, issuer):
    client, _, jwks, clock = await gateway()
    token = mint(keys["rsa"])
    assert (await client.get("/api/required", headers=bearer(token))).status == 200
    issuer["keys"] = [_jwk(keys["rsa2"], "rsa-2")]  # rsa-1 revoked
    clock.now += 301  # the key set is now stale
    # Served from the verification cache while a background refresh starts...
    assert (await client.get("/api/required", headers=bearer(token))).status == 200
    deadline = time.monotonic() + 3
    while jwks.has("rsa-1"):
        assert time.monotonic() < deadline, "the JWKS was not refreshed"
        await asyncio.sleep(0.01)
    # ...and rejected as soon as the refreshed set no longer has its key.
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "unknown")


async def test_cached_token_is_not_accepted_after_its_exp(issuer, keys):
    verifier = TokenVerifier(settings(issuer), leeway=0)
    try:
        # At least one whole second of validity left (exp has whole-second resolution).
        token = mint(keys["rsa"], exp=int(time.time()) + 2)
        assert (await verifier.verify(token)).subject == "alice"
        deadline = time.monotonic() + 5
        while True:
            try:
                await verifier.verify(token)
            except AuthError as exc:
                assert "expired" in exc.description
                break
            assert time.monotonic() < deadline, "an expired token was still accepted"
            await asyncio.sleep(0.05)
    finally:
        await verifier.close()


async def test_verification_cache_skips_the_signature_check(issuer, keys, monkeypatch):
    verifier = TokenVerifier(settings(issuer))
    try:
        token = mint(keys["rsa"])
        await verifier.verify(token)
        calls = []
        monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(a))
        assert (await verifier.verify(token)).subject == "alice"
        assert calls == []
    finally:
        await verifier.close()


async def test_the_verification_cache_keeps_the_most_recently_used_tokens_and_no_more(issuer, keys):
    # Every distinct valid token a client presents is an entry: the bound is what keeps a flood
    # of freshly minted tokens from growing the gateway's memory.
    verifier = TokenVerifier(settings(issuer), cache_size=3)
    try:
        tokens = [mint(keys["rsa"], jti=str(n)) for n in range(5)]
        for token in tokens:
            await verifier.verify(token)
        assert [verifier.knows(token) for token in tokens] == [False, False, True, True, True]
        await verifier.verify(tokens[2])  # used again: now the most recent
        await verifier.verify(mint(keys["rsa"], jti="5"))
        assert [verifier.knows(token) for token in tokens[2:]] == [True, False, True]
    finally:
        await verifier.close()


# -- tokens without a kid --------------------------------------------------------------------------


def mint_kidless(private_key, alg="RS256", **overrides) -> str:
    return jwt.encode(claims(**overrides), private_key, algorithm=alg)


async def test_a_token_without_kid_is_accepted_among_several_keys_without_a_refetch(gateway, keys, issuer):
    """Every key that fits its alg is tried (Envoy's jwt_authn): the token names none, so no key
    is missing and the issuer is not asked again."""
    issuer["keys"].append(_jwk(keys["rsa2"], "rsa-2"))
    client, *_ = await gateway()

    for key, sub in ((keys["rsa2"], "bob"), (keys["rsa"], "alice"), (keys["ec"], "carol")):
        alg = "ES256" if key is keys["ec"] else "RS256"
        response = await client.get("/api/required", headers=bearer(mint_kidless(key, alg, sub=sub)))
        assert response.status == 200
        assert (await response.json())["subject"] == sub
    assert issuer["hits"] == 1


async def test_a_token_without_kid_for_an_alg_no_key_has_refetches_as_an_unknown_kid(gateway, keys, issuer):
    issuer["keys"] = [_jwk(keys["rsa"], "rsa-1"), _jwk(keys["rsa2"], "rsa-2")]
    client, _, _, clock = await gateway()
    assert (await client.get("/api/required", headers=bearer(mint(keys["rsa"])))).status == 200
    issuer["keys"].append(_jwk(keys["ec"], "ec-1"))  # an EC key published, signing at once
    clock.now += 1

    response = await client.get("/api/required", headers=bearer(mint_kidless(keys["ec"], "ES256")))

    assert response.status == 200
    assert issuer["hits"] == 2


async def test_a_cached_token_without_kid_goes_with_the_key_that_verified_it(gateway, keys, issuer):
    """Not the first key that fits its alg: removing that one leaves the token accepted."""
    issuer["keys"].append(_jwk(keys["rsa2"], "rsa-2"))
    client, _, jwks, clock = await gateway()
    token = mint_kidless(keys["rsa2"])
    assert (await client.get("/api/required", headers=bearer(token))).status == 200

    issuer["keys"] = [_jwk(keys["rsa2"], "rsa-2")]  # rsa-1 removed, the token's key kept
    clock.now += 301
    assert (await client.get("/api/required", headers=bearer(token))).status == 200
    await wait_for(lambda: not jwks.has("rsa-1"), what="the JWKS refresh")
    assert (await client.get("/api/required", headers=bearer(token))).status == 200

    issuer["keys"] = [_jwk(keys["rsa"], "rsa-1")]  # and now the token's key removed
    clock.now += 301
    assert (await client.get("/api/required", headers=bearer(token))).status == 200  # starts the refresh
    await wait_for(lambda: not jwks.has("rsa-2"), what="the JWKS refresh")
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "signature is invalid")


async def test_claims_of_a_token_without_kid_are_judged_once_a_key_verified_it(gateway, keys, issuer):
    """An expired token signed by the second key says it expired: the first key's bad signature
    is no verdict on the token."""
    issuer["keys"].append(_jwk(keys["rsa2"], "rsa-2"))
    client, *_ = await gateway()
    token = mint_kidless(keys["rsa2"], exp=int(time.time()) - 600)
    await assert_invalid(await client.get("/api/required", headers=bearer(token)), "expired")
