"""HTTPS upstream targets, end to end through the gateway: a throwaway CA made at test time, real
TLS servers on loopback, and the gateway told to trust the CA the operator's way (``SSL_CERT_FILE``).

Proxied HTTP goes through ``gateway/pool.py``; WebSocket upgrades and ``/health/detailed`` go
through the shared ClientSession. Both must trust the same CAs and fail the same way."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.keys import route_table_key
from tests.helpers import one_service, running_gateway, wait_for

# -- a throwaway CA -------------------------------------------------------------------------------

_NOW = datetime.datetime.now(datetime.UTC)
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(days=1))
        .not_valid_after(_NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert, key


def _leaf(
    names: tuple[str, ...],
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    expired: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = issuer
    key = _key()
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    start, end = (
        (_NOW - datetime.timedelta(days=10), _NOW - datetime.timedelta(days=1))
        if expired
        else (_NOW - datetime.timedelta(days=1), _NOW + datetime.timedelta(days=30))
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class Pki:
    ca_file: Path  # the CA the gateway is told to trust
    certs: dict[str, tuple[Path, Path]]  # kind -> (certificate chain, key)

    def server_context(self, kind: str = "good") -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert, key = self.certs[kind]
        context.load_cert_chain(cert, key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, and server certificates: ``good`` (signed by it, for localhost, 127.0.0.1 and ::1),
    ``expired``, ``wrong-host`` (another name only) and ``untrusted`` (another CA's)."""
    root = tmp_path_factory.mktemp("pki")
    ca = _ca("gateway test CA")
    other_ca = _ca("some other CA")
    leaves = {
        "good": _leaf(_LOOPBACK_NAMES, ca),
        "expired": _leaf(_LOOPBACK_NAMES, ca, expired=True),
        "wrong-host": _leaf(("backend.example.internal",), ca),
        "untrusted": _leaf(_LOOPBACK_NAMES, other_ca),
    }
    pem = serialization.Encoding.PEM
    ca_file = root / "ca.pem"
    ca_file.write_bytes(ca[0].public_bytes(pem))
    certs = {}
    for kind, (cert, key) in leaves.items():
        cert_path, key_path = root / f"{kind}.pem", root / f"{kind}.key"
        cert_path.write_bytes(cert.public_bytes(pem))
        key_path.write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        certs[kind] = (cert_path, key_path)
    return Pki(ca_file, certs)


