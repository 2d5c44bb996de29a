"""Cached Debian guest image for the VM lab.

Why a VM at all: the development hosts' kernel has no MEM_SOFT_DIRTY, so CRIU's
pre-dump (the precopy/hybrid teleport modes) cannot run there. Stock Debian kernels
have it, so the lab boots small trixie guests under QEMU TCG and tests inside them.

The image is a raw ext4 file made with ``mkfs.ext4 -d`` from a debootstrap tree, plus
the kernel and initrd pulled out of that tree (QEMU boots them with ``-kernel``).
It lives in ``CACHE/img-<hash>`` where the hash covers everything that shapes the
image (the recipe below, the guest files, the harness ssh key), so it is rebuilt
only when the recipe changes. The Debian mirror is read from this machine's apt
sources; no registry host is written anywhere in the repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("vmlab.image")

CACHE = Path(os.environ.get("CNVM_VMLAB_CACHE", "/var/cache/cnvm/vmlab"))
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SUITE = "trixie"
IMAGE_SIZE = "4G"
# Bump when the build steps change in a way the recipe dict does not capture.
RECIPE_VERSION = 4

PACKAGES = [
    "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "kmod",
    "criu", "runc", "iproute2", "iptables", "iputils-ping", "procps",
    "python3", "python3-venv", "python3-setuptools",
    "openssh-server", "openssh-sftp-server", "busybox-static", "netbase",
]
# The project's runtime deps, as Debian packages where trixie's are new enough.
# Installed with apt in the chroot after debootstrap: debootstrap's resolver cannot
# follow virtual packages (python3-cryptography needs python3-cffi-backend-api-*).
APT_EXTRA = ["python3-asyncssh", "python3-msgpack", "python3-uvloop", "python3-aiofiles",
             "python3-rich"]
# cnvmd wants CRIU >= 4.2 (like the hosts' private bundle); trixie has 4.1.1. These
# packages of the newer suite become a private bundle in /opt/cnvm/criu (not
# installed: apt would drag in that suite's python3 and break trixie's C extensions).
CRIU_SUITE = "forky"
CRIU_DEBS = ["criu", "libcompel1", "libnet9", "libnl-3-200", "libc6"]
# A small initrd: just what mounts /dev/vda (MODULES=most is 37 MB, slow under TCG).
INITRD_MODULES = ["virtio_blk", "virtio_net", "ext4", "crc32c_generic", "crc32c_intel"]
# trixie's python3-pyroute2 is 0.7.7; the project needs >= 0.9.2. The (pure-Python)
# wheel is fetched on the host once and installed into the guest venv at build time.
WHEELS = ["pyroute2>=0.9.2", "dnslib>=0.9.20", "prometheus_client>=0.17",
          # the docs extra: scripts/install-host makes completion and man pages with them
          "shtab>=1.7"]
# Published as source only: built into a (pure-Python) wheel on the host.
WHEELS_BUILT = ["argparse-manpage>=4.5"]

# Runs at boot inside every guest: per-guest settings come from the kernel command
# line (one image, N guests). NICs are found by MAC: 52:54:00:77:00:xx is the
# user-mode NIC (harness ssh), 52:54:00:77:01:xx the private guest-to-guest link.
GUEST_NET = r"""#!/bin/sh
# lv-net: configure this VM-lab guest from /proc/cmdline (written by tests/vmlab).
set -u
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n1; }
name=$(arg lv.name); ip=$(arg lv.ip); n=$(arg lv.n); net=$(arg lv.net); link=$(arg lv.link)
[ -n "$name" ] && { echo "$name" > /etc/hostname; hostname "$name"; }
ip link set lo up
for _ in $(seq 100); do  # one `ip` per try: forks are slow on an emulated CPU
  links=$(ip -o link)
  u=$(echo "$links" | awk -F': ' '/52:54:00:77:00:/ {print $2; exit}')
  p=$(echo "$links" | awk -F': ' '/52:54:00:77:01:/ {print $2; exit}')
  [ -n "$u" ] && { [ -n "$p" ] || [ "$link" != 1 ]; } && break; sleep 0.1
done
if [ -n "${u:-}" ]; then
  ip link set "$u" up; ip addr add 10.0.2.15/24 dev "$u"
fi
if [ -n "${p:-}" ] && [ -n "$ip" ]; then
  ip link set "$p" name lv0 2>/dev/null && p=lv0
  ip link set "$p" up; ip addr add "$ip" dev "$p"
