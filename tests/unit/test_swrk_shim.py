"""The swrk shim (cnvmd/migration/swrk_shim.c): runc's VERSION and FEATURE_CHECK are
answered from the cache made from the real CRIU at start; every other request, and
every other command, reaches the real CRIU with the wrapper's environment."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cnvmd.migration import criushim

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler")

# A stand-in CRIU: logs each run, answers one swrk request (type echoed, success, a
# body that says it was the real one), prints its environment for other commands.
FAKE = """\
import os, socket, sys
log = os.environ.get("FAKE_LOG") or sys.argv[0] + ".runs"
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["swrk"]:
    s = socket.socket(fileno=int(sys.argv[2]))
    req = s.recv(65536)
    body = {10: b"\\x52\\x06\\x08\\x04\\x10\\x02\\x20\\x01", 9: b"\\x42\\x02\\x10\\x01"}
    s.send(req[:2] + b"\\x10\\x01" + body.get(req[1], b"\\x4a\\x04real"))
else:
    print(os.environ.get("CRIU_CONFIG_FILE"), os.environ.get("LD_PRELOAD"), *sys.argv[1:])
"""


def swrk(cmd: str, request: bytes) -> bytes:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        p = subprocess.Popen([cmd, "swrk", str(b.fileno())], pass_fds=(b.fileno(),))
        b.close()
        a.settimeout(20)
        a.send(request)
        resp = a.recv(65536)
        assert p.wait(20) == 0
    return resp


@pytest.fixture
def shim(tmp_path: Path) -> tuple[Path, Path]:
    fake = tmp_path / "criu"
    fake.write_text(f"#!{sys.executable}\n" + FAKE)
    fake.chmod(0o755)
    conf = tmp_path / "criu.conf"
    built = asyncio.run(criushim._build_swrk_shim(tmp_path / "teleport", str(fake), None, conf))
    assert built is not None
    assert asyncio.run(criushim.make_swrk_cache(built, tmp_path / "teleport" / "swrk-cache"))
    return built, fake


def test_version_and_features_come_from_the_cache(shim: tuple[Path, Path]) -> None:
    built, fake = shim
    runs = Path(str(fake) + ".runs")
    assert len(runs.read_text().splitlines()) == len(criushim.SWRK_REQUESTS)
    runs.unlink()
    assert swrk(str(built), b"\x08\x0a") == b"\x08\x0a\x10\x01\x52\x06\x08\x04\x10\x02\x20\x01"
    # as runc sends it: options first, then the features
    assert swrk(str(built), b"\x08\x09\x12\x04\x08\x05\x20\x01\x2a\x02\x10\x01") == \
        b"\x08\x09\x10\x01\x42\x02\x10\x01"
    assert not runs.exists(), "the real CRIU was asked"


def test_everything_else_reaches_the_real_criu(shim: tuple[Path, Path]) -> None:
    built, fake = shim
    runs = Path(str(fake) + ".runs")
    runs.unlink()
    dump = b"\x08\x01\x12\x04\x08\x05\x20\x01"
    assert swrk(str(built), dump) == b"\x08\x01\x10\x01\x4a\x04real"
    other = b"\x08\x09\x12\x00\x2a\x02\x18\x01"  # a feature nobody cached
    assert swrk(str(built), other) == b"\x08\x09\x10\x01\x42\x02\x10\x01"
    assert len(runs.read_text().splitlines()) == 2
    out = subprocess.run([str(built), "check", "--x"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(fake.parent / "criu.conf"), "None", "check", "--x"]


def test_without_a_cache_runc_gets_the_real_answers(shim: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    built, _ = shim
    shutil.rmtree(tmp_path / "teleport" / "swrk-cache")
    assert swrk(str(built), b"\x08\x0a") == b"\x08\x0a\x10\x01\x52\x06\x08\x04\x10\x02\x20\x01"


async def test_a_criu_that_does_not_answer_leaves_no_cache(tmp_path: Path) -> None:
    dead = tmp_path / "criu"
    dead.write_text("#!/bin/sh\nexit 1\n")
    dead.chmod(0o755)
    built = await criushim._build_swrk_shim(tmp_path / "teleport", str(dead), None, None)
    assert built is not None
    assert not await criushim.make_swrk_cache(built, tmp_path / "teleport" / "swrk-cache")


PARENT = """\
import os, socket, subprocess, sys
held = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]  # keep 3-5 off the pair
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
os.dup2(b.fileno(), 3, inheritable=True)
p = subprocess.Popen([sys.argv[1], "swrk", "3"], pass_fds=(3,))
os.close(3)
b.close()
a.send(bytes.fromhex(sys.argv[2]))
a.settimeout(20)
sys.stdout.write(a.recv(65536).hex())
p.wait(20)
"""


def test_runc_restore_starts_the_real_criu_at_once(shim: tuple[Path, Path]) -> None:
    """Its RESTORE request comes only after runc moved CRIU into the cgroups: CRIU is
    exec'd at once (a parent with a `restore` argument, fd 3) to start meanwhile."""
    built, fake = shim
    runs = Path(str(fake) + ".runs")
    runs.unlink()
    out = subprocess.run([sys.executable, "-c", PARENT, str(built), "080a", "restore"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out == "080a10015206080410022001"
    assert runs.read_text().split() == ["swrk", "3"]
    out = subprocess.run([sys.executable, "-c", PARENT, str(built), "080a", "checkpoint"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert out == "080a10015206080410022001"
    assert len(runs.read_text().splitlines()) == 1  # answered from the cache


def test_a_bundle_entry_point_is_run_by_its_loader_line(tmp_path: Path) -> None:
    """The shim execs the bundle's loader itself (install-deps' entry point: one shell
    less at each CRIU start); any other script is run as it is."""
    ld, real = tmp_path / "ld.so", tmp_path / "criu.bin"
    ld.write_text(f"#!{sys.executable}\nimport sys\nprint(*sys.argv[1:])\n")
    ld.chmod(0o755)
    real.write_text("")
    entry = tmp_path / "criu"
    entry.write_text("#!/bin/sh\n# CRIU forky bundle run through its own loader (written by "
                     f"cnvm's install-deps).\nexec \"{ld}\" --library-path \"/a:/b\" "
                     f"\"{real}\" \"$@\"\n")
    entry.chmod(0o755)
    assert criushim.criu_argv(str(entry)) == [str(ld), "--library-path", "/a:/b", str(real)]
    other = tmp_path / "other"
    other.write_text(f"#!/bin/sh\necho hi\nexec \"{ld}\" \"$@\"\n")
    assert criushim.criu_argv(str(other)) == [str(other)]
    assert criushim.criu_argv(str(tmp_path / "missing")) == [str(tmp_path / "missing")]
    built = asyncio.run(criushim._build_swrk_shim(tmp_path / "teleport", str(entry), None,
                                                  None))
    assert built is not None
    out = subprocess.run([str(built), "check", "a b"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.strip() == f"--library-path /a:/b {real} check a b"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a mount namespace)")
def test_the_lazy_wrapper_runs_criu_with_a_private_run(tmp_path: Path) -> None:
    """The lazy-pages daemon's wrapper: CRIU sees `private_run` as /run (its kdat cache
    persists there); the host's /run is untouched."""
    fake = tmp_path / "criu"
    fake.write_text(f"#!{sys.executable}\nimport os, sys\n"
                    "print(os.stat('/run').st_ino == os.stat(sys.argv[1]).st_ino)\n")
    fake.chmod(0o755)
    private = tmp_path / "run"
    built = asyncio.run(criushim._build_swrk_shim(tmp_path / "teleport", str(fake), None,
                                                  None, name="lazy", private_run=private))
    assert built is not None and built.name == "lazy"
    out = subprocess.run([str(built), str(private)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    assert out.strip() == "True"
    assert not os.path.samefile("/run", private)
