"""Upper-dir sync: a level-0 stream while 'running', a level-1 delta while 'frozen'."""

import os
import stat

import pytest

from cnvmd.migration.treesync import Unpacker, pack

pytestmark = pytest.mark.integration


async def sync(src, dst, snap):
    up = await Unpacker.start(dst)
    n = await pack(src, snap, up.feed)
    await up.finish()
    return n


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (trusted xattrs, device nodes)")
async def test_incremental_sync_keeps_whiteouts_opaque_dirs_and_deletions(tmp_path):
    src, dst, snap = tmp_path / "upper", tmp_path / "target", tmp_path / "snap"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello\n")
    (src / "data").mkdir()
    (src / "data" / "big").write_bytes(os.urandom(1 << 20))
    (src / "gone").write_text("delete me later")
    os.mknod(src / "whiteout", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (src / "opaque").mkdir()
    os.setxattr(src / "opaque", "trusted.overlay.opaque", b"y")
    os.chown(src / "etc" / "motd", 1234, 5678)

    first = await sync(src, dst, snap)
    assert first > 1 << 20
    assert (dst / "data" / "big").read_bytes() == (src / "data" / "big").read_bytes()
    st = os.stat(dst / "whiteout", follow_symlinks=False)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dst / "opaque", "trusted.overlay.opaque") == b"y"
    assert (os.stat(dst / "etc" / "motd").st_uid, os.stat(dst / "etc" / "motd").st_gid) == (
        1234, 5678)

    # "Frozen" round: one change, one new file, one deletion.
    (src / "etc" / "motd").write_text("changed\n")
    (src / "new").write_text("new file")
    (src / "gone").unlink()
    delta = await sync(src, dst, snap)
    assert delta < first // 10, "the delta must not resend unchanged data"
    assert (dst / "etc" / "motd").read_text() == "changed\n"
    assert (dst / "new").read_text() == "new file"
    assert not (dst / "gone").exists()
    assert (dst / "data" / "big").read_bytes() == (src / "data" / "big").read_bytes()


async def test_unpack_of_garbage_fails_cleanly(tmp_path):
    up = await Unpacker.start(tmp_path / "t")
    await up.feed(b"this is not a tar stream" * 100)
    with pytest.raises(Exception, match="tar failed"):
        await up.finish()
