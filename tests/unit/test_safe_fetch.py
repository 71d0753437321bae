"""runs.safe_fetch (and the research agent's `fetch_url` tool): URLs that lead to private, loopback,
link-local or otherwise non-public addresses are refused — directly, through DNS, and on every redirect — and
the connection goes to the address that was checked.

Real sockets: two local HTTP servers. "outside" listens on 127.0.0.2 and stands in for a public host (the
tests widen `allow` to exactly that address; the default policy refuses it like any loopback address);
"inside" listens on 127.0.0.1 and stands for what must stay unreachable: it counts every request it gets.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from dex_agents.research import fetch_url

from runs import safe_fetch
from runs.safe_fetch import FetchError, fetch, is_public_address

OUTSIDE_IP = ipaddress.ip_address("127.0.0.2")


def allow_outside(ip: Any) -> bool:
    return is_public_address(ip) or ip == OUTSIDE_IP


class Server:
    def __init__(self, host: str, routes: dict[str, tuple[int, dict[str, str], bytes]]):
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                server.hits.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def inside() -> Iterator[Server]:
    server = Server("127.0.0.1", {"/secret": (200, {"Content-Type": "text/plain"}, b"internal secret")})
    yield server
    server.stop()


@pytest.fixture
def outside(inside: Server) -> Iterator[Server]:
    to_inside = f"http://127.0.0.1:{inside.port}/secret"
    routes = {
        "/page": (
            200,
            {"Content-Type": "text/html; charset=utf-8"},
            b"<html><body><p>Hello &amp; welcome</p></body></html>",
        ),
        "/to-page": (302, {"Location": "/page"}, b""),
        "/to-loopback": (302, {"Location": to_inside}, b""),
        "/to-localhost": (301, {"Location": f"http://localhost:{inside.port}/secret"}, b""),
        "/to-metadata": (307, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-mapped": (308, {"Location": f"http://[::ffff:127.0.0.1]:{inside.port}/secret"}, b""),
        "/big": (200, {"Content-Type": "text/plain"}, b"y" * 300_000),
    }
    # A loop of redirects, to count how far it is followed.
    for i in range(8):
        routes[f"/hop{i}"] = (302, {"Location": f"/hop{i + 1}"}, b"")
    server = Server("127.0.0.2", routes)
    yield server
    server.stop()


# --- the address policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "::127.0.0.1",  # IPv4-compatible
    ],
)
def test_non_public_addresses_are_not_allowed(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/secret",
        "http://localhost:{port}/secret",
        "http://10.0.0.1/",
        "http://[::1]:{port}/secret",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://0.0.0.0:{port}/secret",
        "http://2130706433:{port}/secret",  # 127.0.0.1 as one decimal number
    ],
)
def test_urls_to_private_loopback_and_link_local_hosts_are_refused(url: str, inside: Server) -> None:
    with pytest.raises(FetchError, match="refused|could not resolve"):
        fetch(url.format(port=inside.port))
    assert inside.hits == []


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://example.com/x", "only http and https"),
        ("gopher://127.0.0.1:6379/_INFO", "only http and https"),
        ("http://user:secret@example.com/", "credentials"),
        ("http:///nohost", "no host"),
        ("http://[::1/", "not a valid URL"),
    ],
)
def test_other_schemes_and_odd_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(FetchError, match=why):
        fetch(url)


def test_a_name_that_resolves_to_a_private_address_is_refused(monkeypatch: Any, inside: Server) -> None:
    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "intranet.example"
        # One public and one private answer: any private answer refuses the host.
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(safe_fetch.socket, "getaddrinfo", resolve)
    with pytest.raises(FetchError, match=r"intranet\.example \(10\.0\.0\.5\) is a private"):
        fetch("http://intranet.example/")


# --- fetching, redirects -----------------------------------------------------------------------------------


def test_an_allowed_page_is_fetched(outside: Server) -> None:
    page = fetch(f"http://127.0.0.2:{outside.port}/to-page", allow=allow_outside)
    assert page.status == 200 and page.url.endswith("/page")
    assert "Hello &amp; welcome" in page.text and not page.truncated


@pytest.mark.parametrize("route", ["/to-loopback", "/to-localhost", "/to-metadata", "/to-mapped"])
def test_a_redirect_to_an_inside_address_is_refused(route: str, outside: Server, inside: Server) -> None:
    with pytest.raises(FetchError, match="refused"):
        fetch(f"http://127.0.0.2:{outside.port}{route}", allow=allow_outside)
    assert outside.hits == [route]  # the first hop was made: the refusal came from re-checking the redirect
    assert inside.hits == []


def test_redirects_are_followed_at_most_five_times(outside: Server) -> None:
    with pytest.raises(FetchError, match="redirected more than 5 times"):
        fetch(f"http://127.0.0.2:{outside.port}/hop0", allow=allow_outside)
    assert outside.hits == [f"/hop{i}" for i in range(6)]


def test_the_body_is_capped(outside: Server) -> None:
    page = fetch(f"http://127.0.0.2:{outside.port}/big", allow=allow_outside, max_bytes=10_000)
    assert len(page.text) == 10_000 and page.truncated


def test_it_connects_to_the_address_it_checked_not_a_rebound_one(
    monkeypatch: Any, outside: Server, inside: Server
) -> None:
    # DNS rebinding: the name answers an allowed address to the check, then a loopback one. Only one
    # resolution happens, and the connection goes to the address that was checked.
    answers = iter(["127.0.0.2", "127.0.0.1", "127.0.0.1"])
    calls: list[str] = []

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(safe_fetch.socket, "getaddrinfo", resolve)
    page = fetch(f"http://rebind.example:{outside.port}/page", allow=allow_outside)
    assert page.status == 200 and "welcome" in page.text
    assert calls == ["rebind.example"]
    assert inside.hits == [] and outside.hits == ["/page"]


# --- the research agent's tool -----------------------------------------------------------------------------


def test_the_fetch_url_tool_answers_a_refusal_the_model_can_read() -> None:
    answer = fetch_url("http://169.254.169.254/latest/meta-data/")
    assert answer["url"] == "http://169.254.169.254/latest/meta-data/"
    assert "refused" in answer["error"] and "non-public" in answer["error"]
    json.dumps(answer)  # a tool result goes back to the model as JSON


@pytest.mark.django_db
def test_the_research_agent_reads_urls_through_the_safe_tool(settings: Any) -> None:
    from runs.ai.testserver import serve_in_thread
    from runs.models import RunStatus
    from runs.testing import run_task

    server, base_url = serve_in_thread()
    settings.DEX_LLM_PROVIDERS = json.dumps({"local": {"kind": "openai", "base_url": base_url, "models": ["*"]}})
    try:
        run = run_task(
            "research-agent", {"topic": "context managers", "depth": 1, "urls": ["http://localhost:1/admin"]}
        )
    finally:
        server.stop()
    assert run.status == RunStatus.COMPLETED, run.error
    fetch_step = run.steps.get(key="fetch")
    assert "refused" in fetch_step.output["error"]
    assert run.output["pages"] == [fetch_step.output]
