"""`Range: bytes=…` request headers (RFC 9110 §14) for blob GETs.

Only a single byte range is honoured. A multi-range request, another unit, or a header we cannot parse is
ignored and the whole blob is sent with 200, which RFC 9110 explicitly allows (a server MAY ignore Range);
multipart/byteranges responses are never produced. A syntactically valid range that selects no byte of the blob
is `RangeNotSatisfiable` (416 with `Content-Range: bytes */SIZE`). This module only parses: it never touches a
file or a socket, and it never returns a range outside [0, size).
"""

from __future__ import annotations

import re

# Digits only: Python's int() would also accept "+5", " 5", "1_000" and non-ASCII digits.
_SPEC = re.compile(r"^\s*([0-9]*)\s*-\s*([0-9]*)\s*$")


# Larger than any blob. A position with more digits than this is taken as this: Python's int() refuses strings
# of more than 4300 digits (ValueError), and nothing that long can point inside a blob anyway.
_HUGE = 10**18


def _num(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 19 else _HUGE


def _less(a: str, b: str) -> bool:
    """a < b for digit strings of any length, exactly."""
    a, b = a.lstrip("0") or "0", b.lstrip("0") or "0"
    return (len(a), a) < (len(b), b)


class RangeNotSatisfiable(Exception):
    """The Range selects nothing inside a blob of `size` bytes: answer 416."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for size {size}")
        self.size = size

    def content_range(self) -> str:
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range [start, end) a `Range` header asks for in a blob of `size` bytes.

    None means "send the whole blob with 200" (no header, multi-range, unknown unit, malformed).
    Raises RangeNotSatisfiable for a valid single range that lies outside the blob.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None  # several ranges: ignoring is allowed and saves us multipart/byteranges
    m = _SPEC.match(spec)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        # suffix range "-n": the last n bytes
        n = _num(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size
    start = _num(first)
    if last != "" and _less(last, first):
        return None  # "5-3" is invalid syntax, not unsatisfiable (RFC 9110 §14.1.1)
    if start >= size:
        raise RangeNotSatisfiable(size)
    end = size if last == "" else min(_num(last) + 1, size)
    return start, end


def content_range(start: int, end: int, size: int) -> str:
    """The `Content-Range` value of a 206 carrying [start, end) of `size` bytes."""
    return f"bytes {start}-{end - 1}/{size}"
