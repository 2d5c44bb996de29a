"""Fixtures for the VM lab lane (``-m vmlab``).

``vmlab_image`` (session) builds or reuses the cached guest image; ``vmlab_boot`` is
a factory other modules (the teleport lane) use to get their own lab, torn down at
the end of the session even if a test fails. Everything skips with a reason when
this machine cannot run the lane (no qemu, not root, too little memory, or
CNVM_VMLAB=0).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from . import image as imagemod
from .lab import VMLab, meminfo_available_mib

MARGIN_MIB = 1024  # left for the harness and the other users of the machine


def vmlab_skip_reason(n: int = 2, mem_mib: int = 1024) -> str | None:
    """Why this machine cannot run a lab of n guests, or None if it can."""
    if os.environ.get("CNVM_VMLAB", "1") == "0":
        return "CNVM_VMLAB=0"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot)"
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"),
                      ("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"),
                      ("ssh", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt-get install {pkg}, or scripts/install-deps)"
    need = n * mem_mib + MARGIN_MIB
    have = meminfo_available_mib()
    if have < need:
        return f"memory short: {have} MiB available, {need} MiB needed for {n} guests"
    return None


@pytest.fixture(scope="session")
def vmlab_image() -> imagemod.Image:
    reason = vmlab_skip_reason()
    if reason:
        pytest.skip(f"vmlab: {reason}")
    return imagemod.build()


@pytest.fixture(scope="session")
def vmlab_boot(vmlab_image: imagemod.Image) -> Iterator[Callable[..., VMLab]]:
    """Factory: ``lab = vmlab_boot(n=3, mem_mib=1024)``; booted labs are torn down
    at session end (a module may also call ``lab.down()`` itself, it is idempotent)."""
    labs: list[VMLab] = []

    def boot(n: int = 2, mem_mib: int = 1024, **kw) -> VMLab:
        reason = vmlab_skip_reason(n, mem_mib)
        if reason:
            pytest.skip(f"vmlab: {reason}")
        lab = VMLab(n=n, mem_mib=mem_mib, image=vmlab_image, **kw)
        labs.append(lab)
        return lab.up()

    yield boot
    errors = []
    for lab in labs:
        try:
            lab.down()
        except Exception as exc:  # report every leak, not just the first
            errors.append(str(exc))
    if errors:
        raise RuntimeError("vmlab teardown: " + "; ".join(errors))
