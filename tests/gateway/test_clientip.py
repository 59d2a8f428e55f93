import ipaddress

import pytest

from gateway.clientip import client_ip, peer_host

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        # Untrusted peer: the header is never read, whatever it says.
        ("203.0.113.7", ["1.2.3.4"], TRUSTED, "203.0.113.7"),
        ("203.0.113.7", ["1.2.3.4"], (), "203.0.113.7"),
        # Trusted peer: the rightmost untrusted hop is the client.
        ("10.0.0.1", ["198.51.100.9"], TRUSTED, "198.51.100.9"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.9"], TRUSTED, "198.51.100.9"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.9, 10.1.2.3"], TRUSTED, "198.51.100.9"),
        # Several header lines are one list, in order.
        ("10.0.0.1", ["6.6.6.6", "198.51.100.9, 10.9.9.9"], TRUSTED, "198.51.100.9"),
        # Every hop trusted: the leftmost one is as far as we can see.
        ("10.0.0.1", ["10.2.2.2, 10.3.3.3"], TRUSTED, "10.2.2.2"),
        # Trusted peer, no header: the peer itself.
        ("10.0.0.1", [], TRUSTED, "10.0.0.1"),
        # Garbage written by the client left of the real hop is never reached...
        ("10.0.0.1", ["not-an-ip, 198.51.100.9"], TRUSTED, "198.51.100.9"),
        # ...and garbage right after a trusted hop stops the walk at the last trusted address.
        ("10.0.0.1", ["198.51.100.9, bogus"], TRUSTED, "10.0.0.1"),
        ("10.0.0.1", [" , 198.51.100.9 ,"], TRUSTED, "198.51.100.9"),
        # Ports and brackets some proxies add.
        ("10.0.0.1", ["198.51.100.9:5555"], TRUSTED, "198.51.100.9"),
        ("10.0.0.1", ["[2001:db8::5]:443"], TRUSTED, "2001:db8::5"),
        # IPv6, normalised; IPv4-mapped IPv6 shown as IPv4.
        ("fd00::1", ["2001:DB8:0:0::7"], TRUSTED, "2001:db8::7"),
        ("::ffff:203.0.113.7", ["1.2.3.4"], TRUSTED, "203.0.113.7"),
        ("::ffff:203.0.113.7", [], [], "203.0.113.7"),  # with no proxy trusted at all, too
        ("::ffff:10.0.0.1", ["198.51.100.9"], TRUSTED, "198.51.100.9"),
        # Not an IP peer (Unix socket) or none at all.
        ("", ["1.2.3.4"], TRUSTED, "unknown"),
        (None, [], TRUSTED, "unknown"),
    ],
)
def test_client_ip(peer, xff, trusted, expected):
    assert client_ip(peer, xff, trusted) == expected


def test_rotating_the_header_cannot_change_an_untrusted_peers_address():
    seen = {client_ip("203.0.113.7", [f"10.0.0.{i}, 1.1.1.{i}"], TRUSTED) for i in range(50)}
    assert seen == {"203.0.113.7"}


def test_prepending_hops_cannot_change_the_client_behind_a_trusted_proxy():
    seen = {client_ip("10.0.0.1", [f"1.1.1.{i}, 198.51.100.9"], TRUSTED) for i in range(50)}
    assert seen == {"198.51.100.9"}


@pytest.mark.parametrize(
    ("peer", "named"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("::ffff:10.0.0.5", "10.0.0.5"),  # an IPv4 client of a dual-stack socket
        ("2001:db8::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),  # the zone is this host's interface, nothing to a backend
        ("/run/gateway.sock", "/run/gateway.sock"),
    ],
)
def test_a_peer_is_named_as_its_client_everywhere(peer: str, named: str) -> None:
    assert peer_host(peer) == named
