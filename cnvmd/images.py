"""Per-node content-addressed image store.

Layout under ``config.images_dir``::

    blobs/sha256/<hex>      verified blobs: manifests, configs, compressed layers
    layers/<diff-id-hex>/   each layer unpacked once, in overlayfs format
    images/<id>.json        one record per image (id = config digest hex)
    tmp/                    staging; anything here is garbage after a crash

Accepted inputs (`ImageStore.import_path`): an OCI image layout, as a directory or a
tar (``skopeo copy … oci:DIR``, ``podman save --format oci-archive``, ``umoci``, docker
>= 25 ``docker save``), a legacy ``docker save`` tarball (``manifest.json``), and a
plain rootfs tarball (optionally gzip/xz/bzip2/zstd compressed).

Unpacker decision — own small unpacker around GNU tar, not umoci:
``umoci unpack``/``umoci raw unpack`` (0.4.7 in Debian) apply every layer into one
flattened rootfs, deleting whited-out files as they go. cnvm needs the opposite: each
layer in its own directory so overlayfs can stack the layers as lowerdirs (a
deploy then costs one mount, not a copy of the image), several images share their
common layers on disk, and teleport can ship only the layers a target lacks, by
digest. So each layer is streamed (decompressed in Python, hashed to verify its
diff-id) into GNU tar, which does the actual extraction (fast C, hard links, xattrs,
long names, sparse files, refuses ``..`` members and makes absolute/``..`` symlinks
as placeholders until the end, so a layer cannot write outside its directory).
A short pass then converts OCI/AUFS whiteouts to overlayfs ones: ``.wh.NAME`` →
a 0/0 character device ``NAME``, ``.wh..wh..opq`` → ``trusted.overlay.opaque=y`` on
its directory. umoci is still used by ``scripts/build-debian-image`` to *write*
layouts, and the tests cross-check our unpacked layers against ``umoci raw unpack``.

Every blob is verified by sha256 as it is copied into the store; every layer's
uncompressed stream is verified against the config's ``rootfs.diff_ids``. A failed
import removes whatever it added, so bad input changes nothing. All blocking work
(hashing, copying, extraction) runs in worker threads or subprocesses.

Hostile input: files of a layout directory are opened beneath it without following
symlinks (a blob that is a symlink could name any file root can read); JSON is
bounded in size and nesting; a layer stream is cut off once it exceeds
``max_layer_size`` or ``max(max_layer_ratio x its blob size, RATIO_FLOOR)`` (a gzip
bomb stops at its limit, not at the disk's end). Layers keep their setuid bits and
devices as the image has them — the cnvms need them — so the store is root's alone:
every directory of it is 0700 (re-moded at load), records and blobs 0600.
"""

from __future__ import annotations

import asyncio
import builtins
import bz2
import contextlib
import errno
import gzip
import hashlib
import inspect
import json
import lzma
import os
import platform
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from cnvmd.state import atomic_write
from proto.framing import too_deep
from proto.messages import ErrorCode, ProtoError, show

CHUNK = 1 << 20
# Patterns are used with fullmatch only: `$` would let a trailing newline through.
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# Image names: docker-style references (lowercase repo path, optional :tag), optionally
# behind a `registry:port/` (a pulled image keeps its full reference as its name).
_IMAGE_NAME = re.compile(r"(?:[a-z0-9][a-z0-9.-]{0,127}:[0-9]{1,5}/)?"
                         r"[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")

MAX_LAYER_SIZE = 8 << 30
"""Default largest uncompressed layer (config `image_max_layer_size`)."""
MAX_LAYER_RATIO = 100
"""Default largest uncompressed:compressed ratio (config `image_max_layer_ratio`)."""
RATIO_FLOOR = 64 << 20
"""Any layer may expand to this much, whatever its ratio (tar headers and padding make
small layers compress 100:1 and more)."""
MAX_JSON = 8 << 20
"""Largest index/manifest/config JSON read."""
MAX_JSON_DEPTH = 32
"""Deepest nesting of a metadata JSON document (OCI's need a handful of levels)."""
MAX_INDEX_NESTING = 4
"""Index → index → ... levels followed before an image manifest must appear."""
MAX_TAR_MEMBERS = 100_000
"""Members of an image archive read into the index (layouts have a few hundred)."""
STORE_DIR_MODE = 0o700
STORE_FILE_MODE = 0o600

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = {MT_OCI_INDEX, MT_DOCKER_LIST}
MANIFEST_TYPES = {MT_OCI_MANIFEST, MT_DOCKER_MANIFEST}
CONFIG_TYPES = {MT_OCI_CONFIG, MT_DOCKER_CONFIG}
LAYER_TYPES = {
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_DOCKER_LAYER,
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
# Layers we synthesize from a rootfs tarball keep its compression; xz/bzip2 have no
# OCI media type, so they get private ones (only cnvm nodes ever read them).
COMPRESSION_MEDIA_TYPES = {
    "none": MT_OCI_LAYER,
    "gzip": MT_OCI_LAYER_GZIP,
    "zstd": MT_OCI_LAYER_ZSTD,
    "xz": "application/vnd.cnvm.image.layer.v1.tar+xz",
    "bzip2": "application/vnd.cnvm.image.layer.v1.tar+bzip2",
}
LAYER_TYPES |= set(COMPRESSION_MEDIA_TYPES.values())

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(ProtoError):
    """An image operation failed in a way the user can act on (travels as a ProtoError)."""


def _bad(msg: str, **details: Any) -> ImageError:
    return ImageError(ErrorCode.INVALID_ARGUMENT, msg, details)


# --------------------------------------------------------------------------- records


@dataclass
class Layer:
    digest: str  # blob digest as stored (compressed form)
    diff_id: str  # sha256 of the uncompressed tar: names the unpacked directory
    media_type: str
    size: int  # blob bytes
    unpacked_size: int = 0


@dataclass
class Image:
    id: str  # hex of the config digest (docker convention: stable across recompression)
    names: list[str]
    manifest_digest: str
    config_digest: str
    layers: list[Layer]  # bottom → top
    config: dict[str, Any]  # the image config's "config" object (Entrypoint, Cmd, Env, ...)
    architecture: str = ""
    os: str = "linux"
    created: str = ""
    imported_at: float = 0.0
    source: str = ""
    layer_dirs: list[Path] = field(default_factory=list)  # filled by the store; not saved

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def size(self) -> int:
        return sum(layer.unpacked_size for layer in self.layers)

    def to_record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("layer_dirs")
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Image:
        d = dict(d)
        d["layers"] = [Layer(**x) for x in d.get("layers", [])]
        d.pop("layer_dirs", None)
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """What `images ls` shows."""
        return {
            "id": self.short_id,
            "names": list(self.names),
            "size": self.size,
            "layers": len(self.layers),
            "created": self.created,
            "imported_at": self.imported_at,
        }

    def describe(self) -> dict[str, Any]:
        """What `images inspect` shows."""
        d = self.to_record()
        d["size"] = self.size
        d["layer_dirs"] = [str(p) for p in self.layer_dirs]
        return d


# ------------------------------------------------------------------------- helpers


def check_image_name(name: str) -> str:
    if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name):
        raise _bad(
            f"bad image name {show(name)}: lowercase letters, digits, '.', '_', '-', '/', "
            "optionally ':tag' (at most 128 characters each)"
        )
    return name


