"""Hostile input is INVALID_ARGUMENT (never `internal`), bounded, and stays inside its
directory: names, argv, the image store (JSON depth, symlinked blobs, gzip bombs,
orphans, modes), exposed ports and the daemon's directories (issue 14)."""

from __future__ import annotations

import gzip
import json
import os
import socket
import stat
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnvmd import bundle
from cnvmd.api import Args
from cnvmd.images import ImageError, ImageStore, check_digest, check_image_name
from cnvmd.network.expose import listening_ports, node_ports, refuse_node_port
from cnvmd.network.names import NetworkError, PortSpec
from cnvmd.state import OWNED_MARK, StateError, StateStore, secure_children, secure_dir
from proto.messages import ErrorCode, ProtoError
from tests import imagebuild

pytestmark = pytest.mark.unit
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="layers need mknod/chown; modes need root")
needs_busybox = pytest.mark.skipif(not imagebuild.BUSYBOX.is_file(),
                                   reason="busybox-static not installed")


def deep(n: int, leaf: Any = 0) -> Any:
    for _ in range(n):
        leaf = [leaf]
    return leaf


def invalid(fn: Any, *a: Any, **kw: Any) -> ProtoError:
    with pytest.raises(ProtoError) as e:
        fn(*a, **kw)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT, e.value
    return e.value


# ------------------------------------------------------------------------ names, argv


@pytest.mark.parametrize("bad", ["web\n", "web\r", "\nweb", "we\0b", "Web", "a" * 64])
def test_names_full_match(bad: str) -> None:
    invalid(Args({"name": bad}).name, "name")
    invalid(bundle.check_name, bad)
    invalid(Args({"name": bad}).str, "name", pattern=r"[a-z0-9-]{1,63}")


@pytest.mark.parametrize("bad", ["web\n", "\nweb", "we\0b", "../web", ""])
def test_state_keys_full_match(tmp_path: Path, bad: str) -> None:
    with pytest.raises(StateError):
        StateStore(tmp_path).save("cnvms", bad, {})
    with pytest.raises(StateError):
        StateStore(tmp_path).load(bad, "web")


def test_other_patterns_full_match() -> None:
    invalid(bundle.check_hostname, "web.lab\n")
    invalid(check_image_name, "busybox\n")
    invalid(check_image_name, "busybox:1.0\n")
    invalid(check_digest, "sha256:" + "a" * 64 + "\n")
    invalid(bundle.parse_env, ["A\n=1"])
    invalid(bundle.parse_env, ["A=x\0y"])
    assert bundle.check_hostname("web.lab") == "web.lab"
    assert check_digest("sha256:" + "a" * 64)


def test_nul_in_any_string_arg() -> None:
    e = invalid(Args({"path": "/tmp/x\0y"}).str, "path")
    assert "NUL" in e.message
    invalid(Args({"l": ["ok", "n\0"]}).list, "l")


def test_argv_limits() -> None:
    ok = ["/bin/echo", "x" * 1000, "é" * 100]
    assert Args({"cmd": ok}).argv("cmd") == ok
    invalid(Args({"cmd": ["/bin/echo", "a\0b"]}).argv, "cmd")
    invalid(Args({"cmd": ["x" * 100_000]}).argv, "cmd")  # a 100k-character cmd
    invalid(Args({"cmd": ["é" * 40_000]}).argv, "cmd")  # 80 KB of UTF-8
    invalid(Args({"cmd": ["x" * 60_000] * 20}).argv, "cmd")  # 1.2 MB together
    invalid(Args({"cmd": ["x"] * 5000}).argv, "cmd")
    invalid(Args({"cmd": "/bin/sh"}).argv, "cmd")
    invalid(Args({"cmd": ["\ud800"]}).argv, "cmd")  # a lone surrogate
    invalid(Args({"env": [1]}).argv, "env")


def test_error_messages_of_deep_or_huge_values_stay_short() -> None:
    """A value deeper than the interpreter's stack used to give `internal: RecursionError`
    (its repr in the message); the frame limit stops it earlier, messages are bounded."""
    for v in (deep(5000), {"a": deep(5000)}, "x" * 1_000_000):
        e = invalid(Args({"name": v}).name, "name")
        assert len(e.message) < 300
        e = invalid(Args({"spec": v}).str, "spec", max_len=10**7, pattern="[0-9]+")
        assert len(e.message) < 300
    e = invalid(Args({("k" * 10_000): 1}).reject_unknown)
    assert len(e.message) < 300


