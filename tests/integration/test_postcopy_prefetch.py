"""Post-copy with the prefetching lazy relay (issue 16): every page of a cnvm that keeps
checking its memory arrives intact, whether the prefetch or a fault brought it.

A static C program in a busybox cnvm fills 96 MiB with a pattern derived from each
word's address, then loops: check every page, rewrite a few (so some pages fault on
the target while the prefetch runs), count rounds in /tmp/rounds and write /tmp/bad
at the first wrong word. It is teleported post-copy node1 -> node2 -> node1 (real
cnvmd, runc, CRIU, SSH); after each hop the rounds go on, nothing is bad, and the
target's relay reports that pages came as prefetch.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from cnvmlab import paths as labpaths
from tests import imagebuild
from tests.teleportlab import TeleLab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IP = "10.100.101.41"
NAME = "memck"
MIB = 96

CHECKER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static uint64_t f(uint64_t i, uint64_t gen) { i ^= gen * 0x9E3779B97F4A7C15ull;
    i ^= i >> 33; i *= 0xff51afd7ed558ccdull; i ^= i >> 33; return i | 1; }
int main(int argc, char **argv) {
    size_t n = strtoul(argv[1], 0, 10) << 17, pages = n / 512;  /* words */
    uint64_t *p = malloc(n * 8), *gen = calloc(pages, 8);
    for (size_t i = 0; i < n; i++) p[i] = f(i, 0);
    for (unsigned long round = 1;; round++) {
        for (size_t k = 0; k < pages; k++)
            for (size_t i = k * 512; i < (k + 1) * 512; i++)
                if (p[i] != f(i, gen[k])) {
                    FILE *b = fopen("/tmp/bad", "w");
                    fprintf(b, "word %zu round %lu\n", i, round); fclose(b); return 1;
                }
        for (size_t j = 0; j < 64; j++) {  /* rewrite some pages */
            size_t k = (round * 7919 + j * 104729) % pages;
            gen[k]++;
            for (size_t i = k * 512; i < (k + 1) * 512; i++) p[i] = f(i, gen[k]);
        }
        FILE *r = fopen("/tmp/rounds.tmp", "w");
        fprintf(r, "%lu\n", round); fclose(r); rename("/tmp/rounds.tmp", "/tmp/rounds");
        usleep(20000);
    }
}
"""


async def rounds(tl: TeleLab, node: str) -> int:
    res = await tl.call(node, "exec", {"name": NAME, "cmd": [
        "sh", "-c", "cat /tmp/rounds 2>/dev/null || echo 0; cat /tmp/bad 2>/dev/null"]})
    lines = res["stdout"].split("\n")
    assert not any("word" in ln for ln in lines), f"memory corrupted: {res['stdout']}"
    return int(lines[0] or 0)


async def more_rounds(tl: TeleLab, node: str, k: int = 2, timeout: float = 60) -> None:
    start = await rounds(tl, node)
    end = asyncio.get_running_loop().time() + timeout
    while await rounds(tl, node) < start + k:
        assert asyncio.get_running_loop().time() < end, f"checker stuck at {start} on {node}"
        await asyncio.sleep(0.3)


async def test_postcopy_pages_are_intact(tmp_path: Path) -> None:
    tl = TeleLab("lpf", 2)
    try:
        await tl.up(tmp_path)
        await tl.deploy(NAME, IP, memory=f"{MIB + 128}M")
        binary = tmp_path / "memck"
        await asyncio.to_thread(imagebuild.gcc_static, CHECKER, binary)
        upper = labpaths.node_state_dir("lpf", "node1") / "cnvms" / NAME / "upper"
        await asyncio.to_thread(shutil.copy2, binary, upper / "memck")
        await tl.call("node1", "exec", {"name": NAME, "cmd": [
            "sh", "-c", f"/memck {MIB} </dev/null >/dev/null 2>&1 &"]})
        await more_rounds(tl, "node1")
        where = "node1"
        for dst in ("node2", "node1"):
            rep = await tl.call(where, "teleport", {"name": NAME, "target": dst,
                                                    "mode": "postcopy"}, timeout=300)
            assert rep["mode"] == "postcopy", rep
            assert rep["wire_bytes"] > MIB << 20, "the pages did not travel"
            await more_rounds(tl, dst)
            log = tl.daemon_log(dst)
            relay = [ln for ln in log.splitlines() if "lazy relay to" in ln]
            assert relay and "MB prefetched" in relay[-1], log[-2000:]
            assert " 0.0 MB prefetched" not in relay[-1], relay[-1]
            where = dst
        assert await tl.where(NAME) == ["node1"]
    except BaseException:
        tl.print_logs(30)
        raise
    finally:
        await tl.down()
