from p2pcache.proxy.conditional import if_range_allows, none_match

ETAG = '"sha256:' + "a" * 64 + '"'


def test_if_none_match_lists_weak_tags_and_star():
    assert none_match([ETAG], ETAG)
    assert none_match(['"x", ' + ETAG], ETAG)
    assert none_match(['"x"', "W/" + ETAG], ETAG)  # weak comparison
    assert none_match(["*"], ETAG)
    assert not none_match(['"x"'], ETAG)
    assert not none_match([], ETAG)
    assert not none_match([ETAG[1:-1]], ETAG)  # an unquoted digest is not the entity tag


def test_if_range_needs_the_exact_strong_tag():
    assert if_range_allows(None, ETAG)
    assert if_range_allows(" " + ETAG, ETAG)
    assert not if_range_allows("W/" + ETAG, ETAG)
    assert not if_range_allows('"x"', ETAG)
    assert not if_range_allows("Sat, 28 Nov 2026 10:00:00 GMT", ETAG)  # no Last-Modified to compare a date with
