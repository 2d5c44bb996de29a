"""Take a cnvm's TCP sockets out of repair mode after an aborted CRIU dump.

Why: with ``--tcp-established`` CRIU puts every established socket in TCP_REPAIR
mode while it dumps. On a failed *lazy* dump CRIU 4.2.1 only unfreezes the tasks
("Lazy pages transfer FAILED"): the sockets stay in repair mode and the network
lock stays in place, so the first read returns EPERM and the service dies (seen
in the lab: the client's connection hangs, the server's handler is gone). A
killed CRIU leaves the same state. The teleport engine therefore freezes the cnvm
itself first (runc pause: the tasks stay frozen when CRIU lets go), then calls
`repair_off` and `netlink.unlock`, and only then resumes it.

`pidfd_getfd(2)` gives us a duplicate of each socket fd without stopping the task;
``setsockopt(TCP_REPAIR, 0)`` on it is what CRIU's own unlock does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket

from cnvmd import netlink

SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 (generic table)
TCP_REPAIR = 19
TCP_REPAIR_OFF = 0

_libc = ctypes.CDLL(None, use_errno=True)


def pids_in_netns(netns_path: str) -> list[int]:
    """Processes living in that network namespace (a /proc scan: call in a thread)."""
    return netlink.pids_in_netns([netns_path])


def _getfd(pidfd: int, fd: int) -> int:
    r = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def repair_off(pids: list[int]) -> int:
    """Clear TCP_REPAIR on every TCP socket the pids hold; returns how many sockets.

    Blocking (/proc walk): run it in a thread.
    """
    seen: set[str] = set()
    done = 0
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for name in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{name}")
                except OSError:
                    continue
                if not target.startswith("socket:[") or target in seen:
                    continue
                seen.add(target)
                try:
                    dup = _getfd(pidfd, int(name))
                except OSError:
                    continue
                try:
                    s = socket.socket(fileno=dup)
                except OSError:
                    os.close(dup)
                    continue
                try:
                    if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET,
                                                                     socket.AF_INET6):
                        with contextlib.suppress(OSError):
                            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)
                            done += 1
                finally:
                    s.close()
        finally:
            os.close(pidfd)
    return done


# --------------------------------------------------------------------------- RTO nudge
#
# Why: while a cnvm is frozen, a client's TCP retransmissions go unanswered and its
# retransmission timeout backs off (200, 400, 800 ms ...). When the cnvm runs again
# the client only retries when its current timeout expires: a long freeze costs up
# to twice its length again. Linux implements RFC 6069: an ICMP host-unreachable
# that quotes the first unacknowledged byte of a connection in RTO backoff reverts one
# backoff step, and retransmits at once when the reverted timeout has already
# expired (tcp_ld_RTO_revert). So right after the restore, for each connection:
# learn the client's first unacknowledged byte from the ACK number of the window
# probe the restored socket sends when leaving repair mode (captured on the host end
# of the cnvm's veth), and send the client a few such ICMPs from the cnvm's address.

ETH_P_ALL = 0x0003  # a bridge port's frames reach protocol-specific taps only after
# the bridge consumed them (never): an ETH_P_ALL tap sees them first
NUDGES = 8  # backoff steps reverted at most (200 ms * 2**8 > any freeze we allow)


class Capture:
    """Outgoing TCP segments of one cnvm address, seen on the host end of its veth."""

    def __init__(self, sock: socket.socket, ip: str) -> None:
        self.sock = sock
        self.ip = socket.inet_aton(ip)

    @classmethod
    def open(cls, ifname: str, ip: str) -> Capture:
        """Blocking; open before the restore so the window probes are buffered."""
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.bind((ifname, ETH_P_ALL))
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return cls(s, ip)

    def acks(self) -> dict[tuple[bytes, int, int], int]:
        """(client address, client port, cnvm port) -> the last ACK number the cnvm
        sent on it, from what was buffered; closes the capture. Blocking."""
        out: dict[tuple[bytes, int, int], int] = {}
        try:
            while True:
                try:
                    frame = self.sock.recv(256)
                except BlockingIOError:
                    break
                _parse_ack(frame, self.ip, out)
        finally:
            self.sock.close()
        return out

    def close(self) -> None:
        self.sock.close()


def _parse_ack(frame: bytes, ip: bytes, out: dict[tuple[bytes, int, int], int]) -> None:
    if len(frame) < 14 + 20 + 20 or frame[12:14] != b"\x08\x00":
        return
    iph = frame[14:]
    ihl = (iph[0] & 0x0F) * 4
    if iph[0] >> 4 != 4 or iph[9] != socket.IPPROTO_TCP or iph[12:16] != ip:
        return
    tcp = iph[ihl:]
    if len(tcp) < 20 or not tcp[13] & 0x10:  # ACK flag
        return
    sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
    out[(bytes(iph[16:20]), dport, sport)] = int.from_bytes(tcp[8:12], "big")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def rto_revert_icmp(client: bytes, client_port: int, cnvm: bytes, cnvm_port: int,
                    seq: int) -> bytes:
    """ICMP host unreachable quoting the client's segment at `seq` (RFC 6069)."""
    quoted_ip = bytearray(b"\x45\x00\x00\x28\x00\x00\x40\x00\x40\x06\x00\x00")
    quoted_ip += client + cnvm
    quoted_ip[10:12] = _checksum(bytes(quoted_ip)).to_bytes(2, "big")
    quoted_tcp = (client_port.to_bytes(2, "big") + cnvm_port.to_bytes(2, "big")
                  + (seq & 0xFFFFFFFF).to_bytes(4, "big"))
    body = b"\x03\x01\x00\x00\x00\x00\x00\x00" + bytes(quoted_ip) + quoted_tcp
    return body[:2] + _checksum(body).to_bytes(2, "big") + body[4:]


def nudge(netns_path: str, cnvm_ip: str, acks: dict[tuple[bytes, int, int], int]) -> int:
    """Send the RTO-revert ICMPs from inside the cnvm's netns; returns how many
    connections were nudged. Blocking (setns on this thread): run it in a thread."""
    if not acks:
        return 0
    me = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, 0x40000000) != 0:
            return 0
        try:
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        finally:
            _libc.setns(me, 0x40000000)
    finally:
        os.close(target)
        os.close(me)
    cnvm = socket.inet_aton(cnvm_ip)
    n = 0
    with raw:
        for (client, cport, sport), seq in acks.items():
            pkt = rto_revert_icmp(client, cport, cnvm, sport, seq)
            try:
                for _ in range(NUDGES):
                    raw.sendto(pkt, (socket.inet_ntoa(client), 0))
                n += 1
            except OSError:
                continue
    return n
