"""Settings come from flags > environment > TOML file > defaults, and bad values name the setting."""

from pathlib import Path

import pytest

from p2pcache.cli import main
from p2pcache.config import ConfigError, load_settings, parse_hostport, unknown_env_settings
from p2pcache.units import parse_duration, parse_rate, parse_size


def test_units() -> None:
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("400 MB") == 400 * 10**6
    assert parse_size(1234) == 1234
    assert parse_rate("1 Gbit/s") == 125e6
    assert parse_rate("50MB/s") == 50e6
    assert parse_rate("10 MiB/s") == 10 * 2**20
    # B is a byte and b a bit, in every spelling (found in review: "Mb/s" was read as MB/s, "MBps" as Mbit/s)
    assert parse_rate("100 Mb/s") == parse_rate("100 Mbps") == parse_rate("100 mbit/s") == 12.5e6
    assert parse_rate("100 MBps") == parse_rate("100 MB/s") == 100e6
    assert parse_rate("8 b/s") == 1 and parse_rate("1 kbps") == 125
    assert parse_size("20gb") == parse_size("20GB") == 20 * 10**9  # a size is never in bits
    # and nothing else became case-sensitive with that (found in review: "30S" stopped a node at start-up)
    assert parse_duration("30S") == 30 and parse_duration("1H") == 3600 and parse_duration("500MS") == 0.5
    assert parse_rate("100MB/S") == 100e6 and parse_rate("1 MIB/s") == 2**20 and parse_rate("1GBIT/s") == 125e6
    assert parse_duration("1 ms") == pytest.approx(0.001)
    assert parse_duration("30s") == 30
    for bad, fn in (("12 parsecs", parse_size), ("fast", parse_rate), ("1 fortnight", parse_duration)):
        with pytest.raises(ValueError, match=bad.split()[-1]):
            fn(bad)