@pytest.fixture
def trust_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Pki:
    """The operator's way to trust a private CA: OpenSSL's ``SSL_CERT_FILE``."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return pki


UpstreamHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class TlsUpstream:
    server: TestServer
    host: str  # as it goes in a URL: localhost, 127.0.0.1, [::1]
    requests: list[web.Request]
    server_names: list[str | None]  # the SNI of each handshake (None: the client sent none)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.server.port}"


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "host": request.headers.get("Host"),
            "length": len(body),
        }
    )


@pytest.fixture
async def make_tls_upstream(
    trust_ca: Pki,
) -> AsyncIterator[Callable[..., Awaitable[TlsUpstream]]]:
    """An aiohttp server over TLS with the ``cert`` kind's certificate, on ``host`` (the gateway
    trusts the test CA)."""
    servers: list[TestServer] = []

    async def make(
        handler: UpstreamHandler | None = None,
        *,
        cert: str = "good",
        host: str = "127.0.0.1",
        routes: Callable[[web.Application], None] | None = None,
    ) -> TlsUpstream:
        requests: list[web.Request] = []
        server_names: list[str | None] = []
        reply = handler or _echo

        async def recording(request: web.Request) -> web.StreamResponse:
            requests.append(request)
            return await reply(request)

        app = web.Application(client_max_size=16 * 1024**2)
        if routes is not None:
            routes(app)
        app.router.add_route("*", "/{tail:.*}", recording)
        bind = "::1" if host == "[::1]" else host
        server = TestServer(app, host=bind, port=0)
        context = trust_ca.server_context(cert)
        context.sni_callback = lambda _, name, __: server_names.append(name)  # type: ignore[assignment,misc,func-returns-value]
        await server.start_server(ssl=context)
        servers.append(server)
        return TlsUpstream(server, host, requests, server_names)

    yield make
    for server in servers:
        await server.close()


# -- proxied HTTP over TLS ------------------------------------------------------------------------


async def test_get_through_an_https_target(make_gateway: Any, make_tls_upstream: Any) -> None:
    upstream = await make_tls_upstream()
    client = await make_gateway(one_service(upstream.url))

    response = await client.get("/things/1?x=y")

    assert response.status == 200
    body = await response.json()
    assert body["path"] == "/things/1?x=y"
    assert body["host"] == f"127.0.0.1:{upstream.server.port}"


async def test_bodies_stream_both_ways_over_tls(make_gateway: Any, make_tls_upstream: Any) -> None:
    """A chunked upload larger than the buffered size goes up streamed, and a large answer of
    unknown length comes back streamed, both over the TLS connection."""
    size = 3 * 1024 * 1024

    async def echo_stream(request: web.Request) -> web.StreamResponse:
        # The whole upload first: an answer that starts early ends the upload (as in nginx).
        received = [chunk async for chunk in request.content.iter_any()]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in received:
            await response.write(chunk)
        await response.write_eof()
        return response

    upstream = await make_tls_upstream(echo_stream)
    client = await make_gateway(one_service(upstream.url))

    async def body() -> AsyncIterator[bytes]:
        for i in range(size // 65536):
            yield bytes([i % 251]) * 65536

    response = await client.post("/upload", data=body())

    assert response.status == 200
    assert "Content-Length" not in response.headers
    echoed = await response.read()
    assert len(echoed) == size
    assert echoed == b"".join(bytes([i % 251]) * 65536 for i in range(size // 65536))


async def test_a_post_with_a_small_body_over_tls(make_gateway: Any, make_tls_upstream: Any) -> None:
    upstream = await make_tls_upstream()
    client = await make_gateway(one_service(upstream.url))

    response = await client.post("/x", data=b"a" * 1000, headers={"Content-Type": "application/octet-stream"})

    assert response.status == 200
    assert (await response.json())["length"] == 1000


async def test_tls_connections_to_a_target_are_kept_alive_and_reused(
    make_gateway: Any, make_tls_upstream: Any
) -> None:
    """One handshake for many requests: the pooled TLS connection is reused, as plain ones are."""
    peers: list[Any] = []

    async def reply(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    upstream = await make_tls_upstream(reply)
    client = await make_gateway(one_service(upstream.url))

    for _ in range(10):
        response = await client.get("/again")
        assert response.status == 200
        assert await response.text() == "ok"

    assert len(peers) == 10
    assert len(set(peers)) == 1, peers
    assert len(upstream.server_names) == 1  # one handshake


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
async def test_each_name_form_of_a_target_is_verified_against_its_certificate(
    make_gateway: Any, make_tls_upstream: Any, host: str
) -> None:
    """A DNS name is checked against the certificate's DNS names and sent as SNI; an IP literal is
    checked against its IP addresses and sends no SNI (RFC 6066 section 3 forbids it)."""
    upstream = await make_tls_upstream(host=host)
    client = await make_gateway(one_service(upstream.url))

    response = await client.get("/named")

    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["host"] == f"{host}:{upstream.server.port}"
    assert upstream.server_names == ["localhost" if host == "localhost" else None]


# -- certificates the gateway must refuse ---------------------------------------------------------

_TLS_REASONS = {
    "untrusted": "unable to get local issuer certificate",
    "expired": "certificate has expired",
    "wrong-host": "IP address mismatch",
}


@pytest.mark.parametrize("cert", list(_TLS_REASONS))
async def test_a_certificate_that_fails_verification_gets_502_and_a_log_line_saying_why(
    make_gateway: Any, make_tls_upstream: Any, caplog: pytest.LogCaptureFixture, cert: str
) -> None:
    upstream = await make_tls_upstream(cert=cert)
    client = await make_gateway(one_service(upstream.url))

    with caplog.at_level(logging.INFO, logger="gateway"):
        response = await client.get("/x")

    assert response.status == 502
    assert response.content_type == "application/json"
    assert "x-request-id" in response.headers
    body = await response.json()
    assert body["detail"] == "Upstream 'svc' failed the TLS handshake"
    assert upstream.requests == []
    (record,) = [r for r in caplog.records if r.getMessage() == "TLS handshake with an upstream failed"]
    assert record.levelno == logging.WARNING
    assert record.target == upstream.url  # type: ignore[attr-defined]
    assert _TLS_REASONS[cert] in record.error  # type: ignore[attr-defined]


async def test_a_target_failing_its_handshake_is_ejected_as_a_refusing_one_is(
    make_gateway: Any, make_tls_upstream: Any
) -> None:
    """Passive health counts a failed handshake as a failed connect, as nginx (``max_fails``
    counts "error", handshakes included) and Envoy (a local-origin connect failure) do."""
    upstream = await make_tls_upstream(cert="untrusted")
    client = await make_gateway(one_service(upstream.url, eject_seconds=60))

    assert (await client.get("/x")).status == 502
    response = await client.get("/x")
    assert response.status == 503
    assert (await response.json())["detail"] == "No healthy target for service 'svc'"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_request_whose_handshake_failed_goes_to_another_target(
    make_gateway: Any, make_tls_upstream: Any, method: str
) -> None:
    """Nothing was sent before the handshake failed: any method may be retried elsewhere."""
    bad = await make_tls_upstream(cert="expired")
    good = await make_tls_upstream()
    client = await make_gateway(one_service([bad.url, good.url], eject_seconds=60))

    for _ in range(2):  # whichever target the round-robin starts with
        response = await client.request(method, "/x", data=b"{}" if method == "POST" else None)
        assert response.status == 200
    assert len(good.requests) == 2
    assert bad.requests == []


# -- targets that do not answer a handshake as they should ----------------------------------------

CONNECT_TIMEOUT = 0.3


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # accepts the connection, says nothing, reads until the peer leaves


def _https(url: str) -> str:
    return "https" + url.removeprefix("http")


async def test_a_handshake_that_never_completes_is_a_connect_timeout(
    make_gateway: Any, make_raw_upstream: Any, trust_ca: Pki
) -> None:
    """A server that accepts TCP and never answers the ClientHello: bounded by the service's
    connect timeout (it covers the handshake, as Envoy's connect_timeout does), a 504."""
    url = _https(await make_raw_upstream(_silent))
    client = await make_gateway(one_service(url, timeout={"connect": CONNECT_TIMEOUT, "read": 30}))

    response = await asyncio.wait_for(client.get("/x"), timeout=10)

    assert response.status == 504
    assert (await response.json())["detail"] == "Upstream 'svc' timed out"


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_handshake_that_never_completes_is_retried_on_another_target(
    make_gateway: Any, make_raw_upstream: Any, make_tls_upstream: Any, method: str
) -> None:
    silent = _https(await make_raw_upstream(_silent))
    good = await make_tls_upstream()
    client = await make_gateway(
        one_service([silent, good.url], timeout={"connect": CONNECT_TIMEOUT, "read": 30}, eject_seconds=60)
    )

    for _ in range(2):
        response = await client.request(method, "/x", data=b"{}" if method == "POST" else None)
        assert response.status == 200
    assert len(good.requests) == 2


async def test_an_https_target_that_speaks_plain_http_gets_502_at_once(
    make_gateway: Any, make_upstream: Any, trust_ca: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    plain = await make_upstream()
    url = _https(plain.url)
    client = await make_gateway(one_service(url, timeout={"connect": 30, "read": 30}))

    with caplog.at_level(logging.INFO, logger="gateway"):
        response = await asyncio.wait_for(client.get("/x"), timeout=10)

    assert response.status == 502
    assert (await response.json())["detail"] == "Upstream 'svc' failed the TLS handshake"
    (record,) = [r for r in caplog.records if r.getMessage() == "TLS handshake with an upstream failed"]
    assert record.target == url  # type: ignore[attr-defined]
    assert "wrong version number" in record.error  # type: ignore[attr-defined]


async def test_an_http_target_that_speaks_tls_gets_502_at_once(
    make_gateway: Any, make_tls_upstream: Any
) -> None:
    upstream = await make_tls_upstream()
    url = "http" + upstream.url.removeprefix("https")
    client = await make_gateway(one_service(url, timeout={"connect": 30, "read": 30}))

    response = await asyncio.wait_for(client.get("/x"), timeout=10)

    assert response.status == 502
    assert response.content_type == "application/json"
    assert (await response.json())["detail"] == "Upstream 'svc' closed the connection"
    assert upstream.requests == []


# -- the ClientSession's paths: WebSocket upgrades and /health/detailed ---------------------------


def _ws_echo(app: web.Application) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"echo {msg.data} via {request.headers.get('Host')}")
        return ws

    app.router.add_get("/ws/echo", echo)


async def test_a_websocket_reaches_an_upstream_through_an_https_target(
    make_gateway: Any, make_tls_upstream: Any
) -> None:
    """The handshake goes over TLS (``wss``) when the target URL is ``https://``, and trusts the
    same CA as proxied HTTP."""
    upstream = await make_tls_upstream(routes=_ws_echo)
    client = await make_gateway(one_service(upstream.url))

    async with client.ws_connect("/ws/echo") as ws:
        await ws.send_str("hi")
        assert await ws.receive_str() == f"echo hi via 127.0.0.1:{upstream.server.port}"


async def test_a_websocket_to_a_target_failing_its_handshake_gets_502_and_a_log_line(
    make_gateway: Any, make_tls_upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = await make_tls_upstream(cert="expired", routes=_ws_echo)
    client = await make_gateway(one_service(upstream.url))

    with caplog.at_level(logging.INFO, logger="gateway"):
        response = await client.get("/ws/echo", headers=_UPGRADE)

    assert response.status == 502
    assert (await response.json())["detail"] == "Upstream 'svc' failed the TLS handshake"
    (record,) = [r for r in caplog.records if r.getMessage() == "TLS handshake with an upstream failed"]
    assert record.target == upstream.url  # type: ignore[attr-defined]
    assert "certificate has expired" in record.error  # type: ignore[attr-defined]


async def test_a_websocket_to_a_target_failing_its_handshake_goes_to_another_target(
    make_gateway: Any, make_tls_upstream: Any
) -> None:
    """A failed TLS handshake is a failed connect: nothing was sent, the upgrade goes elsewhere."""
    bad = await make_tls_upstream(cert="expired", routes=_ws_echo)
    good = await make_tls_upstream(routes=_ws_echo)
    client = await make_gateway(one_service([bad.url, good.url], eject_seconds=60))

    for _ in range(2):  # whichever target the round-robin starts with
        async with client.ws_connect("/ws/echo") as ws:
            await ws.send_str("hi")
            assert await ws.receive_str() == f"echo hi via 127.0.0.1:{good.server.port}"


_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def test_a_websocket_to_a_handshake_that_never_completes_gets_504_within_the_connect_timeout(
    make_gateway: Any, make_raw_upstream: Any, trust_ca: Pki
) -> None:
    """The same bound as a proxied request's: the connect timeout, not connect + read (30 s)."""
    url = _https(await make_raw_upstream(_silent))
    client = await make_gateway(one_service(url, timeout={"connect": CONNECT_TIMEOUT, "read": 30}))

    response = await asyncio.wait_for(client.get("/ws/echo", headers=_UPGRADE), timeout=10)

    assert response.status == 504
    assert (await response.json())["detail"] == "Upstream 'svc' timed out"


async def test_a_websocket_upstream_slower_than_the_connect_timeout_to_accept_gets_its_read_timeout(
    make_gateway: Any, make_tls_upstream: Any
) -> None:
    """Once connected, the upgrade's answer has the read timeout: the connect timeout does not
    cut short an upstream that takes longer than it to say 101."""
    accept = asyncio.Event()

    def slow_ws(app: web.Application) -> None:
        async def handler(request: web.Request) -> web.WebSocketResponse:
            await accept.wait()
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.send_str("late but fine")
            await ws.close()
            return ws

        app.router.add_get("/ws/slow", handler)

    upstream = await make_tls_upstream(routes=slow_ws)
    client = await make_gateway(one_service(upstream.url, timeout={"connect": CONNECT_TIMEOUT, "read": 30}))

    connecting = asyncio.ensure_future(client.ws_connect("/ws/slow"))
    await wait_for(lambda: len(upstream.server_names) == 1, what="the upstream's TLS handshake")
    await asyncio.sleep(CONNECT_TIMEOUT * 2)  # past the connect timeout, with the upstream silent
    accept.set()
    ws = await asyncio.wait_for(connecting, timeout=10)
    assert await ws.receive_str() == "late but fine"
    await ws.close()


def _health_config(url: str) -> dict[str, Any]:
    config = one_service(url)
    config["services"]["svc"]["health_path"] = "/healthz"
    return config


async def test_health_detailed_probes_an_https_backend(make_gateway: Any, make_tls_upstream: Any) -> None:
    upstream = await make_tls_upstream()
    client = await make_gateway(_health_config(upstream.url))

    response = await client.get("/health/detailed")

    assert response.status == 200
    svc = (await response.json())["components"]["svc"]
    assert svc["status"] == "healthy", svc
    assert [r.path for r in upstream.requests] == ["/healthz"]


@pytest.mark.parametrize("cert", list(_TLS_REASONS))
async def test_health_detailed_says_why_an_https_backend_failed_its_handshake(
    make_gateway: Any, make_tls_upstream: Any, cert: str
) -> None:
    upstream = await make_tls_upstream(cert=cert)
    client = await make_gateway(_health_config(upstream.url))

    response = await client.get("/health/detailed")

    assert response.status == 200
    svc = (await response.json())["components"]["svc"]
    assert svc["status"] == "unhealthy"
    assert svc["error"].startswith(f"TLS handshake failed: certificate verify failed: {_TLS_REASONS[cert]}")


async def test_every_https_target_shares_one_tls_context(make_gateway: Any, make_tls_upstream: Any) -> None:
    """Each context loads the whole CA bundle (~80 ms of the event loop, ~0.9 MB): one for all
    targets, services and reloads, which the ClientSession's paths use too."""
    a, b = await make_tls_upstream(), await make_tls_upstream(host="localhost")
    config = one_service([a.url, b.url])
    config["services"]["other"] = {"url": a.url}
    client = await make_gateway(config)

    upstreams = client.app[route_table_key].current.upstreams
    contexts = {id(t.pool.ssl) for u in upstreams.values() for t in u.targets}
    assert len(contexts) == 1


async def test_python_m_gateway_trusts_the_ca_in_ssl_cert_file_on_every_path(
    make_tls_upstream: Any, trust_ca: Pki, tmp_path: Path
) -> None:
    """The operator's way, in the real program (on uvloop): ``SSL_CERT_FILE`` in its environment,
    and proxied HTTP, a WebSocket and /health/detailed all reach the private CA's backend."""
    upstream = await make_tls_upstream(routes=_ws_echo)
    config = _health_config(upstream.url)

    async with (
        running_gateway(
            config, tmp_path, SSL_CERT_FILE=str(trust_ca.ca_file), AUTH_ENABLED="false"
        ) as gateway,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{gateway.base}/x") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["path"] == "/x"
        async with session.ws_connect(f"{gateway.base}/ws/echo") as ws:
            await ws.send_str("hi")
            assert await ws.receive_str() == f"echo hi via 127.0.0.1:{upstream.server.port}"
        async with session.get(f"{gateway.base}/health/detailed") as response:
            assert (await response.json())["components"]["svc"]["status"] == "healthy"
