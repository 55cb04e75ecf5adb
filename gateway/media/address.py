"""Which IP addresses a media fetch may connect to, and how host names become addresses.

The guard works on resolved addresses, never on the URL text: ``http://2130706433/``,
``http://0x7f.1/`` and ``http://[::ffff:127.0.0.1]/`` all resolve to loopback and are
refused, whatever spelling the URL used.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# NAT64 (RFC 6052) carries an IPv4 address in its low 32 bits; a NAT64 gateway would
# forward to it, so the embedded address is what must be judged.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_-]+)*$")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one tunnels to (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_forbidden_address(ip: IPAddress) -> bool:
    """True unless ``ip`` is a plain public unicast address.

    Refuses loopback, RFC 1918 / ULA private, link-local (cloud metadata at
    169.254.169.254), carrier-grade NAT, multicast, reserved, unspecified, documentation
    and benchmark ranges, and IPv6 addresses that tunnel to any of those.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:
            return is_forbidden_address(inner)
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def normalize_host(host: str) -> str:
    """Lower-case a host name and drop the trailing root dot (``Example.COM.``)."""
    return host.lower().rstrip(".")


@dataclass(frozen=True)
class HostAllowList:
    """Hosts exempt from the private-address guard: exact names and IP networks."""

    names: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> HostAllowList:
        """Parse names, IPs and CIDRs; raise ValueError on anything else."""
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip()
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = normalize_host(entry)
            if not _HOSTNAME.match(name):
                raise ValueError(f"media allow-host {raw!r} is not a host name, IP or CIDR")
            names.add(name)
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, ip: IPAddress) -> bool:
        """True when the URL's ``host`` is listed by name or ``ip`` lies in a listed network."""
        if normalize_host(host) in self.names:
            return True
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c in net for c in candidates for net in self.networks)


class Resolver(Protocol):
    """Turns a host name into the addresses to try, in order. A seam for tests."""

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host``; raise OSError (e.g. socket.gaierror) when it cannot."""
        ...


def parse_ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address when it is a canonical literal (``::1`` or ``[::1]``)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Default resolver: getaddrinfo in the loop's thread pool, duplicates dropped."""
    literal = parse_ip_literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(str(sockaddr[0]))
        if ip not in addresses:
            addresses.append(ip)
    return addresses
