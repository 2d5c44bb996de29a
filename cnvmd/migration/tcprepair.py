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
