"""In-guest smoke checks: the kernel tracks dirty memory and CRIU's pre-dump works.

This is the floor the teleport lane's precopy/hybrid modes stand on: if these
fail, the guest kernel or CRIU is at fault, not the migration engine.
"""

from __future__ import annotations

import itertools
import json

from .lab import VMLab

# What cnvmd uses in the guest: the CRIU 4.2 bundle (trixie's own 4.1.1 is /usr/sbin/criu).
GUEST_CRIU = "/opt/cnvm/bin/criu"

# Runs inside the guest (python3 - MIB DIRTY_MIB_PER_S CRIU). Starts a process holding
# MIB MiB that keeps dirtying memory and bumping a counter, pre-dumps it twice,
# dumps it, restores it, and checks that the counter went on from where it was.
PREDUMP_SCRIPT = r'''
import json, os, shutil, subprocess, sys, time
mib, rate, CRIU = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
base = "/var/tmp/lv-predump"
shutil.rmtree(base, ignore_errors=True)
os.makedirs(base)
counter = base + "/counter"
work = r"""
import mmap, os, sys, time
n, rate, path = int(sys.argv[1]) << 20, float(sys.argv[2]), sys.argv[3]
# Private memory: CRIU pre-dump skips shared anonymous memory (dumped whole at the end).
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, n, 4096):
    m[off] = 1
i, step = 0, max(1, int(rate * 256 / 10))  # pages per 100 ms tick
pos = 0
while True:
    for _ in range(step):
        m[pos] = (m[pos] + 1) & 255
        pos = (pos + 4096) % n
    i += 1
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, str(i).encode()); os.close(fd)
    time.sleep(0.1)
"""
open(base + "/work.py", "w").write(work)
p = subprocess.Popen(["python3", base + "/work.py", str(mib), str(rate), counter],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
while not os.path.exists(counter) or not open(counter).read():
    time.sleep(0.1)
time.sleep(0.5)

def read_counter():
    for _ in range(50):
        s = open(counter).read()
        if s:
            return int(s)
        time.sleep(0.05)
    return -1

def size(d, prefix=""):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.startswith(prefix) and os.path.isfile(os.path.join(d, f)))

def criu(args, d):
    t = time.monotonic()
    r = subprocess.run([CRIU, *args, "-D", d, "-o", "criu.log", "-v4"],
                       capture_output=True, text=True)
    dt = time.monotonic() - t
    if r.returncode != 0:
        tail = open(os.path.join(d, "criu.log")).read().splitlines()[-25:]
        print(json.dumps({"error": " ".join(args[:1]) + " failed", "log": tail}))
        p.kill()
        sys.exit(1)
    return round(dt, 3)

rounds = []
steps = [("pre-dump", []), ("pre-dump", ["--prev-images-dir", "../1"]),
         ("dump", ["--prev-images-dir", "../2"])]
for k, (kind, extra) in enumerate(steps, 1):
    d = f"{base}/{k}"
    os.makedirs(d)
    s = criu([kind, "-t", str(p.pid), "--track-mem", *extra], d)
    rounds.append({"kind": kind, "s": s, "pages_bytes": size(d, "pages-"),
                   "dir_bytes": size(d)})
before = read_counter()
p.wait()  # reap the dumped task so its pid is free for the restore
d = f"{base}/3"
t = time.monotonic()
r = subprocess.run([CRIU, "restore", "-d", "-D", d, "-o", "restore.log"],
                   capture_output=True, text=True)
restore_s = round(time.monotonic() - t, 3)
if r.returncode != 0:
    tail = open(os.path.join(d, "restore.log")).read().splitlines()[-25:]
    print(json.dumps({"error": "restore failed", "rounds": rounds, "log": tail}))
    sys.exit(1)
time.sleep(1.0)
after = read_counter()
alive = os.path.exists(f"/proc/{p.pid}")
if alive:
    os.kill(p.pid, 9)
print(json.dumps({"mib": mib, "dirty_mib_per_s": rate, "pid": p.pid, "rounds": rounds,
                  "restore_s": restore_s, "counter_at_dump": before,
                  "counter_after_restore": after, "restored_alive": alive}))
'''


def criu_check(lab: VMLab, i: int, criu: str = GUEST_CRIU) -> str:
    """`criu check --feature mem_dirty_track` in guest i (raises if it fails)."""
    r = lab.ssh(i, f"{criu} --version | head -n1; {criu} check --feature mem_dirty_track 2>&1; "
                   "grep -E 'CONFIG_(MEM_SOFT_DIRTY|USERFAULTFD)=' /boot/config-$(uname -r); "
                   "uname -r")
    return r.stdout


def predump_rounds(lab: VMLab, i: int, mib: int = 128, dirty_mib_per_s: float = 8.0,
                   criu: str = GUEST_CRIU) -> dict:
    """Pre-dump a dirtying process twice, dump it, restore it; return the round report."""
    r = lab.ssh(i, f"python3 - {mib} {dirty_mib_per_s} {criu}", input=PREDUMP_SCRIPT,
                check=False, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise AssertionError(f"pre-dump script gave no report (rc={r.returncode}):\n"
                             f"{r.stdout}\n{r.stderr}")
    rep = json.loads(lines[-1])
    if "error" in rep:
        raise AssertionError(f"{rep['error']}:\n" + "\n".join(rep.get("log", [])))
    return rep


def rounds_shrink(rep: dict) -> bool:
    """Each round moved fewer memory pages than the one before."""
    sizes = [r["pages_bytes"] for r in rep["rounds"]]
    return all(b < a for a, b in itertools.pairwise(sizes))