def test_defaults() -> None:
    s = load_settings({}, env={})
    assert s.listen == "0.0.0.0:5000"
    assert s.default_ns == "docker.io"
    assert s.upstream_url("docker.io") == "https://registry-1.docker.io"
    assert s.upstream_url("ghcr.io") == "https://ghcr.io"
    assert s.max_disk is None


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        'listen = "127.0.0.1:6000"\nmax-disk = "1GiB"\ntag_ttl = "5s"\n'
        '[upstream]\n"docker.io" = "http://127.0.0.1:9000/"\n'
    )
    s = load_settings({}, env={}, config_file=cfg)
    assert (s.listen, s.max_disk, s.tag_ttl) == ("127.0.0.1:6000", 2**30, 5.0)
    assert s.upstream_url("docker.io") == "http://127.0.0.1:9000"
    s = load_settings({}, env={"P2PCACHE_LISTEN": "127.0.0.1:7000"}, config_file=cfg)
    assert s.listen == "127.0.0.1:7000"
    s = load_settings({"listen": "127.0.0.1:8000"}, env={"P2PCACHE_LISTEN": "127.0.0.1:7000"}, config_file=cfg)
    assert s.listen == "127.0.0.1:8000"
    s = load_settings({"upstreams": ["ghcr.io=http://127.0.0.1:1"]}, env={}, config_file=cfg)
    assert s.upstreams == {"ghcr.io": "http://127.0.0.1:1"}


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"max_disk": "lots"}, "max-disk"),
        ({"listen": "nowhere"}, "listen"),
        ({"upstreams": ["docker.io"]}, "^upstream: "),
        ({"upstreams": ["docker.io=ftp://x"]}, "http"),
        ({"log_format": "xml"}, "log-format"),
        # found in review: each of these was a traceback, or a node that started and then served nothing
        ({"max_disk": "1e400"}, "max-disk"), ({"max_disk": float("inf")}, "max-disk"), ({"max_disk": -5}, "max-disk"),
        ({"max_disk": "0"}, "max-disk"), ({"piece_size": "32MiB"}, "piece-size"), ({"piece_size": "1"}, "piece-size"),
        ({"upload_limit": "0"}, "upload-limit"), ({"download_limit": -5}, "download-limit"),
        ({"client_header_timeout": -1}, "client-header-timeout"),
        ({"client_header_timeout": float("nan")}, "client-header-timeout"),
        ({"upstream_connect_timeout": "0"}, "upstream-connect-timeout"), ({"tag_ttl": -5}, "tag-ttl"),
        ({"upstream_retries": float("inf")}, "upstream-retries"), ({"upstream_retries": -1}, "upstream-retries"),
        ({"upstreams": ["docker.io=http://exa mple.com"]}, "upstream URL"),
        ({"upstreams": ["docker.io=http://:99999"]}, "upstream URL"),
        ({"upstreams": ["docker.io=http://127.0.0.1:1,ghcr.io=http://127.0.0.1:2"]}, "upstream URL"),
        ({"listen": "127.0.0.1:\u0663"}, "listen"), ({"join": ["garbage"]}, "join"), ({"tracker": "zzz"}, "tracker"),
        ({"default_ns": "a b/../.."}, "default-ns"), ({"data": ""}, "data"),
        # found in the second review: a piece size off SHA-256's 64-byte block failed every download bigger than
        # a piece; TOML values of the wrong type were tracebacks or became strings ("./['/x']" as the store)
        ({"piece_size": "100000"}, "multiple of 64"), ({"piece_size": "1.5MB"}, "piece-size"),
        ({"join": [1, 2]}, "join"), ({"data": ["/x"]}, "data"), ({"zone": ["a"]}, "zone"),
        ({"join_dns": 5}, "join-dns"), ({"join_dns": "localhost:99999"}, "join-dns"),
        ({"join_dns": "localhost:notaport"}, "join-dns"), ({"upstream_retries": "x"}, "whole number"),
        ({"peer_listen": "127.0.0.1:5002", "advertise": "0.0.0.0:5002"}, "advertise"),
        # found in the third review: a denormal rate crashed the start-up; a tiny one made peers drop each other
        ({"download_limit": "5e-324"}, "download-limit.*at least 1MB/s"), ({"upload_limit": "500kB/s"}, "1MB/s"),
    ],
)
def test_bad_values_name_the_setting(flags: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(flags, env={})


@pytest.mark.parametrize("content", [None, b"", b"  \n", "dir"])
def test_a_cluster_secret_that_cannot_be_used_is_a_start_up_error(tmp_path: Path, content) -> None:
    path = tmp_path / "secret"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="cluster-secret-file"):
        load_settings({"cluster_secret_file": str(path), "peer_listen": "127.0.0.1:0"}, env={})


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"\xff\xfelisten = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, env={}, config_file=cfg)


def test_unknown_toml_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("lisen = '127.0.0.1:1'\n")
    with pytest.raises(ConfigError, match="lisen"):
        load_settings({}, env={}, config_file=cfg)


def test_hostport() -> None:
    assert parse_hostport("[::1]:5000") == ("::1", 5000)
    assert parse_hostport(":5000") == ("0.0.0.0", 5000)
    with pytest.raises(ValueError):
        parse_hostport("127.0.0.1:99999")


def test_cli_reports_bad_flag_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--max-disk", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2pcache: max-disk") and "Traceback" not in err


@pytest.mark.parametrize("listen", ["0.0.0.0:5002", ":5002", "[::]:5002"])
def test_a_wildcard_peer_listen_needs_advertise(listen: str) -> None:
    with pytest.raises(ConfigError, match="--advertise HOST:5002"):
        load_settings({"peer_listen": listen}, env={})
    s = load_settings({"peer_listen": listen, "advertise": "10.0.0.11:5002"}, env={})
    assert s.advertise == "10.0.0.11:5002"
    assert load_settings({"peer_listen": "127.0.0.1:5002"}, env={}).advertise is None


def test_an_unreadable_upstream_ca_is_a_start_up_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="upstream-ca: .*missing.pem"):
        load_settings({"upstream_ca": str(tmp_path / "missing.pem")})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="upstream-ca: .*garbage.pem"):
        load_settings({}, {"P2PCACHE_UPSTREAM_CA": str(garbage)})
    assert main(["node", "--upstream-ca", str(garbage), "--data", str(tmp_path / "d")]) == 2
    assert "upstream-ca" in capsys.readouterr().err


