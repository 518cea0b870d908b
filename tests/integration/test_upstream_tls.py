"""A node in front of the real docker-registry over HTTPS, its certificate from a private CA (IP SAN 127.0.0.1).

What the node trusts is what Docker and containerd trust: the system's store (a CA that `update-ca-certificates`
added), plus `--upstream-ca`. The system store is changed for the node only: it runs in a mount namespace of its
own (`unshare -m`) with a copy of the store, our CA appended, bind-mounted over the real one, and without
SSL_CERT_FILE / SSL_CERT_DIR (which would name another store). The machine's store is never touched.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .harness import images as im
from .harness.registry import Registry

pytestmark = pytest.mark.integration

NAME = "library/tlsimg"
ACCEPT = {"Accept": im.OCI_MANIFEST}
# The node's environment must not name a store of its own: the test is about the system's default one.
NO_STORE_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR", "NIX_SSL_CERT_FILE")


@dataclass
class TlsRegistry:
    registry: Registry
    image: im.Image
    ca_pem: Path
    system_with_ca: Path  # the system's store with our CA appended


def _private_ca(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: (CA PEM, server cert PEM, server key PEM)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pcache test private CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_pem, cert_pem, key_pem = d / "ca.pem", d / "server.crt", d / "server.key"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


def _system_store() -> Path:
    """The file OpenSSL reads by default (with no SSL_CERT_FILE), symlinks resolved."""
    return Path(os.path.realpath(ssl.get_default_verify_paths().openssl_cafile))


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    d = tmp_path_factory.mktemp("tls")
    ca_pem, cert_pem, key_pem = _private_ca(d)
    system_with_ca = d / "system-store-with-ca.crt"
    system_with_ca.write_bytes(_system_store().read_bytes() + b"\n" + ca_pem.read_bytes())
    reg = Registry(d / "registry")
    config = json.loads(reg.config_path.read_text())
    config["http"]["tls"] = {"certificate": str(cert_pem), "key": str(key_pem)}
    reg.config_path.write_text(json.dumps(config))
    reg.url = f"https://{reg.host}"
    reg.start()
    try:
        image = im.make_image([im.random_layer(3 << 20)])
        with httpx.Client(base_url=reg.url, verify=ssl.create_default_context(cafile=str(ca_pem)),
                          timeout=60) as c:
            im.push_image(c, NAME, "1", image)
        yield TlsRegistry(reg, image, ca_pem, system_with_ca)
    finally:
        reg.stop()


def _in_own_store(store: Path) -> list[str]:
    """A wrap for the node: its own mount namespace, `store` over the system's store, no SSL_CERT_* variables."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root and unshare (util-linux) for a CA store of the node's own", pytrace=False)
    unset = " ".join(NO_STORE_ENV)
    return ["unshare", "-m", "sh", "-c", f'mount --bind "$0" {_system_store()} && unset {unset} && exec "$@"',
            str(store)]


def _pull(node, image: im.Image) -> tuple[int, int]:
    with httpx.Client(base_url=node.url, timeout=60) as c:
        manifest = c.get(f"/v2/{NAME}/manifests/1", headers=ACCEPT)
        layer = image.layers[0]
        blob = c.get(f"/v2/{NAME}/blobs/{layer.digest}")
        assert blob.status_code != 200 or blob.content == layer.data
        return manifest.status_code, blob.status_code


def test_a_ca_in_the_system_store_is_trusted_without_upstream_ca(tls_registry: TlsRegistry, make_node) -> None:
    """As after `update-ca-certificates`: Docker and containerd trust the registry, and so does the node."""
    node = make_node({"docker.io": tls_registry.registry.url}, start=False)
    node.wrap = _in_own_store(tls_registry.system_with_ca)
    node.start()
    assert _pull(node, tls_registry.image) == (200, 200), node.log_text()[-2000:]


def test_upstream_ca_adds_to_the_system_store(tls_registry: TlsRegistry, make_node) -> None:
    node = make_node({"docker.io": tls_registry.registry.url}, args=["--upstream-ca", str(tls_registry.ca_pem)],
                     start=False)
    node.wrap = _in_own_store(_system_store())  # the store as it is, without our CA
    node.start()
    assert _pull(node, tls_registry.image) == (200, 200), node.log_text()[-2000:]


def test_an_untrusted_certificate_is_logged_with_its_reason_and_not_retried(
        tls_registry: TlsRegistry, make_node) -> None:
    node = make_node({"docker.io": tls_registry.registry.url}, start=False)
    node.wrap = _in_own_store(_system_store())
    node.start()
    manifest, blob = _pull(node, tls_registry.image)
    assert manifest >= 500 and blob >= 500
    log = node.log_text()
    assert "certificate verify failed: unable to get local issuer certificate" in log, log[-2000:]
    assert "--upstream-ca" in log and "retrying" not in log, log[-2000:]