fi
{ echo "127.0.0.1 localhost"; echo "127.0.1.1 $name"
  i=1; while [ -n "$n" ] && [ "$i" -le "$n" ]; do
    echo "$net.$((10 + i)) lv$i"; i=$((i + 1)); done; } > /etc/hosts
exit 0
"""

GUEST_NET_UNIT = """[Unit]
Description=VM-lab guest network (from the kernel command line)
DefaultDependencies=no
After=systemd-udevd.service sysinit.target
Before=network.target ssh.service
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/lv-net

[Install]
WantedBy=multi-user.target
"""

SSHD_CONF = """# VM lab: key-only root login for the harness; no DNS lookups (the guest has none).
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
"""

FSTAB = "/dev/vda / ext4 rw,noatime,errors=remount-ro 0 0\n"

# Units that only slow a TCG boot down or want to reach the network.
MASK_UNITS = ["getty-static.service", "serial-getty@ttyS0.service", "apt-daily.timer",
              "apt-daily-upgrade.timer", "e2scrub_all.timer",
              "e2scrub_reap.service", "fstrim.timer", "getty@tty1.service",
              "systemd-timesyncd.service", "man-db.timer", "dpkg-db-backup.timer",
              "systemd-networkd-wait-online.service",
              # first-boot cache refreshes (ConditionNeedsUpdate): ~10 s of TCG time
              "ldconfig.service", "systemd-update-done.service",
              "systemd-hwdb-update.service", "systemd-journal-catalog-update.service"]
JOURNALD_CONF = "[Journal]\nStorage=volatile\n"  # nothing to flush to disk at boot


@dataclass(frozen=True)
class Image:
    """A built guest image: the ext4 root plus the kernel and initrd to boot it."""

    dir: Path
    rootfs: Path
    kernel: Path
    initrd: Path
    key: Path  # the harness's private ssh key (public half is in the image)
    manifest: dict


def harness_key(cache: Path = CACHE) -> Path:
    """The lab's ssh key pair, made once; its public half is baked into the image."""
    key = cache / "id_ed25519"
    if not key.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".id_ed25519.{os.getpid()}"
        for p in (tmp, tmp.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cnvm-vmlab",
                        "-f", str(tmp)], check=True)
        os.replace(tmp.with_name(tmp.name + ".pub"), key.with_name(key.name + ".pub"))
        os.replace(tmp, key)
    return key


def recipe(pubkey: str) -> dict:
    """Everything that shapes the image; its hash is the cache key."""
    return {
        "version": RECIPE_VERSION, "suite": SUITE, "variant": "minbase",
        "packages": sorted(PACKAGES), "apt_extra": sorted(APT_EXTRA),
        "wheels": WHEELS + WHEELS_BUILT,
        "size": IMAGE_SIZE, "criu_suite": CRIU_SUITE, "criu_debs": CRIU_DEBS,
        "initrd_modules": INITRD_MODULES,
        "files": {"lv-net": GUEST_NET, "lv-net.service": GUEST_NET_UNIT,
                  "sshd": SSHD_CONF, "fstab": FSTAB, "journald": JOURNALD_CONF},
        "mask": MASK_UNITS, "pubkey": pubkey.strip(),
    }


def recipe_hash(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]


def debian_mirror() -> str:
    """The first Debian archive URI in this machine's apt sources (deb822 or one-line)."""
    uris: list[str] = []
    d = Path("/etc/apt/sources.list.d")
    for f in sorted(d.glob("*.sources")) if d.is_dir() else []:
        for line in f.read_text().splitlines():
            if line.lower().startswith("uris:"):
                uris += line.split()[1:]
    lists = [Path("/etc/apt/sources.list"), *sorted(d.glob("*.list"))] if d.is_dir() else []
    for f in lists:
        if f.is_file():
            for line in f.read_text().splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+://\S+)", line)
                if m:
                    uris.append(m.group(1))
    for u in uris:
        if re.search(r"/debian/?$", u):
            return u.rstrip("/")
    raise RuntimeError("no Debian archive in /etc/apt/sources.list*; cannot debootstrap")


def _run(cmd: list[str], logf, **kw) -> None:
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    r = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"image build step failed (rc={r.returncode}): {' '.join(cmd)}; "
                           f"see {logf.name}")


def _fetch_wheels(dest: Path, logf) -> list[Path]:
    """Download the pure-Python wheels the guest venv needs (from the host's pip index)."""
    dest.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
          "--no-deps", "--only-binary=:all:", "--python-version", "3.13",
          "-d", str(dest), *WHEELS], logf)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
          "--no-deps", "-w", str(dest), *WHEELS_BUILT], logf)
    return sorted(dest.glob("*.whl"))


