"""`p2pcache configure containerd`: the hosts.toml files, and clear errors for bad input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from p2pcache.cli import main
from p2pcache.clientconf import write_containerd_hosts
from p2pcache.config import ConfigError


def test_one_hosts_toml_per_registry(tmp_path: Path) -> None:
    written = write_containerd_hosts(tmp_path, "http://10.0.0.5:5000/", ["docker.io", "ghcr.io"])
    assert written == [tmp_path / "docker.io" / "hosts.toml", tmp_path / "ghcr.io" / "hosts.toml"]
    hub = tomllib.loads(written[0].read_text())
    assert hub == {"server": "https://registry-1.docker.io",
                   "host": {"http://10.0.0.5:5000": {"capabilities": ["pull", "resolve"]}}}
    assert tomllib.loads(written[1].read_text())["server"] == "https://ghcr.io"
    assert sorted(p.name for p in (tmp_path / "ghcr.io").iterdir()) == ["hosts.toml"]  # no temporary left


@pytest.mark.parametrize(("mirror", "registries", "needle"), [
    ("ftp://x:5000", ["docker.io"], "mirror"),
    ("http://x:99999", ["docker.io"], "port"),
    ("http://x:5000/v2", ["docker.io"], "mirror"),
    ("http://x:5000", ["../etc"], "registry"),
    ("http://x:5000", ["Docker.IO"], "registry"),
    ("http://x:5000", [], "registry"),
    ("http://[::1", ["docker.io"], "mirror"),  # a ValueError traceback (found in review)
    ('http://a"b', ["docker.io"], "mirror"),  # a hosts.toml containerd cannot parse, over a good one
    ("http://a b", ["docker.io"], "mirror"),
    ("http://127.0.0.1:0", ["docker.io"], "mirror"),  # written as it was (found in review)
    ("http://user:pw@127.0.0.1:5000", ["docker.io"], "mirror"),  # a password in a world-readable file
])
def test_bad_input_names_the_problem_and_writes_nothing(tmp_path: Path, mirror: str, registries: list[str],
                                                        needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        write_containerd_hosts(tmp_path / "certs.d", mirror, registries)
    assert not (tmp_path / "certs.d").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configure", "containerd", "--hosts-dir", str(tmp_path), "--mirror", "http://127.0.0.1:5000"]) == 0
    assert (tmp_path / "docker.io" / "hosts.toml").exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["configure", "containerd", "--hosts-dir", str(tmp_path / "f" / "x"), "--registry", "a/b"]) == 2
    assert capsys.readouterr().err.startswith("p2pcache: registry:")


def test_an_empty_hosts_dir_is_refused_not_the_current_directory(tmp_path: Path, monkeypatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["configure", "containerd", "--hosts-dir", ""]) == 2
    assert "hosts-dir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    (tmp_path / "docker.io" / "hosts.toml").mkdir(parents=True)  # os.replace onto a directory fails
    with pytest.raises(ConfigError, match="hosts-dir"):
        write_containerd_hosts(tmp_path, "http://127.0.0.1:5000", ["docker.io"])
    assert [p.name for p in (tmp_path / "docker.io").iterdir()] == ["hosts.toml"]


def test_a_hosts_toml_that_says_something_else_is_kept_unless_forced(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """It was replaced without a word: a company mirror's [host] entry and its CA were gone (found in review)."""
    theirs = ('server = "https://registry-1.docker.io"\n[host."https://corp-mirror.example:443"]\n'
              '  capabilities = ["pull", "resolve"]\n  ca = "/etc/certs/corp.pem"\n')
    path = tmp_path / "docker.io" / "hosts.toml"
    path.parent.mkdir()
    path.write_text(theirs)
    assert main(["configure", "containerd", "--hosts-dir", str(tmp_path), "--registry", "docker.io",
                 "--registry", "ghcr.io"]) == 2
    assert "--force" in capsys.readouterr().err
    assert path.read_text() == theirs and not (tmp_path / "ghcr.io").exists()  # nothing written at all
    assert main(["configure", "containerd", "--hosts-dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "docker.io" / "hosts.toml.bak").read_text() == theirs
    ours = path.read_text()
    assert "corp-mirror" not in ours and tomllib.loads(ours)["server"] == "https://registry-1.docker.io"
    assert main(["configure", "containerd", "--hosts-dir", str(tmp_path)]) == 0  # ours again: no --force needed
    assert path.read_text() == ours
