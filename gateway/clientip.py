"""Who the client is: the peer address, or what trusted proxies say in ``X-Forwarded-For``.

Each proxy appends the address it received the request from, so the list is read right to left:
addresses of trusted proxies are skipped, and the first untrusted one is the client. Everything
to its left was written by the client itself and is never looked at, so a client cannot choose
its own address (nor its rate-limit bucket) by sending the header.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPNetwork", "client_ip", "ip_address", "is_trusted_peer", "peer_host"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_ip(
    peer: str | None,
    forwarded_for: Iterable[str] = (),
    trusted: Sequence[IPNetwork] = (),
) -> str:
    """The client's address as a normalised string (IPv4-mapped IPv6 shown as IPv4).

    ``peer`` is the socket's remote address, ``forwarded_for`` every ``X-Forwarded-For`` header
    value in the order received. The header is only read when the peer is a trusted proxy. If a
    trusted hop forwarded something that is not an address, the walk stops at the last trusted
    address seen: a broken chain must not let the client pick the bucket. A peer that is not an
    IP address (a Unix socket) is returned as given, or ``"unknown"`` when empty.
    """
    if not trusted and peer and ":" not in peer and peer[-1:].isdigit():
        return peer  # the common case: an IPv4 socket address is already canonical
    address = _parse(peer)
    if address is None:
        return peer or "unknown"
    if not trusted or not _is_trusted(address, trusted):
        return str(address)
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        hop_address = _parse(_strip_port(hop))
        if hop_address is None:
            break
        address = hop_address
        if not _is_trusted(address, trusted):
            break
    return str(address)


def peer_host(host: str) -> str:
    """A socket's remote address as the gateway names its client everywhere (``request.remote``:
    the access log, ``X-Forwarded-For``, ``TRUSTED_PROXIES``, rate-limit buckets).

    An IPv4 client of a dual-stack socket (``GATEWAY_HOST=::``) arrives as ``::ffff:10.0.0.5``:
    it is 10.0.0.5, as Go's listeners (Traefik) report it. A link-local peer's zone
    (``fe80::1%eth0``) names an interface of this host, meaningless to a backend: dropped, as
    nginx's ``$remote_addr`` does.
    """
    if ":" not in host:
        return host
    address = _parse(host)
    return host if address is None else str(address)


def ip_address(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``value`` as an address, as :func:`peer_host` names it (IPv4-mapped IPv6 as IPv4, no
    zone), or None when it is not one (a host name, a Unix socket, empty)."""
    return _parse(value)


@functools.lru_cache(maxsize=4096)  # the same peers and proxies come back again and again
def _parse(value: str | None) -> _Address | None:
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return ipaddress.IPv6Address(value.partition("%")[0])
    return address


def _strip_port(hop: str) -> str:
    # Some proxies write "1.2.3.4:5678" or "[2001:db8::1]:443"; a bare IPv6 address has 2+ colons.
    if hop.startswith("["):
        return hop[1:].partition("]")[0]
    if hop.count(":") == 1:
        return hop.partition(":")[0]
    return hop


def is_trusted_peer(peer: str | None, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the socket's remote address is one of ``TRUSTED_PROXIES``."""
    address = _parse(peer)
    return address is not None and _is_trusted(address, trusted)


def _is_trusted(address: _Address, trusted: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)
