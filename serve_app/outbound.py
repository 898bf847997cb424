"""Every request the server makes on a user's behalf (job callbacks), and the rules they obey.

- A URL is http:// or https:// with a host and no `user:password@`; any port is allowed.
- The host is resolved once (numeric spellings such as 2130706433, 0x7f.1 or 0177.0.0.1 are
  normalised by the resolver, never parsed here). Every address it resolves to must be public
  or inside a network of `INFER_CALLBACK_ALLOW_NETWORKS`; one that is not refuses the URL.
- The request goes to the address that was checked: the URL sent carries that IP, the Host
  header carries the name, and TLS sends the name as SNI and checks the certificate against it.
  Nothing resolves the name again in between, no proxy from the environment is used, no
  connection is reused (one could have been opened for another name at the same address), and no
  redirect is followed.
- What is recorded about a failure is generic ("connection refused", "HTTP 503 from receiver"):
  never an exception's class or message, which would map the server's own network.
- Callbacks are signed, Stripe style: `X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "<t>.<body>">` with the tenant's secret. `verify_signature` is what a receiver runs.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from serve_app.settings import Settings

# The networks allowed besides public addresses: none. Local development and the tests name theirs
# in INFER_CALLBACK_ALLOW_NETWORKS (a JSON list of CIDRs).
DEFAULT_ALLOW_NETWORKS: tuple[str, ...] = ()
RESOLVE_TIMEOUT_S = 5.0
SIGNATURE_HEADER = "X-Signature"
CALLBACK_ID_HEADER = "X-Callback-Id"
SECRET_PREFIX = "whsec_"
USER_AGENT = "inference-cluster-callbacks/1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_HOST = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class Refused(Exception):
    """A URL the server will not send to. `reason` is fit to show its tenant."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient  # a resolver that did not answer, not an answer that refuses


# -- URLs and addresses ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A URL whose host has been resolved and checked: where a request to it actually goes."""

    scheme: str
    host: str  # the name as given (IDNA, lower case), or the canonical IP when the host is numeric
    port: int
    path: str
    query: str
    address: IPAddress  # the checked address: the only one connected to
    numeric: bool  # the host was an address, in any spelling

    @property
    def destination(self) -> str:
        return destination_key(self.host, self.port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _default_port(self.scheme) else f"{host}:{self.port}"

    @property
    def request_url(self) -> httpx.URL:
        address = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return httpx.URL(urlunsplit((self.scheme, f"{address}:{self.port}", self.path or "/", self.query, "")))

    @property
    def extensions(self) -> dict:
        """TLS: send the name as SNI and check the certificate against it, not against the IP."""
        return {"sni_hostname": self.host} if self.scheme == "https" and not self.numeric else {}


@dataclass(frozen=True)
class _Parts:
    scheme: str
    host: str
    port: int
    path: str
    query: str


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def destination_key(host: str, port: int) -> str:
    """What the per-destination bound counts: host and port."""
    return f"{host.lower()}:{port}"


def _parse(url: str) -> _Parts:
    """The parts of a callback URL; Refused (with the reason) if its shape is not allowed."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise Refused("is not a valid URL (check the host and port)") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise Refused("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise Refused("must not hold a user name or password (user:password@host)")
    host = parts.hostname or ""
    if not host:
        raise Refused("must name a host")
    if ":" not in host:  # a name (or an IPv4 spelling), not an IPv6 literal
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError as exc:
            raise Refused(f"has an invalid host name {parts.hostname!r}") from exc
        if not _HOST.match(host):
            raise Refused(f"has an invalid host name {parts.hostname!r}")
    if port == 0:
        raise Refused("has port 0")
    return _Parts(scheme, host, port or _default_port(scheme), parts.path, parts.query)


def url_problem(url: str) -> str | None:
    """Why a callback URL's shape is refused, without resolving it; None if it may be checked further."""
    try:
        _parse(url)
    except Refused as exc:
        return exc.reason
    return None


def destination(url: str) -> str:
    """host:port of a callback URL (the per-destination bound's key)."""
    try:
        parts = _parse(url)
    except Refused:
        return url[:200]
    return destination_key(parts.host, parts.port)


def _numeric(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)  # never a DNS query
    except (socket.gaierror, UnicodeError, ValueError):
        return False
    return True


def _embedded(ip: ipaddress.IPv6Address) -> Iterator[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries, with the name of the form that carries them."""
    if ip in _IPV4_COMPATIBLE:
        yield "an IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        yield "a 6to4", ip.sixtofour
    if ip.teredo is not None:
        server, client = ip.teredo
        yield "a Teredo", server
        yield "a Teredo", client
    if any(ip in net for net in _NAT64):
        yield "a NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def address_kind(ip: IPAddress) -> str | None:
    """Why a request may not go to this address ("a loopback address"); None if it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            kind = address_kind(ip.ipv4_mapped)
            return f"an IPv4-mapped form of {ip.ipv4_mapped}, {kind}" if kind else None
        if not (ip.is_unspecified or ip.is_loopback):
            for form, inner in _embedded(ip):
                if (kind := address_kind(inner)) is not None:
                    return f"{form} form of {inner}, {kind}"
    if ip.is_unspecified or ip in _THIS_NETWORK:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


def parse_networks(values: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"INFER_CALLBACK_ALLOW_NETWORKS: {value!r} is not a network (CIDR)") from exc
    return tuple(networks)


# Lookups get threads of their own: a name server that never answers holds a thread for its whole
# retry time, and that must not starve the loop's default pool, which the gateway's other work uses.
# When these are all busy, a lookup waits in line and its caller's timeout refuses it (transiently).
_RESOLVER_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="outbound-dns")


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address getaddrinfo gives, in its order."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _RESOLVER_THREADS,
        functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
    )
    return [str(info[4][0]) for info in infos]


