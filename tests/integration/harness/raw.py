"""Raw HTTP/1.1 over a socket: for requests httpx would normalise (`..`, odd targets) or never send."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)

    def error_codes(self) -> list[str]:
        return [e.get("code") for e in self.json().get("errors", [])]


def _parse(data: bytes, head_only: bool) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if not head_only and "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(status, headers, b"" if head_only else body)


def raw_request(host: str, port: int, method: str, target: str, *, headers: dict | None = None,
                body: bytes = b"", timeout: float = 10) -> RawResponse:
    """Send one request (Connection: close) exactly as given; read the response until the server closes."""
    hdrs = {"Host": f"{host}:{port}", "Connection": "close", **(headers or {})}
    if body or method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = str(len(body))
    req = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return raw_send(host, port, req.encode("latin-1") + body, timeout=timeout, head_only=method == "HEAD")


def raw_send(host: str, port: int, data: bytes, *, timeout: float = 10, head_only: bool = False) -> RawResponse:
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything (431)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
            if head_only and b"\r\n\r\n" in b"".join(chunks):
                break
    data = b"".join(chunks)
    assert data, "the server closed the connection without a response"
    return _parse(data, head_only)
