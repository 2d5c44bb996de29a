"""Build small test images offline, as real OCI image layouts (no registry, no network).

The busybox image is made from the host's static busybox (Debian busybox-static) in
two layers, so the importer's multi-layer, compression and whiteout paths all run:

- layer 1 (tar+gzip): busybox, applet symlinks, /etc/passwd and group, plus
  ``/etc/deleteme`` and ``/opt/data/{old,keep}.txt`` that layer 2 hides;
- layer 2 (plain tar): ``/bin/counter`` (the TCP service), ``/bin/counter-session``,
  a whiteout ``etc/.wh.deleteme`` and an opaque ``opt/data/.wh..wh..opq`` with a
  new ``opt/data/new.txt``.

``/bin/counter`` listens on $PORT (7000) with busybox ``nc -ll -e``: every connection
gets its own shell whose counter lives only in memory, so a restored connection that
keeps counting proves memory and socket survived. Each line ``L`` is answered with
``N L``; the line ``hostname`` is answered with ``N <hostname>``.

Also writes the same image as an oci-archive tar, a legacy ``docker save`` tar and a
plain rootfs tar. Usable from the command line (e.g. for benches and demos)::

    python -m tests.imagebuild busybox /tmp/busybox-oci   # OCI layout directory
    python -m tests.imagebuild archive /tmp/busybox.oci.tar
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = [
    "sh", "nc", "cat", "echo", "ls", "sleep", "mkdir", "rm", "touch", "id", "hostname",
    "ps", "wc", "sed", "grep", "env", "true", "false", "seq", "head", "tail", "kill",
    "ip", "ifconfig", "arping", "ping", "date", "dd", "mv", "cp", "uname", "stat", "test",
    "[", "printf", "sync", "find",
]
MTIME = 1_700_000_000
COUNTER = b"""#!/bin/sh
# TCP counter/echo service: one shell per connection, its counter only in memory.
exec nc -ll -p "${PORT:-7000}" -e /bin/counter-session
"""
SESSION = b"""#!/bin/sh
n=0
while IFS= read -r line; do
  n=$((n+1))
  case "$line" in
    hostname) echo "$n $(hostname)" ;;
    *) echo "$n $line" ;;
  esac
done
"""
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class BuiltImage:
    path: Path
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    diff_ids: list[str]

    @property
    def id(self) -> str:
        return self.config_digest.removeprefix("sha256:")


class _TarBuilder:
    """Deterministic tar writer (fixed mtimes, root-owned) into memory."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.mtime = MTIME
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        return ti

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tf.addfile(ti)

    def bytes(self) -> bytes:
        self.tf.close()
        return self.buf.getvalue()


def busybox_layers(busybox: Path = BUSYBOX) -> list[bytes]:
    """The two uncompressed layer tars of the busybox test image."""
    if not busybox.is_file():
        raise FileNotFoundError(f"{busybox} missing: apt-get install busybox-static")
    l1 = _TarBuilder()
    for d in ["bin", "sbin", "etc", "root", "proc", "sys", "dev", "run", "var", "var/log",
              "usr", "usr/bin", "opt", "opt/data", "home"]:
        l1.dir(d, 0o700 if d == "root" else 0o755)
    l1.dir("tmp", 0o1777)
    l1.file("bin/busybox", busybox.read_bytes(), 0o755)
    for a in APPLETS:
        l1.symlink(f"bin/{a}", "busybox")
    l1.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    l1.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    l1.file("etc/hostname", b"busybox\n")
    l1.file("etc/deleteme", b"layer 1 file that layer 2 whites out\n")
    l1.file("opt/data/old.txt", b"hidden by the opaque dir of layer 2\n")
    l1.file("opt/data/keep.txt", b"also hidden\n")
    l2 = _TarBuilder()
    l2.dir("bin")
    l2.file("bin/counter", COUNTER, 0o755)
    l2.file("bin/counter-session", SESSION, 0o755)
    l2.dir("etc")
    l2.file("etc/.wh.deleteme", b"")
    l2.file("etc/motd", b"cnvm busybox test image\n")
    l2.dir("opt")
    l2.dir("opt/data")
    l2.file("opt/data/.wh..wh..opq", b"")
    l2.file("opt/data/new.txt", b"layer 2\n")
    return [l1.bytes(), l2.bytes()]


def image_config(diff_ids: list[str]) -> dict:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "PORT=7000"],
            "Cmd": ["/bin/counter"],
            "WorkingDir": "/",
            "ExposedPorts": {"7000/tcp": {}},
            "Labels": {"org.cnvm.test": "busybox"},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2023-11-14T22:13:20Z",
                     "created_by": f"tests/imagebuild.py layer {i}"} for i in (1, 2)],
    }


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(layout: Path, data: bytes) -> str:
    d = _digest(data)
    p = layout / "blobs" / "sha256" / d.removeprefix("sha256:")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return d


