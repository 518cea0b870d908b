"""Logging setup of a node: `settings.log_level` and `settings.log_format` (text or json) on stderr.

JSON is one object per line with `ts` (UTC, ISO 8601), `level`, `logger`, `msg`, any `extra={...}` fields the
call passed, and `exc` when there is a traceback, so a log shipper needs no parsing rules. Never raises because
of what a record carries: a field that is not JSON-serialisable is logged as its repr(). This module configures
the root logger only when asked (`setup_logging`), never on import.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=` and is worth logging.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime",
                                                                                     "taskName"}

# The HTTP client's libraries, at WARNING even with --log-level debug: httpx logs every request's full URL at
# INFO, httpcore every response's headers at DEBUG (a Location), hpack HTTP/2 headers (Authorization) -- and a
# blob redirected to a CDN is fetched from a signed URL whose query is the credential (`?sig=...`). The node's
# own lines name hosts, not URLs, and never a header's value.
_QUIET = ("httpx", "httpcore", "hpack")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=repr, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at `level` or above to `stream` (stderr) in `fmt`; replaces earlier handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    accept = logging.getLogger("trio.serve_listeners")
    for old_filter in [f for f in accept.filters if isinstance(f, _AcceptErrors)]:
        accept.removeFilter(old_filter)
    accept.addFilter(_AcceptErrors())


class Throttled:
    """A warning that may come once per request (a node out of file descriptors answers every request with
    it), logged at most once per `interval` seconds with how many were held back since: one traceback per
    request filled the log while the node was already short of resources (found in review)."""

    def __init__(self, logger: logging.Logger | None, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last = -interval
        self._held = 0

    def due(self) -> int | None:
        """None within `interval` of the last line (this one is held back); else how many were held since."""
        now = time.monotonic()
        if now - self._last < self._interval:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held

    def warning(self, msg: str, *args: Any) -> None:
        held = self.due()
        if held is None or self._log is None:
            return
        if held:
            msg += f" ({held} more since the last such line)"
        self._log.warning(msg, *args)


class _AcceptErrors(logging.Filter):
    """trio logs every failed accept (EMFILE: out of file descriptors) with a traceback, every 0.1 s while it
    lasts: one line every 10 s without the traceback says the same."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self._gate = Throttled(None, interval)

    def filter(self, record: logging.LogRecord) -> bool:
        if self._gate.due() is None:
            return False
        record.exc_info = None
        record.exc_text = None
        return True
