"""OCI distribution error codes and the JSON bodies clients expect.

Every error a client sees from the registry port is one of these, so docker, containerd and skopeo print a
meaningful message instead of choking on an HTML page or a bare status. Never put a filesystem path or a
stack trace into a message: they are sent to clients.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# code -> HTTP status (OCI distribution spec, plus distribution's UNAVAILABLE / TOOMANYREQUESTS).
STATUS_OF_CODE: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "BLOB_UPLOAD_INVALID": 400,
    "BLOB_UPLOAD_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_BLOB_UNKNOWN": 404,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "PAGINATION_NUMBER_INVALID": 400,  # distribution's, for a tag list's `n`
    "SIZE_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "UNAVAILABLE": 503,
    "UNKNOWN": 500,
}


class OciError(Exception):
    """An error that ends one request with an OCI error body.

    `headers` carries what must travel with it (`Retry-After` on 429, `WWW-Authenticate` on 401,
    `Content-Range` on 416).
    """

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        status: int | None = None,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if code not in STATUS_OF_CODE:
            code = "UNKNOWN"
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message or code.replace("_", " ").lower()
        self.status = status if status is not None else STATUS_OF_CODE[code]
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return json.dumps({"errors": [err]}).encode()


class UpstreamUnavailable(Exception):
    """The upstream registry could not be reached (connection refused, timeout, 5xx after retries).

    Distinct from OciError: callers fall back to the store or to peers on this, but pass an OciError
    (404, 401, 429) straight to the client.
    """