def _configure(root: Path, pubkey: str, wheels: list[Path], logf) -> None:
    """Turn the debootstrap tree into a bootable, ssh-reachable lab guest."""
    (root / "etc/fstab").write_text(FSTAB)
    (root / "etc/hostname").write_text("lv\n")
    # No machine-id in the image: every guest makes its own at first boot (a shared one
    # gives every guest the same udev-derived MACs and DHCP/journal identities).
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    sbin = root / "usr/local/sbin/lv-net"
    sbin.write_text(GUEST_NET)
    sbin.chmod(0o755)
    (root / "etc/systemd/system/lv-net.service").write_text(GUEST_NET_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "lv-net.service").unlink(missing_ok=True)
    (wants / "lv-net.service").symlink_to("/etc/systemd/system/lv-net.service")
    for unit in MASK_UNITS:
        m = root / "etc/systemd/system" / unit
        m.unlink(missing_ok=True)
        m.symlink_to("/dev/null")
    (root / "etc/systemd/journald.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/systemd/journald.conf.d/lv.conf").write_text(JOURNALD_CONF)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/lv.conf").write_text(SSHD_CONF)
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey.strip() + "\n")
    (ssh / "authorized_keys").chmod(0o600)
    # Small initrd with only the boot path's modules.
    conf = root / "etc/initramfs-tools"
    (conf / "conf.d/lv.conf").write_text("MODULES=list\n")
    (conf / "modules").write_text("\n".join(INITRD_MODULES) + "\n")
    _run(["chroot", str(root), "update-initramfs", "-u", "-k", "all"], logf)
    # A venv over the system packages; only what Debian lacks comes from wheels.
    wdir = root / "tmp/lv-wheels"
    wdir.mkdir(parents=True, exist_ok=True)
    for w in wheels:
        shutil.copy2(w, wdir / w.name)
    _run(["chroot", str(root), "python3", "-m", "venv", "--system-site-packages",
          "/opt/cnvm/venv"], logf)
    _run(["chroot", str(root), "/opt/cnvm/venv/bin/pip", "install", "-q", "--no-index",
          "--disable-pip-version-check", *[f"/tmp/lv-wheels/{w.name}" for w in wheels]], logf)
    shutil.rmtree(wdir)
    # Keep the image lean: the apt cache and docs are useless in the guest.
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for sub in ("usr/share/doc", "usr/share/man"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir()


def _criu_bundle(root: Path, logf) -> None:
    """Put CRIU 4.2 in /opt/cnvm (the project's default path), as install-deps does on
    hosts: the newer suite's criu and the few libraries it needs newer (libc included)
    extracted into /opt/cnvm/criu and run through that libc's own loader. The guest's
    system (python3 3.13 and its C extensions) stays pure trixie; /usr/sbin/criu
    remains trixie's 4.1.1."""
    dl = root / "tmp/lv-criu"
    bundle = root / "opt/cnvm/criu"
    bundle.mkdir(parents=True, exist_ok=True)
    for deb in sorted(dl.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(bundle)], logf)
    shutil.rmtree(dl)
    lib = "/opt/cnvm/criu/usr/lib/x86_64-linux-gnu"
    if not (root / lib.lstrip("/") / "ld-linux-x86-64.so.2").exists():
        raise RuntimeError("CRIU bundle has no dynamic loader")
    wrapper = root / "opt/cnvm/bin/criu"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.unlink(missing_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n# CRIU from Debian " + CRIU_SUITE + ", private bundle (tests/vmlab).\n"
        f'exec {lib}/ld-linux-x86-64.so.2 --library-path '
        f'{lib}:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu '
        '/opt/cnvm/criu/usr/sbin/criu "$@"\n')
    wrapper.chmod(0o755)


def _image_from(d: Path, key: Path) -> Image:
    man = json.loads((d / "manifest.json").read_text())
    return Image(dir=d, rootfs=d / "rootfs.raw", kernel=d / "vmlinuz", initrd=d / "initrd.img",
                 key=key, manifest=man)


def cached(cache: Path = CACHE) -> Image | None:
    """The image for the current recipe if it is already built, else None."""
    key = harness_key(cache)
    h = recipe_hash(recipe(key.with_name(key.name + ".pub").read_text()))
    d = cache / f"img-{h}"
    return _image_from(d, key) if (d / "manifest.json").exists() else None


