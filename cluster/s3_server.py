"""The local S3 server: moto's S3, in this process, behind a gate that authenticates every request.

    INFER_S3_ACCESS_KEY=... INFER_S3_SECRET_KEY=... python -m cluster.s3_server --host 127.0.0.1 --port 9000

moto answers any credentials and serves an admin API (`/moto-api/reset` wipes every bucket). Here
only moto's S3 application is mounted, and the gate in front of it

- answers 404 for `/moto-api/` and moto's other non-S3 paths, and for requests meant for another
  AWS service;
- checks AWS Signature Version 4 of every other request against one key pair, read from the
  environment (never from argv, which `ps` shows): the Authorization header, or a presigned URL's
  query string (with its expiry). The canonical request, string to sign and signature are
  botocore's (`S3SigV4Auth`, `S3SigV4QueryAuth`), fed a request rebuilt from the server side as
  moto's own `moto/iam/access_control.py` does; a signed payload hash is checked against the
  body. A refusal is S3's XML error with 403 (AccessDenied, InvalidAccessKeyId,
  SignatureDoesNotMatch, RequestTimeTooSkewed) or 400 (malformed);
- checks browser POST uploads (a multipart form with `policy` and `x-amz-signature`), which moto
  does not: the policy's signature, expiry and every condition (`bucket`, `key` and other fields by
  `eq`/`starts-with`, `content-length-range`; an unknown condition is refused), and every form field
  must be covered by a condition. The size range is enforced on the bytes: a Content-Length beyond
  the range's maximum plus the form's overhead is refused before the file is read, and the file is
  read only up to the maximum. The object is then put through moto as a plain PUT.

Not covered: SigV2, session tokens (`X-Amz-Security-Token`), chunk-signed streaming uploads
(`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`, answered 501), IAM-style policies (one key may do anything),
and `${filename}` in POST keys.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit
from xml.sax.saxutils import escape

# Buckets by path only: moto would take a bucket from a `Host: <bucket>.anything` subdomain, and
# a POST upload's Host is the client's, not covered by its policy. Set before moto is imported.
os.environ["S3_IGNORE_SUBDOMAIN_BUCKETNAME"] = "true"

from botocore.auth import S3SigV4Auth, S3SigV4PostAuth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials
from moto.core.request import PRESERVED_HEADER_NAMES_ENVIRON_KEY, environ_key_for_header
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData
from werkzeug.serving import make_server

logger = logging.getLogger("cluster.s3_server")

ACCESS_KEY_ENV = "INFER_S3_ACCESS_KEY"
SECRET_KEY_ENV = "INFER_S3_SECRET_KEY"
REGION_ENV = "INFER_S3_REGION"

ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_CLOCK_SKEW_S = 15 * 60
MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# POST uploads: the fields before the file (AWS allows 20 KB), and what a form adds to the file's bytes.
POST_MAX_PRE_DATA_BYTES = 20 * 1024
POST_FORM_OVERHEAD_BYTES = POST_MAX_PRE_DATA_BYTES + 4 * 1024
# After refusing mid-body, read at most this much more (and discard it) so the client can see the
# answer; a client still sending after that gets its connection closed.
DRAIN_AFTER_REFUSAL_BYTES = 8 * 1024 * 1024
READ_CHUNK = 64 * 1024
SPOOL_IN_MEMORY_BYTES = 8 * 1024 * 1024

# Paths moto serves besides S3 (its admin API, instance metadata): never reachable here.
NOT_S3_PATHS = ("/moto-api", "/favicon.ico", "/latest/meta-data", "/latest/api")

# Fields a POST policy may constrain, besides x-amz-meta-*: anything else is refused.
POST_CONDITION_FIELDS = {
    "bucket",
    "key",
    "content-type",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "success_action_status",
    "x-amz-algorithm",
    "x-amz-credential",
    "x-amz-date",
}
POST_UNCONDITIONED_FIELDS = {"policy", "x-amz-signature", "file"}
POST_STORED_HEADERS = ("content-type", "cache-control", "content-disposition", "content-encoding")


@dataclass(frozen=True)
class KeyPair:
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> KeyPair:
        env = os.environ if environ is None else environ
        access_key, secret_key = env.get(ACCESS_KEY_ENV, ""), env.get(SECRET_KEY_ENV, "")
        if not access_key or not secret_key:
            raise SystemExit(f"{ACCESS_KEY_ENV} and {SECRET_KEY_ENV} must be set (the server accepts only that key)")
        return cls(access_key, secret_key, env.get(REGION_ENV) or "us-east-1")

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.access_key, self.secret_key)


class S3Refusal(Exception):
    """An S3 error answer: status, code and message."""

    def __init__(self, status: int, code: str, message: str, *, stop_reading: int = DRAIN_AFTER_REFUSAL_BYTES) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        # Of the body left unread, how much more to read (and discard) so the client sees the answer.
        self.stop_reading = stop_reading


def _denied(message: str) -> S3Refusal:
    return S3Refusal(403, "AccessDenied", message)


def _mismatch() -> S3Refusal:
    return S3Refusal(
        403,
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    )


def _unknown_key() -> S3Refusal:
    return S3Refusal(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")


STATUS_TEXT = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    411: "Length Required",
    501: "Not Implemented",
}


# -- signature checks: header and query string -------------------------------------------------------


class _HeaderVerifier(S3SigV4Auth):
    """botocore's S3 signer, signing exactly the headers the client said it signed."""

    def __init__(self, keys: KeyPair, signed: HTTPHeaders) -> None:
        super().__init__(keys.credentials, "s3", keys.region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        return self._signed


class _QueryVerifier(S3SigV4QueryAuth):
    """botocore's presigned-URL signer (payload: UNSIGNED-PAYLOAD), with the client's signed headers."""

    def __init__(self, keys: KeyPair, signed: HTTPHeaders) -> None:
        super().__init__(keys.credentials, "s3", keys.region)
        self._signed = signed

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        return self._signed


def _raw_path(environ: dict[str, Any]) -> str:
    """The path as the client sent it (still percent-encoded): what it signed."""
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or quote(environ.get("PATH_INFO", "/"))
    parts = urlsplit(raw_uri)
    path = parts.path if parts.scheme else raw_uri.split("?", 1)[0]
    return path or "/"


def _query_pairs(environ: dict[str, Any]) -> list[tuple[str, str]]:
    """The query string as decoded (name, value) pairs, in order, blanks kept ('?uploads')."""
    query = environ.get("QUERY_STRING", "")
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    pairs = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def _header(environ: dict[str, Any], name: str) -> str | None:
    value = environ.get(environ_key_for_header(name))
    return None if value is None else str(value)


def _signed_headers(environ: dict[str, Any], names: list[str]) -> HTTPHeaders:
    """The signed headers with the values this request carries (a missing one: the signature fails)."""
    headers = HTTPHeaders()
    for name in names:
        value = _header(environ, name)
        headers[name] = value if value is not None else ""
    return headers


def _parse_amz_date(value: str) -> datetime:
    try:
        return datetime.strptime(value, AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise _denied(f"X-Amz-Date {value!r} is not a date like 20240101T000000Z") from None


def _parse_scope(credential: str, amz_date: str, keys: KeyPair) -> None:
    """Credential=<key>/<yyyymmdd>/<region>/s3/aws4_request: the one key, its region, the date signed."""
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise S3Refusal(400, "AuthorizationHeaderMalformed", f"the credential {'/'.join(parts[1:])!r} is malformed")
    access_key, date, region, service, _ = parts
    if not hmac.compare_digest(access_key.encode(), keys.access_key.encode()):
        raise _unknown_key()
    if service != "s3":
        raise S3Refusal(400, "AuthorizationHeaderMalformed", f"this server is S3 only, not {service!r}")
    if region != keys.region:
        raise S3Refusal(
            400, "AuthorizationHeaderMalformed", f"the region {region!r} is wrong; expecting {keys.region!r}"
        )
    if date != amz_date[:8]:
        raise S3Refusal(400, "AuthorizationHeaderMalformed", "the credential's date is not the request's date")


def _aws_request(environ: dict[str, Any], method: str, params: list[tuple[str, str]], amz_date: str) -> AWSRequest:
    """The client's request rebuilt for botocore: method, encoded path, query, and the signing time."""
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    request = AWSRequest(method=method, url=f"http://{host}{_raw_path(environ)}", params=params)
    request.context["timestamp"] = amz_date
    return request


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_header_signature(environ: dict[str, Any], keys: KeyPair, now: float) -> str:
    """Check an Authorization-header request; the payload hash it signed (to check against the body)."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, rest = authorization.partition(" ")
    if scheme != ALGORITHM:
        raise _denied(f"only AWS Signature Version 4 ({ALGORITHM}) is accepted")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, _, value = item.strip().partition("=")
        fields[name] = value
    credential, signed, signature = (fields.get(k, "") for k in ("Credential", "SignedHeaders", "Signature"))
    if not credential or not signed or not signature:
        raise S3Refusal(400, "AuthorizationHeaderMalformed", "Credential, SignedHeaders and Signature are required")
    amz_date = _header(environ, "x-amz-date") or ""
    when = _parse_amz_date(amz_date)
    _parse_scope(credential, amz_date, keys)
    if abs(now - when.timestamp()) > MAX_CLOCK_SKEW_S:
        raise S3Refusal(
            403, "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."
        )
    payload = _header(environ, "x-amz-content-sha256")
    if payload is None:
        raise S3Refusal(400, "InvalidRequest", "Missing required header for this request: x-amz-content-sha256")
    if payload.startswith("STREAMING-") and payload != STREAMING_UNSIGNED_TRAILER:
        raise S3Refusal(501, "NotImplemented", f"x-amz-content-sha256 {payload} is not supported by this server")
    if payload not in (UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_TRAILER) and not HEX_SHA256.match(payload):
        raise S3Refusal(400, "InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD or a SHA-256 hex digest")
    names = signed.split(";")
    if names != sorted(set(names)) or any(n != n.lower() or not n for n in names):
        raise S3Refusal(400, "AuthorizationHeaderMalformed", "SignedHeaders must be sorted lower-case names")
    original = environ.get(PRESERVED_HEADER_NAMES_ENVIRON_KEY) or {}
    present_amz = {
        original.get(key, key[5:].replace("_", "-")).lower()
        for key in environ
        if key.startswith("HTTP_X_AMZ_") and key != "HTTP_X_AMZ_SECURITY_TOKEN"
    }
    if "HTTP_X_AMZ_SECURITY_TOKEN" in environ:
        raise _denied("session tokens (X-Amz-Security-Token) are not accepted")
    unsigned = sorted(({"host"} | present_amz) - set(names))
    if unsigned:
        raise _denied(f"these headers must be signed: {', '.join(unsigned)}")

    request = _aws_request(environ, environ["REQUEST_METHOD"], _query_pairs(environ), amz_date)
    request.headers = _signed_headers(environ, names)
    verifier = _HeaderVerifier(keys, request.headers)
    canonical = verifier.canonical_request(request)
    expected = verifier.signature(verifier.string_to_sign(request, canonical), request)
    if not _same(expected, signature):
        raise _mismatch()
    return payload


def check_query_signature(environ: dict[str, Any], keys: KeyPair, now: float) -> None:
    """Check a presigned URL: signature, and that it has not expired (nor was made for the future)."""
    pairs = _query_pairs(environ)
    query: dict[str, str] = {}
    for name, value in pairs:
        if name.lower().startswith("x-amz-") and name in query:
            raise S3Refusal(400, "InvalidArgument", f"{name} is given twice")
        query[name] = value
    if "X-Amz-Security-Token" in query:
        raise _denied("session tokens (X-Amz-Security-Token) are not accepted")
    needed = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders")
    missing = [name for name in (*needed, "X-Amz-Signature") if not query.get(name)]
    if missing:
        raise _denied(f"Query-string authentication requires {', '.join(missing)}")
    if query["X-Amz-Algorithm"] != ALGORITHM:
        raise _denied(f"only {ALGORITHM} is accepted")
    amz_date = query["X-Amz-Date"]
    when = _parse_amz_date(amz_date).timestamp()
    _parse_scope(query["X-Amz-Credential"], amz_date, keys)
    try:
        expires = int(query["X-Amz-Expires"])
    except ValueError:
        raise _denied("X-Amz-Expires must be a number of seconds") from None
    if not 1 <= expires <= MAX_PRESIGN_EXPIRES_S:
        raise _denied(f"X-Amz-Expires must be between 1 and {MAX_PRESIGN_EXPIRES_S}")
    names = query["X-Amz-SignedHeaders"].split(";")
    if "host" not in names or any(n != n.lower() or not n for n in names):
        raise _denied("X-Amz-SignedHeaders must include host, in lower case")

    request = _aws_request(
        environ, environ["REQUEST_METHOD"], [(n, v) for n, v in pairs if n != "X-Amz-Signature"], amz_date
    )
    request.headers = _signed_headers(environ, names)
    verifier = _QueryVerifier(keys, request.headers)
    canonical = verifier.canonical_request(request)
    expected = verifier.signature(verifier.string_to_sign(request, canonical), request)
    if not _same(expected, query["X-Amz-Signature"]):
        raise _mismatch()
    # Checked after the signature, so the answer says nothing about a URL its holder could not have made.
    if now > when + expires:
        raise _denied("Request has expired")
    if when > now + MAX_CLOCK_SKEW_S:
        raise _denied("Request is not valid yet")


# -- bodies --------------------------------------------------------------------------------------------


def _content_length(environ: dict[str, Any]) -> int | None:
    value = environ.get("CONTENT_LENGTH")
    if value in (None, ""):
        return None
    try:
        length = int(value)
    except ValueError:
        raise S3Refusal(400, "InvalidArgument", "Content-Length is not a number") from None
    if length < 0:
        raise S3Refusal(400, "InvalidArgument", "Content-Length is negative")
    return length


def _read_some(stream: Any, size: int) -> bytes:
    """Up to size bytes, without waiting for all of them (what has arrived)."""
    read1 = getattr(stream, "read1", None)
    return read1(size) if read1 is not None else stream.read(size)


def _spool_body(environ: dict[str, Any], expected_sha256: str | None) -> None:
    """Read the body to a spool (hashing it when its SHA-256 was signed) and hand that on instead."""
    length = _content_length(environ)
    if length is None and not environ.get("wsgi.input_terminated"):
        length = 0  # neither a length nor chunks: no body
    stream = environ["wsgi.input"]
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115 (handed on as wsgi.input)
    digest = hashlib.sha256()
    total = 0
    while length is None or total < length:
        block = stream.read(min(READ_CHUNK, length - total) if length is not None else READ_CHUNK)
        if not block:
            break
        total += len(block)
        digest.update(block)
        spool.write(block)
    if length is not None and total < length:
        raise S3Refusal(400, "IncompleteBody", "You did not provide the number of bytes specified by Content-Length")
    if expected_sha256 is not None and not _same(digest.hexdigest(), expected_sha256):
        raise S3Refusal(
            400,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        )
    spool.seek(0)
    environ["wsgi.input"] = spool
    environ["CONTENT_LENGTH"] = str(total)
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)


# -- POST policy uploads -------------------------------------------------------------------------------


@dataclass
class PostUpload:
    bucket: str
    key: str
    fields: dict[str, str]
    body: Any  # a file positioned at 0
    size: int


def _policy_conditions(policy: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """The policy's conditions as (operator, field, value); ValueError for one not understood."""
    conditions = policy.get("conditions")
    if not isinstance(conditions, list):
        raise ValueError("the policy has no conditions list")
    parsed = []
    for condition in conditions:
        if isinstance(condition, dict) and len(condition) == 1:
            ((name, value),) = condition.items()
            parsed.append(("eq", name.lower(), value))
        elif isinstance(condition, list) and len(condition) == 3 and isinstance(condition[0], str):
            operator = condition[0].lower()
            if operator == "content-length-range":
                low, high = condition[1], condition[2]
                if (
                    not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (low, high))
                    or low > high
                ):
                    raise ValueError(f"content-length-range {condition[1:]} is not a range of sizes")
                parsed.append((operator, "", (low, high)))
                continue
            if operator not in ("eq", "starts-with") or not isinstance(condition[1], str):
                raise ValueError(f"unsupported condition {json.dumps(condition)}")
            if not condition[1].startswith("$"):
                raise ValueError(f"condition {json.dumps(condition)} must name a $field")
            parsed.append((operator, condition[1][1:].lower(), condition[2]))
        else:
            raise ValueError(f"unsupported condition {json.dumps(condition)}")
    for operator, name, value in parsed:
        if operator == "content-length-range":
            continue
        if name not in POST_CONDITION_FIELDS and not name.startswith("x-amz-meta-"):
            raise ValueError(f"unsupported condition on {name!r}")
        if not isinstance(value, str):
            raise ValueError(f"the condition on {name!r} must compare with a string")
    return parsed


def check_post_policy(bucket: str, fields: dict[str, str], keys: KeyPair, now: float) -> tuple[int, int | None]:
    """Check a POST form's policy, signature and conditions; the allowed file sizes (min, max or None)."""
    for name in ("policy", "x-amz-algorithm", "x-amz-credential", "x-amz-date", "x-amz-signature"):
        if not fields.get(name):
            raise _denied(f"Bucket POST must contain a field named '{name}'")
    if "x-amz-security-token" in fields:
        raise _denied("session tokens (x-amz-security-token) are not accepted")
    if not fields.get("key"):
        raise S3Refusal(400, "InvalidArgument", "Bucket POST must contain a field named 'key'")
    if fields["x-amz-algorithm"] != ALGORITHM:
        raise _denied(f"only {ALGORITHM} is accepted")
    amz_date = fields["x-amz-date"]
    _parse_amz_date(amz_date)
    _parse_scope(fields["x-amz-credential"], amz_date, keys)
    request = AWSRequest(method="POST", url="http://localhost/")
    request.context["timestamp"] = amz_date
    expected = S3SigV4PostAuth(keys.credentials, "s3", keys.region).signature(fields["policy"], request)
    if not _same(expected, fields["x-amz-signature"]):
        raise _mismatch()

    try:
        policy = json.loads(base64.b64decode(fields["policy"], validate=True))
        expires_at = datetime.fromisoformat(policy["expiration"])
        expiration = (expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)).timestamp()
        conditions = _policy_conditions(policy)
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise S3Refusal(400, "InvalidPolicyDocument", f"Invalid Policy: {exc}") from None
    if now > expiration:
        raise _denied("Invalid according to Policy: Policy expired.")

    values = {**fields, "bucket": bucket}
    covered = set()
    size_range: tuple[int, int | None] = (0, None)
    for operator, name, value in conditions:
        if operator == "content-length-range":
            size_range = value
            continue
        covered.add(name)
        given = values.get(name, "")
        ok = given == value if operator == "eq" else given.startswith(value)
        if not ok:
            raise _denied(f"Invalid according to Policy: Policy Condition failed: [{operator!r}, '${name}', {value!r}]")
    for required in ("bucket", "key"):
        if required not in covered:
            raise _denied(f"Invalid according to Policy: the policy must name the {required}")
    extra = sorted(
        name for name in fields if name not in covered | POST_UNCONDITIONED_FIELDS and not name.startswith("x-ignore-")
    )
    if extra:
        raise _denied(f"Invalid according to Policy: Extra input fields: {', '.join(extra)}")
    return size_range