# ------------------------------------------------------------------------ expose


def test_expose_refuses_the_nodes_own_ports() -> None:
    cfg = SimpleNamespace(peer_port=6783, vxlan_port=6783)
    for port, proto in ((22, "tcp"), (6783, "tcp"), (6783, "udp")):
        with pytest.raises(NetworkError) as e:
            refuse_node_port(PortSpec(port, 80, proto), cfg)
        assert e.value.code == ErrorCode.INVALID_ARGUMENT
    with socket.socket() as s:  # any service listening in the node's netns
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert (port, "tcp") in listening_ports()
        with pytest.raises(NetworkError):
            refuse_node_port(PortSpec(port, 80, "tcp"), SimpleNamespace(peer_port=0))
    free = next(p for p in range(18080, 18180) if (p, "tcp") not in node_ports(cfg))
    refuse_node_port(PortSpec(free, 80, "tcp"), cfg)


# ------------------------------------------------------------------------ image store


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "store")
    s.load()
    return s


def _layout_with_index(tmp_path: Path, index: bytes) -> Path:
    lay = tmp_path / "oci"
    (lay / "blobs" / "sha256").mkdir(parents=True)
    (lay / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (lay / "index.json").write_bytes(index)
    return lay


@pytest.mark.parametrize("depth", [40, 5000, 200_000])
async def test_deeply_nested_index_json(store: ImageStore, tmp_path: Path, depth: int) -> None:
    lay = _layout_with_index(tmp_path, b"[" * depth + b"]" * depth)
    with pytest.raises(ImageError) as e:
        await store.import_path(lay)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "deeper" in e.value.message


async def test_malformed_index_entries_are_invalid(store: ImageStore, tmp_path: Path) -> None:
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "x", "digest": "sha256:" + "1" * 64, "annotations": ["not", "a", "map"],
         "platform": "amd64"},
        {"mediaType": "y", "digest": "sha256:" + "2" * 64, "annotations": 5}]}
    lay = _layout_with_index(tmp_path, json.dumps(index).encode())
    with pytest.raises(ImageError) as e:
        await store.import_path(lay)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT


@needs_busybox
async def test_symlinked_blob_is_refused(store: ImageStore, tmp_path: Path) -> None:
    """A layout blob that is a symlink would make root copy any file into the store."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    secret.chmod(0o600)
    lay = imagebuild.build_busybox_layout(tmp_path / "bb")
    blob = lay.path / "blobs" / "sha256" / lay.config_digest[7:]
    body = blob.read_bytes()
    secret.write_bytes(body)  # even with the right content: a symlink is refused
    blob.unlink()
    blob.symlink_to(secret)
    with pytest.raises(ImageError) as e:
        await store.import_path(lay.path)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "symbolic link" in e.value.message
    # a symlinked blobs/ directory too
    lay2 = imagebuild.build_busybox_layout(tmp_path / "bb2")
    (lay2.path / "blobs").rename(tmp_path / "elsewhere")
    (lay2.path / "blobs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ImageError, match="symbolic link"):
        await store.import_path(lay2.path)
    # a FIFO is not a blob (and must not block the import)
    lay3 = imagebuild.build_busybox_layout(tmp_path / "bb3")
    fifo = lay3.path / "blobs" / "sha256" / lay3.config_digest[7:]
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="regular file"):
        await store.import_path(lay3.path)
    assert store.list() == []


def _gzip_bomb(dest: Path, size: int) -> Path:
    """A rootfs tarball: one file of `size` zero bytes, gzip-compressed about 1000:1
    (gzip members concatenated: one MiB of zeros compressed once, repeated)."""
    ti = tarfile.TarInfo("zeros")
    ti.size = size
    mib, rest = divmod(size, 1 << 20)
    zeros = gzip.compress(bytes(1 << 20), 9, mtime=0)
    with open(dest, "wb") as f:
        f.write(gzip.compress(ti.tobuf(format=tarfile.GNU_FORMAT), mtime=0))
        for _ in range(mib):
            f.write(zeros)
        f.write(gzip.compress(bytes(rest + (-size) % 512 + 1024), mtime=0))
    return dest


@needs_root
async def test_gzip_bomb_stops_at_the_ratio_limit(store: ImageStore, tmp_path: Path) -> None:
    bomb = _gzip_bomb(tmp_path / "bomb.tar.gz", 1100 << 20)  # 1.1 GiB of zeros
    assert bomb.stat().st_size < 2_500_000
    with pytest.raises(ImageError) as e:
        await store.import_path(bomb, "bomb")
    assert e.value.code == ErrorCode.INVALID_ARGUMENT and "expands to more than" in e.value.message
    assert e.value.details["limit"] == 100 * bomb.stat().st_size  # the default ratio
    assert list(store.layers_dir.iterdir()) == [] and list(store.tmp.iterdir()) == []
    assert list(store.blobs.iterdir()) == []
    # the size limit holds on its own too (and small layers always fit the floor)
    small = ImageStore(tmp_path / "small", max_layer_size=1 << 20)
    small.load()
    with pytest.raises(ImageError, match="expands to more than 1048576"):
        await small.import_path(_gzip_bomb(tmp_path / "b2.tar.gz", 2 << 20), "b2")
    ok = await store.import_path(_gzip_bomb(tmp_path / "ok.tar.gz", 4 << 20), "ok")
    assert ok.layers[0].unpacked_size == 4 << 20


@needs_root
@needs_busybox
async def test_images_rm_leaves_no_orphan_blob(store: ImageStore, tmp_path: Path) -> None:
    """OCI layout (gzip layer) then the same image as docker-save (uncompressed: blob
    digest == diff-id): the second import's blob must not be kept as 'referenced'."""
    lay = imagebuild.build_busybox_layout(tmp_path / "bb")
    img = await store.import_path(lay.path, "busybox")
    before = sorted(p.name for p in store.blobs.iterdir())
    again = await store.import_path(imagebuild.build_docker_save(tmp_path / "d.tar").path)
    assert again.id == img.id
    assert sorted(p.name for p in store.blobs.iterdir()) == before
    await store.remove("busybox")
    assert list(store.blobs.iterdir()) == []
    assert list(store.layers_dir.iterdir()) == []


