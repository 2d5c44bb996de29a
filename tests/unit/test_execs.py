"""cnvmd.execs without runc: runc's start errors, docker's exit codes, the exec table
(another connection's exec is not found), and stdin queueing on a real pty."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import termios
from pathlib import Path

import pytest

from cnvmd import execs
from proto.messages import ErrorCode, ProtoError


def _log(tmp_path: Path, *entries: dict) -> Path:
    p = tmp_path / "runc.log"
    p.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return p


def test_start_error_from_runc_log(tmp_path):
    msg = ('exec failed: unable to start container process: exec: "nosuch": executable '
           'file not found in $PATH')
    log = _log(tmp_path, {"level": "warning", "msg": "something"},
               {"level": "error", "msg": msg})
    why = execs.start_error(log)
    assert why == 'exec: "nosuch": executable file not found in $PATH'
    assert execs.start_exit_code(why) == 127
    assert execs.start_exit_code('exec: "/etc/passwd": permission denied') == 126
    assert execs.start_exit_code('exec: "/nosuch": stat /nosuch: no such file or '
                                 'directory') == 127
    assert execs.start_exit_code("chdir to cwd (\"/x\") set in config.json failed: no such "
                                 "file or directory") == 126
    # no such entry (the command ran and exited 255 itself), or no log at all
    assert execs.start_error(_log(tmp_path, {"level": "error", "msg": "other"})) is None
    assert execs.start_error(tmp_path / "missing.log") is None


def test_runc_failure_line_is_recognised():
    assert execs._RUNC_FAILED.fullmatch(b'exec failed: unable to start: x\n')
    assert execs._RUNC_FAILED.fullmatch(b'exec failed: unable to start: x\r\n')
    assert not execs._RUNC_FAILED.fullmatch(b'exec failed: x\nand more\n')
    assert not execs._RUNC_FAILED.fullmatch(b'hello\n')


def test_exec_table_is_per_connection(tmp_path):
    table = execs.ExecTable()
    mine, other = object(), object()
    e = execs.ExecProc("0123456789abcdef", "web", mine, False, tmp_path)
    table.add(e)
    assert table.running("web") == 1 and table.running("db") == 0
    assert table.get(e.id, mine) is e
    with pytest.raises(ProtoError) as ei:
        table.get(e.id, other)
    assert ei.value.code == ErrorCode.NOT_FOUND
    table.remove(e)
    assert table.running("web") == 0


async def test_tty_feed_and_resize_on_a_real_pty(tmp_path):
    master, slave = os.openpty()
    try:
        os.set_blocking(master, False)
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~(termios.ICANON | termios.ECHO)  # raw-ish, as runc sets it
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        e = execs.ExecProc("0123456789abcdef", "web", None, True, tmp_path, master=master)
        e.feed(b"hello", eof=False)
        assert os.read(slave, 100) == b"hello"
        e.feed(b"", eof=True)  # a terminal's EOF is ^D
        assert os.read(slave, 100) == b"\x04"
        with pytest.raises(ProtoError) as ei:
            e.feed(b"more", eof=False)
        assert ei.value.code == ErrorCode.CONFLICT
        e.resize(33, 101)
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ,
                                                             b"\0" * 8))
        assert (rows, cols) == (33, 101)
        e.master = None  # closed below
    finally:
        os.close(master)
        os.close(slave)


def test_pipe_exec_without_tty_cannot_resize(tmp_path):
    e = execs.ExecProc("0123456789abcdef", "web", None, False, tmp_path)
    with pytest.raises(ProtoError) as ei:
        e.resize(10, 10)
    assert ei.value.code == ErrorCode.CONFLICT
    with pytest.raises(ProtoError):
        e.feed(b"x", eof=False)  # not started with interactive
