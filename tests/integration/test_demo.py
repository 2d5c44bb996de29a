"""The demo's steps as a test: an SSH session survives teleports node1 → node2 → node3."""

from __future__ import annotations

import pytest

from cnvmctl.demo import Demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_demo_ssh_session_survives_teleports():
    d = Demo("dmt", say=lambda s: print(s, flush=True), tty=False)
    try:
        reports = await d.run(hops=("node2", "node3"))
        s = d.session
        assert s is not None and not s.broken, s.broken if s else "no session"
        assert [r["target"] for r in reports] == ["node2", "node3"]
        assert all(r["ok"] for r in reports)
        assert reports[0]["mode"] == "postcopy", reports[0]["mode_reason"]
        # the counter ran through both teleports without restarting or skipping
        values = [n for _, n in s.lines]
        assert values == list(range(values[0], values[0] + len(values)))
        assert values[0] == 1 and len(values) > 30
        where = await d.cnvmctl("node3", "--json", "ls")
        assert '"sneaker01"' in where and '"running"' in where
        # its ssh host key was made at its first start and came along
        key = await d.cnvmctl("node3", "exec", "sneaker01", "--", "cat",
                              "/etc/ssh/ssh_host_ed25519_key.pub")
        assert key.strip() == d.host_key and key.startswith("ssh-ed25519 ")
    finally:
        await d.close_session()
        await d.lab.down()