@needs_root
@needs_busybox
async def test_store_is_roots_alone(tmp_path: Path) -> None:
    root = tmp_path / "store"
    for d in ("blobs/sha256", "layers", "images", "tmp"):  # a store of an older version
        (root / d).mkdir(parents=True)
    for d in (root, root / "blobs", root / "blobs/sha256", root / "layers", root / "images"):
        d.chmod(0o755)
    store = ImageStore(root)
    store.load()
    await store.import_path(imagebuild.build_busybox_layout(tmp_path / "bb").path, "bb")
    for d in (root, root / "blobs", store.blobs, store.layers_dir, store.records, store.tmp):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in [*store.blobs.iterdir(), *store.records.iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# ------------------------------------------------------------------------ directories


@needs_root
def test_secure_dir_only_tightens_its_own(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    made = tmp_path / "made" / "state"
    assert secure_dir(made, 0o700) == "created"
    assert stat.S_IMODE(made.stat().st_mode) == 0o700 and (made / OWNED_MARK).is_file()
    made.chmod(0o755)
    (made / "images").mkdir(mode=0o755)
    assert secure_dir(made, 0o700) == "secured"  # marked: ours
    secure_children(made)
    assert stat.S_IMODE((made / "images").stat().st_mode) == 0o700
    # a shared dir given as a state dir (/tmp-like) is never re-moded
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    assert secure_dir(shared, 0o700) == "left"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and not (shared / OWNED_MARK).exists()
    # an older cnvmd's dir (recognised by `adopt`) is tightened and marked
    old = tmp_path / "old"
    old.mkdir()
    old.chmod(0o711)
    assert secure_dir(old, 0o700, adopt=lambda p, st: stat.S_IMODE(st.st_mode) == 0o711) \
        == "secured"
    assert stat.S_IMODE(old.stat().st_mode) == 0o700 and (old / OWNED_MARK).is_file()
    # under a marked dir: ours; group given: 0750 root:gid
    sub = made / "run"
    sub.mkdir(mode=0o755)
    assert secure_dir(sub, 0o750, 65534, mark=False) == "secured"
    st = sub.stat()
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == 65534 and st.st_uid == 0


def test_state_records_are_private(tmp_path: Path) -> None:
    st = StateStore(tmp_path / "state")
    st.save("cnvms", "web", {"name": "web"})
    assert stat.S_IMODE((tmp_path / "state" / "cnvms").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "cnvms" / "web.json").stat().st_mode) == 0o600
