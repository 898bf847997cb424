"""A browser-style POST upload that declares more bytes than it sends: what an S3 store answers to it."""

from __future__ import annotations

import http.client
import time
import uuid
from urllib.parse import urlsplit


def post_declaring(url: str, fields: dict[str, str], declared_file_bytes: int) -> tuple[int, str]:
    """POST the form's fields and a file part header declaring a large body, send only a KB of it, read the answer."""
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    target = urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        connection.putrequest("POST", target.path)
        connection.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        connection.putheader("Content-Length", str(len(head) + declared_file_bytes + len(tail)))
        connection.endheaders(head + b'"x"\n' * 256)
        started = time.monotonic()
        response = connection.getresponse()
        body = response.read().decode()
        assert time.monotonic() - started < 10, "answered without waiting for the rest of the body"
        return response.status, body
    finally:
        connection.close()
