"""A PeerHost for PeerConnection pairs in tests and benchmarks: every piece asked for is one file's bytes."""

from __future__ import annotations

import os


class FileHost:
    """Serves `length` bytes of the file at `path` for any piece; answers "ping"; starts every upload at once."""

    def __init__(self, path: str, length: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.length = length

    def piece_source(self, digest: str, index: int):
        return os.dup(self.fd), 0, self.length

    def on_message(self, conn, msg):
        return [("pong", {"id": msg["id"]}, b"")] if msg.kind == "ping" else []

    def on_closed(self, conn) -> None:
        pass

    def upload_request(self, conn, digest: str, index: int) -> bool:
        conn.start_upload(digest, index)
        return True

    def upload_done(self, conn, digest: str, index: int) -> None:
        pass
