"""Unit tests of issue 17's CLI pieces: --format templates, durations and --since,
human times, the log time index (written by the real shim), completion/man output."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnvmctl import template, timefmt
from cnvmd import logshim, logstore

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- --format


def test_format_fields_case_and_underscores():
    row = {"name": "web", "ip": "10.0.0.2", "image_id": "abc", "adopted": False,
           "memory": None, "record": {"cmd": ["sh", "-c", "x"], "env": {}}}
    t = template.Template("{{.Name}} {{.IP}} {{.ImageId}} {{.adopted}} [{{.memory}}]")
    assert t.render(row) == "web 10.0.0.2 abc false []"
    assert template.Template("{{.record.cmd}}").render(row) == '["sh","-c","x"]'
    assert template.Template("{{json .name}}").render(row) == '"web"'
    assert json.loads(template.Template("{{.}}").render(row))["ip"] == "10.0.0.2"
    assert template.Template(r"{{.name}}\t{{.ip}}\n").render(row) == "web\t10.0.0.2\n"
    assert template.Template("{{ .name }}").render(row) == "web"  # spaces as in Go


def test_format_table_aligns_and_has_a_header():
    rows = [{"name": "a", "ip": "10.0.0.2"}, {"name": "longer", "ip": None}]
    lines = template.Template(r"table {{.Name}}\t{{.IP}}").lines(rows)
    assert lines == ["NAME    IP", "a       10.0.0.2", "longer"]


@pytest.mark.parametrize("spec", ["{{.Name", "{{range .x}}", "{{Name}}", "x }}",
                                  "{{.a..b}}", "{{printf .a}}"])
def test_format_refuses_what_it_does_not_know(spec):
    with pytest.raises(template.FormatError):
        template.Template(spec).render({"a": 1, "Name": 2})


def test_format_unknown_field_lists_the_fields():
    with pytest.raises(template.FormatError, match=r"no field \.Nope \(fields: ip, name\)"):
        template.Template("{{.Nope}}").render({"name": "x", "ip": "y"})
    with pytest.raises(template.FormatError, match="not inside a map"):
        template.Template("{{.name.x}}").render({"name": "x"})


# ---------------------------------------------------------------- durations, --since


@pytest.mark.parametrize(("text", "secs"), [("45s", 45), ("10m", 600), ("1h30m", 5400),
                                            ("2d", 172800), ("1.5h", 5400), ("500ms", 0.5),
                                            ("1w", 604800), ("10M", 600)])
def test_parse_duration(text, secs):
    assert timefmt.parse_duration(text) == pytest.approx(secs)


@pytest.mark.parametrize("text", ["", "10", "m", "10x", "-5m", "1h 30m", "10mm", "1.m"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="bad duration"):
        timefmt.parse_duration(text)


def test_parse_since_forms():
    now = 1_800_000_000.0
    assert timefmt.parse_since("10m", now) == now - 600
    assert timefmt.parse_since("1796165090", now) == 1796165090.0
    assert timefmt.parse_since("2026-12-01T22:00:00Z") == datetime.datetime(
        2026, 12, 1, 22, 0, tzinfo=datetime.UTC).timestamp()
    assert timefmt.parse_since("2026-12-01T23:00:00+01:00") == timefmt.parse_since(
        "2026-12-01T22:00:00Z")
    local = datetime.datetime(2026, 12, 1, 22, 0).astimezone().timestamp()
    assert timefmt.parse_since("2026-12-01 22:00") == local
    for bad in ("yesterday", "2026-13-01", "10 minutes"):
        with pytest.raises(ValueError):
            timefmt.parse_since(bad)


def test_human_times():
    now = 1_800_000_000.0
    assert timefmt.ago(now - 0.5, now) == "just now"
    assert timefmt.ago(now - 1, now) == "just now"
    assert timefmt.ago(now - 5, now) == "5 seconds ago"
    assert timefmt.ago(now - 60, now) == "1 minute ago"
    assert timefmt.ago(now - 3 * 60 - 10, now) == "3 minutes ago"
    assert timefmt.ago(now - 7200, now) == "2 hours ago"
    assert timefmt.ago(now - 3 * 86400, now) == "3 days ago"
    assert timefmt.ago(now + 120, now) == "in 2 minutes"
    h = timefmt.human(now - 180, now)
    assert h.endswith("(3 minutes ago)") and h.startswith(
        datetime.datetime.fromtimestamp(now - 180).strftime("%Y-%m-%d %H:%M:%S"))
    runc = "2026-12-01T22:44:50.792869408Z"  # nanoseconds, as runc writes them
    assert timefmt.to_epoch(runc) == pytest.approx(datetime.datetime(
        2026, 12, 1, 22, 44, 50, 792869, tzinfo=datetime.UTC).timestamp())
    assert timefmt.human(None) == "-" and timefmt.to_epoch("web") is None
    assert timefmt.to_epoch(True) is None


def test_inspect_humanizes_only_time_fields():
    from cnvmctl.commands.core import humanize_times

    now = 1_800_000_000.0
    rec = {"created_at": now - 60, "memory": 1 << 20, "teleports": [{"at": now - 7200}],
           "name": "web", "started_at": None}
    out = humanize_times(rec, now)
    assert out["created_at"].endswith("(1 minute ago)")
    assert out["teleports"][0]["at"].endswith("(2 hours ago)")
    assert out["memory"] == 1 << 20 and out["name"] == "web" and out["started_at"] is None


# ---------------------------------------------------------------- the log time index


def test_logshim_index_and_reads(tmp_path):
    """The real shim (as a process, fed in pieces) writes the log and its index;
    logstore gives each line the time of its first byte, --since and tail on top."""
    log = tmp_path / "console.log"
    log.write_bytes(b"old line without a time\n")
    p = subprocess.Popen([sys.executable, "-I", "-S", logshim.__file__, str(log)],
                         stdin=subprocess.PIPE)
    assert p.stdin is not None
    t0 = time.time()
    p.stdin.write(b"one\ntw")
    p.stdin.flush()
    time.sleep(0.3)
    t1 = time.time()
    p.stdin.write(b"o\nthree\n")
    p.stdin.flush()
    time.sleep(0.3)
    p.stdin.write(b"four")
    p.stdin.close()
    assert p.wait(10) == 0
    assert log.read_bytes() == b"old line without a time\none\ntwo\nthree\nfour"
    assert os.path.getsize(logstore.index_path(log)) == 3 * logshim.INDEX_RECORD.size

    lines, end, untimed = logstore.read_tail(log)
    assert [s for _, s in lines] == ["old line without a time\n", "one\n", "two\n",
                                     "three\n", "four"]
    assert end == log.stat().st_size and untimed == 0
    times = [t for t, _ in lines]
    assert times[0] is None
    assert t0 <= times[1] == times[2] < t1 <= times[3] < times[4]  # "two" began in piece 1
    since, _, untimed = logstore.read_tail(log, since=t1)
    assert [s for _, s in since] == ["three\n", "four"] and untimed == 1
    assert [s for _, s in logstore.read_tail(log, since=t1, tail=1)[0]] == ["four"]
    assert logstore.read_tail(log, since=time.time() + 60)[0] == []
    new, pos = logstore.read_from(log, len(b"old line without a time\none\n"))
    assert new == [(times[2], "two\n"), (times[3], "three\n"), (times[4], "four")]
    assert pos == end


def test_log_window_starts_at_a_line(tmp_path, monkeypatch):
    monkeypatch.setattr(logstore, "WINDOW", 10)
    log = tmp_path / "console.log"
    log.write_text("0123456789\nabc\ndef\n")  # the window starts at "9\n..."
    assert [s for _, s in logstore.read_tail(log)[0]] == ["abc\n", "def\n"]
    log.write_text("012345678\nabc\ndef\n")  # ... at "abc": a whole line, kept
    assert [s for _, s in logstore.read_tail(log)[0]] == ["abc\n", "def\n"]
    log.write_text("x" * 30)  # one long line: its end
    assert logstore.read_tail(log)[0] == [(None, "x" * 10)]


# ---------------------------------------------------------------- completion, man page


def _cnvmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnvmctl", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bash_completion_is_valid_bash(tmp_path):
    r = _cnvmctl("completion", "bash")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "cnvmctl.bash"
    script.write_text(r.stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for word in ("teleport", "exec", "logs", "--timestamps", "ps", "completion"):
        assert word in r.stdout
    # it really completes: load it and ask for `cnvmctl log<TAB>`
    probe = (f"source {script}; COMP_WORDS=(cnvmctl log); COMP_CWORD=1; "
             "COMP_LINE='cnvmctl log'; COMP_POINT=${#COMP_LINE}; "
             "fn=$(complete -p cnvmctl | sed 's/.*-F \\([^ ]*\\).*/\\1/'); $fn; "
             "echo \"${COMPREPLY[@]}\"")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
    assert "logs" in out.stdout.split(), (out.stdout, out.stderr)


def test_zsh_completion(tmp_path):
    r = _cnvmctl("completion", "zsh")
    assert r.returncode == 0 and r.stdout.startswith("#compdef cnvmctl"), r.stderr
    if shutil.which("zsh"):
        script = tmp_path / "_cnvmctl"
        script.write_text(r.stdout)
        assert subprocess.run(["zsh", "-n", str(script)]).returncode == 0


def test_man_page_renders(tmp_path):
    from cnvmctl import manpage

    out = manpage.write(tmp_path)
    main = tmp_path / "cnvmctl.1"
    assert main in out and (tmp_path / "cnvmctl-logs.1") in out
    text = main.read_text()
    assert text.startswith(".TH") and "teleport" in text
    if shutil.which("groff"):
        for page in out:  # -k: UTF-8 input through preconv, as man(1) does
            r = subprocess.run(["groff", "-k", "-man", "-Tutf8", "-ww", str(page)],
                               capture_output=True, text=True)
            assert r.returncode == 0 and not r.stderr, (page, r.stderr)
        r = subprocess.run(["groff", "-k", "-man", "-Tutf8", str(tmp_path / "cnvmctl-logs.1")],
                           capture_output=True, text=True)
        assert "--timestamps" in r.stdout.replace("\u2010", "-")
        assert "cnvmctl logs -n 20 -t web         the last 20 lines" in r.stdout.replace(
            "\u2010", "-")  # the examples keep their columns
