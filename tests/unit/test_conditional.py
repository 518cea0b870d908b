from p2pcache.proxy.conditional import if_range_allows, match_fails, none_match

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


def test_if_match_fails_only_when_present_and_no_strong_tag_matches():
    assert not match_fails([], ETAG)
    assert not match_fails([ETAG], ETAG)
    assert not match_fails(['"x", ' + ETAG], ETAG)
    assert not match_fails(["*"], ETAG)
    assert match_fails(['"x"'], ETAG)
    assert match_fails(["W/" + ETAG], ETAG)  # strong comparison
