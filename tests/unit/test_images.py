"""Image store and bundle config: formats, digests, whiteouts, bad input, config.json."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from cnvmd import bundle
from cnvmd.images import (
    OPAQUE_XATTR,
    ImageError,
    ImageStore,
    check_image_name,
    convert_whiteouts,
    is_whiteout,
)
from proto.messages import ErrorCode
from tests import imagebuild

pytestmark = pytest.mark.unit
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="whiteouts need mknod and trusted.* xattrs")
needs_busybox = pytest.mark.skipif(not imagebuild.BUSYBOX.is_file(),
                                   reason="busybox-static not installed")


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "store")
    s.load()
    return s


@pytest.fixture
def layout(tmp_path: Path) -> imagebuild.BuiltImage:
    return imagebuild.build_busybox_layout(tmp_path / "bb-oci")


def snapshot(root: Path) -> set[str]:
    """Every path under the store (to prove a failed import changed nothing)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def rewrite_layout(layout: Path, edit_config=None, edit_manifest=None) -> None:
    """Re-digest a layout after editing its config and/or manifest (consistent, but wrong)."""
    index = json.loads((layout / "index.json").read_text())
    mdesc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / mdesc["digest"][7:]).read_text())
    if edit_config:
        cfg = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
        edit_config(cfg)
        body = json.dumps(cfg).encode()
        d = hashlib.sha256(body).hexdigest()
        (blobs / d).write_bytes(body)
        manifest["config"].update(digest=f"sha256:{d}", size=len(body))
    if edit_manifest:
        edit_manifest(manifest)
    body = json.dumps(manifest).encode()
    d = hashlib.sha256(body).hexdigest()
    (blobs / d).write_bytes(body)
    mdesc.update(digest=f"sha256:{d}", size=len(body))
    (layout / "index.json").write_text(json.dumps(index))


