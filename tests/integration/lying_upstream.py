"""An HTTP proxy that stands in front of a real registry and can lie about blobs.

It forwards every request to `target` and records what it was asked (method, target, Range). Blob GETs
(`…/blobs/sha256:…`) can be tampered with, per `mode`:

- "honest":        pass through
- "flip":          one byte in the middle of the body flipped (same length, wrong digest)
- "truncate":      the full Content-Length announced, half the body sent, then the connection closed
- "short":         a shorter body with a matching (wrong) Content-Length
- "ignore_range":  Range stripped: 200 with the whole blob (legal, the node must skip the prefix itself)
- "wrong_range":   206 with the right Content-Range header but the bytes from offset 0 (a lie)
- "trickle":       pass through at `rate` bytes/s (to stop a node mid-download)
- "flip_trickle":  "flip" at the pace of "trickle" (the bytes around the wrong one reach clients long before
                   the body's end could tell anyone it is wrong)
- "stall":         the headers and half the body, then nothing until the proxy stops (a hung upstream)
- "chunked":       the body with `Transfer-Encoding: chunked`, no Content-Length (a streaming proxy or CDN)
- "close":         an HTTP/1.0 answer without Content-Length, the body ending at the close
- "chunked_cut":   "chunked" with half the body, then the connection closed (no last chunk)
- "close_cut":     "close" with half the body: a clean end, that only the size tells from a whole body
- "close_long":    "close" with the body and then 1000 more bytes
- "429", "500", "503": that status with an OCI error body (429 with `Retry-After: 7`), the registry not asked

`scope="all"` tampers manifest requests (GET and HEAD) too, any `/v2/<name>/…` but the `/v2/` ping;
`only` restricts tampering to paths ending with it (a digest, "manifests/1"); `times` to the first N tampered
responses (None = always); `plan` is a list of modes used one per matching request before `mode` applies
(e.g. ["truncate", "wrong_range"]: cut the first response short, lie about the retry's Range, then `mode`).
Runs in a thread of the test process (ThreadingHTTPServer), so tests can change `mode` while it runs.
Also used as a plain recorder in front of a node, to see exactly what a client sent.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

UNSIZED_MODES = {"chunked", "close", "chunked_cut", "close_cut", "close_long"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    range: str | None
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class LyingUpstream:
    def __init__(self, target: str, *, mode: str = "honest", only: str | None = None, times: int | None = None,
                 rate: float = 1_000_000.0, plan: list[str] | None = None, scope: str = "blobs") -> None:
        u = urlsplit(target)
        self.target_host, self.target_port = u.hostname or "127.0.0.1", u.port or 80
        self.mode = mode
        self.only = only
        self.times = times
        self.rate = rate
        self.plan = list(plan or [])
        self.scope = scope
        self._stopping = threading.Event()
        self.seen: list[Seen] = []
        self.blob_bytes_sent: dict[str, int] = {}
        self.tampered = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> LyingUpstream:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LyingUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what it saw ---
    def ranges_for(self, path_suffix: str) -> list[str | None]:
        return [s.range for s in self.seen if s.method == "GET" and s.path.endswith(path_suffix)]

    def gets(self, path_suffix: str) -> int:
        return len(self.ranges_for(path_suffix))

    def _tamper_mode(self, path: str) -> str:
        if self.scope == "all":
            if path.rstrip("/") == "/v2":
                return "honest"
        elif "/blobs/sha256:" not in path:
            return "honest"
        if self.only is not None and not path.endswith(self.only):
            return "honest"
        with self._lock:
            if self.plan:
                return self.plan.pop(0)
            if self.mode == "honest":
                return "honest"
            if self.times is not None and self.tampered >= self.times:
                return "honest"
            self.tampered += 1
        return self.mode

    def _handler_class(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:  # quiet
                pass

            def _proxy(self) -> None:
                method, target = self.command, self.path
                headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
                with outer._lock:
                    outer.seen.append(Seen(method, target, self.headers.get("Range"), tuple(headers)))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                path = target.split("?", 1)[0]
                tamper_heads = outer.scope == "all" and method == "HEAD"
                mode = outer._tamper_mode(path) if method == "GET" or tamper_heads else "honest"
                if mode in ("429", "500", "503"):
                    code = {"429": "TOOMANYREQUESTS", "500": "UNKNOWN", "503": "UNAVAILABLE"}[mode]
                    doc = b'{"errors":[{"code":"%s","message":"lying upstream says %s"}]}' % (
                        code.encode(), mode.encode())
                    extra = [("Retry-After", "7")] if mode == "429" else []
                    self._send_head(int(mode), [("Content-Type", "application/json"), *extra],
                                    len(doc))
                    if method != "HEAD":
                        self._write(path, doc)
                    return
                if mode == "ignore_range":
                    headers = [(k, v) for k, v in headers if k.lower() != "range"]
                if mode == "wrong_range":
                    real_range = self.headers.get("Range")
                    headers = [(k, v) for k, v in headers if k.lower() != "range"]
                conn = http.client.HTTPConnection(outer.target_host, outer.target_port, timeout=60)
                try:
                    conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                    conn.putheader("Host", f"{outer.target_host}:{outer.target_port}")
                    for k, v in headers:
                        conn.putheader(k, v)
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    rheaders = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                    clen = resp.getheader("Content-Length")
                    if method == "HEAD":
                        self._send_head(resp.status, rheaders, int(clen) if clen else 0)
                        return
                    if mode == "wrong_range" and real_range and resp.status == 200:
                        start = int(real_range.split("=", 1)[1].split("-", 1)[0])
                        data = resp.read()
                        size = len(data)
                        lie = data[: size - start]  # the right length, the wrong bytes (from offset 0)
                        rheaders = [(k, v) for k, v in rheaders if k.lower() not in ("content-range",)]
                        rheaders.append(("Content-Range", f"bytes {start}-{size - 1}/{size}"))
                        self._send_head(206, rheaders, len(lie))
                        self._write(path, lie)
                        return
                    if clen is None:
                        data = resp.read()
                        self._send_head(resp.status, rheaders, len(data))
                        self._write(path, data)
                        return
                    total = int(clen)
                    if mode in UNSIZED_MODES and resp.status in (200, 206):
                        self._send_unsized(path, mode, resp.status, rheaders, resp.read())
                        return
                    if mode == "short" and resp.status in (200, 206):
                        data = resp.read()[: max(0, total - 1000)]
                        self._send_head(resp.status, rheaders, len(data))
                        self._write(path, data)
                        return
                    self._send_head(resp.status, rheaders, total)
                    sent, cut = 0, total // 2
                    slow = mode in ("trickle", "flip_trickle")
                    while sent < total:
                        chunk = resp.read(min(16384 if slow else 1 << 20, total - sent))
                        if not chunk:
                            break
                        if mode in ("flip", "flip_trickle") and sent <= total // 2 < sent + len(chunk):
                            i = total // 2 - sent
                            chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
                        if mode == "stall" and sent + len(chunk) > cut:
                            self._write(path, chunk[: cut - sent])
                            self.wfile.flush()
                            outer._stopping.wait()
                            self.close_connection = True
                            return
                        if mode == "truncate" and sent + len(chunk) > cut:
                            self._write(path, chunk[: cut - sent])
                            self.close_connection = True
                            self.wfile.flush()
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        self._write(path, chunk)
                        sent += len(chunk)
                        if slow:
                            time.sleep(len(chunk) / outer.rate)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True
                finally:
                    conn.close()

            def _send_unsized(self, path: str, mode: str, status: int, headers: list[tuple[str, str]],
                              data: bytes) -> None:
                if mode.endswith("_cut"):
                    data = data[: len(data) // 2]
                elif mode == "close_long":
                    data += bytes(1000)
                self.close_connection = mode != "chunked"
                if mode.startswith("chunked"):
                    self.send_response_only(status)
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(data), 65536):
                        part = data[i:i + 65536]
                        self.wfile.write(b"%x\r\n" % len(part))
                        self._write(path, part)
                        self.wfile.write(b"\r\n")
                    if mode == "chunked":
                        self.wfile.write(b"0\r\n\r\n")
                    return
                head = [f"HTTP/1.0 {status} {self.responses.get(status, ('',))[0]}"]
                head += [f"{k}: {v}" for k, v in headers] + ["Connection: close", "", ""]
                self.wfile.write("\r\n".join(head).encode("latin-1"))
                self._write(path, data)

            def _send_head(self, status: int, headers: list[tuple[str, str]], length: int) -> None:
                self.send_response_only(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _write(self, path: str, data: bytes) -> None:
                self.wfile.write(data)
                with outer._lock:
                    outer.blob_bytes_sent[path] = outer.blob_bytes_sent.get(path, 0) + len(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

        return Handler
