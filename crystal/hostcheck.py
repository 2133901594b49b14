"""Which Host headers a server of crystal's answers: the defence against DNS rebinding.

A web page on any site can point its own domain's DNS record at 127.0.0.1 (DNS rebinding); the
browser then sends the page's requests for that domain to a server on this machine and lets the
page read the answers (the same origin, as far as the browser knows). What the page cannot change
is the Host header: it names the page's domain. So a server answers only Host values that name
the address it is bound to:
    127.0.0.1, localhost, [::1] (the loopback names) and the --host given (an IPv6 address in
    brackets), each with the bound port; without a port only when that port is 80 (HTTP's
    default, which browsers leave out);
    bound to every interface (0.0.0.0, ::), also any IP address literal (IPv6 in brackets) with
    the port: a rebinding needs a domain name, and an address in Host is the one the browser
    connected to.
Names compare without regard to case. Any other Host, a missing one or two of them get 421
Misdirected Request. `HostCheck` is the rule as ASGI middleware around any application
(crystal watch's; every server crystal adds applies the same).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARDS = ("", "0.0.0.0", "::")
DEFAULT_HTTP_PORT = 80


def _bracketed(host: str) -> str:
    """An IPv6 address as it appears in a URL or a Host header: [::1]."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_ip_literal(name: str) -> bool:
    """An IPv4 address, or an IPv6 address in brackets (as browsers write it in Host)."""
    try:
        if name.startswith("[") and name.endswith("]"):
            return isinstance(ipaddress.ip_address(name[1:-1]), ipaddress.IPv6Address)
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv4Address)
    except ValueError:
        return False


@dataclass(frozen=True)
class HostRule:
    """The Host values a server bound to (host, port) answers."""

    names: frozenset[str]  # lower case; IPv6 addresses in brackets
    port: int
    any_ip: bool = False  # bound to every interface: any IP address literal too

    @classmethod
    def bound(cls, host: str, port: int) -> "HostRule":
        """The rule for a server listening on `host` (--host as given) and `port` (the bound one)."""
        names = frozenset(n.lower() for n in (*LOOPBACK_NAMES, _bracketed(host)) if n)
        return cls(names, port, host in WILDCARDS)

    def allows(self, host: str | None) -> bool:
        """Whether a request with this Host header value is answered."""
        if not host:
            return False
        name, port = host.lower(), None
        if not name.endswith("]") and ":" in name:  # name:port ([::1] alone has no port)
            name, _, port = name.rpartition(":")
        if port is None:
            if self.port != DEFAULT_HTTP_PORT:
                return False
        elif port != str(self.port):
            return False
        return name in self.names or (self.any_ip and _is_ip_literal(name))

    def describe(self) -> str:
        names = sorted(self.names) + (["any IP address"] if self.any_ip else [])
        return f"{', '.join(names)} with port {self.port}"


class HostCheck:
    """ASGI middleware: requests whose Host the rule refuses get 421 (a websocket is closed);
    the others go to `app`."""

    def __init__(self, app, rule: HostRule):
        self.app, self.rule = app, rule

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            hosts = [v for k, v in scope.get("headers", []) if k.lower() == b"host"]
            if len(hosts) != 1 or not self.rule.allows(hosts[0].decode("latin-1")):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = (f"421 Misdirected Request: this server answers only Host {self.rule.describe()}; "
                        "browse to one of those\n").encode()
                await send({"type": "http.response.start", "status": 421,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
