"""Freeze-time pieces without a lab: CRIU log stages, the RFC 6069 nudge packet, the
window-probe parser, and the report's timeline round trip."""

from __future__ import annotations

import socket
import struct

import pytest

from cnvmd.migration import tcprepair
from cnvmd.migration.report import (
    DUMP_STAGES,
    RESTORE_STAGES,
    Step,
    TeleportReport,
    criu_stages,
)

pytestmark = pytest.mark.unit

DUMP_LOG = """(00.000000) CRIU run id = x
(00.000135) Loaded kdat cache from /run/criu.kdat
(00.002000) Dumping processes (pid: 831 comm: nc
(00.002100) freezing cgroup /sys/fs/cgroup/freezer/cnvm/node2/tp1: 100 x 100ms attempts
(00.003000) net: Lock network
(00.012000) Dumping task (pid: 831 comm: nc)
(00.300000) Unfreezing tasks into 1
(00.300500) Dumping finished successfully
"""
LAZY_LOG = DUMP_LOG.replace("(00.300000) Unfreezing", "(00.090000) Starting lazy pages "
                            "server\n(00.950000) Unfreezing")
RESTORE_LOG = """(00.000000) CRIU run id = y
(00.001000) Will dump/restore TCP connections
(00.002000) cg: Preparing cgroups yard (cgroups restore mode 0x4)
(00.003000) Running pre-restore scripts
(00.050000) Running post-setup-namespaces scripts
(00.060000) Running post-restore scripts
(00.061000) Running network-unlock scripts
(00.071000) pie: 6: pie: Turning repair off for 0 (reuse 1)
(00.072000) Restore finished successfully. Tasks resumed.
"""


def test_dump_stages_from_criu_timestamps():
    st = {x.step: (x.start_ms, x.ms) for x in criu_stages(DUMP_LOG, DUMP_STAGES, "source",
                                                           100.0)}
    assert st["criu: criu start, kernel probe"] == (100.0, 2.0)
    assert st["criu: network lock"] == (103.0, 9.0)
    assert st["criu: dump tasks (memory, files, sockets)"] == (112.0, 288.0)
    assert "criu: dump tasks (all but the lazy pages)" not in st


def test_a_lazy_dump_stops_at_its_page_server():
    st = {x.step: x.ms for x in criu_stages(LAZY_LOG, DUMP_STAGES, "source", 0.0)}
    assert st["criu: dump tasks (all but the lazy pages)"] == 78.0
    # the serving that follows runs after the switchover: not frozen time
    assert "criu: dump tasks (memory, files, sockets)" not in st
    assert "criu: let go of the tasks" not in st


def test_restore_stages_and_missing_markers():
    st = {x.step: x.ms for x in criu_stages(RESTORE_LOG, RESTORE_STAGES, "target", 0.0)}
    assert st["criu: network unlock"] == 10.0 and st["criu: cgroups"] == 1.0
    assert criu_stages("garbage\n(no stamps)\n", RESTORE_STAGES, "target", 0.0) == []


def test_timeline_survives_the_report_round_trip():
    r = TeleportReport("web", "n1", "n2", timeline=[Step("source", "freeze cgroup", 1.5, 2.0)])
    assert TeleportReport.from_dict(r.to_dict()).timeline == r.timeline
    bad = r.to_dict() | {"timeline": [{"side": "x"}]}
    with pytest.raises((KeyError, ValueError, TypeError)):
        TeleportReport.from_dict(bad)


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_rto_revert_icmp_quotes_the_clients_segment():
    client, cnvm = socket.inet_aton("10.0.0.250"), socket.inet_aton("10.0.0.21")
    pkt = tcprepair.rto_revert_icmp(client, 40000, cnvm, 7000, 0xDEADBEEF)
    assert pkt[0] == 3 and pkt[1] == 1  # destination unreachable, host unreachable
    assert _csum(pkt) == 0xFFFF  # ICMP checksum valid
    ip = pkt[8:28]
    assert ip[0] == 0x45 and ip[9] == socket.IPPROTO_TCP and _csum(ip) == 0xFFFF
    assert ip[12:16] == client and ip[16:20] == cnvm  # the client's own segment
    sport, dport, seq = struct.unpack("!HHI", pkt[28:36])
    assert (sport, dport, seq) == (40000, 7000, 0xDEADBEEF)


def test_window_probe_parser_keeps_the_last_ack_per_connection():
    cnvm = socket.inet_aton("10.0.0.21")

    def frame(src: bytes, dst: bytes, sport: int, dport: int, ack: int, flags: int) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, ack, 5 << 4, flags, 1000, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, src, dst)
        return b"\x02" * 6 + b"\x06" * 6 + b"\x08\x00" + ip + tcp

    client = socket.inet_aton("10.0.0.250")
    out: dict[tuple[bytes, int, int], int] = {}
    tcprepair._parse_ack(frame(cnvm, client, 7000, 40000, 5, 0x10), cnvm, out)
    tcprepair._parse_ack(frame(cnvm, client, 7000, 40000, 9, 0x10), cnvm, out)
    tcprepair._parse_ack(frame(client, cnvm, 40000, 7000, 77, 0x10), cnvm, out)  # inbound
    tcprepair._parse_ack(frame(cnvm, client, 7000, 40001, 3, 0x02), cnvm, out)  # SYN only
    assert out == {(client, 40000, 7000): 9}