def build(cache: Path = CACHE, force: bool = False, keep: int = 2) -> Image:
    """Return the image for the current recipe, building it first if needed.

    Serialised with a lock file, so two test runs never debootstrap the same thing.
    """
    if os.geteuid() != 0:
        raise PermissionError("building the VM-lab image needs root (debootstrap, chroot)")
    cache.mkdir(parents=True, exist_ok=True)
    key = harness_key(cache)
    pubkey = key.with_name(key.name + ".pub").read_text()
    r = recipe(pubkey)
    h = recipe_hash(r)
    final = cache / f"img-{h}"
    with open(cache / "build.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if (final / "manifest.json").exists() and not force:
            return _image_from(final, key)
        t0 = time.monotonic()
        work = cache / f"build-{h}"
        shutil.rmtree(work, ignore_errors=True)
        root = work / "root"
        root.mkdir(parents=True)
        logp = cache / f"build-{h}.log"
        log.info("building VM-lab image %s (log: %s)", h, logp)
        with open(logp, "w") as logf:
            mirror = debian_mirror()
            debs = cache / "debs"
            debs.mkdir(exist_ok=True)
            _run(["debootstrap", "--variant=minbase", f"--keyring={KEYRING}",
                  f"--cache-dir={debs}", f"--include={','.join(PACKAGES)}",
                  SUITE, str(root), mirror], logf)
            # apt inside the chroot, in a private mount namespace (proc and the .deb
            # cache are mounted there only, and vanish with it). The project's deps are
            # installed from SUITE alone; only then is the newer suite added, and only to
            # download CRIU's packages (else apt takes that suite's python3 as the best
            # candidate and the guest's Python drifts off SUITE).
            crit = " ".join(f"{p}/{CRIU_SUITE}" for p in CRIU_DEBS)
            newer = f"deb {mirror} {CRIU_SUITE} main"
            _run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                  'r=$1; d=$2; newer=$3; shift 3; mount -t proc proc "$r/proc"; '
                  'mount --bind "$d" "$r/var/cache/apt/archives"; '
                  'A="-q -o APT::Sandbox::User=root"; '
                  'chroot "$r" apt-get $A update; '
                  'DEBIAN_FRONTEND=noninteractive chroot "$r" apt-get install -y $A '
                  '--no-install-recommends "$@"; '
                  'echo "$newer" > "$r/etc/apt/sources.list.d/lv-criu.list"; '
                  # A testing suite's Release expires; mirrors here may be snapshots.
                  'chroot "$r" apt-get $A -o Acquire::Check-Valid-Until=false update; '
                  'mkdir -p "$r/tmp/lv-criu"; '
                  f'chroot "$r" sh -c "cd /tmp/lv-criu && apt-get $A download {crit}"',
                  "sh", str(root), str(debs), newer, *APT_EXTRA], logf)
            # Only the CRIU bundle comes from the newer suite; nothing may drift later.
            (root / "etc/apt/sources.list.d/lv-criu.list").unlink()
            for f in (root / "var/lib/apt/lists").glob(f"*_{CRIU_SUITE}_*"):
                f.unlink()
            _criu_bundle(root, logf)
            wheels = _fetch_wheels(cache / "wheels", logf)
            _configure(root, pubkey, wheels, logf)
            boot = root / "boot"
            kernels = sorted(boot.glob("vmlinuz-*"))
            initrds = sorted(boot.glob("initrd.img-*"))
            if not kernels or not initrds:
                raise RuntimeError(f"no kernel/initrd in {boot}; see {logp}")
            shutil.copy2(kernels[-1], work / "vmlinuz")
            shutil.copy2(initrds[-1], work / "initrd.img")
            raw = work / "rootfs.raw"
            _run(["truncate", "-s", IMAGE_SIZE, str(raw)], logf)
            _run(["mkfs.ext4", "-q", "-F", "-L", "lvroot", "-d", str(root), str(raw)], logf)
            shutil.rmtree(root)
            manifest = {"hash": h, "recipe": r, "kernel": kernels[-1].name,
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "build_s": round(time.monotonic() - t0, 1)}
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(logp, work / "build.log")
        os.replace(work, final)
        _prune(cache, keep, final)
        log.info("built VM-lab image %s in %.0f s", h, manifest["build_s"])
        return _image_from(final, key)


def _prune(cache: Path, keep: int, current: Path) -> None:
    """Drop the oldest images of other recipes; each costs ~1 GB of disk."""
    imgs = sorted((p for p in cache.glob("img-*") if p != current),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for p in imgs[max(keep - 1, 0):]:
        shutil.rmtree(p, ignore_errors=True)
    for p in cache.glob("build-*"):  # trees and logs of failed builds, kept until a success
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