def test_good_join_dns_names_pass() -> None:
    for name in ("p2pcache", "p2pcache.ns.svc.cluster.local:5002", "[::1]:5002", "::1", "[fd00::1]"):
        assert load_settings({"join_dns": name}, env={}).join_dns == name
    assert load_settings({}, env={"P2PCACHE_JOIN_DNS": ""}).join_dns is None  # "": no DNS discovery, as before


def test_a_bracketed_address_alone_resolves_as_the_address() -> None:
    from p2pcache.discovery.dns import split_name

    assert split_name("[fd00::1]", 5002) == ("fd00::1", 5002)


def test_a_missing_secret_file_is_named_with_its_path(tmp_path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}/nope"):
        load_settings({"cluster_secret_file": str(tmp_path / "nope")}, env={})


def test_misspelt_environment_settings_are_found_but_kubernetes_service_variables_are_not() -> None:
    env = {"P2PCACHE_MAXDISK": "1", "P2PCACHE_MAX_DISK": "1GiB", "P2PCACHE_UPSTREAM": "x=http://y",
           "P2PCACHE_CONFIG": "/c", "P2PCACHE_SERVICE_HOST": "10.0.0.1", "P2PCACHE_PORT_5000_TCP": "tcp://x",
           "P2PCACHE_PORT": "tcp://10.0.0.1:5000", "HOME": "/root"}
    assert unknown_env_settings(env) == ["P2PCACHE_MAXDISK"]


def test_no_home_directory_is_a_message_not_a_traceback(monkeypatch) -> None:
    import p2pcache.config as config

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(config.Path, "home", staticmethod(no_home))
    with pytest.raises(ConfigError, match="--data"):
        load_settings({}, env={})


@pytest.mark.parametrize("url", ["http://alice:pw-s3cret@127.0.0.1:5000", "https://alice:pw-s3cret@reg.example/",
                                 "http://alice@127.0.0.1:5000", "http://alice:pw-s3cret@[::1:5000",
                                 "http://alice:pw-s3cret@127.0.0.1:99999",
                                 # without a scheme the scheme's own error echoed the URL (found in review)
                                 "alice:pw-s3cret@registry:5000", "//alice:pw-s3cret@registry:5000"])
