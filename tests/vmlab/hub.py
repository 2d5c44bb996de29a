"""A tiny learning Ethernet hub for QEMU ``-netdev socket,udp=`` links on 127.0.0.1.

Why: QEMU's UDP socket netdev is point-to-point, and multicast would send to a
non-loopback group address. For three or more guests the lab runs this hub:
one UDP socket per guest, each datagram is one Ethernet frame; frames go to the
port that last sent from the destination MAC, else to every other guest.

Usage: hub.py HUB_PORT:GUEST_PORT ...   (one pair per guest; all on 127.0.0.1)
"""

from __future__ import annotations

import selectors
import signal
import socket
import sys


def main(argv: list[str]) -> int:
    pairs = [tuple(int(x) for x in a.split(":")) for a in argv]
    socks: list[socket.socket] = []
    peers: list[tuple[str, int]] = []
    sel = selectors.DefaultSelector()
    for idx, (hub_port, guest_port) in enumerate(pairs):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("127.0.0.1", hub_port))
        s.setblocking(False)
        socks.append(s)
        peers.append(("127.0.0.1", guest_port))
        sel.register(s, selectors.EVENT_READ, idx)
    where: dict[bytes, int] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        for key, _ in sel.select():
            src = key.data
            s = socks[src]
            while True:
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr != peers[src] or len(frame) < 14:
                    continue  # only our own guest may talk on its port
                where[frame[6:12]] = src
                dst = where.get(frame[0:6])
                targets = [dst] if dst is not None and dst != src and not frame[0] & 1 else [
                    j for j in range(len(socks)) if j != src]
                for j in targets:
                    try:
                        socks[j].sendto(frame, peers[j])
                    except OSError:
                        pass  # that guest is not up yet (ECONNREFUSED) or gone


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
