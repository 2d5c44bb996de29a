"""VMLab: boot N small Debian guests under QEMU TCG, reach them over ssh, tear down.

Why this shape:
- ``-accel tcg -cpu max``: this machine's /dev/kvm (kvm_pvm) cannot run a stock kernel.
- NIC 1 is QEMU user-mode networking with ``restrict=on``: the guest cannot reach
  anything outside; only the harness's ``hostfwd`` on 127.0.0.1 comes in (ssh).
- NIC 2 is the private L2 link among guests, QEMU socket netdevs over UDP on
  127.0.0.1: two guests are wired back to back; three or more go through a small
  learning hub process on loopback (``hub.py``). No packet leaves the machine.
- One shared read-only raw image, one qcow2 overlay per guest, removed on ``down()``.
- ``down()`` kills exactly the qemu (and hub) pids this object started, also when
  ``up()`` failed half-way; children get PR_SET_PDEATHSIG so a crashed harness
  does not leave qemu behind either.

Guests are indexed from 0; guest ``i`` is named ``lv{i+1}`` and has the private
address ``{net}.{11+i}`` (see ``Guest``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import image as imagemod

log = logging.getLogger("vmlab")

REPO = Path(__file__).resolve().parents[2]
GUEST_VENV = "/opt/cnvm/venv"
GUEST_SRC = "/opt/cnvm/src"
DAEMON_SOCKET = "/run/cnvm/cnvmd.sock"
DEFAULT_NET = "10.77.0"  # private guest link, /24; only exists inside the guests
QEMU = "qemu-system-x86_64"
WORK_BASE = "/var/tmp"  # per-lab dirs lv-vmlab-*: overlays, consoles, ssh sockets
_PR_SET_PDEATHSIG = 1


class VMLabError(RuntimeError):
    pass


@dataclass
class Guest:
    index: int
    name: str
    ip: str  # on the private link
    ssh_port: int
    mac_user: str
    mac_link: str
    overlay: Path
    console: Path
    proc: subprocess.Popen | None = None
    boot_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


@dataclass
class VMLab:
    """A set of QEMU guests; use as a context manager or call up()/down()."""

    n: int = 2
    mem_mib: int = 1024
    net: str = DEFAULT_NET
    link: str = "auto"  # "auto": direct for 2 guests, hub for more; or "hub"
    boot_timeout: float = 300.0
    resettable: bool = False  # keep QEMU alive across a guest reset (see reset())
    image: imagemod.Image | None = None
    workdir: Path | None = None
    guests: list[Guest] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _owns_workdir: bool = False

    # ---------------------------------------------------------------- lifecycle
    def up(self) -> VMLab:
        """Build (or reuse) the image, boot every guest, wait until each answers ssh."""
        if not 1 <= self.n <= 20:
            raise ValueError("n must be 1..20")
        try:
            t0 = time.monotonic()
            if self.image is None:
                self.image = imagemod.build()
            self.timings["image_s"] = round(time.monotonic() - t0, 1)
            if self.workdir is None:
                _reap_stale_workdirs()
                self.workdir = Path(tempfile.mkdtemp(prefix="lv-vmlab-", dir=WORK_BASE))
                (self.workdir / "owner").write_text(f"{os.getpid()}\n")
                self._owns_workdir = True
            self._plan()
            t1 = time.monotonic()
            self._start_link()
            for g in self.guests:
                self._start_guest(g)
            self._wait_ssh(t1)
            self.timings["boot_to_ssh_s"] = round(time.monotonic() - t1, 1)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process this lab started (by pid) and remove its overlays.

        Idempotent. Raises VMLabError if a process we started is still alive after
        SIGKILL (which would mean a leak worth knowing about).
        """
        for g in self.guests:
            if self.workdir is not None and (self.workdir / f"cm-{g.name}").exists():
                subprocess.run([*self._ssh_base(g), "-O", "exit", "root@127.0.0.1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10, check=False)
        for p in self._procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self._procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        alive = [p.pid for p in self._procs if p.poll() is None]
        self._procs = [p for p in self._procs if p.poll() is None]
        if self.workdir is not None and self._owns_workdir and not alive:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        else:
            for g in self.guests:
                g.overlay.unlink(missing_ok=True)
        if alive:
            raise VMLabError(f"processes still alive after SIGKILL: {alive}")

    def pids(self) -> list[int]:
        """Pids of every process this lab started (qemu per guest, maybe a hub)."""
        return [p.pid for p in self._procs]

    def alive_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def __enter__(self) -> VMLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---------------------------------------------------------------- access
    def ssh(self, i: int, cmd: str | Sequence[str], *, check: bool = True,
            timeout: float | None = 600, input: str | bytes | None = None,
            capture: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command in guest i (as root). Text in, text out unless bytes given."""
        g = self.guests[i]
        if not isinstance(cmd, str):
            cmd = shlex.join(cmd)
        text = not isinstance(input, bytes)
        r = subprocess.run([*self._ssh_base(g), "root@127.0.0.1", cmd], input=input,
                           capture_output=capture, text=text, timeout=timeout, check=False,
                           stdin=subprocess.DEVNULL if input is None else None)
        if check and r.returncode != 0:
            raise VMLabError(f"{g.name}: `{cmd}` exited {r.returncode}:\n"
                             f"{_tail(r.stdout)}\n{_tail(r.stderr)}")
        return r

    def popen(self, i: int, cmd: str, **kw) -> subprocess.Popen:
        """Start a long-running command in guest i (e.g. a client that holds a
        connection during a teleport); the caller owns the returned process."""
        return subprocess.Popen([*self._ssh_base(self.guests[i]), "root@127.0.0.1", cmd], **kw)

    def copy_to(self, i: int, src: str | Path, dst: str) -> None:
        """Copy a host file or directory into guest i at dst (scp -r, sftp protocol)."""
        g = self.guests[i]
        r = subprocess.run(["scp", "-q", "-r", *self._ssh_opts(g), "-P", str(g.ssh_port),
                            str(src), f"root@127.0.0.1:{dst}"],
                           capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            raise VMLabError(f"{g.name}: scp {src} -> {dst} failed: {_tail(r.stderr)}")

    def copy_from(self, i: int, src: str, dst: str | Path) -> None:
        g = self.guests[i]
        r = subprocess.run(["scp", "-q", "-r", *self._ssh_opts(g), "-P", str(g.ssh_port),
                            f"root@127.0.0.1:{src}", str(dst)],
                           capture_output=True, text=True, timeout=600, check=False)
        if r.returncode != 0:
            raise VMLabError(f"{g.name}: scp {src} <- failed: {_tail(r.stderr)}")

    def each(self, fn, indices: Iterable[int] | None = None) -> list:
        """Run fn(i) for every guest in parallel threads; results in guest order."""
        idx = list(range(self.n)) if indices is None else list(indices)
        with ThreadPoolExecutor(max_workers=max(1, len(idx))) as ex:
            return list(ex.map(fn, idx))

    # ---------------------------------------------------------------- project
    def install_project(self, src: Path = REPO, mode: str = "tree") -> dict[str, float]:
        """Copy the working tree into every guest and install it into the guest venv.

        ``mode="tree"`` (default, ~5 s + ~10-40 s of byte-compiling, which saves
        cnvmd about a minute of cold imports at every start): the tree goes to
        /opt/cnvm/src, a .pth file puts it on the venv's path and the
        ``[project.scripts]`` wrappers are written, like an editable install.
        ``mode="pip"`` runs a real offline ``pip install`` (1-1.5 min). Either way the
        project's dependencies must already be in the image (Debian packages plus
        baked wheels); a missing or too old one fails here, loudly.
        """
        blob = _tree_tar(src)
        meta = tomllib.loads((src / "pyproject.toml").read_text())["project"]
        unpack = (f"rm -rf {GUEST_SRC} && mkdir -p {GUEST_SRC} && "
                  f"tar -xzf - -C {GUEST_SRC} --no-same-owner")
        if mode == "pip":
            setup = (f"{GUEST_VENV}/bin/pip install -q --no-index --no-build-isolation "
                     f"--disable-pip-version-check {GUEST_SRC}")
        elif mode == "tree":
            site = (f"$({GUEST_VENV}/bin/python -c "
                    "'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')")
            setup = f"echo {GUEST_SRC} > {site}/lv-cnvm-src.pth"
            for name, target in meta.get("scripts", {}).items():
                mod, func = target.split(":")
                body = (f"#!{GUEST_VENV}/bin/python3\nimport sys\n"
                        f"from {mod} import {func}\nsys.exit({func}())\n")
                setup += (f" && printf '{body}' > {GUEST_VENV}/bin/{name}"
                          f" && chmod 755 {GUEST_VENV}/bin/{name}")
        else:
            raise ValueError(f"mode must be tree or pip, not {mode!r}")
        check = _DEPS_CHECK.replace("@DEPS@", repr(meta.get("dependencies", [])))

        def one(i: int) -> float:
            t = time.monotonic()
            self.ssh(i, f"{unpack} && {setup}", input=blob, timeout=900)
            self.ssh(i, f"{GUEST_VENV}/bin/python -", input=check, timeout=300)
            # Byte-compile once now: a cold import of the daemon costs ~1 min of TCG.
            self.ssh(i, f"{GUEST_VENV}/bin/python -m compileall -q {GUEST_SRC}", timeout=600)
            return round(time.monotonic() - t, 1)

        return {self.guests[i].name: s for i, s in enumerate(self.each(one))}

    def install_operator(self, config: dict[int, str], src: Path = REPO) -> dict[str, float]:
        """Install cnvm in every guest the way an operator does on a host: the checkout
        at /opt/cnvm/src with its ``.venv`` (the image's venv, which already has the
        dependencies: the guests have no network for ``scripts/install-deps``), the
        project installed into it as install-deps does (``pip install -e``, offline),
        the operator's /etc/cnvm/cnvmd.toml (``config[i]``), then the project's own
        ``scripts/install-host --start``: the shipped systemd unit (Type=notify),
        enabled, started; ``systemctl start`` returns once cnvmd said READY=1."""
        blob = _tree_tar(src)
        check = _DEPS_CHECK.replace("@DEPS@", repr(
            tomllib.loads((src / "pyproject.toml").read_text())["project"]
            .get("dependencies", [])))

        def one(i: int) -> float:
            t = time.monotonic()
            self.ssh(i, f"rm -rf {GUEST_SRC} && mkdir -p {GUEST_SRC} && "
                        f"tar -xzf - -C {GUEST_SRC} --no-same-owner && "
                        f"ln -sfn {GUEST_VENV} {GUEST_SRC}/.venv", input=blob, timeout=900)
            self.ssh(i, f"{GUEST_VENV}/bin/pip install -q --no-index --no-build-isolation "
                        f"--no-deps --disable-pip-version-check -e {GUEST_SRC}", timeout=900)
            self.ssh(i, f"{GUEST_VENV}/bin/python -", input=check, timeout=300)
            # Byte-compile once now: a cold import of the daemon costs ~1 min of TCG.
            self.ssh(i, f"{GUEST_VENV}/bin/python -m compileall -q {GUEST_SRC}", timeout=600)
            self.ssh(i, "mkdir -p /etc/cnvm && cat > /etc/cnvm/cnvmd.toml",
                     input=config[i], timeout=60)
            self.ssh(i, f"{GUEST_SRC}/scripts/install-host --start", timeout=900)
            return round(time.monotonic() - t, 1)

        return {self.guests[i].name: s for i, s in enumerate(self.each(one))}

    def reset(self, i: int) -> None:
        """Hard-reset guest i (QMP ``system_reset``: no shutdown, no sync; what is not
        on the virtual disk yet is lost) and forget its ssh master connection. Needs a
        ``resettable`` lab. Returns at once; ``wait_ssh(i)`` waits for the new boot."""
        if not self.resettable:
            raise VMLabError("reset() needs VMLab(resettable=True) (QEMU without -no-reboot)")
        g = self.guests[i]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self._qmp_path(g)))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": "system_reset"}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    ans = json.loads(f.readline())
                    if "return" in ans or "error" in ans:
                        break
                if "error" in ans:
                    raise VMLabError(f"{g.name}: QMP {cmd['execute']}: {ans['error']}")
        log.info("%s: system_reset", g.name)
        subprocess.run([*self._ssh_base(g), "-O", "exit", "root@127.0.0.1"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=10, check=False)
        assert self.workdir is not None
        (self.workdir / f"cm-{g.name}").unlink(missing_ok=True)

    def wait_ssh(self, i: int, timeout: float | None = None) -> float:
        """Wait until guest i answers ssh again (after a reset); seconds waited."""
        t0 = time.monotonic()
        self._wait_ssh(t0, [self.guests[i]], timeout)
        return round(time.monotonic() - t0, 1)

    def has_daemon(self) -> bool:
        """Whether the installed tree has the daemon entry point yet."""
        r = self.ssh(0, f"test -f {GUEST_SRC}/cnvmd/__main__.py", check=False)
        return r.returncode == 0

    def start_daemons(self, timeout: float = 300) -> dict[str, str]:
        """Start cnvmd in every guest (as a transient systemd unit) and wait for
        ``cnvmctl status`` to answer; returns each guest's status output."""
        def one(i: int) -> str:
            g = self.guests[i]
            sock = DAEMON_SOCKET
            # fault_injection: the teleport test hooks (fail_at) for the fault lane
            self.ssh(i, "printf 'fault_injection = true\\n' > /etc/lv-cnvmd.toml; "
                        "systemctl stop lv-cnvmd.service 2>/dev/null; "
                        "systemctl reset-failed lv-cnvmd.service 2>/dev/null; "
                        f"systemd-run --unit=lv-cnvmd --collect {GUEST_VENV}/bin/cnvmd "
                        "--config /etc/lv-cnvmd.toml "
                        f"--node-name {g.name} --socket {sock} --state-dir /var/lib/cnvm "
                        "--run-dir /run/cnvm --runc-root /run/cnvm/runc "
                        f"--listen-address {g.ip}")
            deadline = time.monotonic() + timeout
            while True:
                r = self.ssh(i, f"{GUEST_VENV}/bin/cnvmctl --socket {sock} status", check=False)
                if r.returncode == 0:
                    return r.stdout
                if time.monotonic() > deadline:
                    j = self.ssh(i, "journalctl -u lv-cnvmd --no-pager | tail -30", check=False)
                    raise VMLabError(f"{g.name}: cnvmctl status failed: {_tail(r.stderr)}\n"
                                     f"journal:\n{j.stdout}")
                time.sleep(2)

        return {self.guests[i].name: out for i, out in enumerate(self.each(one))}

    def cnvmctl(self, i: int, args: str, **kw) -> subprocess.CompletedProcess:
        """Run ``cnvmctl --socket <the lab daemon's socket> ARGS`` in guest i."""
        return self.ssh(i, f"{GUEST_VENV}/bin/cnvmctl --socket {DAEMON_SOCKET} {args}", **kw)

    def form_cluster(self) -> str:
        """``cluster init`` on guest 0, every other guest joins it over the private
        link with a fresh token; returns ``cnvmctl nodes`` as guest 0 sees it."""
        self.cnvmctl(0, "cluster init")
        first = self.guests[0]
        for i in range(1, self.n):
            token = self.cnvmctl(0, "cluster token").stdout.split()[0]
            self.cnvmctl(i, f"join {first.ip} --token {token}", timeout=300)
        return self.cnvmctl(0, "nodes").stdout

    # ---------------------------------------------------------------- internals
    def _plan(self) -> None:
        assert self.workdir is not None and self.image is not None
        self.guests = []
        for i in range(self.n):
            name = f"lv{i + 1}"
            g = Guest(index=i, name=name, ip=f"{self.net}.{11 + i}", ssh_port=_free_port(),
                      mac_user=f"52:54:00:77:00:{i + 1:02x}",
                      mac_link=f"52:54:00:77:01:{i + 1:02x}",
                      overlay=self.workdir / f"{name}.qcow2",
                      console=self.workdir / f"{name}.console")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                            str(self.image.rootfs), str(g.overlay)], check=True)
            self.guests.append(g)

    def _start_link(self) -> None:
        """Assign each guest its (local, remote) UDP ports on 127.0.0.1."""
        self._link: dict[int, tuple[int, int]] = {}
        if self.n == 1:
            return
        if self.n == 2 and self.link == "auto":
            a, b = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_DGRAM)
            self._link = {0: (a, b), 1: (b, a)}
            return
        pairs = []
        for i in range(self.n):
            guest_port, hub_port = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_DGRAM)
            self._link[i] = (guest_port, hub_port)
            pairs.append(f"{hub_port}:{guest_port}")
        assert self.workdir is not None
        hub_log = open(self.workdir / "hub.log", "wb")
        p = subprocess.Popen([sys.executable, str(Path(__file__).with_name("hub.py")), *pairs],
                             stdin=subprocess.DEVNULL, stdout=hub_log, stderr=hub_log,
                             preexec_fn=_pdeathsig(), start_new_session=True)
        hub_log.close()
        self._procs.append(p)

    def _start_guest(self, g: Guest) -> None:
        assert self.image is not None and self.workdir is not None
        append = " ".join([
            "root=/dev/vda", "rw", "console=ttyS0", "net.ifnames=0", "panic=-1",
            "systemd.show_status=0", "systemd.ssh_auto=no", "loglevel=4", "mitigations=off",
            f"lv.name={g.name}", f"lv.ip={g.ip}/24", f"lv.link={int(g.index in self._link)}",
            f"lv.n={self.n}", f"lv.net={self.net}"])
        cmd = [
            QEMU, "-name", f"lv-vmlab-{g.name}", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-smp", "1", "-m", str(self.mem_mib), "-nodefaults", "-no-user-config",
            "-display", "none", "-monitor", "none",
            "-qmp", f"unix:{self._qmp_path(g)},server=on,wait=off",
            # -no-reboot turns every reset, QMP's system_reset included, into an exit
            *([] if self.resettable else ["-no-reboot"]),
            "-serial", f"file:{g.console}",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", append,
            "-drive", f"file={g.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-netdev", f"user,id=u0,restrict=on,hostfwd=tcp:127.0.0.1:{g.ssh_port}-:22",
            "-device", f"virtio-net-pci,netdev=u0,mac={g.mac_user},romfile=",
            "-device", "virtio-rng-pci",
        ]
        if g.index in self._link:
            local, remote = self._link[g.index]
            cmd += ["-netdev", f"socket,id=l0,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}",
                    "-device", f"virtio-net-pci,netdev=l0,mac={g.mac_link},romfile="]
        errlog = open(self.workdir / f"{g.name}.qemu.log", "wb")
        g.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog,
                                  preexec_fn=_pdeathsig(), start_new_session=True)
        errlog.close()
        self._procs.append(g.proc)
        log.info("started %s (qemu pid %d, ssh 127.0.0.1:%d)", g.name, g.proc.pid, g.ssh_port)

    def _ssh_opts(self, g: Guest) -> list[str]:
        assert self.image is not None and self.workdir is not None
        return ["-i", str(self.image.key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
                "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=6",
                "-o", "ControlMaster=no", "-o", f"ControlPath={self.workdir}/cm-{g.name}"]

    def _ssh_base(self, g: Guest) -> list[str]:
        return ["ssh", *self._ssh_opts(g), "-p", str(g.ssh_port)]

    def _qmp_path(self, g: Guest) -> Path:
        assert self.workdir is not None
        return self.workdir / f"{g.name}.qmp"

    def _wait_ssh(self, t0: float, guests: list[Guest] | None = None,
                  timeout: float | None = None) -> None:
        """Poll every guest until a multiplexing master connection is up.

        The master (``ssh -M -N -f``) makes later commands skip the key exchange,
        which costs about a second on an emulated CPU.
        """
        pending = list(self.guests if guests is None else guests)
        deadline = t0 + (self.boot_timeout if timeout is None else timeout)
        while pending:
            for g in list(pending):
                assert g.proc is not None
                if g.proc.poll() is not None:
                    raise VMLabError(f"{g.name}: qemu exited with {g.proc.returncode}: "
                                     f"{self._diag(g)}")
                base = self._ssh_base(g)
                base[base.index("ControlMaster=no")] = "ControlMaster=yes"
                master = [base[0], "-M", "-N", "-f", "-o", "ControlPersist=3600",
                          "-o", "ConnectTimeout=10", *base[1:], "root@127.0.0.1"]
                r = subprocess.run(master,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=60, check=False)
                if r.returncode == 0:
                    g.boot_s = round(time.monotonic() - t0, 1)
                    pending.remove(g)
                    log.info("%s answers ssh after %.1f s", g.name, g.boot_s)
            if pending:
                if time.monotonic() > deadline:
                    raise VMLabError("no ssh within {:.0f} s from {}: {}".format(
                        self.boot_timeout, ", ".join(g.name for g in pending),
                        self._diag(pending[0])))
                time.sleep(1.0)

    def _diag(self, g: Guest) -> str:
        assert self.workdir is not None
        parts = []
        for p in (self.workdir / f"{g.name}.qemu.log", g.console):
            with contextlib.suppress(OSError):
                parts.append(f"--- {p.name}:\n{_tail(p.read_text(errors='replace'), 25)}")
        return "\n".join(parts)


# -------------------------------------------------------------------- helpers
def _tail(s: str | bytes | None, n: int = 15) -> str:
    if s is None:
        return ""
    if isinstance(s, bytes):
        s = s.decode(errors="replace")
    return "\n".join(s.strip().splitlines()[-n:])


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig():
    """preexec_fn: SIGKILL the child when the thread that started it dies.

    Only armed when called from the main thread: PDEATHSIG follows the *thread*,
    so a lab started from a short-lived worker thread would lose its guests.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return arm


# Runs in the guest venv: every runtime dependency importable and new enough.
_DEPS_CHECK = r"""
import re, sys
from importlib.metadata import PackageNotFoundError, version
bad = []
for req in @DEPS@:
    m = re.match(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?", req)
    name, low = m.group(1), m.group(2)
    try:
        have = version(name)
    except PackageNotFoundError:
        bad.append(f"{name}: missing"); continue
    num = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])
    if low and num(have) < num(low):
        bad.append(f"{name}: {have} < {low}")
import cnvmd, proto  # noqa
sys.exit("guest deps: " + "; ".join(bad) if bad else 0)
"""

_TREE_SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}


def _tree_tar(src: Path) -> bytes:
    """The working tree (tracked + untracked, not ignored) as a gzipped tar."""
    files: list[str] = []
    r = subprocess.run(["git", "-C", str(src), "ls-files", "-co", "--exclude-standard", "-z"],
                       capture_output=True, check=False)
    if r.returncode == 0:
        files = [f for f in r.stdout.decode().split("\0") if f and (src / f).is_file()]
    else:
        for dp, dns, fns in os.walk(src):
            dns[:] = [d for d in dns if d not in _TREE_SKIP and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dp, f), src) for f in fns]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(files):
            tar.add(src / f, arcname=f, recursive=False)
    return buf.getvalue()


def _reap_stale_workdirs() -> None:
    """Remove overlays left by a harness that died without down() (its qemu died
    with it through PDEATHSIG; the files did not)."""
    for d in Path(WORK_BASE).glob("lv-vmlab-*"):
        try:
            pid = int((d / "owner").read_text())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def meminfo_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0
