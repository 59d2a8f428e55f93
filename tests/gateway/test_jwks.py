"""The JWKS cache when the issuer fails: every issuer here is a real server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.jwks import FETCH_ERROR_KINDS, MAX_JWKS_BYTES, JwksCache, JwksError, JwksUnavailable, parse_jwks
from tests.helpers import fuzz_examples, wait_for

KEY = ec.generate_private_key(ec.SECP256R1())
JWK = {**jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1", "use": "sig"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Issuer:
    """A JWKS endpoint that fails with ``status`` until told to serve, and can hold answers back."""

    def __init__(self) -> None:
        self.status = 503
        self.document: dict[str, Any] = {"keys": [JWK]}
        self.hits = 0
        self.release = asyncio.Event()
        self.release.set()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await self.release.wait()
        return web.json_response(self.document, status=self.status)


@pytest.fixture
async def issuer(aiohttp_server: Any) -> Issuer:
    state = Issuer()
    app = web.Application()
    app.router.add_get("/jwks", state.handle)
    state.url = str((await aiohttp_server(app)).make_url("/jwks"))
    return state


@pytest.fixture
async def make_cache() -> AsyncIterator[Any]:
    made: list[JwksCache] = []

    def make(url: str, **kwargs: Any) -> JwksCache:
        made.append(JwksCache(url, **kwargs))
        return made[-1]

    yield make
    for cache in made:
        await cache.close()


async def test_a_failed_cold_fetch_is_remembered_for_failure_ttl(issuer, make_cache):
    clock = Clock()
    jwks = make_cache(issuer.url, clock=clock, failure_ttl=5)

    with pytest.raises(JwksUnavailable) as first:
        await jwks.get("k1")
    assert first.value.retry_after == 5
    clock.now += 2
    for _ in range(10):
        with pytest.raises(JwksUnavailable) as later:
            await jwks.get("k1")
        assert later.value.retry_after == 3
    assert issuer.hits == 1  # none of the later lookups asked the issuer again


async def test_after_failure_ttl_the_retry_runs_behind_the_requests(issuer, make_cache):
    clock = Clock()
    jwks = make_cache(issuer.url, clock=clock, failure_ttl=5)
    with pytest.raises(JwksUnavailable):
        await jwks.get("k1")

    issuer.status = 200
    issuer.release.clear()  # the issuer is back, but slow to answer
    clock.now += 5
    with pytest.raises(JwksUnavailable) as retrying:
        await jwks.get("k1")  # starts the retry and returns at once: it cannot wait for a held answer
    assert retrying.value.retry_after == 1
    await wait_for(lambda: issuer.hits == 2, what="the retry to reach the issuer")
    with pytest.raises(JwksUnavailable):
        await jwks.get("k1")  # the retry is still under way: no second one, no waiting
    assert issuer.hits == 2

    issuer.release.set()
    await wait_for(lambda: jwks.has("k1"), what="the retry to load the keys")
    assert await jwks.get("k1") is not None


async def test_a_never_answering_issuer_costs_only_the_first_lookups_the_timeout(
    make_raw_upstream, make_cache
):
    connections = 0

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read()  # until the client gives up

    url = await make_raw_upstream(never_answers) + "/jwks"
    jwks = make_cache(url, timeout=0.5)

    started = time.monotonic()
    first = await asyncio.gather(*(jwks.get("k1") for _ in range(5)), return_exceptions=True)
    waited = time.monotonic() - started
    assert all(isinstance(outcome, JwksUnavailable) for outcome in first)
    assert 0.4 < waited < 2.5  # the fetch timeout, shared by all five
    assert connections == 1

    started = time.monotonic()
    for _ in range(5):
        with pytest.raises(JwksUnavailable):
            await jwks.get("k1")
    assert time.monotonic() - started < 0.4  # remembered: no lookup waits again
    assert connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",  # not HTTP at all
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",  # not JSON
        b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"keys": 1}\n',  # not a JWKS
        b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["not-http", "not-json", "not-a-jwks", "nested-too-deep"],
)
async def test_an_issuer_answering_nonsense_is_unavailable(make_raw_upstream, make_cache, answer):
    async def nonsense(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    jwks = make_cache(await make_raw_upstream(nonsense) + "/jwks")

    with pytest.raises(JwksUnavailable):
        await jwks.get("k1")


async def _answering(answer: bytes | None) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await reader.read()  # never answers: until the client gives up
        else:
            writer.write(answer)
            await writer.drain()

    return serve


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (None, "timeout"),
        (b"", "reset"),  # closes without an answer
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{", "reset"),  # cut off
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "status"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "invalid"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "invalid"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{"keys": 1}\n', "invalid"),
    ],
    ids=["timeout", "closed", "cut-off", "404", "not-http", "not-json", "not-a-jwks"],
)
async def test_each_failed_fetch_is_counted_by_kind(make_raw_upstream, make_cache, answer, kind):
    jwks = make_cache(await make_raw_upstream(await _answering(answer)) + "/jwks", timeout=0.3)
    assert jwks.fetch_errors == dict.fromkeys(FETCH_ERROR_KINDS, 0)
    for _ in range(3):  # one fetch: the failure is remembered
        with pytest.raises(JwksUnavailable):
            await jwks.get("k1")
    assert jwks.fetch_errors == {k: (1 if k == kind else 0) for k in FETCH_ERROR_KINDS}


async def test_a_refused_fetch_is_a_connect_error(make_cache, refused_url):
    jwks = make_cache(refused_url + "/jwks")
    with pytest.raises(JwksUnavailable):
        await jwks.get("k1")
    assert jwks.fetch_errors["connect"] == 1


@pytest.mark.parametrize(("padding", "loaded"), [(MAX_JWKS_BYTES - 1000, True), (MAX_JWKS_BYTES, False)])
async def test_a_jwks_is_read_up_to_max_jwks_bytes(make_cache, aiohttp_server, padding, loaded):
    document = {"keys": [JWK], "padding": "a" * padding}

    async def large(request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/jwks", large)
    jwks = make_cache(str((await aiohttp_server(app)).make_url("/jwks")))

    if loaded:
        assert await jwks.get("k1") is not None
    else:
        with pytest.raises(JwksUnavailable):
            await jwks.get("k1")
        assert jwks.fetch_errors["invalid"] == 1


async def test_an_endless_jwks_is_cut_off_at_the_limit_not_read_until_the_timeout(
    make_raw_upstream, make_cache
):
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"keys": [], "padding": "')
        while True:  # until the client hangs up
            writer.write(b"a" * 65536)
            await writer.drain()
            sent += 65536

    jwks = make_cache(await make_raw_upstream(endless) + "/jwks", timeout=2)

    started = time.monotonic()
    with pytest.raises(JwksUnavailable):
        await jwks.get("k1")
    assert time.monotonic() - started < 1.5
    assert jwks.fetch_errors["invalid"] == 1
    assert sent < 16 * MAX_JWKS_BYTES  # what the socket buffers held, not everything until the timeout


async def test_an_unknown_kid_while_the_issuer_is_down_is_unknown(issuer, make_cache):
    issuer.status = 200
    jwks = make_cache(issuer.url)
    assert await jwks.get("k1") is not None

    issuer.status = 500
    assert await jwks.get("k2") is None  # the refetch failed: the kid is unknown, not an error
    assert issuer.hits == 2
    assert await jwks.get("k1") is not None  # the last good set stays in use


FIELD = st.sampled_from(["kty", "crv", "x", "y", "n", "e", "alg", "use", "kid", "d"]) | st.text(max_size=3)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["RSA", "EC", "OKP", "oct", "sig", "enc", "P-256", "Ed25519", "ES256", "AQAB"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELD, inner, max_size=6),
    max_leaves=12,
)  # fmt: skip
KEYS = st.fixed_dictionaries(
    {"kty": st.sampled_from(["RSA", "EC", "OKP"]) | JSON},
    optional={name: JSON for name in ["crv", "x", "y", "n", "e", "alg", "use", "kid", "d"]},
)


@settings(max_examples=fuzz_examples(100), deadline=None, database=None)
@given(document=JSON | st.fixed_dictionaries({"keys": st.lists(KEYS | JSON, max_size=3)}))
def test_a_jwks_document_of_any_shape_gives_keys_or_a_jwks_error(document: Any) -> None:
    try:
        keys = parse_jwks(document)
    except JwksError:
        return
    assert all(isinstance(kid, str) for kid in keys)


async def test_a_key_whose_kty_is_not_a_string_is_skipped(make_cache, aiohttp_server):
    async def odd(request: web.Request) -> web.Response:
        return web.json_response({"keys": [{"kty": ["RSA"]}, {"kty": {"EC": 1}}, JWK]})

    app = web.Application()
    app.router.add_get("/jwks", odd)
    jwks = make_cache(str((await aiohttp_server(app)).make_url("/jwks")))

    assert await jwks.get("k1") is not None
    assert set(jwks.keys) == {"k1"}


OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_JWK = {**jwt.algorithms.ECAlgorithm.to_jwk(OTHER_KEY.public_key(), as_dict=True), "kid": "k2"}


def test_only_public_signature_keys_are_kept() -> None:
    """An HMAC secret, a private key or an encryption key in a JWKS never becomes a key a token
    may name (the middleware would refuse each for its alg too; this is the first line)."""
    private = {**jwt.algorithms.ECAlgorithm.to_jwk(KEY, as_dict=True), "kid": "private"}
    assert "d" in private
    document = {
        "keys": [
            {"kty": "oct", "k": "c2VjcmV0LWtleS1vZi0zMi1ieXRlcy1hdC1sZWFzdCE", "kid": "hmac"},
            private,
            {**JWK, "kid": "encryption", "use": "enc"},
            JWK,
        ]
    }
    assert set(parse_jwks(document)) == {"k1"}


async def test_an_empty_key_set_keeps_the_keys_loaded_before(issuer, make_cache):
    """An issuer answering ``{"keys": []}`` (a deploy that lost its keys) is a failed fetch once
    keys were loaded, not a set that refuses every token until it is fixed."""
    issuer.status = 200
    jwks = make_cache(issuer.url)
    assert await jwks.get("k1") is not None
    issuer.document = {"keys": []}
    assert await jwks.get("unknown") is None  # an unknown kid refetches: the empty set
    assert issuer.hits == 2
    assert jwks.has("k1") and jwks.fetch_errors["invalid"] == 1


@pytest.mark.parametrize("status", [201, 206])
async def test_a_jwks_answered_with_a_status_other_than_200_is_not_used(issuer, make_cache, status):
    """206 is a fragment of a document, 201 an answer to something else: only a 200 is a key set."""
    issuer.status = status  # with the key set as its body
    jwks = make_cache(issuer.url)
    with pytest.raises(JwksUnavailable, match=f"answered {status}"):
        await jwks.get("k1")
    assert jwks.fetch_errors["status"] == 1


async def test_a_lookup_cancelled_at_a_cold_start_does_not_cancel_the_fetch_others_wait_for(
    issuer, make_cache
):
    issuer.status = 200
    issuer.release.clear()
    jwks = make_cache(issuer.url)
    first = asyncio.ensure_future(jwks.get("k1"))
    second = asyncio.ensure_future(jwks.get("k1"))
    await wait_for(lambda: issuer.hits == 1, what="the fetch to reach the issuer")
    first.cancel()  # its client went away
    issuer.release.set()
    assert await second is not None
    assert issuer.hits == 1
    assert first.cancelled()


async def test_a_sha256_thumbprint_names_a_key_before_a_sha1_one(issuer, make_cache):
    """A token naming its key by both thumbprints, each matching a different key: the SHA-256 one
    decides (SHA-1 is the weaker name, and may collide)."""
    issuer.status = 200
    issuer.document = {"keys": [{**JWK, "x5t": "c2hhLTE"}, {**OTHER_JWK, "x5t#S256": "c2hhLTI1Ng"}]}
    jwks = make_cache(issuer.url)
    named = await jwks.candidates(None, {"x5t": "c2hhLTE", "x5t#S256": "c2hhLTI1Ng"}, "ES256")
    assert [key._jwk_data["kid"] for key in named] == ["k2"]


async def test_keys_older_than_max_age_are_refreshed_behind_the_lookups(issuer, make_cache):
    """A key the issuer removed (rotated out, revoked) is forgotten within ``max_age`` and one
    fetch, whether or not a token names an unknown kid meanwhile; lookups never wait for it."""
    issuer.status = 200
    clock = Clock()
    jwks = make_cache(issuer.url, clock=clock, max_age=300)
    assert await jwks.get("k1") is not None
    issuer.document = {"keys": [OTHER_JWK]}
    clock.now += 299
    assert await jwks.get("k1") is not None
    assert issuer.hits == 1
    clock.now += 1
    issuer.release.clear()
    assert await jwks.get("k1") is not None  # the stale set still answers while the refresh runs
    await wait_for(lambda: issuer.hits == 2, what="the refresh to reach the issuer")
    issuer.release.set()
    await wait_for(lambda: jwks.has("k2"), what="the refreshed keys")
    assert not jwks.has("k1")
