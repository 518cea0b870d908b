"""Range header parsing: what a client asking for part of a blob gets."""

import pytest

from p2pcache.proxy.ranges import RangeNotSatisfiable, content_range, parse_range


@pytest.mark.parametrize(
    "header,size,expected",
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),  # suffix longer than the blob: the whole blob
        ("bytes=90-1000", 100, (90, 100)),  # end clamped to the blob
        ("bytes=99-99", 100, (99, 100)),
        ("Bytes = 1 - 2", 100, (1, 3)),
        ("bytes=0-", 1, (0, 1)),
        # ignored: multi-range, other units, malformed -> whole blob with 200
        ("bytes=0-1,5-6", 100, None),
        ("items=0-1", 100, None),
        ("bytes=5-3", 100, None),
        ("bytes=-", 100, None),
        ("bytes=abc", 100, None),
        ("bytes=+1-2", 100, None),
        ("bytes=١-٢", 100, None),  # non-ASCII digits are not digits here
        ("bytes", 100, None),
        # positions longer than int() takes (4300 digits) or than any blob
        ("bytes=0-" + "9" * 5000, 100, (0, 100)),
        ("bytes=-" + "9" * 5000, 100, (0, 100)),
        ("bytes=" + "0" * 5000 + "5-9", 100, (5, 10)),
        ("bytes=5-" + "9" * 19, 100, (5, 100)),
        ("bytes=" + "9" * 5000 + "-1", 100, None),  # last < first: invalid, ignored
        ("bytes=" + "2" * 19 + "-" + "1" * 19, 100, None),
    ],
)
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header,size", [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100),
                                         ("bytes=0-", 0), ("bytes=-5", 0), ("bytes=" + "1" * 5000 + "-", 100),
                                         ("bytes=" + "1" * 19 + "-" + "1" * 20, 100)])
def test_unsatisfiable(header, size):
    with pytest.raises(RangeNotSatisfiable) as e:
        parse_range(header, size)
    assert e.value.content_range() == f"bytes */{size}"


def test_content_range():
    assert content_range(0, 10, 100) == "bytes 0-9/100"
