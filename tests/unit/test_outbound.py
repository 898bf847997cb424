"""serve_app/outbound.py: which addresses a callback may go to, the pinned connect, signatures, and
failures described without internal detail. Real sockets on 127.0.0.1, allowed by name where needed."""

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.outbound import (
    Outbound,
    Refused,
    address_kind,
    describe_failure,
    destination,
    sign,
    url_problem,
    verify_signature,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1::1"


def run(coroutine):
    return asyncio.run(coroutine)


async def _check(url: str, **options):
    outbound = Outbound(**options)
    try:
        return await outbound.check(url)
    finally:
        await outbound.aclose()


def refusal(url: str, **options) -> str:
    with pytest.raises(Refused) as info:
        run(_check(url, **options))
    return info.value.reason


def fixed(answers: dict[str, list[str]], calls: list | None = None):
    """A resolver that answers from a table (no DNS)."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return resolve


# -- what is refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        # 127.0.0.1 in every spelling getaddrinfo accepts: the resolver normalises them all
        ("http://127.0.0.1/", "a loopback address"),
        ("http://127.0.0.1:8000/-/routes", "a loopback address"),
        ("http://2130706433/", "a loopback address"),
        ("http://017700000001/", "a loopback address"),
        ("http://0177.0.0.1/", "a loopback address"),
        ("http://0x7f000001/", "a loopback address"),
        ("http://0x7f.1/", "a loopback address"),
        ("http://127.1/", "a loopback address"),
        ("http://127.0.1/", "a loopback address"),
        ("http://127.255.255.254/", "a loopback address"),
        ("http://localhost/", "a loopback address"),
        ("http://LOCALHOST:9000/minio/admin", "a loopback address"),
        ("http://[::1]/", "a loopback address"),
        ("http://[0:0:0:0:0:0:0:1]/", "a loopback address"),
        ("http://[::ffff:127.0.0.1]/", "an IPv4-mapped form of 127.0.0.1, a loopback address"),
        ("http://[::ffff:7f00:1]/", "an IPv4-mapped form of 127.0.0.1, a loopback address"),
        ("http://[::127.0.0.1]/", "an IPv4-compatible form of 127.0.0.1, a loopback address"),
        ("http://[2002:7f00:1::1]/", "a 6to4 form of 127.0.0.1, a loopback address"),
        # unspecified
        ("http://0.0.0.0/", "an unspecified address"),
        ("http://0/", "an unspecified address"),
        ("http://0.1.2.3/", "an unspecified address"),
        ("http://[::]/", "an unspecified address"),
        # link-local, the cloud metadata address among them
        ("http://169.254.169.254/latest/meta-data", "a link-local address"),
        ("http://0xa9fea9fe/", "a link-local address"),
        ("http://[fe80::1]/", "a link-local address"),
        ("http://[::ffff:169.254.169.254]/", "an IPv4-mapped form of 169.254.169.254, a link-local address"),
        # private
        ("http://10.0.0.1/", "a private address"),
        ("http://012.0.0.1/", "a private address"),
        ("http://172.16.0.1/", "a private address"),
        ("http://172.31.255.255/", "a private address"),
        ("http://192.168.1.1/", "a private address"),
        ("http://3232235777/", "a private address"),
        ("http://198.18.0.2/", "a private address"),
        ("http://192.0.2.1/", "a private address"),
        ("http://[fc00::1]/", "a private address"),
        ("http://[fd12:3456::1]/", "a private address"),
        ("http://[2002:a00:1::]/", "a 6to4 form of 10.0.0.1, a private address"),
        ("http://[2001:db8::1]/", "a private address"),
        # shared address space (carrier-grade NAT)
        ("http://100.64.0.1/", "a shared (carrier-grade NAT) address"),
        ("http://100.127.255.254/", "a shared (carrier-grade NAT) address"),
        # multicast, reserved, site-local, broadcast
        ("http://224.0.0.1/", "a multicast address"),
        ("http://239.255.255.250/", "a multicast address"),
        ("http://[ff02::1]/", "a multicast address"),
        ("http://240.0.0.1/", "a reserved address"),
        ("http://255.255.255.255/", "a reserved address"),
        ("http://[fec0::1]/", "a site-local address"),
        # Teredo (the client address is stored inverted: 127.0.0.1 is 80ff:fffe) and NAT64
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "a Teredo form of 127.0.0.1, a loopback address"),
        ("http://[64:ff9b::a9fe:a9fe]/", "a NAT64 form of 169.254.169.254, a link-local address"),
        ("http://[64:ff9b::a00:1]/", "a NAT64 form of 10.0.0.1, a private address"),
    ],
)
def test_every_spelling_and_range_that_is_not_public_is_refused(url, kind):
    reason = refusal(url)
    assert f"{kind}; callbacks go only to public addresses" in reason
    # A numeric host is named back as the caller wrote it; a name's address is not given away.
    assert reason.startswith("resolves to " if "localhost" not in url.lower() else "the host localhost resolves to ")


@pytest.mark.parametrize(
    "address",
    ["100::1", "2001:10::1", "198.51.100.7", "203.0.113.9", "2001:0:4136:e378::1", "fe80::1%1"],
)
def test_special_purpose_ranges_are_not_public(address):
    assert address_kind(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", [PUBLIC_V4, PUBLIC_V6, "8.8.8.8", "1.1.1.1", "2a00:1450:4001:82b::200e"])
def test_public_ranges_are_public(address):
    assert address_kind(ipaddress.ip_address(address)) is None


def test_a_name_with_any_one_forbidden_address_is_refused():
    resolver = fixed({"mixed.test": [PUBLIC_V4, "10.0.0.7"], "v6.test": [PUBLIC_V4, "::1"]})
    mixed, v6 = refusal("http://mixed.test/", resolver=resolver), refusal("http://v6.test/", resolver=resolver)
    assert "the host mixed.test resolves to a private address" in mixed
    assert "the host v6.test resolves to a loopback address" in v6
    assert "10.0.0.7" not in mixed
    assert "::1" not in v6


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://93.184.216.34/x", "must be an http:// or https:// URL"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
        ("gopher://93.184.216.34:6379/_INFO", "must be an http:// or https:// URL"),
        ("http:///no-host", "must name a host"),
        ("http://user:pass@93.184.216.34/", "must not hold a user name or password"),
        ("http://user@93.184.216.34/", "must not hold a user name or password"),
        ("http://:@93.184.216.34/", "must not hold a user name or password"),
        ("http://93.184.216.34@127.0.0.1/", "must not hold a user name or password"),
        ("http://93.184.216.34:99999/", "is not a valid URL"),
        ("http://93.184.216.34:0/", "has port 0"),
        ("http://bad host/", "has an invalid host name"),
        ("http://a$b.example/", "has an invalid host name"),
        ("http://[::1/", "is not a valid URL"),
    ],
)
def test_urls_of_the_wrong_shape_are_refused_without_resolving(url, fragment):
    assert fragment in url_problem(url)

    async def never(host, port):
        raise AssertionError("resolved a URL whose shape is refused")

    assert fragment in refusal(url, resolver=never)


def test_a_name_that_does_not_resolve_is_refused():
    assert refusal("http://nothing.test/", resolver=fixed({})) == "the host nothing.test does not resolve"


def test_a_resolver_that_does_not_answer_is_a_transient_refusal():
    async def slow(host, port):
        await asyncio.sleep(5)
        return [PUBLIC_V4]

    with pytest.raises(Refused) as info:
        run(_check("http://slow.test/", resolver=slow, resolve_timeout_s=0.05))
    assert info.value.transient


# -- what is allowed --------------------------------------------------------------------------


def test_public_addresses_are_allowed_and_pinned():
    target = run(_check(f"http://{PUBLIC_V4}/hook?a=1"))
    assert target.address == ipaddress.ip_address(PUBLIC_V4)
    assert (target.host, target.port, target.path, target.query) == (PUBLIC_V4, 80, "/hook", "a=1")
    assert str(target.request_url) == f"http://{PUBLIC_V4}/hook?a=1"
    assert target.host_header == PUBLIC_V4
    v6 = run(_check(f"https://[{PUBLIC_V6}]:8443/x"))
    assert v6.address == ipaddress.ip_address(PUBLIC_V6)
    assert v6.host_header == f"[{PUBLIC_V6}]:8443"
    assert v6.extensions == {}  # an address: the certificate is checked against it
    assert v6.destination == f"{PUBLIC_V6}:8443"


def test_a_numeric_spelling_of_a_public_address_is_normalised():
    target = run(_check("http://1572395042/x"))  # 93.184.216.34
    assert target.numeric
    assert target.host == PUBLIC_V4
    assert str(target.address) == PUBLIC_V4


def test_a_name_is_pinned_to_the_address_checked_and_keeps_its_name_for_host_and_sni():
    target = run(_check("https://Hooks.Example.test/in", resolver=fixed({"hooks.example.test": [PUBLIC_V4]})))
    assert str(target.request_url) == f"https://{PUBLIC_V4}/in"
    assert target.host_header == "hooks.example.test"
    assert target.extensions == {"sni_hostname": "hooks.example.test"}
    assert target.destination == "hooks.example.test:443"
    assert destination("https://Hooks.Example.test/in") == "hooks.example.test:443"


def test_the_allow_list_admits_named_networks_only():
    allowed = run(_check("http://10.1.2.3:9000/x", allow_networks=["10.0.0.0/8"]))
    assert str(allowed.address) == "10.1.2.3"
    assert "a private address" in refusal("http://192.168.0.1/", allow_networks=["10.0.0.0/8"])
    assert "a loopback address" in refusal("http://127.0.0.1/", allow_networks=["198.18.0.2/32"])
    assert str(run(_check("http://198.18.0.2/", allow_networks=["198.18.0.2/32"])).address) == "198.18.0.2"
    assert "a private address" in refusal("http://198.18.0.3/", allow_networks=["198.18.0.2/32"])
    with pytest.raises(ValueError, match="not a network"):
        Outbound(allow_networks=["not-a-cidr"])


# -- signatures -------------------------------------------------------------------------------


def test_a_signature_verifies_and_nothing_else_does():
    body = b'{"id":"abc","status":"succeeded"}'
    header = sign("whsec_one", body)
    assert header.startswith("t=")
    assert ",v1=" in header
    assert verify_signature("whsec_one", header, body)
    assert verify_signature("whsec_one", header, body.decode())
    assert not verify_signature("whsec_one", header, body.replace(b"succeeded", b"failed"))
    assert not verify_signature("whsec_two", header, body)
    assert not verify_signature("whsec_one", None, body)
    assert not verify_signature("whsec_one", "garbage", body)
    assert not verify_signature("whsec_one", header.split(",")[1], body)  # no timestamp


def test_a_stale_or_future_signature_is_refused():
    body = b"{}"
    old = sign("whsec_one", body, timestamp=int(time.time()) - 301)
    assert not verify_signature("whsec_one", old, body)
    assert verify_signature("whsec_one", old, body, tolerance_s=600)
    future = sign("whsec_one", body, timestamp=int(time.time()) + 301)
    assert not verify_signature("whsec_one", future, body)
    # the timestamp is signed: moving it forward breaks the signature
    _, v1 = old.split(",")
    assert not verify_signature("whsec_one", f"t={int(time.time())},{v1}", body)


# -- real requests -----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path.startswith("/hang"):
            self.server.release.wait(10)
            return
        status = 302 if self.path.startswith("/redirect") else 500 if self.path.startswith("/fail") else 200
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.seen = []
    httpd.release = threading.Event()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def _post(outbound: Outbound, url: str, body: bytes = b"{}", headers=None):
    async def go():
        try:
            return await outbound.post(url, body, headers or {})
        finally:
            await outbound.aclose()

    return run(go())


def test_the_request_goes_to_the_checked_address_and_the_name_is_never_resolved_again(server, monkeypatch):
    port = server.server_port
    calls: list = []
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])  # a second lookup would answer elsewhere

    async def resolver(host, port_):
        calls.append((host, port_))
        return next(answers)

    real = socket.getaddrinfo

    def no_dns(host, *args, **kwargs):  # neither httpx nor anything else may look the name up
        flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
        if host == "callback.test" and not flags & socket.AI_NUMERICHOST:
            raise AssertionError("callback.test was resolved outside the checked path")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    outbound = Outbound(allow_networks=["127.0.0.1/32"], resolver=resolver, timeout_s=5)
    body = json.dumps({"id": "job-1"}).encode()
    delivery = _post(outbound, f"http://callback.test:{port}/hook?x=1", body, {"X-Signature": sign("s", body)})
    assert delivery.delivered, delivery.error
    assert calls == [("callback.test", port)]
    [seen] = server.seen
    assert seen["path"] == "/hook?x=1"
    assert seen["headers"]["Host"] == f"callback.test:{port}"
    assert seen["body"] == body
    assert verify_signature("s", seen["headers"]["X-Signature"], seen["body"])
    # the next delivery checks again: DNS now answers a private address, and nothing is sent
    again = _post(Outbound(allow_networks=["127.0.0.1/32"], resolver=resolver), f"http://callback.test:{port}/hook")
    assert again.error == (
        "refused: the host callback.test resolves to a private address; callbacks go only to public addresses"
    )
    assert len(server.seen) == 1


def _self_signed(tmp_path, name: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_tls_to_the_pinned_address_sends_the_name_and_checks_the_certificate_against_it(server, tmp_path):
    cert, key = _self_signed(tmp_path, "callback.test")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    names: list = []
    server_context.sni_callback = lambda sock, name, ctx: names.append(name)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    client_context = ssl.create_default_context(cafile=cert)
    resolver = fixed({"callback.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    port = server.server_port

    def outbound():
        return Outbound(allow_networks=["127.0.0.1/32"], resolver=resolver, verify=client_context, timeout_s=5)

    delivery = _post(outbound(), f"https://callback.test:{port}/tls")
    assert delivery.delivered, delivery.error
    assert names[0] == "callback.test"
    assert server.seen[-1]["headers"]["Host"] == f"callback.test:{port}"
    # the same address under a name its certificate does not carry
    assert _post(outbound(), f"https://other.test:{port}/tls").error == "TLS error"


def test_failures_are_recorded_in_general_words_only(server):
    port = server.server_port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]

    def post(url, **options):
        return _post(Outbound(allow_networks=["127.0.0.1/32"], timeout_s=options.pop("timeout_s", 5)), url).error

    errors = {
        "refused": post(f"http://127.0.0.1:{closed}/x"),
        "fail": post(f"http://127.0.0.1:{port}/fail"),
        "redirect": post(f"http://127.0.0.1:{port}/redirect"),
        "hang": post(f"http://127.0.0.1:{port}/hang", timeout_s=0.3),
        "forbidden": _post(Outbound(), f"http://127.0.0.1:{port}/x").error,
    }
    assert errors == {
        "refused": "connection refused",
        "fail": "HTTP 500 from receiver",
        "redirect": "HTTP 302 from receiver (redirects are not followed)",
        "hang": "timed out",
        "forbidden": "refused: resolves to 127.0.0.1, a loopback address; callbacks go only to public addresses",
    }
    assert not any(s["path"] == "/elsewhere" for s in server.seen)  # the redirect was not followed
    for name, error in errors.items():
        if name != "forbidden":
            assert str(port) not in error
            assert str(closed) not in error
            assert "127.0.0.1" not in error
        assert "Error" not in error
        assert "Exception" not in error
        assert "errno" not in error.lower()


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("internal detail: mongodb://10.1.2.3:27017"),
        OSError(113, "No route to host 10.1.2.3"),
        KeyError("secret"),
        ValueError("http://127.0.0.1:8265/api/jobs"),
    ],
)
def test_an_unexpected_failure_says_nothing_of_itself(exc):
    described = describe_failure(exc)
    assert described in ("delivery failed", "host unreachable")
    assert "10.1.2.3" not in described
    assert type(exc).__name__ not in described


# -- the gateway refuses at submission -----------------------------------------------------------


@pytest.fixture
def api(client):
    """The gateway with a fake model, every request authenticated (tests/unit/conftest.py)."""
    return client


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:8000/-/routes", "resolves to 127.0.0.1, a loopback address"),
        ("http://2130706433/", "resolves to 127.0.0.1, a loopback address"),
        ("http://0x7f.1/", "resolves to 127.0.0.1, a loopback address"),
        ("http://[::1]/", "resolves to ::1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254, a link-local address"),
        ("http://10.0.0.1/", "resolves to 10.0.0.1, a private address"),
        ("http://localhost/", "a loopback address"),
        ("http://u:p@93.184.216.34/", "must not hold a user name or password"),
    ],
)
def test_submitting_a_forbidden_callback_url_is_422_with_the_reason(api, url, fragment):
    response = api.post("/v1/jobs", json={"model": "fake-model", "input": ["x"], "callback_url": url})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "callback_url"
    assert error["code"] == "validation_error"
    assert fragment in error["message"]
    assert error["message"].startswith("callback_url")


def test_the_secret_endpoint_is_in_the_schema(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert "post" in paths["/v1/callbacks/secret"]
    schema = api.get("/openapi.json").json()
    assert schema["paths"]["/v1/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SubmittedJob"
    }
    assert "callback_secret" in schema["components"]["schemas"]["SubmittedJob"]["properties"]
