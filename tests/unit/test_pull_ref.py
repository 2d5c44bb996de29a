"""`images pull` references (proto.imageref) and the daemon's checks of its args."""

from __future__ import annotations

import base64
import json

import pytest

from cnvmd.images import check_image_name
from cnvmd.migration.wire import IMAGE_NAME_RE
from cnvmd.pull import auth_json, parse_ref
from proto import imageref
from proto.imageref import RefError, looks_like_registry_ref, parse
from proto.messages import ErrorCode, ProtoError


@pytest.mark.parametrize(("ref", "remote", "name"), [
    ("busybox", "busybox:latest", "busybox:latest"),
    ("busybox:1.36", "busybox:1.36", "busybox:1.36"),
    ("docker://busybox", "busybox:latest", "busybox:latest"),
    ("library/busybox:latest", "library/busybox:latest", "library/busybox:latest"),
    ("127.0.0.1:5000/test/busybox:1", "127.0.0.1:5000/test/busybox:1",
     "127.0.0.1:5000/test/busybox:1"),
    ("docker://localhost/a/b-c__d.e", "localhost/a/b-c__d.e:latest", "localhost/a/b-c__d.e:latest"),
    ("reg.example:443/x@sha256:" + "a" * 64, "reg.example:443/x@sha256:" + "a" * 64,
     "reg.example:443/x:sha256-aaaaaaaaaaaa"),
    ("x:t@sha256:" + "b" * 64, "x@sha256:" + "b" * 64, "x:t"),
])
def test_registry_refs(ref: str, remote: str, name: str) -> None:
    r = parse(ref)
    assert r.transport == "docker"
    assert r.remote == remote
    assert r.skopeo == f"docker://{remote}"
    assert r.default_name() == name
    assert check_image_name(name) == name  # the store takes the default name
    assert IMAGE_NAME_RE.fullmatch(name)  # and a teleport carries it


def test_registry_split() -> None:
    r = parse("127.0.0.1:5000/test/busybox:1")
    assert (r.registry, r.repository, r.tag) == ("127.0.0.1:5000", "test/busybox", "1")
    assert parse("library/busybox").registry == ""  # no '.', ':' or localhost: a path


@pytest.mark.parametrize("bad", [
    "", "Busybox", "-x", "--src-creds=a:b", "busybox\n", "busybox:", "a b", "x:-tag",
    "x@sha512:" + "a" * 128, "x@sha256:abc", "https://reg/x", "oci:/tmp/x", "dir:/tmp/x",
    "docker:///x", "a//b", "a/", "/a", "REG.Example/x", "x" * 600, "reg:99999/x",
    "busybox:latest\0", "x" * 300 + "/y",
])
def test_bad_refs(bad: str) -> None:
    with pytest.raises(RefError):
        parse(bad)
    with pytest.raises(ProtoError) as e:
        parse_ref(bad)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT


def test_archives() -> None:
    r = parse("oci-archive:/tmp/x.tar")
    assert (r.transport, r.path, r.ref) == ("oci-archive", "/tmp/x.tar", None)
    r = parse("docker-archive:./b.tar:busybox:latest")
    assert (r.path, r.ref) == ("./b.tar", "busybox:latest")
    assert r.skopeo == "docker-archive:./b.tar:busybox:latest"
    with pytest.raises(RefError):
        parse("docker-archive:x.tar:notag")
    with pytest.raises(RefError):
        parse("oci-archive:")
    # the daemon never takes an archive (a path) for a pull
    with pytest.raises(ProtoError) as e:
        parse_ref("oci-archive:/etc/shadow")
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    assert "client" in e.value.message


def test_import_mistakes() -> None:
    for s in ("docker.io/library/busybox:latest", "busybox:latest", "docker://busybox",
              "localhost/x", "127.0.0.1:5000/a"):
        assert looks_like_registry_ref(s), s
    for s in ("busybox", "./layout", "/tmp/busybox.tar", "out/busybox-oci"):
        assert not looks_like_registry_ref(s), s


def test_auth_file() -> None:
    r = parse("127.0.0.1:5000/test/busybox:1")
    assert auth_json(r, None, None) is None
    doc = json.loads(auth_json(r, "alice:s3cr:et", None) or b"")
    assert base64.b64decode(doc["auths"]["127.0.0.1:5000"]["auth"]) == b"alice:s3cr:et"
    theirs = json.dumps({"auths": {"other.example": {"auth": "eDp5"}}}).encode()
    doc = json.loads(auth_json(r, "bob:pw", theirs) or b"")
    assert set(doc["auths"]) == {"other.example", "127.0.0.1:5000"}
    for creds in ("nopassword", ":pw", "a b:pw"):
        with pytest.raises(ProtoError) as e:
            auth_json(r, creds, None)
        assert e.value.code == ErrorCode.INVALID_ARGUMENT
    for bad in (b"[]", b"{", b'{"auths": 3}', b"[" * 5000):
        with pytest.raises(ProtoError) as e:
            auth_json(r, None, bad)
        assert e.value.code == ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ProtoError):  # creds need a named registry (no default host here)
        auth_json(parse("busybox"), "a:b", None)


def test_max_ref() -> None:
    assert imageref.MAX_REF >= 255


def test_store_names_with_a_registry_port() -> None:
    for ok in ("127.0.0.1:5000/test/busybox", "localhost:5000/x:1", "reg.example:443/a/b:c"):
        assert check_image_name(ok) == ok
    for bad in ("a:b/c", ":5000/x", "127.0.0.1:5000/", "127.0.0.1:5000/x\n",
                "127.0.0.1:/x", "Reg:5000/x"):
        with pytest.raises(ProtoError):
            check_image_name(bad)