def _boundary(content_type: str) -> bytes | None:
    kind, _, options = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        return None
    for option in options.split(";"):
        name, _, value = option.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


def read_post_upload(environ: dict[str, Any], bucket: str, keys: KeyPair, now: float) -> PostUpload:
    """Stream a POST form: fields first, checked before a byte of the file is kept, then the file, bounded."""
    boundary = _boundary(environ.get("CONTENT_TYPE", ""))
    if boundary is None:
        raise S3Refusal(400, "InvalidArgument", "a POST upload must be multipart/form-data with a boundary")
    length = _content_length(environ)
    if length is None:
        raise S3Refusal(411, "MissingContentLength", "You must provide the Content-Length HTTP header.", stop_reading=0)
    stream = environ["wsgi.input"]
    decoder = MultipartDecoder(boundary, max_parts=100)
    consumed = 0
    fields: dict[str, str] = {}
    current: str | None = None
    current_value = bytearray()
    size_range: tuple[int, int | None] | None = None
    spool = None
    size = 0
    pre_data = 0  # bytes of field values before the file

    def feed() -> None:
        nonlocal consumed
        if consumed >= length:
            decoder.receive_data(None)
            return
        block = _read_some(stream, min(READ_CHUNK, length - consumed))
        if not block:
            raise S3Refusal(400, "IncompleteBody", "the form ended before Content-Length bytes")
        consumed += len(block)
        decoder.receive_data(block)

    try:
        while True:
            try:
                event = decoder.next_event()
            except ValueError as exc:  # malformed form data
                raise S3Refusal(
                    400, "MalformedPOSTRequest", f"The body of your POST request is not well-formed: {exc}"
                ) from None
            if isinstance(event, NeedData):
                # Before the file: fields and part headers only, bounded (a header that never ends included).
                if spool is None and (
                    pre_data > POST_MAX_PRE_DATA_BYTES or len(decoder.buffer) > POST_MAX_PRE_DATA_BYTES
                ):
                    raise S3Refusal(
                        400,
                        "MaxPostPreDataLengthExceeded",
                        "Your POST request fields preceding the upload file were too large.",
                        stop_reading=0,
                    )
                feed()
            elif isinstance(event, (Field, File)):
                name = (event.name or "").lower()
                if name == "file":
                    size_range = check_post_policy(bucket, fields, keys, now)
                    high = size_range[1]
                    if high is not None and length > high + POST_FORM_OVERHEAD_BYTES:
                        raise S3Refusal(
                            400,
                            "EntityTooLarge",
                            f"Your proposed upload exceeds the maximum allowed size ({length} bytes sent; "
                            f"the policy allows {high})",
                            stop_reading=0,
                        )
                    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES)  # noqa: SIM115 (returned)
                    current = "file"
                elif isinstance(event, File):
                    raise S3Refusal(400, "InvalidArgument", f"only the 'file' field may hold a file, not {name!r}")
                elif name in fields:
                    raise S3Refusal(400, "InvalidArgument", f"the field {name!r} is given twice")
                else:
                    current = name
                    current_value.clear()
            elif isinstance(event, Data):
                if current == "file":
                    assert spool is not None
                    assert size_range is not None
                    size += len(event.data)
                    high = size_range[1]
                    if high is not None and size > high:
                        raise S3Refusal(
                            400,
                            "EntityTooLarge",
                            f"Your proposed upload exceeds the maximum allowed size ({high} bytes)",
                        )
                    spool.write(event.data)
                    if not event.more_data:
                        break  # AWS ignores whatever follows the file
                elif current is not None:
                    current_value += event.data
                    pre_data += len(event.data)
                    if pre_data > POST_MAX_PRE_DATA_BYTES:
                        raise S3Refusal(
                            400,
                            "MaxPostPreDataLengthExceeded",
                            "Your POST request fields preceding the upload file were too large.",
                            stop_reading=0,
                        )
                    if not event.more_data:
                        try:
                            fields[current] = current_value.decode()
                        except UnicodeDecodeError:
                            raise S3Refusal(400, "InvalidArgument", f"the field {current!r} is not UTF-8") from None
                        current = None
            elif isinstance(event, Epilogue):
                break
        if spool is None or size_range is None:
            raise S3Refusal(400, "InvalidArgument", "POST requires exactly one file upload per request.")
        if size < size_range[0]:
            raise S3Refusal(
                400, "EntityTooSmall", f"Your proposed upload is smaller than the minimum ({size_range[0]})"
            )
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    spool.seek(0)
    return PostUpload(bucket, fields["key"], fields, spool, size)


