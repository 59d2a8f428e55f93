"""Fuzzing: schemathesis against the gateway's own /openapi.json, hypothesis against the header
rules, the trace-context parser, the bearer-token verifier and whole requests. Routes use ``auth: none`` and point at a stub
that answers 200 to everything, so any 5xx (or traceback) is the gateway's own."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
import schemathesis
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.app import create_app
from gateway.headers import GATEWAY_OWNED, GATEWAY_SET, HOP_BY_HOP, TRACE_HEADERS, upstream_headers
from gateway.httpserver import GatewayRunner
from gateway.middleware.auth import AuthError, TokenVerifier
from gateway.settings import DEFAULT_ROUTES, AuthSettings, load_settings
from gateway.tracecontext import TraceContext, child_headers, extract, new_span_id
from tests.helpers import fuzz_examples

FAST = settings(
    max_examples=fuzz_examples(25),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _assert_not_gateway_failure(status: int, body: bytes) -> None:
    assert status < 500, body[:300]
    assert b"Traceback" not in body and b'File "' not in body


class LiveGateway:
    """The gateway and a stub upstream on a private event loop in a thread: schemathesis calls
    them synchronously, through real sockets, from the test's thread."""

    def __init__(self, tmp_path: Any) -> None:
        self._tmp = tmp_path
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        assert self._ready.wait(10), "live gateway did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with _serve(_stub_app()) as stub_port:
            url = f"http://127.0.0.1:{stub_port}"
            config = self._tmp / "fuzz.yaml"
            routes = "\n".join(
                f"  - {{prefix: {prefix}, service: {service}, auth: none}}"
                for prefix, service in DEFAULT_ROUTES
            )
            services = "\n".join(f"  {s}: {{url: '{url}'}}" for s in {s for _, s in DEFAULT_ROUTES})
            config.write_text(f"services:\n{services}\nroutes:\n{routes}\n", encoding="utf-8")
            app = create_app(load_settings({"GATEWAY_CONFIG": str(config)}))
            async with _serve(app, gateway=True) as port:
                self.url = f"http://127.0.0.1:{port}"
                self._ready.set()
                await self._stop.wait()


def _stub_app() -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "healthy", "latency_ms": 1})

    app = web.Application(client_max_size=16 * 1024**2)
    # Every path, also one with a percent-encoded newline ("." stops at it): the stub's own 404
    # would be relayed as the upstream's answer, text/plain, and fail the JSON check below.
    app.router.add_route("*", r"/{tail:[\s\S]*}", ok)
    return app


class _Serve:
    def __init__(self, app: web.Application, gateway: bool) -> None:
        self._runner = GatewayRunner(app) if gateway else web.AppRunner(app)

    async def __aenter__(self) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return self._runner.addresses[0][1]

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def _serve(app: web.Application, gateway: bool = False) -> _Serve:
    return _Serve(app, gateway)


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: Any) -> Iterator[LiveGateway]:
    with LiveGateway(tmp_path_factory.mktemp("fuzz")) as live:
        yield live


def test_schemathesis_finds_no_gateway_failure_in_the_openapi_surface(live_gateway: LiveGateway) -> None:
    schema = schemathesis.openapi.from_url(f"{live_gateway.url}/openapi.json")
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation, mode in itertools.product(operations, schemathesis.GenerationMode):
        if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # nothing in a parameterless GET to get wrong

        # Positive cases must pass validation and reach the stub; negative ones get a JSON 4xx.
        @settings(FAST, max_examples=fuzz_examples(5))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = case.call(base_url=live_gateway.url, session=session, timeout=5)
            _assert_not_gateway_failure(response.status_code, response.content)
            if response.status_code >= 400:
                # schemathesis' Response: lower-cased names, each with a list of values
                kind = str(response.headers.get("content-type", [""])[0])
                assert kind.startswith("application/json"), (
                    case.as_curl_command(),
                    response.status_code,
                    response.content[:200],
                )

        check()


# -- whole requests with arbitrary headers and paths ---------------------------------------------

