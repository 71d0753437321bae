"""Fetching a URL an LLM chose, without letting it reach what only the server can reach (SSRF).

`fetch(url)` is for agent tools (agents/research.py `fetch_url`): the model names any URL it likes, including
`http://169.254.169.254/latest/meta-data/` (a cloud's credentials), `http://localhost:5432/` or a host whose
DNS answers 10.0.0.5. So:

- only `http` and `https`, no credentials in the URL;
- the host is resolved once, and *every* address it resolves to must be public (not private, loopback,
  link-local, multicast, reserved, unspecified, shared / carrier-grade NAT, documentation or benchmarking
  ranges) — IPv4 and IPv6 alike, including IPv4 addresses embedded in IPv6 (IPv4-mapped `::ffff:a.b.c.d`,
  IPv4-compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo);
- the connection goes to the address that was checked (the Host header and TLS name stay the URL's), so DNS
  can't answer "public" to the check and "private" to the connect (DNS rebinding);
- redirects are followed by hand, at most MAX_REDIRECTS, each new URL checked the same way;
- the body is read up to a byte cap, within an overall deadline.

A refusal or failure is FetchError, whose message is meant to be read by the model (and the person looking
at the run); its `reason` says the same without the URL, for a place that shows the URL already.

`request(method, url, body=...)` is the same for other methods (alert webhooks POST through it): a POST
follows only 307 and 308 (which keep the method and body), each new URL checked again; `trusted_hosts` names
hosts whose addresses aren't checked (an operator's internal webhook receiver, DEX_ALERT_ALLOW_PRIVATE_HOSTS).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_REDIRECTS = 5
MAX_BYTES = 512 * 1024
TIMEOUT = 10.0
USER_AGENT = "Dex-fetch/1 (+agent tool)"
_REDIRECTS = {301, 302, 303, 307, 308}
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class FetchError(Exception):
    """The URL was refused or couldn't be fetched; the message says why, for the model to read."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


@dataclass(frozen=True)
class Page:
    url: str  # after redirects
    status: int
    content_type: str
    text: str
    truncated: bool


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address leads to (mapped, NAT64, 6to4, Teredo, IPv4-compatible)."""
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if any(ip in net for net in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def is_public_address(ip: IPAddress) -> bool:
    """True for an address on the public internet; False for anything private, local or special."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        embedded = _embedded_ipv4(ip)
        if embedded:
            return all(is_public_address(v4) for v4 in embedded)
    special = (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )
    return not special


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"could not resolve the host {host!r}: {exc}", reason="could not resolve the host") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise FetchError(f"the host {host!r} has no address")
    return addresses


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # with the query string
    ip: IPAddress


def _vet(url: str, allow: Callable[[IPAddress], bool], trusted_hosts: Collection[str] = ()) -> _Target:
    """Parse and check `url`; the address to connect to, or FetchError."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchError(f"not a valid URL: {url[:200]!r} ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"refused {url[:200]!r}: only http and https URLs can be fetched")
    if parts.username is not None or parts.password is not None:
        raise FetchError(f"refused {url[:200]!r}: URLs with credentials can't be fetched")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchError(f"refused {url[:200]!r}: the URL has no host")
    try:
        host = host.encode("idna").decode("ascii")  # an international name, as DNS and the Host header want it
    except UnicodeError:
        raise FetchError(f"refused {url[:200]!r}: {host!r} is not a valid host name") from None
    port = port or (443 if scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    addresses = [literal] if literal is not None else _resolve(host, port)
    trusted = host.lower() in trusted_hosts
    for ip in addresses:
        if not trusted and not allow(ip):
            shown = host if literal is not None else f"{host} ({ip})"
            raise FetchError(
                f"refused {url[:200]!r}: {shown} is a private, loopback, link-local or otherwise non-public "
                "address; only public internet hosts can be fetched",
                reason=f"refused: {shown} is not a public address",
            )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(scheme, host, port, path, addresses[0])


def _connect(ip: IPAddress, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to exactly `ip` (no name lookup of any kind, unlike socket.create_connection)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((str(ip), port))
    except BaseException:
        sock.close()
        raise
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the vetted address, whatever the host name resolves to now."""

    def __init__(self, target: _Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self._ip = target.ip

    def connect(self) -> None:
        self.sock = _connect(self._ip, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: _Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
        self._ip = target.ip

    def connect(self) -> None:
        sock = _connect(self._ip, self.port, self.timeout)
        # The certificate is checked against the URL's host name, as for any HTTPS request.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _host_header(target: _Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def fetch(
    url: str,
    *,
    max_bytes: int = MAX_BYTES,
    timeout: float = TIMEOUT,
    max_redirects: int = MAX_REDIRECTS,
    allow: Callable[[IPAddress], bool] = is_public_address,
) -> Page:
    """GET `url` under the rules of this module. `allow` decides which addresses may be connected to (tests
    widen it to one address of their own; everyone else keeps the default)."""
    return request("GET", url, max_bytes=max_bytes, timeout=timeout, max_redirects=max_redirects, allow=allow)


def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    max_bytes: int = MAX_BYTES,
    timeout: float = TIMEOUT,
    max_redirects: int = MAX_REDIRECTS,
    allow: Callable[[IPAddress], bool] = is_public_address,
    trusted_hosts: Collection[str] = (),
) -> Page:
    """`method` `url` (with `body`) under the rules of this module; the answer, whatever its status (a redirect
    this method doesn't follow comes back as it is). `trusted_hosts`: lower-case host names or address
    literals exempt from the address check."""
    deadline = time.monotonic() + timeout
    current = url
    follow = _REDIRECTS if method in ("GET", "HEAD") else {307, 308}
    sent_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    for _hop in range(max_redirects + 1):
        target = _vet(current, allow, trusted_hosts)
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"fetching {url[:200]!r} took longer than {timeout:g}s", reason="timed out")
        cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
        conn = cls(target, timeout=left)
        try:
            conn.putrequest(method, target.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", _host_header(target))
            if method == "GET":
                conn.putheader("Accept", "text/html, text/plain, application/json;q=0.9, */*;q=0.5")
            conn.putheader("Accept-Encoding", "identity")
            for name, value in sent_headers.items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            if response.status in follow:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(
                        f"{current[:200]!r} answered {response.status} without a Location",
                        reason=f"HTTP {response.status} without a Location",
                    )
                current = urljoin(current, location)
                continue
            data, truncated = _read(response, max_bytes, deadline, url, timeout)
            content_type = response.getheader("Content-Type", "") or ""
            return Page(
                url=current,
                status=response.status,
                content_type=content_type,
                text=data.decode(_charset(content_type), errors="replace"),
                truncated=truncated,
            )
        except FetchError:
            raise
        except TimeoutError:
            raise FetchError(f"fetching {url[:200]!r} took longer than {timeout:g}s", reason="timed out") from None
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise FetchError(f"could not fetch {current[:200]!r}: {exc or type(exc).__name__}", reason=why) from None
        finally:
            conn.close()
    raise FetchError(f"{url[:200]!r} redirected more than {max_redirects} times", reason="too many redirects")


def _read(
    response: http.client.HTTPResponse, max_bytes: int, deadline: float, url: str, timeout: float
) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            raise FetchError(f"fetching {url[:200]!r} took longer than {timeout:g}s", reason="timed out")
        chunk = response.read(min(64 * 1024, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    return body[:max_bytes], len(body) > max_bytes


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "charset" and value:
            charset = value.strip("\"' ")
            try:
                "".encode(charset)
            except LookupError:
                break
            return charset
    return "utf-8"
