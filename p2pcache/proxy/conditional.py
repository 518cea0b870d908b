"""Conditional request headers (RFC 9110 §13) for content-addressed answers: `If-Match`, `If-None-Match` and
`If-Range`.

Why: the node sends `ETag: "<digest>"` on blobs and manifests, and whatever sits between it and a client (an HTTP
cache with revalidation, a client resuming a download) then asks with these headers; docker-registry answers
them, and RFC 9110 says an origin MUST evaluate If-Match and If-None-Match and MUST ignore Range when If-Range
does not match (found in review: the node ignored all three; a resume with If-Match and Range against another
blob's validator got bytes to splice on where docker-registry answers 412). Pure functions of header values: no I/O.

Only entity tags are compared. The node sends no `Last-Modified`, so an `If-Range` holding a date never matches
(the whole blob is sent, as docker-registry does), and `If-Modified-Since` is not evaluated (RFC 9110 §13.1.3:
ignored when If-None-Match is present, and without Last-Modified there is nothing to compare it with).
"""

from __future__ import annotations

__all__ = ["if_range_allows", "match_fails", "none_match"]


def _tags(value: str) -> list[str]:
    """The entity tags of a list header, opaque tags with their quotes, weakness prefixes dropped."""
    out = []
    for item in value.split(","):
        item = item.strip()
        if item.startswith("W/"):
            item = item[2:]
        if item:
            out.append(item)
    return out


def match_fails(values: list[str], etag: str) -> bool:
    """True if If-Match header lines are present and none holds `etag` (strong comparison; `*` matches anything
    that exists): the request is answered 412 Precondition Failed."""
    if not values:
        return False
    for value in values:
        for item in value.split(","):
            tag = item.strip()
            if tag == "*" or tag == etag:
                return False
    return True


def none_match(values: list[str], etag: str) -> bool:
    """True if the If-None-Match header lines `values` match `etag` (weak comparison, `*` matches anything
    that exists): a GET or HEAD is then answered 304 Not Modified."""
    for value in values:
        for tag in _tags(value):
            if tag == "*" or tag == etag:
                return True
    return False


def if_range_allows(value: str | None, etag: str) -> bool:
    """False if an If-Range header is present and does not hold exactly `etag` (strong comparison: a weak tag
    or a date never matches): the Range header is then ignored and the whole representation sent."""
    if value is None:
        return True
    return value.strip() == etag