def test_credentials_in_an_upstream_url_are_refused_without_echoing_them(
        url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """httpx would send them as Basic auth and the URL would reach log lines: refused at start-up, pointing to the
    credentials file, and the password is not in the message either."""
    with pytest.raises(ConfigError, match=r"must not carry credentials.*--credentials") as e:
        load_settings({"upstreams": [f"docker.io={url}"]}, env={})
    assert "pw-s3cret" not in str(e.value) and "alice" not in str(e.value)
    with pytest.raises(ConfigError, match="must not carry credentials"):
        load_settings(env={"P2PCACHE_UPSTREAM": f"docker.io={url}"})
    assert main(["node", "--upstream", f"docker.io={url}"]) == 2
    err = capsys.readouterr().err
    assert "--credentials" in err and "pw-s3cret" not in err


def test_an_empty_system_ca_store_falls_back_to_certifi(tmp_path, monkeypatch) -> None:
    """Debian's openssl package owns /etc/ssl/certs: an image with openssl and without ca-certificates has the
    directory, empty, and a context on it trusted nothing, so every public registry failed verification (found
    in review). An empty or missing store means certifi's bundle; a store with anything in it is the system's."""
    import ssl

    from p2pcache import config

    empty = tmp_path / "certs"
    empty.mkdir()
    paths = ssl.DefaultVerifyPaths(str(tmp_path / "none.pem"), str(empty), "", "", "", "")
    monkeypatch.setattr(config.ssl, "get_default_verify_paths", lambda: paths)
    ctx = config.upstream_tls_context(None)
    assert ctx.cert_store_stats()["x509_ca"] > 0  # certifi's bundle, loaded from its file

    assert not config._system_store_present(paths)
    (empty / "ca.pem").write_text("x")
    assert config._system_store_present(paths)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    assert not config._system_store_present(ssl.DefaultVerifyPaths(str(bundle), None, "", "", "", ""))


def test_addresses_other_nodes_dial_are_checked_at_start_up() -> None:
    """An unbracketed IPv6 address was read as a host and a port ('2001:db8::7' -> '2001:db8:' and 7), and port 0
    was taken for --advertise, --join and --tracker, where peers would dial it (found in review)."""
    base = {"peer_listen": "10.0.0.5:5002"}
    for key, addr in [("join", "2001:db8::7"), ("tracker", "fd00::1"), ("advertise", "10.0.0.1:0"),
                      ("join", "10.0.0.1:0"), ("tracker", "[nope]:5002")]:
        with pytest.raises(ConfigError, match=key):
            load_settings({**base, key: addr}, env={})
    s = load_settings({**base, "join": "[2001:db8::7]:5002", "tracker": "[fd00::1]:5002"}, env={})
    assert s.join == ["[2001:db8::7]:5002"] and parse_hostport("[2001:db8::7]:5002") == ("2001:db8::7", 5002)


def test_repeated_join_flags_add_up_and_a_namespace_given_twice_is_an_error(tmp_path: Path) -> None:
    """`--join a --join b` kept only b; `--upstream docker.io=A --upstream docker.io=B` kept only B, and a
    namespace no request can name ("Docker.IO") was taken (found in review)."""
    from p2pcache.cli import build_parser

    args = build_parser().parse_args(["node", "--peer-listen", "10.0.0.5:5002", "--join", "10.0.0.1:5002",
                                      "--join", "10.0.0.2:5002,10.0.0.3:5002"])
    assert load_settings({"peer_listen": args.peer_listen, "join": args.join}, env={}).join == [
        "10.0.0.1:5002", "10.0.0.2:5002", "10.0.0.3:5002"]
    with pytest.raises(ConfigError, match="docker.io is given twice"):
        load_settings({"upstreams": ["docker.io=http://a.example", "docker.io=http://b.example"]}, env={})
    for ns in ("Docker.IO", "bad ns"):
        with pytest.raises(ConfigError, match="upstream"):
            load_settings({"upstreams": [f"{ns}=http://a.example"]}, env={})
    cfg = tmp_path / "c.toml"
    cfg.write_text('upstream = ["docker.io=http://a.example"]\nupstreams = ["ghcr.io=http://b.example"]\n')
    with pytest.raises(ConfigError, match="same setting"):
        load_settings({}, env={}, config_file=cfg)


async def test_an_ipv6_peer_listener_starts(tmp_path: Path) -> None:
    """`--peer-listen [::1]:0` failed: the swarm's socket was always IPv4 (found in review)."""
    import socket

    import trio

    from p2pcache.node import build_node
    from p2pcache.swarm.service import SwarmService

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    s = load_settings({"peer_listen": "[::1]:0", "data": str(tmp_path / "d")}, env={})
    node = build_node(s)
    svc = SwarmService(s, node.store, node.fetcher, node.upstream, node.metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        assert svc.addr.startswith("[::1]:") and svc.bound_port > 0
        nursery.cancel_scope.cancel()


def test_a_rate_too_large_for_a_float_is_an_error_not_inf() -> None:
    """'1e300 GB/s' became inf: no limit at all for --upload-limit, and "must be positive" in a scenario."""
    with pytest.raises(ValueError, match="too large a rate"):
        parse_rate("1e300 GB/s")
    with pytest.raises(ConfigError, match="upload-limit"):
        load_settings({"upload_limit": "1e300 GB/s"}, env={})


def test_an_advertised_address_peers_would_refuse_is_refused_at_start_up() -> None:
    """Peers refuse a hello whose address they could not dial (swarm/wire.py): an --advertise of 'my host:5002'
    passed the flag check and would have failed every handshake of the node."""
    with pytest.raises(ConfigError, match="advertise: .*no DNS name"):
        load_settings({"peer_listen": "10.0.0.5:5002", "advertise": "my host:5002"}, env={})