def layer_tar(entries: list[tuple[str, bytes, str | None]]) -> bytes:
    """A tar of (name, data, symlink-target) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, link in entries:
            ti = tarfile.TarInfo(name)
            if link is not None:
                ti.type = tarfile.SYMTYPE
                ti.linkname = link
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def single_layer_layout(dest: Path, raw: bytes) -> Path:
    """A valid one-layer OCI layout around an arbitrary layer tar."""
    img = imagebuild.build_busybox_layout(dest)
    blobs = dest / "blobs" / "sha256"
    d = hashlib.sha256(raw).hexdigest()
    (blobs / d).write_bytes(raw)

    def cfg(c):
        c["rootfs"]["diff_ids"] = [f"sha256:{d}"]

    def man(m):
        m["layers"] = [{"mediaType": imagebuild.MT_LAYER, "digest": f"sha256:{d}",
                        "size": len(raw)}]

    rewrite_layout(dest, cfg, man)
    del img
    return dest


# ------------------------------------------------------------------ import formats


@needs_root
@needs_busybox
async def test_import_oci_layout_unpacks_layers_with_whiteouts(store, layout):
    img = await store.import_path(layout.path)
    assert img.id == layout.id
    assert img.names == ["bb-oci"]
    assert [x.diff_id for x in img.layers] == layout.diff_ids
    assert [x.digest for x in img.layers] == layout.layer_digests
    assert img.config["Cmd"] == ["/bin/counter"]
    low, top = img.layer_dirs
    assert (low / "bin" / "busybox").is_file()
    assert (low / "etc" / "deleteme").is_file()
    # .wh.deleteme became a 0/0 char device, the marker file is gone
    assert is_whiteout(top / "etc" / "deleteme")
    assert not (top / "etc" / ".wh.deleteme").exists()
    # .wh..wh..opq became the opaque xattr on its directory
    assert os.getxattr(top / "opt" / "data", OPAQUE_XATTR) == b"y"
    assert sorted(os.listdir(top / "opt" / "data")) == ["new.txt"]
    assert store.has_blob(layout.manifest_digest)
    assert store.missing_blobs([layout.config_digest, "sha256:" + "0" * 64]) == [
        "sha256:" + "0" * 64]
    assert img.size > 1_000_000


@needs_root
@needs_busybox
async def test_reimport_is_idempotent_and_names_move(store, layout, tmp_path):
    a = await store.import_path(layout.path, "busybox")
    before = snapshot(store.root / "layers")
    b = await store.import_path(layout.path, "busybox:v2")
    assert a.id == b.id and b.names == ["busybox", "busybox:v2"]
    assert snapshot(store.root / "layers") == before
    # a second image taking the name: the name moves, the old image stays by id
    other = imagebuild.build_busybox_layout(tmp_path / "other",
                                            gzip_layers=(False, False))
    c = await store.import_path(other.path, "busybox")
    assert c.id == a.id  # same config → same image, whatever the compression
    assert store.resolve("busybox").id == a.id
    assert store.resolve(a.id[:8]).id == a.id
    assert store.resolve("sha256:" + a.id).id == a.id
    # the same image again as a docker-save tarball: a name more, no orphan blobs
    blobs = snapshot(store.blobs)
    d = await store.import_path(imagebuild.build_docker_save(tmp_path / "d.tar").path)
    assert d.id == a.id and "cnvm-busybox:latest" in d.names
    assert snapshot(store.blobs) == blobs


@needs_root
@needs_busybox
async def test_reload_from_disk(store, layout):
    img = await store.import_path(layout.path, "busybox")
    again = ImageStore(store.root)
    again.load()
    got = again.resolve("busybox")
    assert got.id == img.id and got.layer_dirs == img.layer_dirs


@needs_root
@needs_busybox
async def test_import_oci_archive_and_ref_selection(store, tmp_path):
    arch = imagebuild.build_busybox_archive(tmp_path / "bb.oci.tar", tag="1.0")
    img = await store.import_path(f"{arch.path}:1.0", "bb")
    assert img.id == arch.id and img.source.startswith("oci:")
    with pytest.raises(ImageError) as e:
        await store.import_path(f"{arch.path}:nope")
    assert e.value.code == ErrorCode.NOT_FOUND


@needs_root
@needs_busybox
async def test_import_docker_save(store, tmp_path):
    ds = imagebuild.build_docker_save(tmp_path / "bb.docker.tar")
    img = await store.import_path(ds.path)
    assert img.names == ["cnvm-busybox:latest"]
    assert [x.diff_id for x in img.layers] == ds.diff_ids
    assert store.resolve("cnvm-busybox").id == img.id
    assert store.has_blob(img.manifest_digest)  # synthesized OCI manifest stored
    assert is_whiteout(img.layer_dirs[1] / "etc" / "deleteme")


@needs_root
@needs_busybox
@pytest.mark.parametrize("compress", [True, False])
async def test_import_rootfs_tarball(store, tmp_path, compress):
    tar = imagebuild.build_rootfs_tar(tmp_path / "rootfs.tar.gz", compress=compress)
    img = await store.import_path(tar, "rootfs")
    assert len(img.layers) == 1
    assert img.config["Cmd"] == ["/bin/sh"]
    assert (img.layer_dirs[0] / "bin" / "busybox").is_file()
    raw = imagebuild.busybox_layers()[0]
    assert img.layers[0].diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


# ------------------------------------------------------------------ bad input


@needs_busybox
async def test_missing_index_json(store, layout):
    (layout.path / "index.json").unlink()
    before = snapshot(store.root)
    with pytest.raises(ImageError, match=r"index\.json is missing") as e:
        await store.import_path(layout.path)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    assert snapshot(store.root) == before


async def test_missing_path(store, tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        await store.import_path(tmp_path / "nothing")


@needs_busybox
async def test_corrupt_layer_digest_changes_nothing(store, layout):
    blob = layout.path / "blobs" / "sha256" / layout.layer_digests[1][7:]
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF
    blob.write_bytes(bytes(data))
    before = snapshot(store.root)
    with pytest.raises(ImageError, match="digest mismatch") as e:
        await store.import_path(layout.path, "bad")
    assert e.value.details["expected"] == layout.layer_digests[1]
    assert snapshot(store.root) == before  # layer 1 was unpacked, then rolled back
    assert store.list() == []


@needs_busybox
async def test_wrong_diff_id_is_refused(store, layout):
    def cfg(c):
        c["rootfs"]["diff_ids"][0] = "sha256:" + "1" * 64

    rewrite_layout(layout.path, cfg)
    before = snapshot(store.root)
    with pytest.raises(ImageError, match="uncompressed content hashes to"):
        await store.import_path(layout.path)
    assert snapshot(store.root) == before


@needs_busybox
async def test_unsupported_layer_media_type(store, layout):
    def man(m):
        m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+encrypted"

    rewrite_layout(layout.path, edit_manifest=man)
    with pytest.raises(ImageError, match="unsupported media type"):
        await store.import_path(layout.path)


@needs_busybox
async def test_unsupported_digest_algorithm(store, layout):
    def man(m):
        m["layers"][0]["digest"] = "sha512:" + "a" * 128

    rewrite_layout(layout.path, edit_manifest=man)
    with pytest.raises(ImageError, match="unsupported digest algorithm"):
        await store.import_path(layout.path)


@needs_busybox
async def test_bad_json_and_bad_name(store, layout):
    with pytest.raises(ImageError, match="bad image name"):
        await store.import_path(layout.path, "Bad Name")
    (layout.path / "index.json").write_text("{not json")
    with pytest.raises(ImageError, match="not valid JSON"):
        await store.import_path(layout.path)


@needs_root
@needs_busybox
async def test_layer_cannot_escape_its_directory(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    raw = layer_tar([
        ("evil", b"", str(outside)),          # absolute symlink out of the layer
        ("evil/pwned", b"x", None),           # ... then a file through it
        ("../escaped", b"x", None),           # dot-dot member
    ])
    lay = single_layer_layout(tmp_path / "evil-oci", raw)
    before = snapshot(store.root)
    with pytest.raises(ImageError, match="extraction failed"):
        await store.import_path(lay)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escaped").exists()
    assert not (store.root / "escaped").exists()
    assert snapshot(store.root) == before


async def test_unknown_image(store):
    with pytest.raises(ImageError) as e:
        store.resolve("nope")
    assert e.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(ImageError):
        await store.remove("nope")


def test_image_names():
    for ok in ["busybox", "busybox:latest", "docker.io/library/debian:12-slim", "a_b.c-d"]:
        assert check_image_name(ok) == ok
    for bad in ["", "Busybox", "-x", "a b", "x:", "x" * 200]:
        with pytest.raises(ImageError):
            check_image_name(bad)


# ------------------------------------------------------------------ removal


@needs_root
@needs_busybox
async def test_remove_refused_while_in_use_and_gc(tmp_path, layout):
    users: dict[str, list[str]] = {}
    store = ImageStore(tmp_path / "store", in_use=lambda: users)
    store.load()
    img = await store.import_path(layout.path, "busybox")
    rootfs = imagebuild.build_rootfs_tar(tmp_path / "r.tar", compress=False)
    other = await store.import_path(rootfs, "base")  # shares layer 1's diff-id
    assert other.layers[0].diff_id == img.layers[0].diff_id
    users[img.id] = ["web1"]
    with pytest.raises(ImageError, match="in use by cnvm") as e:
        await store.remove("busybox")
    assert e.value.code == ErrorCode.CONFLICT
    users.clear()
    await store.remove("busybox")
    assert [i.names for i in store.list()] == [["base"]]
    assert not store.has_blob(img.manifest_digest)
    assert img.layer_dirs[0].is_dir()  # still used by "base"
    assert not img.layer_dirs[1].exists()
    await store.remove("base")
    assert list((store.root / "layers").iterdir()) == []
    assert list(store.blobs.iterdir()) == []


# ------------------------------------------------------------------ whiteout pass


@needs_root
def test_convert_whiteouts(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".wh..wh..opq").write_bytes(b"")
    (tmp_path / "d" / "sub" / ".wh.gone").write_bytes(b"")
    (tmp_path / "d" / "sub" / ".wh.back").write_bytes(b"")
    (tmp_path / "d" / "sub" / "back").write_bytes(b"re-created in the same layer")
    (tmp_path / ".wh..wh.plnk").mkdir()
    (tmp_path / "f").write_bytes(b"12345")
    size = convert_whiteouts(tmp_path)
    assert size == 5 + len(b"re-created in the same layer")
    assert os.getxattr(tmp_path / "d", OPAQUE_XATTR) == b"y"
    st = os.lstat(tmp_path / "d" / "sub" / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert (tmp_path / "d" / "sub" / "back").read_bytes().startswith(b"re-created")
    assert sorted(os.listdir(tmp_path)) == ["d", "f"]


# ------------------------------------------------------------------ bundle: parsing


@pytest.mark.parametrize("text,n", [
    ("256M", 256 << 20), ("1G", 1 << 30), ("1g", 1 << 30), ("1.5G", 3 << 29),
    ("512MiB", 512 << 20), ("64mb", 64 << 20), ("8388608", 8 << 20), (8 << 20, 8 << 20),
    (" 2 G ", 2 << 30),
])
def test_parse_memory(text, n):
    assert bundle.parse_memory(text) == n


@pytest.mark.parametrize("text", ["", "abc", "12Q", "-1G", "1M", "1 0M", "G", "1iB", True,
                                  "9999999T"])
def test_parse_memory_errors(text):
    with pytest.raises(bundle.BundleError) as e:
        bundle.parse_memory(text)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    assert "memory size" in e.value.message


def test_parse_cpus():
    assert bundle.parse_cpus("2") == 2.0
    assert bundle.parse_cpus(0.5) == 0.5
    assert bundle.parse_cpus("500m") == 0.5
    for bad in ["0", "-1", "x", "nan", "5000"]:
        with pytest.raises(bundle.BundleError):
            bundle.parse_cpus(bad)


@pytest.mark.parametrize("name", ["a", "web1", "sneaker01", "a-b", "x" * 63])
def test_names_ok(name):
    assert bundle.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a.b", "x" * 64, "../x", None, 5])
def test_names_bad(name):
    with pytest.raises(bundle.BundleError, match="bad cnvm name"):
        bundle.check_name(name)


def test_parse_env():
    assert bundle.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    assert bundle.parse_env({"K": 3}) == {"K": "3"}
    for bad in (["NOEQ"], ["1A=x"], ["A B=1"]):
        with pytest.raises(bundle.BundleError):
            bundle.parse_env(bad)


# ------------------------------------------------------------------ bundle: config.json


def fake_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "usr" / "sbin").mkdir(parents=True)
    (root / "etc").mkdir()
    sh = root / "bin" / "busybox"
    sh.write_bytes(b"#!")
    sh.chmod(0o755)
    (root / "bin" / "sh").symlink_to("/bin/busybox")  # absolute: must resolve in-root
    (root / "sbin").symlink_to("usr/sbin")
    sshd = root / "usr" / "sbin" / "sshd"
    sshd.write_bytes(b"#!")
    sshd.chmod(0o755)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nuser:x:1000:1001::/home/user:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nusers:x:100:user\n")
    return root


IMAGE_CFG = {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "A=image", "B=image"],
             "Entrypoint": ["/usr/sbin/sshd"], "Cmd": ["-D", "-e"], "WorkingDir": "/srv"}


def test_runc_config(tmp_path):
    root = fake_rootfs(tmp_path / "rootfs")
    cfg = bundle.runc_config(name="web1", image_config=IMAGE_CFG, node="node1",
                             hostname="web1.lab", env={"B": "deploy", "C": "c"},
                             memory=bundle.parse_memory("256M"), cpus=1.5,
                             netns_path="cnvm-web1", rootfs=root)
    p = cfg["process"]
    assert p["args"] == ["/usr/sbin/sshd", "-D", "-e"]
    assert p["terminal"] is False
    assert p["cwd"] == "/srv"
    env = dict(e.split("=", 1) for e in p["env"])
    assert env["A"] == "image" and env["B"] == "deploy" and env["C"] == "c"
    assert env["HOSTNAME"] == "web1.lab" and env["PATH"].startswith("/usr/sbin")
    assert p["user"] == {"uid": 0, "gid": 0}
    assert {"CAP_SETUID", "CAP_SYS_CHROOT", "CAP_AUDIT_WRITE"} <= set(
        p["capabilities"]["bounding"])
    assert "CAP_SYS_ADMIN" not in p["capabilities"]["bounding"]
    assert cfg["hostname"] == "web1.lab"
    assert cfg["root"] == {"path": "rootfs", "readonly": False}
    lin = cfg["linux"]
    assert {"type": "network", "path": "/run/netns/cnvm-web1"} in lin["namespaces"]
    assert lin["cgroupsPath"] == "/cnvm/node1/web1"
    assert lin["resources"]["memory"] == {"limit": 256 << 20}
    assert lin["resources"]["cpu"] == {"quota": 150_000, "period": 100_000}
    assert {m["destination"] for m in cfg["mounts"]} >= {"/proc", "/dev", "/dev/pts", "/sys"}
    json.dumps(cfg)


def test_runc_config_command_override_and_lookup(tmp_path):
    root = fake_rootfs(tmp_path / "rootfs")
    base = {"Env": ["PATH=/usr/sbin:/bin"], "Cmd": ["/bin/sh"]}
    cfg = bundle.runc_config(name="a", image_config=base, cmd=["sshd", "-D"], rootfs=root)
    assert cfg["process"]["args"] == ["sshd", "-D"]  # found via PATH (sbin → usr/sbin)
    assert cfg["process"]["cwd"] == "/"
    assert {"type": "network"} in cfg["linux"]["namespaces"]  # fresh netns without a path
    with pytest.raises(bundle.BundleError, match="not found in the image"):
        bundle.runc_config(name="a", image_config=base, cmd=["nosuch"], rootfs=root)
    with pytest.raises(bundle.BundleError, match="no command"):
        bundle.runc_config(name="a", image_config={}, rootfs=root)
    cfg = bundle.runc_config(name="a", image_config={**base, "User": "user:users"}, rootfs=root)
    assert cfg["process"]["user"] == {"uid": 1000, "gid": 100}
    cfg = bundle.runc_config(name="a", image_config={**base, "User": "1000"}, rootfs=root)
    assert cfg["process"]["user"] == {"uid": 1000, "gid": 1001}
    with pytest.raises(bundle.BundleError, match="not in its /etc/passwd"):
        bundle.runc_config(name="a", image_config={**base, "User": "ghost"}, rootfs=root)
    with pytest.raises(bundle.BundleError, match="bad hostname"):
        bundle.runc_config(name="a", image_config=base, hostname="A_B")


def test_resolve_in_root_stays_inside(tmp_path):
    root = fake_rootfs(tmp_path / "rootfs")
    (root / "escape").symlink_to("../../../../../etc")
    assert bundle.resolve_in_root(root, "/bin/sh") == root / "bin" / "busybox"
    got = bundle.resolve_in_root(root, "/escape/passwd")
    assert got == root / "etc" / "passwd"  # '..' stops at the image's root


def test_bundle_paths(tmp_path):
    p = bundle.bundle_paths(tmp_path, "web1")
    assert p.upper == tmp_path / "web1" / "upper" and p.config.name == "config.json"
    with pytest.raises(bundle.BundleError):
        bundle.bundle_paths(tmp_path, "../x")


def test_gzip_blob_roundtrip_helper():
    # the test image builder itself: layers are deterministic (digests stable per host)
    a = imagebuild.busybox_layers() if imagebuild.BUSYBOX.is_file() else [b"x"]
    b = imagebuild.busybox_layers() if imagebuild.BUSYBOX.is_file() else [b"x"]
    assert a == b
    assert gzip.decompress(gzip.compress(a[0], mtime=0)) == a[0]


# ------------------------------------------------------------------ teleport: blobs by digest


@needs_root
@needs_busybox
async def test_ship_missing_blobs_and_register(tmp_path, layout):
    """What teleport does: send the blobs the target lacks, then register the manifest."""
    src = ImageStore(tmp_path / "src")
    src.load()
    dst = ImageStore(tmp_path / "dst")
    dst.load()
    img = await src.import_path(layout.path, "busybox")
    # the target already has layer 1 (via a rootfs image sharing it), not the rest
    await dst.import_path(imagebuild.build_rootfs_tar(tmp_path / "r.tar", compress=True),
                          "base")
    need = dst.missing_blobs(src.image_blobs("busybox"))
    assert img.layers[0].digest not in need  # same gzip bytes: already there
    assert set(need) == {img.manifest_digest, img.config_digest, img.layers[1].digest}
    for d in need:
        await dst.add_blob(src.blob_path(d), d)
    got = await dst.register(img.manifest_digest, "busybox")
    assert got.id == img.id and got.names == ["busybox"]
    assert is_whiteout(got.layer_dirs[1] / "etc" / "deleteme")
    # a blob that does not match its digest is refused
    bad = tmp_path / "bad"
    bad.write_bytes(b"not the blob")
    with pytest.raises(ImageError, match="digest mismatch"):
        await dst.add_blob(bad, "sha256:" + "ab" * 32)
    with pytest.raises(ImageError, match="not in the store"):
        await dst.register("sha256:" + "cd" * 32)