TOKEN = st.text(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=20
)
VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
).map(str.strip)
INTERESTING = st.sampled_from(
    ["connection", "transfer-encoding", "te", "upgrade", "traceparent", "tracestate", "b3", "x-b3-traceid",
     "x-b3-spanid", "x-b3-sampled", "x-b3-flags", "x-request-id", "x-forwarded-for", "x-auth-subject",
     "content-type", "authorization", "expect", "via", "forwarded", "host"]
)  # fmt: skip
# CGI spells every "-" as "_": a client may too
UNDERSCORED = INTERESTING.map(lambda name: name.replace("-", "_"))
HEADERS = st.lists(st.tuples(st.one_of(INTERESTING, UNDERSCORED, TOKEN), VALUE), max_size=8)
PATH = st.lists(
    st.sampled_from(
        ["api", "v1", "clusters", "chat", "x", ".", "..", "%2e", "%2F", "%5C", ";", "%00", "~", "%ff", "a b"]
    ),
    max_size=6,
).map(lambda parts: "/" + "/".join(parts).replace(" ", "%20"))


@settings(FAST, max_examples=fuzz_examples(80))
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]), path=PATH, headers=HEADERS
)
def test_arbitrary_headers_and_paths_never_make_the_gateway_fail(
    live_gateway: LiveGateway, method: str, path: str, headers: list[tuple[str, str]]
) -> None:
    prepared = requests.Request(method, live_gateway.url + path, headers=dict(headers)).prepare()
    prepared.url = live_gateway.url + path  # no client-side normalisation
    try:
        response = requests.Session().send(prepared, timeout=5)
    except requests.exceptions.ConnectionError:
        return  # a head the gateway refused outright (e.g. Expect: 100-continue with junk); no 5xx
    assert response.status_code < 500, (method, path, headers, response.content[:200])
    _assert_not_gateway_failure(response.status_code, response.content)


# -- the parsers themselves ----------------------------------------------------------------------


@settings(max_examples=fuzz_examples(150), deadline=None, database=None)
@given(headers=HEADERS, remote=st.one_of(st.none(), st.ip_addresses().map(str)))
def test_upstream_headers_never_pass_hop_by_hop_or_gateway_owned_headers(
    headers: list[tuple[str, str]], remote: str | None
) -> None:
    incoming = CIMultiDictProxy(CIMultiDict(headers))
    out = upstream_headers(incoming, remote=remote, scheme="http", host="gw")
    names = {name.lower() for name in out}
    assert not names & (HOP_BY_HOP | GATEWAY_OWNED)
    for name in names:  # no second spelling of a header the gateway sets, as CGI would read it
        assert "_" not in name or name.replace("_", "-") not in GATEWAY_SET
    connection = {t.strip().lower() for v in incoming.getall("connection", ()) for t in v.split(",")}
    assert not names & (connection - {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"})
    assert out["X-Forwarded-Proto"] == "http" and out["Via"].endswith("1.1 gateway")
    for value in out.values():
        assert "\r" not in value and "\n" not in value


HEX = st.text("0123456789abcdefABCDEF-", max_size=40)
TRACE_VALUE = st.one_of(HEX, VALUE, st.builds("-".join, st.lists(HEX, max_size=5)))


@settings(max_examples=fuzz_examples(200), deadline=None, database=None)
@given(st.dictionaries(st.sampled_from(sorted(TRACE_HEADERS | {"x-b3-parentspanid"})), TRACE_VALUE))
def test_trace_context_parser_accepts_or_ignores_anything(headers: dict[str, str]) -> None:
    ctx = extract(CIMultiDictProxy(CIMultiDict(headers)))
    if isinstance(ctx, TraceContext):
        out = child_headers(ctx, new_span_id())
        assert len(out["x-b3-traceid"]) in (16, 32) and len(out["x-b3-spanid"]) == 16
        assert out["traceparent"].count("-") == 3
        for value in out.values():
            assert value.isprintable() and "\r" not in value and "\n" not in value


async def test_the_live_gateway_fixture_serves_through_the_stub(live_gateway: LiveGateway) -> None:
    response = await asyncio.to_thread(requests.get, f"{live_gateway.url}/api/v1/clusters/x", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "healthy"


# -- bearer tokens -------------------------------------------------------------------------------

ISSUER, AUDIENCE, SECRET = "https://issuer.fuzz", "gateway", "fuzz-secret-" + "s" * 64
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_JWK = {**jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key(), as_dict=True), "kid": "ec-1"}

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)  # surrogates included
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300) | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=6,
)
SOON = st.integers(min_value=-120, max_value=600).map(lambda delta: int(time.time()) + delta)
# Values a random draw would rarely make: a lone surrogate (a JSON escape), a number past float's.
SUBJECTS = st.sampled_from(["alice", "\ud800", "a\udce9", "a\r\nb", "x" * 257, ""]) | ANY_TEXT
EXPIRIES = SOON | st.sampled_from([10**400, 2**64, 1e308, float("inf"), float("nan"), "9" * 12]) | JSON
# Mostly tokens that pass but for one or two fields, so that every check gets to run.
HEADER_EXTRAS = st.dictionaries(
    st.sampled_from(["kid", "crit", "b64", "typ", "jku", "jwk", "x5c", "cty"]),
    st.sampled_from(["ec-1", "nobody", "b64", ["b64"], ["foo"], []]) | JSON,
    max_size=2,
)
CLAIM_CHANGES = st.dictionaries(
    st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud", "scope", "scp"]),
    SOON | JSON | st.lists(ANY_TEXT, max_size=3),
    max_size=2,
)