def check_digest(digest: Any) -> str:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        if isinstance(digest, str) and ":" in digest and not digest.startswith("sha256:"):
            raise _bad(f"unsupported digest algorithm in {show(digest)} (only sha256)")
        raise _bad(f"malformed digest {show(digest)}")
    return digest


def host_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def sniff_compression(head: bytes) -> str:
    """Compression by magic bytes: more reliable than media types in the wild."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"BZh"):
        return "bzip2"
    return "none"


def _json(data: bytes, what: str) -> Any:
    """Parse metadata JSON; too deep (or deep enough to exhaust the parser's stack) is
    INVALID_ARGUMENT like any other bad document."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise _bad(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        obj = None
        deep = True
    else:
        deep = too_deep(obj, MAX_JSON_DEPTH)
    if deep:
        raise _bad(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return obj


def _dict(v: Any) -> dict[str, Any]:
    """`v` if it is a JSON object, else {} (optional objects of a hostile document)."""
    return v if isinstance(v, dict) else {}


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _safe_rel(name: str) -> str:
    """A relative member path inside a layout/archive, refusing escapes."""
    p = PurePosixPath(name.lstrip("/")) if not name.startswith("/") else None
    if p is None or ".." in p.parts or not p.parts:
        raise _bad(f"unsafe path {show(name)} in image archive")
    return str(p)


# ------------------------------------------------------------------------- sources


class _Source:
    """Read-only view of a layout/archive: a directory or a tar file."""

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def open(self, rel: str) -> IO[bytes]:
        raise NotImplementedError

    def read(self, rel: str, limit: int = MAX_JSON) -> bytes:
        with self.open(rel) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise _bad(f"{rel} is too large for a metadata file")
        return data

    def close(self) -> None:
        pass


def open_beneath(root: Path, rel: str) -> int:
    """Open regular file `rel` under directory `root` read-only, following no symlink
    below `root` (O_NOFOLLOW component by component, as RESOLVE_NO_SYMLINKS would);
    a symlink, a device or a FIFO is INVALID_ARGUMENT. Returns the fd."""
    parts = PurePosixPath(_safe_rel(rel)).parts
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        ffd = os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=fd)
    except FileNotFoundError:
        raise _bad(f"{rel} is missing from the image layout {root}") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise _bad(f"{rel} in {root} is (or lies under) a symbolic link or not a "
                       "directory: refused") from None
        raise _bad(f"cannot open {rel} in {root}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        raise _bad(f"{rel} in {root} is not a regular file")
    return ffd


class _DirSource(_Source):
    """A layout directory: every file is opened beneath it, no symlink followed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def exists(self, rel: str) -> bool:
        p = self.root / _safe_rel(rel)
        return os.path.lexists(p) and not p.is_dir()  # `open` refuses what is not a file

    def open(self, rel: str) -> IO[bytes]:
        return os.fdopen(open_beneath(self.root, rel), "rb")


class _FileSource(_Source):
    """The one file the caller named (a rootfs tarball): opened as given."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self, rel: str) -> bool:
        return self.path.is_file()

    def open(self, rel: str) -> IO[bytes]:
        if not self.path.is_file():
            raise _bad(f"{self.path} is not a regular file")
        return open(self.path, "rb")


class _TarSource(_Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:*")
            self.members: dict[str, tarfile.TarInfo] = {}
            for m in self.tf:
                if len(self.members) >= MAX_TAR_MEMBERS:
                    self.tf.close()
                    raise _bad(f"{path}: more than {MAX_TAR_MEMBERS} members; not an image")
                self.members[m.name.removeprefix("./").lstrip("/")] = m
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _bad(f"{path}: not a readable tar archive ({exc})") from None

    def exists(self, rel: str) -> bool:
        m = self.members.get(_safe_rel(rel))
        return m is not None and (m.isfile() or m.islnk() or m.issym())

    def open(self, rel: str) -> IO[bytes]:
        m = self.members.get(_safe_rel(rel))
        try:  # a link member resolves inside the archive only (KeyError if absent)
            f = self.tf.extractfile(m) if m is not None else None
        except (KeyError, tarfile.TarError):
            f = None
        if f is None:
            raise _bad(f"{rel} is missing from the image archive {self.path}")
        return f

    def close(self) -> None:
        self.tf.close()


# ------------------------------------------------------------------ blocking work


def _copy_verified(src: IO[bytes], dest_dir: Path, expect: str | None,
                   max_bytes: int = MAX_LAYER_SIZE) -> tuple[str, int, Path]:
    """Copy a stream into a temp file in dest_dir while hashing; check the digest.
    A blob larger than `max_bytes` is refused as it streams."""
    h = hashlib.sha256()
    n = 0
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix="blob-")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
                if n > max_bytes:
                    raise _bad(f"blob is larger than {max_bytes} bytes "
                               "(image_max_layer_size)", limit=max_bytes)
        digest = "sha256:" + h.hexdigest()
        if expect is not None and digest != expect:
            raise _bad(
                f"digest mismatch: blob should be {expect} but its content hashes to {digest}",
                expected=expect,
                actual=digest,
            )
        return digest, n, Path(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class _ByteReader(Protocol):
    """What a decompressed layer stream offers: a plain file, a pipe, GzipFile, LZMAFile, ..."""

    def read(self, size: int = -1, /) -> bytes: ...


@contextlib.contextmanager
def _decompressed(path: Path) -> Iterator[_ByteReader]:
    """Yield the uncompressed tar stream of a blob, whatever its compression."""
    with open(path, "rb") as raw:
        kind = sniff_compression(raw.read(8))
        raw.seek(0)
        if kind == "none":
            yield raw
        elif kind == "gzip":
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        elif kind == "xz":
            with lzma.LZMAFile(raw) as f:
                yield f
        elif kind == "bzip2":
            with bz2.BZ2File(raw) as f:
                yield f
        else:
            zstd = shutil.which("zstd")
            if zstd is None:
                raise _bad("zstd-compressed layer but no `zstd` program on this host")
            p = subprocess.Popen([zstd, "-dcq"], stdin=raw, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            assert p.stdout is not None
            try:
                yield p.stdout
            finally:
                p.stdout.close()
                p.kill()
                p.wait()


TAR_ARGS = [
    "--numeric-owner",  # never map names through the host's /etc/passwd
    "--same-owner",
    "--same-permissions",
    "--xattrs",
    "--xattrs-include=security.capability",
    "--xattrs-include=user.*",
    "--warning=no-unknown-keyword",
    "--warning=no-timestamp",
]


def _untar_stream(stream: _ByteReader, dest: Path, max_bytes: int | None = None) -> str:
    """Feed an uncompressed tar stream to GNU tar; return the stream's sha256 digest.

    More than `max_bytes` of stream stops tar at once (the decompressor is read a
    chunk at a time, so a bomb never expands past its limit)."""
    h = hashlib.sha256()
    seen = 0
    with tempfile.TemporaryFile() as errf:
        p = subprocess.Popen(
            ["tar", "-x", "-f", "-", "-C", str(dest), *TAR_ARGS],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errf,
        )
        assert p.stdin is not None
        feeding = True
        try:
            while chunk := stream.read(CHUNK):
                seen += len(chunk)
                if max_bytes is not None and seen > max_bytes:
                    raise _bad(f"layer expands to more than {max_bytes} bytes (limits: "
                               "image_max_layer_size, image_max_layer_ratio)", limit=max_bytes)
                h.update(chunk)
                if feeding:
                    try:
                        p.stdin.write(chunk)
                    except BrokenPipeError:
                        feeding = False  # tar stopped early; keep hashing, judge by its rc
            with contextlib.suppress(BrokenPipeError):
                p.stdin.close()
        except BaseException:
            p.kill()
            p.wait()
            raise
        rc = p.wait()
        if rc != 0:
            errf.seek(0)
            err = errf.read().decode(errors="replace").strip().splitlines()
            raise _bad("layer extraction failed: " + (" | ".join(err[-3:]) or f"tar exit {rc}"))
    return "sha256:" + h.hexdigest()


def convert_whiteouts(root: Path) -> int:
    """Turn OCI/AUFS whiteouts under root into overlayfs ones; return the tree's size.

    ``.wh.NAME`` becomes a 0/0 character device NAME (hides NAME of lower layers);
    ``.wh..wh..opq`` becomes ``trusted.overlay.opaque=y`` on its directory (hides all
    lower contents of it). Other ``.wh..wh.*`` entries (AUFS bookkeeping) are dropped.
    """
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for names in (dirnames, filenames):
            for fn in list(names):
                p = os.path.join(dirpath, fn)
                if not fn.startswith(WHITEOUT_PREFIX):
                    if names is filenames:
                        total += os.lstat(p).st_size
                    continue
                if names is dirnames:
                    dirnames.remove(fn)
                    shutil.rmtree(p)
                else:
                    os.unlink(p)
                if fn == OPAQUE_MARKER:
                    os.setxattr(dirpath, OPAQUE_XATTR, b"y", follow_symlinks=False)
                elif fn.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                    continue
                else:
                    target = os.path.join(dirpath, fn[len(WHITEOUT_PREFIX):])
                    if not os.path.lexists(target):  # the layer itself re-created NAME
                        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return total


def is_whiteout(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def layer_limit(blob_size: int, max_size: int = MAX_LAYER_SIZE,
                ratio: int = MAX_LAYER_RATIO) -> int:
    """How far a layer of `blob_size` compressed bytes may expand."""
    return min(max_size, max(ratio * blob_size, RATIO_FLOOR))


def _unpack_layer(blob: Path, dest_tmp: Path, diff_id: str | None,
                  max_bytes: int | None = None) -> tuple[str, int]:
    """Unpack one layer blob into dest_tmp (overlayfs format); verify its diff-id."""
    dest_tmp.mkdir(mode=STORE_DIR_MODE, parents=True)
    with _decompressed(blob) as stream:
        got = _untar_stream(stream, dest_tmp, max_bytes)
    if diff_id is not None and got != diff_id:
        raise _bad(
            f"layer {blob.name[:12]}: uncompressed content hashes to {got} but the image "
            f"config says {diff_id}",
            expected=diff_id,
            actual=got,
        )
    size = convert_whiteouts(dest_tmp)
    return got, size


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _rmtrees(paths: list[Path]) -> None:
    for p in paths:
        _rmtree(p)


# -------------------------------------------------------------------------- store


# image id (or name) → cnvms using it; may be async (it reads the daemon's records).
InUse = Callable[[], Mapping[str, list[str]] | Awaitable[Mapping[str, list[str]]]]


class ImageStore:
    """The node's image store; one instance per daemon (not shared between processes)."""

    def __init__(self, root: Path, in_use: InUse | None = None, *,
                 max_layer_size: int = MAX_LAYER_SIZE,
                 max_layer_ratio: int = MAX_LAYER_RATIO) -> None:
        self.root = Path(root)
        self.max_layer_size = max_layer_size
        self.max_layer_ratio = max_layer_ratio
        self.blobs = self.root / "blobs" / "sha256"
        self.layers_dir = self.root / "layers"
        self.records = self.root / "images"
        self.tmp = self.root / "tmp"
        self.in_use: InUse = in_use or (lambda: {})
        self._images: dict[str, Image] = {}
        self._lock = asyncio.Lock()  # commits and removals (the long work runs unlocked)
        # blobs (by digest) and layers (by diff-id) an import in flight relies on: two
        # namespaces, since an uncompressed layer's blob digest equals its diff-id
        self._pinned: dict[str, dict[str, int]] = {"blob": {}, "layer": {}}
        self._loaded = False

    @classmethod
    def from_config(cls, config: Any, in_use: InUse | None = None) -> ImageStore:
        return cls(Path(config.images_dir), in_use,
                   max_layer_size=int(getattr(config, "image_max_layer_size", MAX_LAYER_SIZE)),
                   max_layer_ratio=int(getattr(config, "image_max_layer_ratio",
                                               MAX_LAYER_RATIO)))

    # ---- loading

    def load(self) -> None:
        """Read records and drop staging left by a crash (fast; call at daemon start).

        The store's directories are made (or re-moded, for stores of older versions)
        0700: layers hold the images' setuid binaries and devices as they are."""
        for d in (self.root, self.blobs.parent, self.blobs, self.layers_dir, self.records,
                  self.tmp):
            d.mkdir(mode=STORE_DIR_MODE, parents=True, exist_ok=True)
            if stat.S_IMODE(os.lstat(d).st_mode) != STORE_DIR_MODE:
                os.chmod(d, STORE_DIR_MODE, follow_symlinks=False)
        for p in self.tmp.iterdir():
            _rmtree(p)
        self._images = {}
        for p in sorted(self.records.glob("*.json")):
            try:
                img = Image.from_record(json.loads(p.read_bytes()))
            except (OSError, ValueError, TypeError) as exc:
                raise ImageError(ErrorCode.INTERNAL, f"corrupt image record {p}: {exc}") from None
            img.layer_dirs = [self.layer_dir(x.diff_id) for x in img.layers]
            self._images[img.id] = img
        self._loaded = True

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    # ---- paths

    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).removeprefix("sha256:")

    def layer_dir(self, diff_id: str) -> Path:
        return self.layers_dir / check_digest(diff_id).removeprefix("sha256:")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def missing_blobs(self, digests: list[str]) -> list[str]:
        """Which of these blobs this node lacks (teleport ships only those)."""
        return [d for d in digests if not self.has_blob(d)]

    # ---- queries

    def list(self) -> list[Image]:
        self._ensure_loaded()
        return sorted(self._images.values(), key=lambda i: (i.names[:1] or ["~"], i.id))

    def resolve(self, ref: str) -> Image:
        """Find an image by name, name without ':latest', full or short id."""
        self._ensure_loaded()
        if not isinstance(ref, str) or not ref:
            raise _bad("an image name or id is required")
        for img in self._images.values():
            if ref in img.names or (":" not in ref.rpartition("/")[2]
                                    and f"{ref}:latest" in img.names):
                return img
        key = ref.removeprefix("sha256:")
        if re.fullmatch(r"[0-9a-f]{4,64}", key):  # fullmatch: no trailing newline
            hits = [i for i in self._images.values() if i.id.startswith(key)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise _bad(f"image id prefix {show(ref)} is ambiguous")
        raise ImageError(ErrorCode.NOT_FOUND, f"unknown image {show(ref)}", {"image": ref})

    def inspect(self, ref: str) -> dict[str, Any]:
        return self.resolve(ref).describe()

    def image_blobs(self, ref: str) -> builtins.list[str]:
        """Every blob an image needs: manifest, config, layers (what a peer must hold)."""
        img = self.resolve(ref)
        return [img.manifest_digest, img.config_digest, *(x.digest for x in img.layers)]

    # ---- import

    async def import_path(self, path: str | os.PathLike[str], name: str | None = None,
                          *, kind: str = "auto") -> Image:
        """Import an OCI layout (dir or tar), a docker-save tar or a rootfs tarball.

        ``PATH:REF`` selects a manifest by its ref name in a multi-image layout.
        ``kind`` forces the format: auto | oci | docker | rootfs.
        """
        self._ensure_loaded()
        if name is not None:
            check_image_name(name)
        if kind not in ("auto", "oci", "docker", "rootfs"):
            raise _bad(f"unknown image format {kind!r} (auto, oci, docker, rootfs)")
        p, ref = _split_ref(str(path))
        if not p.exists():
            raise _bad(f"{path}: no such file or directory")
        imp = _Import(self, p, ref, kind)
        try:
            img = await imp.run()
            img = await self._commit(img, name or imp.default_name)
        except BaseException:
            await imp.rollback()
            raise
        else:
            # Same image imported before in another form (e.g. docker-save after the
            # OCI layout): keep the first one's blobs, drop the duplicates just added.
            await imp.rollback()
            return img
        finally:
            imp.unpin()

    async def add_blob(self, src: str | os.PathLike[str], digest: str) -> None:
        """Take a blob received from a peer into the store, verified (teleport)."""
        self._ensure_loaded()
        check_digest(digest)
        if self.has_blob(digest):
            return

        def work() -> None:
            with open(src, "rb") as f:
                _, _, tmp = _copy_verified(f, self.tmp, digest, self.max_layer_size)
            os.replace(tmp, self.blob_path(digest))

        await asyncio.to_thread(work)

    async def register(self, manifest_digest: str, name: str | None = None) -> Image:
        """Build an image from blobs already in the store (after a peer sent them)."""
        self._ensure_loaded()
        if name is not None:
            check_image_name(name)
        imp = _Import(self, self.blobs, None, "store")
        imp.store_manifest = check_digest(manifest_digest)
        try:
            img = await imp.run()
            return await self._commit(img, name)
        except BaseException:
            await imp.rollback()
            raise
        finally:
            imp.unpin()

    async def _commit(self, img: Image, name: str | None) -> Image:
        async with self._lock:
            existing = self._images.get(img.id)
            if existing is not None:
                img = existing
            if name:
                for other in self._images.values():
                    if other is not img and name in other.names:
                        other.names.remove(name)  # a name moves to the newest import
                        self._save(other)
                if name not in img.names:
                    img.names.append(name)
            img.layer_dirs = [self.layer_dir(x.diff_id) for x in img.layers]
            self._images[img.id] = img
            self._save(img)
            return img

    def _save(self, img: Image) -> None:
        body = json.dumps(img.to_record(), indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(self.records / f"{img.id}.json", body, mode=STORE_FILE_MODE)

    # ---- removal

    async def remove(self, ref: str) -> Image:
        """Remove an image and the blobs/layers no other image uses; refused while in use."""
        self._ensure_loaded()
        async with self._lock:
            img = self.resolve(ref)
            users = await self._users(img)
            if users:
                raise ImageError(
                    ErrorCode.CONFLICT,
                    f"image {show(ref)} is in use by cnvm(s) {', '.join(sorted(users))}",
                    {"image": img.id, "cnvms": sorted(users)},
                )
            (self.records / f"{img.id}.json").unlink(missing_ok=True)
            del self._images[img.id]
            garbage = self._unreferenced(img)
        await asyncio.to_thread(_rmtrees, garbage)
        return img

    async def _users(self, img: Image) -> builtins.list[str]:
        got = self.in_use()
        if inspect.isawaitable(got):
            got = await got
        users: list[str] = []
        for key, cnvms in got.items():
            k = key.removeprefix("sha256:")
            if k == img.id or key in img.names:
                users.extend(cnvms)
        return users

    def _unreferenced(self, img: Image) -> builtins.list[Path]:
        keep_blobs: set[str] = set(self._pinned["blob"])
        keep_layers: set[str] = set(self._pinned["layer"])
        for other in self._images.values():
            keep_blobs.update([other.manifest_digest, other.config_digest])
            keep_blobs.update(x.digest for x in other.layers)
            keep_layers.update(x.diff_id for x in other.layers)
        out = [self.blob_path(d) for d in
               [img.manifest_digest, img.config_digest, *(x.digest for x in img.layers)]
               if d not in keep_blobs]
        out += [self.layer_dir(x.diff_id) for x in img.layers if x.diff_id not in keep_layers]
        return out

    def _pin(self, kind: str, digest: str) -> None:
        pins = self._pinned[kind]
        pins[digest] = pins.get(digest, 0) + 1

    def _unpin(self, kind: str, digest: str) -> None:
        pins = self._pinned[kind]
        n = pins.get(digest, 0) - 1
        if n <= 0:
            pins.pop(digest, None)
        else:
            pins[digest] = n

    def _known_layer_size(self, diff_id: str, path: Path) -> int:
        for img in self._images.values():
            for x in img.layers:
                if x.diff_id == diff_id:
                    return x.unpacked_size
        return _tree_size(path)

    def _referenced(self, kind: str, digest: str) -> bool:
        """Does an image use this blob (kind "blob": by digest) or layer ("layer": by
        diff-id)? Never mixed: an uncompressed blob shares its layer's digest."""
        for img in self._images.values():
            if kind == "layer":
                if any(digest == x.diff_id for x in img.layers):
                    return True
            elif digest in (img.manifest_digest, img.config_digest) or any(
                    digest == x.digest for x in img.layers):
                return True
        return False


def _split_ref(path: str) -> tuple[Path, str | None]:
    """`dir:tag` (skopeo's oci: syntax) when `dir:tag` itself does not exist; the
    longest existing prefix wins, so a `docker save` tar takes `file:repo:tag`."""
    p = Path(path)
    cut = len(path)
    while not p.exists() and (cut := path.rfind(":", 0, cut)) > 0:
        if Path(path[:cut]).exists():
            return Path(path[:cut]), path[cut + 1:]
    return p, None


# ------------------------------------------------------------------------ importer


class _Import:
    """One import: stages blobs and layers into the store, undoing them on failure."""

    def __init__(self, store: ImageStore, path: Path, ref: str | None, kind: str) -> None:
        self.store = store
        self.path = path
        self.ref = ref
        self.kind = kind
        self.store_manifest: str | None = None
        self.default_name: str | None = None
        self.added: list[tuple[str, Path]] = []  # ("blob"|"layer", path), undone on failure
        self.pins: list[tuple[str, str]] = []

    def pin(self, kind: str, digest: str) -> None:
        self.store._pin(kind, digest)
        self.pins.append((kind, digest))

    def unpin(self) -> None:
        for kind, d in self.pins:
            self.store._unpin(kind, d)
        self.pins.clear()

    async def rollback(self) -> None:
        """Remove what this import added and no image references (all of it on failure)."""
        added, self.added = self.added, []
        store = self.store
        mine = {k: self.pins.count(k) for k in self.pins}

        def doomed_ok(kind: str, p: Path) -> bool:
            d = "sha256:" + p.name
            others = store._pinned[kind].get(d, 0) - mine.get((kind, d), 0)
            return others <= 0 and not store._referenced(kind, d)

        doomed = [p for kind, p in added if doomed_ok(kind, p)]
        await asyncio.to_thread(_rmtrees, doomed)

    # ---- blob helpers (run in threads)

    def _ingest(self, src: _Source, rel: str, expect: str | None) -> tuple[str, int]:
        """Copy a blob from the source into the store (verified); return (digest, size)."""
        if expect is not None:
            self.pin("blob", expect)
            dest = self.store.blob_path(expect)
            if dest.is_file():
                return expect, dest.stat().st_size
        with src.open(rel) as f:
            digest, size, tmp = _copy_verified(f, self.store.tmp, expect,
                                               self.store.max_layer_size)
        if expect is None:
            self.pin("blob", digest)
        dest = self.store.blob_path(digest)
        if dest.is_file():
            tmp.unlink()
        else:
            os.replace(tmp, dest)
            self.added.append(("blob", dest))
        return digest, size

    def _ensure_layer(self, blob_digest: str, diff_id: str | None) -> tuple[str, int]:
        """Unpack a layer once (keyed by diff-id); return (diff_id, unpacked size)."""
        if diff_id is not None:
            self.pin("layer", diff_id)
            done = self.store.layer_dir(diff_id)
            if done.is_dir():
                return diff_id, self.store._known_layer_size(diff_id, done)
        tmp = self.store.tmp / f"layer-{uuid.uuid4().hex}"
        blob = self.store.blob_path(blob_digest)
        limit = layer_limit(blob.stat().st_size, self.store.max_layer_size,
                            self.store.max_layer_ratio)
        try:
            got, size = _unpack_layer(blob, tmp, diff_id, limit)
            if diff_id is None:
                self.pin("layer", got)
            dest = self.store.layer_dir(got)
            if dest.is_dir():
                _rmtree(tmp)
            else:
                os.replace(tmp, dest)
                self.added.append(("layer", dest))
            return got, size
        except BaseException:
            _rmtree(tmp)
            raise

    def _read_blob(self, digest: str, limit: int = MAX_JSON) -> bytes:
        p = self.store.blob_path(digest)
        if p.stat().st_size > limit:
            raise _bad(f"blob {digest} is too large for a manifest/config")
        return p.read_bytes()

    # ---- formats

    async def run(self) -> Image:
        if self.kind == "store":
            return await asyncio.to_thread(self._from_store)
        return await asyncio.to_thread(self._from_path)

    def _from_path(self) -> Image:
        p = self.path
        if p.is_dir():
            src: _Source = _DirSource(p)
            fmt = self.kind
            if fmt == "auto":
                fmt = "docker" if (not src.exists("index.json")
                                   and src.exists("manifest.json")) else "oci"
            if fmt == "rootfs":
                raise _bad("a rootfs must be given as a tarball, not a directory")
        else:
            src = _TarSource(p)
            fmt = self.kind
            if fmt == "auto":
                if "index.json" in src.members or "oci-layout" in src.members:
                    fmt = "oci"
                elif "manifest.json" in src.members:
                    fmt = "docker"
                else:
                    fmt = "rootfs"
        try:
            stem = p.name
            for suffix in (".tar", ".gz", ".tgz", ".xz", ".zst", ".oci", ".docker", ".rootfs"):
                stem = stem.removesuffix(suffix)
            if fmt == "oci":
                img = self._oci(src)
            elif fmt == "docker":
                img = self._docker(src)
            else:
                img = self._rootfs(p)
            if self.default_name is None:
                guess = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "image"
                self.default_name = guess[:128]
            img.source = f"{fmt}:{p}"
            return img
        finally:
            src.close()

    def _oci(self, src: _Source) -> Image:
        if not src.exists("index.json"):
            raise _bad(f"{self.path}: not an OCI image layout: index.json is missing")
        if src.exists("oci-layout"):
            layout = _json(src.read("oci-layout"), "oci-layout")
            if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
                raise _bad(f"unsupported oci-layout version: {show(layout)}")
        index = _json(src.read("index.json"), "index.json")
        desc = self._pick_manifest(src, index, top=True, level=0)
        mdigest, _ = self._ingest(src, _blob_rel(desc["digest"]), desc["digest"])
        manifest = _json(self._read_blob(mdigest), f"manifest {mdigest}")
        return self._from_manifest(src, mdigest, manifest)

    def _from_store(self) -> Image:
        assert self.store_manifest is not None
        if not self.store.has_blob(self.store_manifest):
            raise _bad(f"manifest {self.store_manifest} is not in the store")
        self.pin("blob", self.store_manifest)
        manifest = _json(self._read_blob(self.store_manifest), "manifest")
        return self._from_manifest(_DirSource(self.store.root), self.store_manifest, manifest)

    def _pick_manifest(self, src: _Source, index: Any, top: bool,
                       level: int) -> dict[str, Any]:
        """Choose one image manifest from an index (by ref, else the only one / our arch)."""
        if level > MAX_INDEX_NESTING:
            raise _bad(f"image indexes nest more than {MAX_INDEX_NESTING} levels deep")
        mans = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(mans, list) or not mans:
            raise _bad("index.json lists no manifests")
        cands = [m for m in mans if isinstance(m, dict)]
        if top:
            names = {}
            for m in cands:
                ann = _dict(m.get("annotations"))
                names[id(m)] = ann.get("org.opencontainers.image.ref.name")
                full = ann.get("io.containerd.image.name")
                if (isinstance(full, str) and self.default_name is None
                        and _IMAGE_NAME.fullmatch(full)):
                    self.default_name = full
            if self.ref is not None:
                cands = [m for m in cands if names[id(m)] == self.ref]
                if not cands:
                    raise ImageError(ErrorCode.NOT_FOUND,
                                     f"no manifest named {self.ref!r} in {self.path}")
        if len(cands) > 1:
            arch = host_arch()
            plat = [m for m in cands if _dict(m.get("platform")).get("architecture") == arch]
            if len(plat) >= 1:
                cands = plat[:1]
            else:
                refs = sorted(
                    str(_dict(m.get("annotations")).get("org.opencontainers.image.ref.name"))
                    for m in cands
                )
                raise _bad(f"{self.path} holds several images; pick one as PATH:REF "
                           f"(refs: {', '.join(refs)})")
        desc = cands[0]
        mt = desc.get("mediaType")
        check_digest(desc.get("digest"))
        if mt in INDEX_TYPES:  # nested index (multi-arch): descend
            self._ingest(src, _blob_rel(desc["digest"]), desc["digest"])
            nested = _json(self._read_blob(desc["digest"]), "nested index")
            return self._pick_manifest(src, nested, top=False, level=level + 1)
        if mt not in MANIFEST_TYPES:
            raise _bad(f"unsupported media type {show(mt)} for an image manifest")
        return desc

    def _from_manifest(self, src: _Source, mdigest: str, manifest: Any) -> Image:
        if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
            raise _bad(f"manifest {mdigest} is not a schema 2 image manifest")
        mt = manifest.get("mediaType", MT_OCI_MANIFEST)
        if mt not in MANIFEST_TYPES:
            raise _bad(f"unsupported media type {show(mt)} for an image manifest")
        cdesc = _dict(manifest.get("config"))
        if cdesc.get("mediaType") not in CONFIG_TYPES:
            raise _bad(f"unsupported media type {show(cdesc.get('mediaType'))} for an image config")
        cdigest, _ = self._ingest(src, _blob_rel(check_digest(cdesc.get("digest"))),
                                  cdesc["digest"])
        cfg = _json(self._read_blob(cdigest), f"config {cdigest}")
        diff_ids = _diff_ids(cfg)
        ldescs = manifest.get("layers")
        if not isinstance(ldescs, list) or not ldescs:
            raise _bad("image manifest lists no layers")
        if len(ldescs) != len(diff_ids):
            raise _bad(f"manifest has {len(ldescs)} layers but config has {len(diff_ids)} "
                       "diff_ids")
        for d in ldescs:  # check everything before copying any big blob
            if not isinstance(d, dict) or d.get("mediaType") not in LAYER_TYPES:
                raise _bad(f"unsupported media type {show(_dict(d).get('mediaType'))} "
                           "for a layer")
            check_digest(d.get("digest"))
        layers = []
        for d, diff_id in zip(ldescs, diff_ids, strict=True):
            digest, size = self._ingest(src, _blob_rel(d["digest"]), d["digest"])
            _, usize = self._ensure_layer(digest, diff_id)
            layers.append(Layer(digest, diff_id, d["mediaType"], size, usize))
        return _image(cdigest, mdigest, cfg, layers)

    def _docker(self, src: _Source) -> Image:
        """Legacy `docker save`: manifest.json → config + layer tars; synthesize a manifest."""
        if not src.exists("manifest.json"):
            raise _bad(f"{self.path}: not a docker-save archive: manifest.json is missing")
        man = _json(src.read("manifest.json"), "manifest.json")
        if not isinstance(man, list) or not man or not all(isinstance(e, dict) for e in man):
            raise _bad("manifest.json lists no images")
        entry = man[0]
        if self.ref is not None:
            hits = [e for e in man if isinstance(e.get("RepoTags"), list)
                    and self.ref in e["RepoTags"]]
            if not hits:
                raise ImageError(ErrorCode.NOT_FOUND, f"no image tagged {self.ref!r}")
            entry = hits[0]
        elif len(man) > 1:
            raise _bad("archive holds several images; pick one as PATH:TAG")
        tags = entry.get("RepoTags") if isinstance(entry.get("RepoTags"), list) else []
        if tags and isinstance(tags[0], str) and _IMAGE_NAME.fullmatch(tags[0]):
            self.default_name = tags[0]
        cfg_rel = _safe_rel(str(entry.get("Config", "")))
        m = re.search(r"([0-9a-f]{64})(\.json)?$", cfg_rel)
        expect = f"sha256:{m.group(1)}" if m else None
        cdigest, csize = self._ingest(src, cfg_rel, expect)
        cfg = _json(self._read_blob(cdigest), "image config")
        diff_ids = _diff_ids(cfg)
        rels = entry.get("Layers") if isinstance(entry.get("Layers"), list) else []
        if len(rels) != len(diff_ids):
            raise _bad(f"manifest.json has {len(rels)} layers but config has {len(diff_ids)} "
                       "diff_ids")
        layers = []
        for rel, diff_id in zip(rels, diff_ids, strict=True):
            rel = _safe_rel(str(rel))
            m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", rel)
            # Old docker: layer.tar is uncompressed, so its digest *is* its diff-id.
            expect = f"sha256:{m.group(1)}" if m else None
            digest, size = self._ingest(src, rel, expect)
            with open(self.store.blob_path(digest), "rb") as f:
                comp = sniff_compression(f.read(8))
            if expect is None and comp == "none" and digest != diff_id:
                raise _bad(f"layer {rel}: content hashes to {digest} but the image config "
                           f"says {diff_id}", expected=diff_id, actual=digest)
            mt = COMPRESSION_MEDIA_TYPES[comp]
            _, usize = self._ensure_layer(digest, diff_id)
            layers.append(Layer(digest, diff_id, mt, size, usize))
        cmt = MT_OCI_CONFIG
        return self._synth_manifest(cdigest, csize, cmt, cfg, layers)

    def _rootfs(self, path: Path) -> Image:
        """A plain rootfs tarball becomes a one-layer image with a minimal config."""
        digest, size = self._ingest(_FileSource(path), path.name, None)
        with open(self.store.blob_path(digest), "rb") as f:
            comp = sniff_compression(f.read(8))
        diff_id, usize = self._ensure_layer(digest, None)
        mt = COMPRESSION_MEDIA_TYPES[comp]
        cfg = {
            "architecture": host_arch(),
            "os": "linux",
            "config": {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": f"cnvm images import {path.name}"}],
        }
        body = _canonical(cfg)
        cdigest = self._put_bytes(body)
        layers = [Layer(digest, diff_id, mt, size, usize)]
        return self._synth_manifest(cdigest, len(body), MT_OCI_CONFIG, cfg, layers)

    def _put_bytes(self, body: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.pin("blob", digest)
        dest = self.store.blob_path(digest)
        if not dest.is_file():
            atomic_write(dest, body, mode=STORE_FILE_MODE)
            self.added.append(("blob", dest))
        return digest

    def _synth_manifest(self, cdigest: str, csize: int, cmt: str, cfg: dict[str, Any],
                        layers: list[Layer]) -> Image:
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": cmt, "digest": cdigest, "size": csize},
            "layers": [{"mediaType": x.media_type, "digest": x.digest, "size": x.size}
                       for x in layers],
        }
        mdigest = self._put_bytes(_canonical(manifest))
        return _image(cdigest, mdigest, cfg, layers)


def _blob_rel(digest: str) -> str:
    return "blobs/sha256/" + check_digest(digest).removeprefix("sha256:")


def _diff_ids(cfg: Any) -> list[str]:
    rootfs = cfg.get("rootfs") if isinstance(cfg, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not ids:
        raise _bad("image config has no rootfs.diff_ids")
    return [check_digest(d) for d in ids]


def _image(cdigest: str, mdigest: str, cfg: dict[str, Any], layers: list[Layer]) -> Image:
    arch = str(cfg.get("architecture", ""))
    if arch and arch != host_arch():
        raise _bad(f"image is for {arch}, this node is {host_arch()}")
    return Image(
        id=cdigest.removeprefix("sha256:"),
        names=[],
        manifest_digest=mdigest,
        config_digest=cdigest,
        layers=layers,
        config=dict(_dict(cfg.get("config"))),
        architecture=arch,
        os=str(cfg.get("os", "linux")),
        created=str(cfg.get("created", "")),
        imported_at=time.time(),
    )


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, fn)).st_size
    return total