# -- the gate -------------------------------------------------------------------------------------------


StartResponse = Callable[..., Any]


def _error_body(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()


class SigV4Gate:
    """WSGI middleware: only authenticated S3 requests reach the application behind it."""

    def __init__(self, app: Callable[..., Iterable[bytes]], keys: KeyPair, clock: Callable[[], float] = time.time):
        self.app = app
        self.keys = keys
        self.clock = clock

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        try:
            if path.startswith(NOT_S3_PATHS) or "HTTP_X_AMZ_TARGET" in environ:
                raise S3Refusal(404, "NotFound", "Not Found")
            query_names = {name for name, _ in _query_pairs(environ)}
            has_header = "HTTP_AUTHORIZATION" in environ
            has_query = bool(query_names & {"X-Amz-Signature", "X-Amz-Credential", "X-Amz-Algorithm"})
            if has_header and has_query:
                raise S3Refusal(400, "InvalidArgument", "Only one auth mechanism allowed")
            now = self.clock()
            if has_header:
                payload = check_header_signature(environ, self.keys, now)
                if HEX_SHA256.match(payload):
                    _spool_body(environ, payload)
            elif has_query:
                check_query_signature(environ, self.keys, now)
            elif environ.get("REQUEST_METHOD") == "POST" and _boundary(environ.get("CONTENT_TYPE", "")) is not None:
                return self._post_upload(environ, start_response, now)
            else:
                raise _denied("Access Denied")
        except S3Refusal as refusal:
            return self._refuse(environ, start_response, refusal)
        return self.app(environ, start_response)

    def _refuse(self, environ: dict[str, Any], start_response: StartResponse, refusal: S3Refusal) -> list[bytes]:
        if refusal.status >= 500:
            logger.warning("%s %s: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), refusal.message)
        gate_input = environ.get("s3_server.input")
        if gate_input is not None:
            gate_input.stop_after(refusal.stop_reading)
        body = _error_body(refusal.code, refusal.message, environ.get("PATH_INFO", ""))
        head = environ.get("REQUEST_METHOD") == "HEAD"
        start_response(
            f"{refusal.status} {STATUS_TEXT.get(refusal.status, 'Error')}",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [] if head else [body]

    def _post_upload(self, environ: dict[str, Any], start_response: StartResponse, now: float) -> Iterable[bytes]:
        segments = [unquote(s) for s in _raw_path(environ).split("/") if s]
        if len(segments) != 1 or environ.get("QUERY_STRING"):
            raise S3Refusal(400, "InvalidArgument", "a POST upload goes to /<bucket>, with no query")
        upload = read_post_upload(environ, segments[0], self.keys, now)
        try:
            return self._store(environ, start_response, upload)
        finally:
            upload.body.close()

    def _store(self, environ: dict[str, Any], start_response: StartResponse, upload: PostUpload) -> list[bytes]:
        """Put the checked upload through the inner application as a plain PUT."""
        path = f"/{upload.bucket}/{upload.key}"
        inner = {
            key: value
            for key, value in environ.items()
            if not key.startswith("HTTP_") and key not in ("CONTENT_TYPE", "CONTENT_LENGTH")
        }
        encoded = quote(path, safe="/~")
        inner.update(
            REQUEST_METHOD="PUT",
            PATH_INFO=path.encode().decode("latin-1"),
            RAW_URI=encoded,
            REQUEST_URI=encoded,
            QUERY_STRING="",
            CONTENT_LENGTH=str(upload.size),
            CONTENT_TYPE=upload.fields.get("content-type") or "binary/octet-stream",
            HTTP_HOST=_own_host(environ),  # never the client's: moto must see the checked bucket only
        )
        inner["wsgi.input"] = upload.body
        inner.pop("wsgi.input_terminated", None)
        for name in POST_STORED_HEADERS[1:]:
            if upload.fields.get(name):
                inner[f"HTTP_{name.upper().replace('-', '_')}"] = upload.fields[name]
        for name, value in upload.fields.items():
            if name.startswith("x-amz-meta-"):
                inner[f"HTTP_{name.upper().replace('-', '_')}"] = value

        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        result = self.app(inner, capture)
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        status = int(captured["status"].split()[0])
        if status >= 300:  # moto's own answer (no such bucket, say)
            start_response(captured["status"], captured["headers"])
            return [body]
        etag = next((v for k, v in captured["headers"] if k.lower() == "etag"), "")
        location = f"{environ.get('wsgi.url_scheme', 'http')}://{_own_host(environ)}{encoded}"
        wanted = upload.fields.get("success_action_status", "204")
        code = int(wanted) if wanted in ("200", "201", "204") else 204
        headers = [("ETag", etag), ("Location", location)]
        if code == 201:
            out = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<PostResponse><Location>{escape(location)}</Location><Bucket>{escape(upload.bucket)}</Bucket>"
                f"<Key>{escape(upload.key)}</Key><ETag>{escape(etag)}</ETag></PostResponse>"
            ).encode()
            headers.append(("Content-Type", "application/xml"))
        else:
            out = b""
        if code != 204:
            headers.append(("Content-Length", str(len(out))))
        start_response(f"{code} {STATUS_TEXT[code]}", headers)
        return [out] if out else []


# -- the server -----------------------------------------------------------------------------------------


class _GateInput:
    """The connection's input: after a refusal, at most a bounded amount more is read (and discarded)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._budget: int | None = None

    def stop_after(self, budget: int) -> None:
        self._budget = budget

    def _allowed(self, size: int | None) -> int | None:
        if self._budget is None:
            return size
        return self._budget if size is None or size < 0 else min(size, self._budget)

    def _spent(self, data: bytes) -> bytes:
        if self._budget is not None:
            self._budget -= len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        allowed = self._allowed(size)
        if allowed == 0:
            return b""
        return self._spent(self._raw.read(-1 if allowed is None else allowed))

    def read1(self, size: int = -1) -> bytes:
        allowed = self._allowed(size)
        if allowed == 0:
            return b""
        return self._spent(self._raw.read1(-1 if allowed is None else allowed))

    def readline(self, size: int | None = -1) -> bytes:
        allowed = self._allowed(size)
        if allowed == 0:
            return b""
        return self._spent(self._raw.readline(-1 if allowed is None else allowed))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _own_host(environ: dict[str, Any]) -> str:
    """host:port this server listens on (what it names in Location, and the inner PUT's Host)."""
    return f"{environ.get('SERVER_NAME', '127.0.0.1')}:{environ.get('SERVER_PORT', '')}"


def _request_handler() -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class GateRequestHandler(MotoRequestHandler):
        """moto's handler (it keeps underscores in x-amz-meta-* names), with a bounded input and quiet logs."""

        def setup(self) -> None:
            super().setup()
            self.rfile = _GateInput(self.rfile)

        def make_environ(self) -> dict[str, Any]:
            environ = super().make_environ()
            environ["s3_server.input"] = self.rfile
            return environ

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # The path only: a presigned URL's query holds a signature that grants access until it expires.
            path = getattr(self, "path", "").split("?", 1)[0]
            self.log("info", '"%s %s" %s %s', getattr(self, "command", "-"), path, code, size)

    return GateRequestHandler


def s3_application(keys: KeyPair) -> SigV4Gate:
    """moto's S3 application alone (none of its other services, nor its admin API), behind the gate."""
    from moto.moto_server.werkzeug_app import create_backend_app

    return SigV4Gate(create_backend_app("s3"), keys)


def serve(host: str, port: int, keys: KeyPair, application=None):
    """A threaded server of the gated S3 application (call serve_forever on it; shutdown to stop)."""
    application = application or s3_application(keys)
    return make_server(host, port, application, threaded=True, request_handler=_request_handler())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", action="append", help="an address to listen on (repeat for more; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    keys = KeyPair.from_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # One server per address, all over the same application (and so the same buckets).
    application = s3_application(keys)
    servers = [serve(host, args.port, keys, application) for host in args.host or ["127.0.0.1"]]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for host, server in zip(args.host or ["127.0.0.1"], servers, strict=True):
        logger.info("S3 (moto, signature-checked) on http://%s:%d, region %s", host, server.port, keys.region)
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        servers[0].serve_forever()
    for server in servers:
        server.server_close()


if __name__ == "__main__":
    main()
