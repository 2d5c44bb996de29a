"""The network lock handed from a dump to a fresh target netns (nftables), the
inventory fields it is read from, and per-lab cgroup roots."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cnvmd import bundle, netlink
from cnvmd.migration import criuimg
from cnvmlab.lab import remove_cgroup_tree
from proto.messages import ProtoError
from tests.protobufenc import varint

pytestmark = pytest.mark.unit

RUN = "8e3148f5-3580-4437-809e-668f8c4255fc"


def inventory(tmp: Path, fields: bytes, magic: bytes | None = None) -> Path:
    head = magic if magic is not None else struct.pack("<II", criuimg.IMG_COMMON_MAGIC,
                                                       criuimg.INVENTORY_MAGIC)
    (tmp / "inventory.img").write_bytes(head + struct.pack("<I", len(fields)) + fields)
    return tmp


def test_table_name_is_cut_like_criu_cuts_it() -> None:
    # snprintf(table, 32, "inet CRIU-%s", run_id): 31 characters survive
    assert netlink.nft_lock_table(RUN) == "CRIU-8e3148f5-3580-4437-80"
    rules = netlink.nft_lock_rules(RUN)
    assert "table inet CRIU-8e3148f5-3580-4437-80 {" in rules
    assert rules.count("policy drop; meta mark 0xc114 accept;") == 2
    for bad in ("x; flush ruleset", RUN.upper(), RUN + "0", ""):
        with pytest.raises(ValueError):
            netlink.nft_lock_rules(bad)


def test_inventory_lock_method_and_run_id(tmp_path: Path) -> None:
    run = RUN.encode()
    body = varint(1 << 3) + varint(1) + varint(11 << 3) + varint(1) + \
        varint(13 << 3 | 2) + varint(len(run)) + run
    assert criuimg.network_lock(inventory(tmp_path, body)) == (criuimg.LOCK_NFTABLES, RUN)
    # an old image (no method): iptables, as CRIU falls back
    assert criuimg.network_lock(inventory(tmp_path, varint(1 << 3) + varint(1))) == \
        (criuimg.LOCK_IPTABLES, None)
    # a run id that could say anything is dropped, never passed on
    evil = b"x; flush ruleset"
    body = varint(11 << 3) + varint(1) + varint(13 << 3 | 2) + varint(len(evil)) + evil
    assert criuimg.network_lock(inventory(tmp_path, body)) == (criuimg.LOCK_NFTABLES, None)
    with pytest.raises(ValueError):
        criuimg.network_lock(inventory(tmp_path, body, magic=b"\0" * 8))
    (tmp_path / "inventory.img").unlink()
    (tmp_path / "inventory.img").symlink_to("/etc/passwd")
    with pytest.raises(OSError):
        criuimg.network_lock(tmp_path)


def test_cgroup_root() -> None:
    assert bundle.cgroups_path("node1", "web") == "/cnvm/node1/web"
    assert bundle.cgroups_path("node1", "web", "/cnvm-lt") == "/cnvm-lt/node1/web"
    for bad in ("cnvm", "/cnvm/../x", "/", "/a b", "/cnvm/.x"):
        with pytest.raises(ProtoError):
            bundle.cgroups_path("node1", "web", bad)


def test_remove_cgroup_tree(tmp_path: Path) -> None:
    for ctrl in ("freezer", "memory"):
        (tmp_path / ctrl / "cnvm-lab" / "node1" / "web").mkdir(parents=True)
        (tmp_path / ctrl / "cnvm-other" / "node1").mkdir(parents=True)
    assert remove_cgroup_tree("cnvm-lab", tmp_path) == []
    assert not any(tmp_path.glob("*/cnvm-lab"))
    assert len(list(tmp_path.glob("*/cnvm-other/node1"))) == 2
