"""The `Gate` middleware in front of the app: Host header, API key, body size, UTF-8; and
`HostPolicy`, the Host names the server answers."""

import ipaddress
import re
import secrets
import socket
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from echolm.errors import EchoError
from echolm.serve.errors import APIError

PROTECTED = ("/v1/", "/api/")  # the paths that need the API key, when the server has one
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")  # listening on every interface
# a Host header: a name or IPv4 address, or a bracketed IPv6 address; then maybe a port
HOST_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))"
                     r"(?::(?P<port>[0-9]{1,5}))?")


def host_name(value: str) -> tuple[str, str | None] | None:
    """(name, port) of a Host header value, the name lowercased, IPv6 without brackets and
    a name's trailing dot dropped; None when it is not a host at all."""
    m = HOST_RE.fullmatch(value)
    if m is None:
        return None
    if m["v6"] is not None:
        try:
            return str(ipaddress.IPv6Address(m["v6"])), m["port"]
        except ValueError:
            return None
    return m["name"].lower().removesuffix("."), m["port"]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostPolicy:
    """The Host names the server answers, against DNS rebinding: a web page of another site
    whose name the attacker points at this machine's address would otherwise reach the API
    from the victim's browser (and write into DIR/prefs.sqlite). Such a request always
    carries the attacker's name in Host, so:

    * always: localhost, 127.0.0.1, ::1 (ssh -L tunnels and proxies on this machine);
    * the address given with --host, unless it is a wildcard (0.0.0.0, ::);
    * listening on a wildcard: any IP address literal (a rebinding request never carries
      one) and this machine's host names (`socket.gethostname`, `getfqdn`): which names and
      addresses reach a machine cannot be known from inside it (NAT, proxies, DNS), so
      other names need --allow-host;
    * the --allow-host names; ``*`` lets every Host in (behind a reverse proxy that
      checks it).

    Any port is accepted: the name is what rebinding forges, and a tunnel
    (`ssh -L 9000:localhost:8000`) legitimately changes the port."""

    def __init__(self, bind: str = "127.0.0.1", allow: Sequence[str] = ()) -> None:
        self.any = "*" in allow
        self.wildcard = bind in WILDCARD_BINDS
        names = set(LOOPBACK_NAMES)
        given = [("--allow-host", v) for v in allow if v != "*"]
        for flag, value in given + ([] if self.wildcard else [("--host", bind)]):
            parsed = host_name(value) or host_name(f"[{value}]")  # ::1 as well as [::1]
            if parsed is None or parsed[1] is not None:
                raise EchoError(f"{flag} {value!r}: not a host name or address without a "
                                "port (e.g. example.com, 10.0.0.5, ::1; or * for any)")
            names.add(parsed[0])
        if self.wildcard:
            names |= {n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n}
        self.names = frozenset(names)

    def allows(self, name: str) -> bool:
        return self.any or name in self.names or (self.wildcard and _is_ip(name))

    def describe(self) -> str:
        """For the startup line: which Host names are answered."""
        if self.any:
            return "any Host (--allow-host '*')"
        shown = ", ".join(f"[{n}]" if ":" in n else n for n in sorted(self.names))
        return f"Host {shown}" + (" or any IP address" if self.wildcard else "")

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> APIError | None:
        """The error for a request whose Host this server does not answer, else None.
        421 Misdirected Request (RFC 9110 15.5.20: this server will not answer for that
        name) when the name is foreign; 400 when the header is missing or malformed."""
        if self.any:
            return None
        values = [v for k, v in headers if k == b"host"]
        if len(values) != 1:
            return APIError(400, f"the request needs exactly one Host header, got "
                            f"{len(values)}", code="invalid_host")
        value = values[0].decode("latin-1")
        parsed = host_name(value)
        if parsed is None:
            return APIError(400, f"Host header {value[:100]!r} is not a host name",
                            code="invalid_host")
        if self.allows(parsed[0]):
            return None
        name = f"[{parsed[0]}]" if ":" in parsed[0] else parsed[0]
        return APIError(421, f"Host {value[:100]!r} is not served here (this server answers "
                        f"{self.describe()}); to allow it, restart with `echolm serve "
                        f"--allow-host {name}` (or --allow-host '*' behind a reverse proxy)",
                        code="host_not_allowed")


class Gate:
    """Pure ASGI middleware (it never buffers responses, so streaming stays streaming):
    refuses a Host this server does not answer (`HostPolicy`), checks the API key on /v1/
    and /api/, caps the body size, rejects bodies that are not UTF-8, and hands the app the
    body it read. Starlette's TrustedHostMiddleware does the Host part too, but it answers
    in plain text ("Invalid host header"), not in this server's error shape."""

    def __init__(self, app: ASGIApp, max_body: int, api_key: str | None,
                 hosts: HostPolicy | None = None) -> None:
        self.app, self.max_body, self.api_key = app, max_body, api_key
        self.hosts = hosts or HostPolicy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.hosts.refusal(scope.get("headers", []))
        if refused is not None:
            await self._drain(receive)
            await refused.response()(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith(PROTECTED) and not self._authorized(scope):
            await self._drain(receive)
            await APIError(401, "incorrect or missing API key: send 'Authorization: Bearer "
                           "KEY'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive,
                                                                              send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length")
        too_big = APIError(413, f"the request body is larger than {self.max_body} bytes",
                           code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._drain(receive)
            await too_big.response()(scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await self._drain(receive) if more else None
                await too_big.response()(scope, receive, send)
                return
        try:
            bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            await APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                           code="invalid_encoding").response()(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and secrets.compare_digest(
                    token.strip().encode(), self.api_key.encode())
        return False

    @staticmethod
    async def _drain(receive: Receive, limit: int = 64 << 20) -> None:
        """Read (and drop) the rest of the body, so the client gets to read our answer."""
        seen = 0
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
