"""Pure parts of the teleport engine: the pre-copy round loop against policy.Convergence,
and the lazy-page relay's EOF-vs-RST rule (loopback TCP only)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cnvmd.migration.policy import Convergence, Decision
from cnvmd.migration.precopy import final_mode, run_rounds
from cnvmd.peers.streams import splice

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def rounds_of(sizes: list[int], bandwidth: float, conv: Convergence) -> Any:
    clock = Clock()
    calls: list[int] = []

    async def dump(i: int) -> int:
        calls.append(i)
        n = sizes[min(i, len(sizes) - 1)]
        clock.t += n / bandwidth
        return n

    seen: list[tuple[int, Decision]] = []
    res = await run_rounds(dump, conv, lambda i, r, d: seen.append((i, d)), clock=clock)
    assert [i for i, _ in seen] == calls == list(range(len(res.rounds)))
    return res


async def test_rounds_converge_when_the_rest_fits_the_budget():
    # 256 MB, then 40 MB, then 8 MB at 100 MB/s: 8 MB = 80 ms + 100 ms fixed <= 300 ms
    res = await rounds_of([256_000_000, 40_000_000, 8_000_000], 100e6,
                          Convergence(max_downtime=0.3))
    assert res.decision is Decision.SWITCH and res.converged
    assert [r.bytes for r in res.rounds] == [256_000_000, 40_000_000, 8_000_000]
    assert final_mode("precopy", res, lazy_ready=True) == "dump"


async def test_rounds_give_up_when_not_shrinking_and_finish_lazily():
    # a cnvm dirtying 90 MB per round never fits: stop after round 2, no spinning
    res = await rounds_of([100_000_000, 95_000_000, 95_000_000], 100e6,
                          Convergence(max_downtime=0.3))
    assert res.decision is Decision.GIVE_UP and len(res.rounds) == 2
    assert final_mode("precopy", res, lazy_ready=True) == "lazy"
    assert final_mode("precopy", res, lazy_ready=False) == "dump"
    assert final_mode("hybrid", res, lazy_ready=True) == "lazy"


async def test_rounds_are_capped():
    sizes = [1_000_000_000 // (2 ** i) for i in range(20)]  # halves, but slowly fits
    res = await rounds_of(sizes, 10e6, Convergence(max_downtime=0.3, max_rounds=4))
    assert len(res.rounds) == 4 and res.decision is Decision.GIVE_UP


class FakeStream:
    """The stream side of a relayed connection: a queue of chunks, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.q: asyncio.Queue[bytes] = asyncio.Queue()
        for c in chunks:
            self.q.put_nowait(c)
        self.q.put_nowait(b"")
        self.written = bytearray()
        self.eof = False
        self.closed = False

    async def read(self, n: int) -> bytes:
        return await self.q.get()

    async def write(self, data: bytes) -> None:
        self.written += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True


async def _relay_once(clean: bool) -> tuple[bytes, str]:
    """A 'CRIU page server' on loopback; splice a fake stream into it; what does it see?"""
    got = bytearray()
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1 << 16):
                got.extend(data)
            outcome.set_result("eof")
        except ConnectionResetError:
            outcome.set_result("reset")
        w.close()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stream = FakeStream([b"pages", b"more"])
        await splice(stream, reader, writer, clean_eof=lambda: clean)
        return bytes(got), await asyncio.wait_for(outcome, 5)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_lazy_relay_resets_instead_of_eof_until_committed():
    data, how = await _relay_once(clean=False)
    assert data == b"pagesmore" and how == "reset"
    data, how = await _relay_once(clean=True)
    assert data == b"pagesmore" and how == "eof"


def test_criu_wrappers(tmp_path):
    """The lazy-pages wrapper runs CRIU with a private /run on a tmpfs dir (kdat cache);
    the prlimit shim is preloaded when given; a real run reaches the wrapped command."""
    import subprocess

    from cnvmd.migration import criushim

    plain = criushim.wrapper_text("/opt/x/criu", None, None)
    assert plain.endswith('exec "/opt/x/criu" "$@"\n') and "unshare" not in plain
    both = criushim.wrapper_text("/opt/x/criu", tmp_path / "shim.so", tmp_path / "kdat")
    assert f'LD_PRELOAD="{tmp_path}/shim.so' in both and "--propagation private" in both
    assert criushim._fstype("/proc") == "proc"
    # a real run, with `echo` standing in for CRIU: arguments arrive intact
    w = tmp_path / "w"
    w.write_text(criushim.wrapper_text("/bin/echo", None, None))
    w.chmod(0o755)
    out = subprocess.run([str(w), "lazy-pages", "a b"], capture_output=True, text=True)
    assert out.stdout == "lazy-pages a b\n"
