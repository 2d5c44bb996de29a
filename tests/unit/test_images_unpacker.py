"""A peer's CRIU-images stream lands as plain files in the session's images dir only:
no link, directory, device or path survives, and nothing is written through a
symlink an earlier stream (or anyone) left there."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from cnvmd.migration.target import ImagesUnpacker
from proto.messages import ErrorCode, ProtoError

pytestmark = pytest.mark.unit


def archive(*members: tuple[str, str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, data in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, data.decode()
                tar.addfile(ti)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
    return buf.getvalue()


async def unpack(dst: Path, blob: bytes) -> None:
    un = await ImagesUnpacker.start(dst)
    for i in range(0, len(blob), 4096):
        await un.feed(blob[i:i + 4096])
    await un.finish()


async def test_plain_image_files_are_written(tmp_path: Path):
    await unpack(tmp_path / "images", archive(("file", "./core-1.img", b"x" * 10000),
                                              ("file", "inventory.img", b"inv")))
    assert (tmp_path / "images" / "core-1.img").read_bytes() == b"x" * 10000
    assert (tmp_path / "images" / "inventory.img").read_bytes() == b"inv"


@pytest.mark.parametrize("member", [
    ("symlink", "files.img", b"/etc/passwd"), ("file", "../evil.img", b"x"),
    ("file", "sub/core.img", b"x"), ("dir", "sub", b""), ("file", "/abs.img", b"x"),
])
async def test_anything_but_plain_files_is_refused(tmp_path: Path, member):
    with pytest.raises(ProtoError) as ei:
        await unpack(tmp_path / "images", archive(member))
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert not (tmp_path / "evil.img").exists()


async def test_only_a_parent_link_to_a_sibling_round_is_taken(tmp_path: Path):
    await unpack(tmp_path / "images", archive(("symlink", "./parent", b"../round-3"),
                                              ("file", "core-1.img", b"c")))
    assert os.readlink(tmp_path / "images" / "parent") == "../round-3"
    for bad in (b"/etc", b"../../x", b"../round-3/../.."):
        with pytest.raises(ProtoError, match="parent link"):
            await unpack(tmp_path / f"i{len(bad)}", archive(("symlink", "parent", bad)))


async def test_a_symlink_already_there_is_not_written_through(tmp_path: Path):
    outside = tmp_path / "outside"
    outside.write_text("keep")
    (tmp_path / "images").mkdir()
    os.symlink(outside, tmp_path / "images" / "files.img")
    with pytest.raises(ProtoError):
        await unpack(tmp_path / "images", archive(("file", "files.img", b"evil")))
    assert outside.read_text() == "keep"
