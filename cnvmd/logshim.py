"""The console-log shim: copies a cnvm's stdout/stderr pipe (its stdin) to LOG and
notes when each piece arrived in ``LOG.idx``, so `logs --since/--timestamps` can
answer without the daemon having watched (the shim outlives daemon restarts).

Run as ``python -I -S logshim.py LOG`` (stdlib only, no site: starts in ~20 ms);
`cnvmd.runtime.start_log_shim` starts it detached. It exits on EOF, i.e. when the
cnvm's last process is gone. Index records are `INDEX_RECORD` (offset in LOG where
a piece starts, UNIX time it was read), appended at most every `INDEX_EVERY`
seconds; `cnvmd.logstore` reads them. A failing write (disk full) drops output
instead of exiting: an exiting shim would kill the cnvm's next write (SIGPIPE).
"""

from __future__ import annotations

import os
import struct
import sys
import time

INDEX_RECORD = struct.Struct("<Qd")
INDEX_EVERY = 0.01


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(log: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    fd = os.open(log, flags, 0o640)
    idx = os.open(log + ".idx", flags, 0o640)
    last = 0.0
    while True:
        try:
            data = os.read(0, 65536)
        except InterruptedError:
            continue
        if not data:
            return 0
        try:
            now = time.time()
            if now - last >= INDEX_EVERY:
                last = now
                _write_all(idx, INDEX_RECORD.pack(os.lseek(fd, 0, os.SEEK_END), now))
            _write_all(fd, data)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