@st.composite
def headers_and_claims(draw: st.DrawFn) -> tuple[Any, Any]:
    alg = draw(st.sampled_from(["HS256", "HS512", "ES256"]))
    if draw(st.integers(0, 3)) == 0:
        alg = draw(st.sampled_from(["RS256", "none", "EdDSA"]) | JSON)
    header = {"alg": alg, "kid": "ec-1", **draw(st.just({}) | HEADER_EXTRAS)}
    claims = {"sub": draw(SUBJECTS), "exp": draw(EXPIRIES), "iss": ISSUER, "aud": AUDIENCE}
    claims.update(draw(st.just({}) | CLAIM_CHANGES))
    for name in draw(st.lists(st.sampled_from(sorted(claims)), max_size=1)):
        del claims[name]
    return header, draw(st.just(claims) | JSON)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def signed_tokens(draw: st.DrawFn) -> str:
    """A token whose signature verifies when its alg is HS* or ES256 (so every claim is read)."""
    header, claims = draw(headers_and_claims())
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    alg = header["alg"]
    if alg in ("HS256", "HS512", "ES256"):
        key = EC_KEY if alg == "ES256" else SECRET.encode()
        algorithm = jwt.get_algorithm_by_name(alg)
        signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    else:
        signature = draw(st.binary(max_size=64))
    return f"{signing_input}.{_b64(signature)}"


TOKENS = signed_tokens() | st.one_of(
    st.text(max_size=60),
    st.text("abcXYZ019-_=.", max_size=60),
    # what aiohttp makes of header bytes that are not UTF-8
    st.binary(max_size=60).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)


@pytest.fixture
async def fuzz_verifier(aiohttp_server: Any) -> Any:
    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [EC_JWK]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    cfg = AuthSettings(
        jwks_url=str(server.make_url("/jwks")),
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=("RS256", "ES256", "HS256", "HS512"),
        jwt_secret=SECRET,
    )
    verifier = TokenVerifier(cfg)
    yield verifier
    await verifier.close()


@settings(
    max_examples=fuzz_examples(200),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(token=TOKENS)
async def test_any_token_is_an_identity_or_an_auth_error(fuzz_verifier: TokenVerifier, token: str) -> None:
    for _ in range(2):  # the second time from the verification cache when it passed
        try:
            identity = await fuzz_verifier.verify(token)
        except AuthError as exc:
            assert exc.description.isprintable() and '"' not in exc.description  # it goes in a header
            continue
        # What the gateway does with a subject: a header upstream, a rate-limit key in Redis.
        identity.subject.encode("utf-8")
        assert not any(ord(c) < 0x20 for c in identity.subject)