# -- failures, described without internal detail -----------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def describe_failure(exc: BaseException) -> str:
    """A failed delivery in words fit for its tenant: what happened, never where inside or how."""
    if isinstance(exc, Refused):
        return f"refused: {exc.reason}"
    chain = list(_chain(exc))
    if any(isinstance(e, httpx.TimeoutException | TimeoutError) for e in chain):
        return "timed out"
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        return "TLS error"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    codes = {getattr(e, "errno", None) for e in chain}
    if codes & {errno.ENETUNREACH, errno.EHOSTUNREACH}:
        return "host unreachable"
    if any(isinstance(e, ConnectionResetError) for e in chain):
        return "connection reset by receiver"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "the receiver closed the connection or answered invalid HTTP"
    return "delivery failed"


def describe_status(status: int) -> str | None:
    """None for a 2xx; else what is recorded."""
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status} from receiver (redirects are not followed)"
    return f"HTTP {status} from receiver"


# -- signatures ---------------------------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The X-Signature value for this body: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_mac(secret, t, body)}"


def verify_signature(
    secret: str, header: str | None, body: bytes | str, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether `header` (X-Signature) signs `body` with `secret`, timestamped within `tolerance_s`."""
    if not header:
        return False
    if isinstance(body, str):
        body = body.encode()
    timestamp, candidates = None, []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


# -- the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    error: str | None  # generic: safe to record on the job and show its tenant
    status: int | None = None


class Outbound:
    """Checks URLs and sends requests to the checked addresses only."""

    def __init__(
        self,
        *,
        allow_networks: Iterable[str] = DEFAULT_ALLOW_NETWORKS,
        timeout_s: float = 10.0,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
        resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
    ) -> None:
        self.allowed = parse_networks(allow_networks)
        self.timeout_s = timeout_s
        self.resolve_timeout_s = resolve_timeout_s
        self.resolver = resolver or system_resolver
        self.verify = verify
        self._client: httpx.AsyncClient | None = None  # made on first send (the gateway only checks)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s,
                follow_redirects=False,
                trust_env=False,  # an HTTP_PROXY from the environment would connect somewhere else
                verify=self.verify,
                # No keep-alive: a pooled connection is keyed by address, and may have been opened
                # (and its certificate checked) for another name at the same address.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            )
        return self._client

    @classmethod
    def from_settings(cls, settings: Settings, **options) -> Outbound:
        return cls(allow_networks=settings.callback_allow_networks, timeout_s=settings.callback_timeout_s, **options)

    def allows(self, ip: IPAddress) -> bool:
        """An address of an allowed network (INFER_CALLBACK_ALLOW_NETWORKS)."""
        return any(ip.version == net.version and ip in net for net in self.allowed)

    async def check(self, url: str) -> Target:
        """Resolve the URL's host and check every address; the Target holds the one to connect to."""
        parts = _parse(url)
        try:
            async with asyncio.timeout(self.resolve_timeout_s):
                answers = await self.resolver(parts.host, parts.port)
        except TimeoutError as exc:
            raise Refused(f"the host {parts.host} could not be resolved in time", transient=True) from exc
        except socket.gaierror as exc:
            transient = exc.errno == socket.EAI_AGAIN
            raise Refused(f"the host {parts.host} does not resolve", transient=transient) from exc
        except (OSError, UnicodeError) as exc:
            raise Refused(f"the host {parts.host} does not resolve") from exc
        addresses: list[IPAddress] = []
        for answer in answers:
            ip = ipaddress.ip_address(answer.split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise Refused(f"the host {parts.host} does not resolve")
        for ip in addresses:
            mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
            if self.allows(ip) or (mapped is not None and self.allows(mapped)):
                continue
            if (kind := address_kind(ip)) is not None:
                # A name's addresses are the server's view of the network: not for the tenant to read.
                named = f"the host {parts.host} resolves to {kind}"
                said = f"resolves to {ip}, {kind}" if _numeric(parts.host) else named
                raise Refused(f"{said}; callbacks go only to public addresses")
        chosen = addresses[0]
        if isinstance(chosen, ipaddress.IPv6Address) and chosen.ipv4_mapped is not None:
            chosen = chosen.ipv4_mapped
        numeric = _numeric(parts.host)
        host = str(chosen) if numeric else parts.host
        return Target(parts.scheme, host, parts.port, parts.path, parts.query, chosen, numeric)

    async def send(self, target: Target, body: bytes, headers: dict[str, str]) -> int:
        """POST to the checked address; the status. Raises what the transport raises."""
        request = self.client.build_request(
            "POST",
            target.request_url,
            content=body,
            headers={"Host": target.host_header, "User-Agent": USER_AGENT, **headers},
            extensions=target.extensions,
        )
        response = await self.client.send(request, stream=True, follow_redirects=False)
        await response.aclose()  # the receiver's body is never read
        return response.status_code

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Delivery:
        """Check the URL again (DNS may have changed) and POST to the checked address, within the timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                target = await self.check(url)
                status = await self.send(target, body, headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure becomes a generic description
            return Delivery(False, describe_failure(exc))
        error = describe_status(status)
        return Delivery(error is None, error, status)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
