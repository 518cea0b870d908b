"""Build OCI / Docker images without a Docker engine and push them through the registry API.

Layers are real gzip'd tar archives; configs carry `rootfs.diff_ids` (the sha256 of the uncompressed tar);
manifests are OCI image manifests or Docker schema2; an index ties per-platform images together.
Pushing uses the plain registry API: `POST /blobs/uploads/` → `PUT <location>?digest=`, `PUT /manifests/<ref>`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ALL_MANIFEST_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]
MTIME = 1_700_000_000


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass
class Blob:
    data: bytes
    media_type: str
    # the digest of `data`, kept with the object it was computed from: a 512 MB blob takes ~0.4 s to hash, and
    # the swarm benchmark read `digest` inside its timed region (every node-to-node pull looked 0.4 s slower)
    _memo: tuple[bytes, str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def digest(self) -> str:
        memo = self._memo
        if memo is None or memo[0] is not self.data:
            memo = self._memo = (self.data, sha256_digest(self.data))
        return memo[1]

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass
class Layer(Blob):
    diff_id: str = ""


@dataclass
class Image:
    """A single-platform image: config + layers + manifest bytes."""

    config: Blob
    layers: list[Layer]
    manifest: Blob
    platform: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers]


@dataclass
class Index:
    images: list[Image]
    manifest: Blob

    @property
    def digest(self) -> str:
        return self.manifest.digest

    def for_arch(self, arch: str) -> Image:
        return next(i for i in self.images if i.platform.get("architecture") == arch)


def make_layer(files: dict[str, bytes | Symlink], *, docker: bool = False, compresslevel: int = 6) -> Layer:
    """A gzip'd tar layer holding `files` (path -> bytes, or a Symlink); parent directories are added."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(q) for p in files for q in Path(p.lstrip("/")).parents if str(q) != "."})
        for d in dirs:
            ti = tarfile.TarInfo(d.lstrip("/"))
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(ti)
        for path, content in sorted(files.items()):
            ti = tarfile.TarInfo(path.lstrip("/"))
            ti.mtime = MTIME
            if isinstance(content, Symlink):
                ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, content.target, 0o777
                tar.addfile(ti)
            else:
                ti.size, ti.mode = len(content), 0o755
                tar.addfile(ti, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    gz = gzip.compress(tar_bytes, compresslevel=compresslevel, mtime=0)
    return Layer(gz, DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP, sha256_digest(tar_bytes))


def random_layer(size: int, *, seed: str | None = None, docker: bool = False) -> Layer:
    """A layer of about `size` bytes of incompressible data (a fresh, cold digest unless `seed` is given)."""
    if seed is None:
        data = os.urandom(size)
    else:
        chunks, h, n = [], hashlib.sha256(seed.encode()).digest(), 0
        while n < size:
            h = hashlib.sha256(h).digest()
            chunks.append(h * 1024)
            n += len(h) * 1024
        data = b"".join(chunks)[:size]
    return make_layer({"data/blob.bin": data}, docker=docker, compresslevel=1)


def make_image(layers: list[Layer], *, docker: bool = False, arch: str = "amd64", os_: str = "linux",
               cmd: list[str] | None = None, env: list[str] | None = None) -> Image:
    config = {
        "architecture": arch,
        "os": os_,
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": cmd or ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "p2pcache test harness"}
                    for _ in layers],
    }
    cfg = Blob(json.dumps(config, sort_keys=True).encode(), DOCKER_CONFIG if docker else OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": cfg.descriptor(),
        "layers": [la.descriptor() for la in layers],
    }
    mblob = Blob(json.dumps(manifest, indent=2).encode(), manifest["mediaType"])
    return Image(cfg, layers, mblob, {"architecture": arch, "os": os_})


def make_index(images: list[Image], *, docker: bool = False) -> Index:
    mt = DOCKER_LIST if docker else OCI_INDEX
    doc = {
        "schemaVersion": 2,
        "mediaType": mt,
        "manifests": [im.manifest.descriptor(platform=im.platform) for im in images],
    }
    return Index(images, Blob(json.dumps(doc, indent=2).encode(), mt))


def small_image(tag_text: str, *, docker: bool = False, arch: str = "amd64", extra_kib: int = 64) -> Image:
    """A two-layer image of a few dozen KiB with content unique to `tag_text`."""
    l1 = make_layer({"etc/motd": f"hello from {tag_text} ({arch})\n".encode(),
                     "etc/os-release": b"NAME=p2pcache-test\n"}, docker=docker)
    l2 = random_layer(extra_kib * 1024, seed=f"{tag_text}/{arch}", docker=docker)
    return make_image([l1, l2], docker=docker, arch=arch)


def busybox_image(busybox: str = "/bin/busybox", *, docker: bool = True) -> Image:
    """A runnable image: static busybox at /bin/busybox with sh, echo, cat, … symlinked to it."""
    data = Path(busybox).read_bytes()
    applets = ["sh", "ash", "echo", "cat", "ls", "mkdir", "rm", "cp", "mv", "touch", "true", "false", "test",
               "sleep", "env", "id", "uname", "sha256sum", "wc", "grep", "sed", "head", "tail", "printf"]
    files: dict[str, bytes | Symlink] = {"bin/busybox": data}
    files.update({f"bin/{a}": Symlink("busybox") for a in applets})
    files["etc/passwd"] = b"root:x:0:0:root:/root:/bin/sh\n"
    files["etc/group"] = b"root:x:0:\n"
    files["tmp/.keep"] = b""
    return make_image([make_layer(files, docker=docker)], docker=docker, cmd=["sh"])


# --- pushing through the registry API ---

def push_blob(client: httpx.Client, name: str, blob: Blob) -> None:
    if client.head(f"/v2/{name}/blobs/{blob.digest}").status_code == 200:
        return
    r = client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status_code == 202, (r.status_code, r.text)
    loc = r.headers["Location"]
    sep = "&" if "?" in loc else "?"
    r = client.put(f"{loc}{sep}digest={blob.digest}", content=blob.data,
                   headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, (r.status_code, r.text)


def push_manifest(client: httpx.Client, name: str, ref: str, manifest: Blob) -> None:
    r = client.put(f"/v2/{name}/manifests/{ref}", content=manifest.data,
                   headers={"Content-Type": manifest.media_type})
    assert r.status_code == 201, (r.status_code, r.text)
    assert r.headers.get("Docker-Content-Digest") == manifest.digest


def push_image(client: httpx.Client, name: str, tag: str | None, image: Image) -> None:
    for b in image.blobs:
        push_blob(client, name, b)
    push_manifest(client, name, tag or image.digest, image.manifest)


def push_index(client: httpx.Client, name: str, tag: str, index: Index) -> None:
    for im in index.images:
        push_image(client, name, None, im)
    push_manifest(client, name, tag, index.manifest)


def push(registry_url: str, name: str, tag: str, thing: Image | Index, **client_kw) -> None:
    with httpx.Client(base_url=registry_url, timeout=60, **client_kw) as c:
        if isinstance(thing, Index):
            push_index(c, name, tag, thing)
        else:
            push_image(c, name, tag, thing)
