"""The VM lab's loopback Ethernet hub: floods unknown/broadcast, learns, isolates ports.

Runs without QEMU: plain UDP sockets stand in for the guests' socket netdevs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .lab import _free_port

pytestmark = pytest.mark.unit

HUB = Path(__file__).with_name("hub.py")
MAC = [bytes([0x52, 0x54, 0, 0x77, 1, i + 1]) for i in range(3)]
BCAST = b"\xff" * 6


def _frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload


def _recv(s: socket.socket, timeout: float = 0.5) -> bytes | None:
    s.settimeout(timeout)
    try:
        return s.recv(65536)
    except TimeoutError:
        return None


@pytest.fixture
def hub():
    guests, hub_ports = [], []
    for _ in range(3):
        g = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        g.bind(("127.0.0.1", 0))
        guests.append(g)
        hub_ports.append(_free_port(socket.SOCK_DGRAM))
    pairs = [f"{h}:{g.getsockname()[1]}" for h, g in zip(hub_ports, guests, strict=True)]
    p = subprocess.Popen([sys.executable, str(HUB), *pairs])
    time.sleep(0.3)
    yield guests, hub_ports
    p.terminate()
    p.wait(timeout=5)
    for g in guests:
        g.close()


def test_floods_then_learns(hub) -> None:
    guests, ports = hub
    # guest 0 broadcasts: 1 and 2 get it, 0 does not get it back
    f = _frame(BCAST, MAC[0], b"hello")
    for _ in range(20):  # the hub may still be starting
        guests[0].sendto(f, ("127.0.0.1", ports[0]))
        if _recv(guests[1], 0.1) == f:
            break
    else:
        pytest.fail("hub never forwarded")
    assert _recv(guests[2]) == f
    assert _recv(guests[0], 0.2) is None
    # guest 1 answers guest 0 (learned): only guest 0 gets it
    r = _frame(MAC[0], MAC[1], b"reply")
    guests[1].sendto(r, ("127.0.0.1", ports[1]))
    assert _recv(guests[0]) == r
    assert _recv(guests[2], 0.2) is None


def test_ignores_strangers(hub) -> None:
    guests, ports = hub
    time.sleep(0.3)  # the hub is up by now; a frame only a stranger sent must not pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        stranger.sendto(_frame(BCAST, b"\x02" * 6, b"x"), ("127.0.0.1", ports[0]))
        assert _recv(guests[1], 0.5) is None
        assert _recv(guests[2], 0.1) is None
    f = _frame(BCAST, MAC[0], b"alive")  # and the hub itself still works
    guests[0].sendto(f, ("127.0.0.1", ports[0]))
    assert _recv(guests[1]) == f