def build_busybox_layout(dest: Path, tag: str = "latest", busybox: Path = BUSYBOX,
                         gzip_layers: tuple[bool, ...] = (True, False)) -> BuiltImage:
    """Write the busybox test image as an OCI image layout directory at dest."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    raw = busybox_layers(busybox)
    diff_ids = [_digest(x) for x in raw]
    descs = []
    for data, gz in zip(raw, gzip_layers, strict=True):
        blob = gzip.compress(data, compresslevel=1, mtime=0) if gz else data
        descs.append({"mediaType": MT_LAYER_GZ if gz else MT_LAYER,
                      "digest": _put(dest, blob), "size": len(blob)})
    cfg = json.dumps(image_config(diff_ids), sort_keys=True).encode()
    cdig = _put(dest, cfg)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdig, "size": len(cfg)},
        "layers": descs,
    }, sort_keys=True).encode()
    mdig = _put(dest, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MT_MANIFEST, "digest": mdig, "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return BuiltImage(dest, mdig, cdig, [d["digest"] for d in descs], diff_ids)


def tar_dir(src: Path, dest_tar: Path) -> Path:
    """Pack a layout directory as an archive (what `podman save --format oci-archive` does)."""
    with tarfile.open(dest_tar, "w") as tf:
        for p in sorted(Path(src).rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return dest_tar


def build_busybox_archive(dest_tar: Path, tag: str = "latest") -> BuiltImage:
    work = Path(str(dest_tar) + ".d")
    img = build_busybox_layout(work, tag)
    tar_dir(work, dest_tar)
    shutil.rmtree(work)
    img.path = Path(dest_tar)
    return img


def build_docker_save(dest_tar: Path, repo_tag: str = "cnvm-busybox:latest") -> BuiltImage:
    """The same image as a legacy `docker save` tarball (manifest.json, <id>/layer.tar)."""
    raw = busybox_layers()
    diff_ids = [_digest(x) for x in raw]
    cfg = json.dumps(image_config(diff_ids), sort_keys=True).encode()
    cdig = _digest(cfg)
    with tarfile.open(dest_tar, "w") as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = MTIME
            tf.addfile(ti, io.BytesIO(data))
        add(cdig.removeprefix("sha256:") + ".json", cfg)
        layers = []
        for i, data in enumerate(raw):
            rel = f"{hashlib.sha256(b'layer%d' % i).hexdigest()}/layer.tar"
            add(rel, data)
            layers.append(rel)
        add("manifest.json", json.dumps([{
            "Config": cdig.removeprefix("sha256:") + ".json",
            "RepoTags": [repo_tag],
            "Layers": layers,
        }]).encode())
    return BuiltImage(Path(dest_tar), "", cdig, diff_ids, diff_ids)


def build_rootfs_tar(dest_tar: Path, compress: bool = True) -> Path:
    """Layer 1 alone as a plain rootfs tarball (optionally gzip-compressed)."""
    data = busybox_layers()[0]
    Path(dest_tar).write_bytes(gzip.compress(data, 1, mtime=0) if compress else data)
    return Path(dest_tar)


def files_layer(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed layer tar holding `files` (path -> (content, mode)), with their
    parent directories."""
    t = _TarBuilder()
    dirs = sorted({str(Path(p).parents[i]) for p in files
                   for i in range(len(Path(p).parents) - 1)})
    for d in dirs:
        t.dir(d)
    for path, (data, mode) in sorted(files.items()):
        t.file(path, data, mode)
    return t.bytes()


def build_busybox_plus_layout(dest: Path, files: dict[str, tuple[bytes, int]],
                              tag: str = "latest") -> BuiltImage:
    """The busybox test image with a third (plain tar) layer holding `files`."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    raw = [*busybox_layers(), files_layer(files)]
    diff_ids = [_digest(x) for x in raw]
    descs = []
    for i, data in enumerate(raw):
        blob = gzip.compress(data, compresslevel=1, mtime=0) if i == 0 else data
        descs.append({"mediaType": MT_LAYER_GZ if i == 0 else MT_LAYER,
                      "digest": _put(dest, blob), "size": len(blob)})
    cfg_doc = image_config(diff_ids)
    cfg_doc["history"].append({"created": "2023-11-14T22:13:20Z",
                               "created_by": "tests/imagebuild.py extra files"})
    cfg = json.dumps(cfg_doc, sort_keys=True).encode()
    cdig = _put(dest, cfg)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdig, "size": len(cfg)},
        "layers": descs,
    }, sort_keys=True).encode()
    mdig = _put(dest, manifest)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": MT_MANIFEST, "digest": mdig, "size": len(manifest),
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return BuiltImage(dest, mdig, cdig, [d["digest"] for d in descs], diff_ids)


def gcc_static(source: str, out: Path) -> bytes:
    """Compile a C program statically (the busybox image has no libc) and return the
    binary; raises FileNotFoundError without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FileNotFoundError("gcc is missing: apt-get install gcc libc6-dev")
    out = Path(out)
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([gcc, "-static", "-O2", "-o", str(out), str(src)], check=True,
                   capture_output=True)
    return out.read_bytes()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.imagebuild", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["busybox", "archive", "docker", "rootfs"])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--tag", default="latest")
    a = ap.parse_args(argv)
    if a.what == "busybox":
        img = build_busybox_layout(a.dest, a.tag)
    elif a.what == "archive":
        img = build_busybox_archive(a.dest, a.tag)
    elif a.what == "docker":
        img = build_docker_save(a.dest)
    else:
        print(build_rootfs_tar(a.dest))
        return
    print(f"{img.path} {img.manifest_digest} id={img.id[:12]}")


if __name__ == "__main__":
    os.umask(0o022)
    main()
