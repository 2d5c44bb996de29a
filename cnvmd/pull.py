"""`images.pull`: copy an image from a registry with skopeo, then import it.

The daemon runs ``skopeo copy docker://REF oci:<dir>:pulled`` into a private staging
directory under the image store (``<images>/tmp/pull-*``, 0700, cleared at daemon
start), then hands that OCI layout to `ImageStore.import_path` — the same hardened
path as ``images import`` (files opened beneath the layout without following
symlinks, bounded JSON, every blob verified by digest, layers cut off at their size
limits), so a hostile registry gets no more than a hostile archive.

What the daemon takes from the API: a registry reference only (validated by
`proto.imageref`, full match; anything else is ``invalid_argument``), never a path.
``oci-archive:``/``docker-archive:`` sources are the client's files: cnvmctl sends
them through ``images.import``, whose importer reads both formats natively.

skopeo runs as an asyncio subprocess in its own process group: its output lines are
streamed to the caller as ``log`` events, the staging directory's growth as
``progress`` (bytes), and it is killed when the request is cancelled, when
``timeout`` passes, or when the download exceeds ``image_pull_max_size`` (config).

Credentials never reach a command line or a log: ``creds`` (USER:PASSWORD) and the
``authfile`` contents the client sends are written to a 0600 auth file in the
staging directory, passed as ``--src-authfile`` and removed with it. skopeo 1.9
reads credentials from no other private channel (``--src-creds`` would show them in
``ps``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnvmd import proc
from cnvmd.api import Args, Context, Router
from cnvmd.images import check_image_name
from cnvmd.services import LIFECYCLE, Plugin
from proto import imageref
from proto.framing import too_deep
from proto.messages import EVT_LOG, ErrorCode, ProtoError

log = logging.getLogger("cnvmd.pull")
router = Router()

MAX_AUTHFILE = 1 << 20
"""Largest auth file a client may send (a docker/containers auth.json)."""
DEFAULT_TIMEOUT = 1800.0
POLL = 0.5
"""Seconds between checks of the staging directory (progress, size limit)."""
OCI_TAG = "pulled"
MAX_CONCURRENT = 4
"""Pulls running at once on a node; more wait for a slot (each is a skopeo process
and a staging copy of an image)."""
_slots = asyncio.Semaphore(MAX_CONCURRENT)  # one daemon per process
_LOGRUS = re.compile(r'level=\w+ msg="((?:[^"\\]|\\.)*)"')
_CREDS = re.compile(r"[^:\s\0]{1,256}:[^\0\n]{0,4096}")


def _bad(msg: str) -> ProtoError:
    return ProtoError(ErrorCode.INVALID_ARGUMENT, msg)


def parse_ref(ref: str) -> imageref.ImageRef:
    """A registry reference for the daemon; archives are refused with a hint."""
    try:
        r = imageref.parse(ref)
    except imageref.RefError as exc:
        raise _bad(str(exc)) from None
    if r.transport != "docker":
        raise _bad(f"{r.transport}: names a file of the client; cnvmctl imports it "
                   "(`cnvmctl images pull` or `images import`), the daemon takes registry "
                   "references only")
    return r


def auth_json(ref: imageref.ImageRef, creds: str | None, auth: bytes | None) -> bytes | None:
    """The auth file skopeo gets: the client's auth file, with `creds` for the reference's
    registry on top. None when there is neither."""
    if creds is None and auth is None:
        return None
    doc: dict[str, Any] = {"auths": {}}
    if auth is not None:
        try:
            doc = json.loads(auth)
        except (ValueError, RecursionError):
            raise _bad("authfile is not valid JSON") from None
        if not isinstance(doc, dict) or too_deep(doc, 8) or not isinstance(
                doc.get("auths", {}), dict):
            raise _bad("authfile must be a JSON object with an \"auths\" map")
        doc.setdefault("auths", {})
    if creds is not None:
        if not _CREDS.fullmatch(creds):
            raise _bad("creds must be USERNAME:PASSWORD")
        if not ref.registry:
            raise _bad("creds need a reference that names its registry "
                       "(REGISTRY/REPO[:TAG])")
        doc["auths"][ref.registry] = {"auth": base64.b64encode(creds.encode()).decode()}
    return json.dumps(doc).encode()


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _classify(stderr: str) -> ErrorCode:
    s = stderr.lower()
    if "manifest unknown" in s or "name unknown" in s or "not found" in s:
        return ErrorCode.NOT_FOUND
    if "unauthorized" in s or "authentication required" in s or "denied" in s:
        return ErrorCode.PERMISSION_DENIED
    if ("connection refused" in s or "no such host" in s or "timeout" in s
            or "http response to https client" in s or "certificate" in s):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.FAILED


async def run_skopeo(argv: list[str], *, staging: Path, timeout: float, max_bytes: int,
                     on_line: Callable[[str], None], on_bytes: Callable[[int], None]) -> None:
    """Run skopeo to completion: lines to `on_line`, staging size to `on_bytes`; killed
    (whole group) on cancel, timeout or once `staging` grows past `max_bytes`."""
    try:
        p = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise ProtoError(ErrorCode.UNAVAILABLE, f"cannot run skopeo: {exc.strerror}") from None
    err: list[str] = []

    async def pump(stream: asyncio.StreamReader | None, sink: Callable[[str], None]) -> None:
        assert stream is not None
        while raw := await stream.readline():
            line = raw.decode(errors="replace").rstrip()[:500]
            if line:
                sink(line)

    def keep_err(line: str) -> None:
        m = _LOGRUS.search(line)  # time="…" level=fatal msg="…": keep the message
        err.append(m.group(1).replace('\\"', '"') if m else line)
        del err[:-20]

    readers = [asyncio.ensure_future(pump(p.stdout, on_line)),
               asyncio.ensure_future(pump(p.stderr, keep_err))]
    waiter = asyncio.ensure_future(p.wait())
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=POLL)
            n = await asyncio.to_thread(_tree_size, staging)
            on_bytes(n)
            if n > max_bytes:
                raise _bad(f"image is larger than {max_bytes} bytes (image_pull_max_size)")
            if loop.time() > end and not waiter.done():
                raise ProtoError(ErrorCode.FAILED, f"pull timed out after {timeout:g}s")
        await asyncio.wait(readers, timeout=5)
    finally:
        if p.returncode is None:
            proc.kill_group(p.pid)
            await asyncio.shield(waiter)
        for t in readers:
            t.cancel()
    if p.returncode != 0:
        tail = " | ".join(err[-3:]) or f"exit status {p.returncode}"
        raise ProtoError(_classify(" ".join(err)), f"skopeo copy failed: {tail}")


async def pull(ctx: Context, ref: imageref.ImageRef, *, name: str | None, tls_verify: bool,
               auth: bytes | None, timeout: float) -> dict[str, Any]:
    """skopeo → staging OCI layout → the image store's import."""
    life = ctx.daemon.services.require(LIFECYCLE)
    store = life.images
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise ProtoError(ErrorCode.UNAVAILABLE, "skopeo is not installed on this node "
                         "(scripts/install-deps installs it)")
    staging = store.tmp / f"pull-{uuid.uuid4().hex}"
    await asyncio.to_thread(staging.mkdir, 0o700)
    max_bytes = int(getattr(ctx.daemon.config, "image_pull_max_size", 16 << 30))
    t0 = time.monotonic()
    try:
        layout = staging / "oci"
        argv = [skopeo, "copy", f"--src-tls-verify={'true' if tls_verify else 'false'}",
                "--retry-times", "2"]
        if auth is not None:
            authfile = staging / "auth.json"
            await asyncio.to_thread(_write_private, authfile, auth)
            argv += ["--src-authfile", str(authfile)]
        argv += ["--", ref.skopeo, f"oci:{layout}:{OCI_TAG}"]
        ctx.progress("fetch", message="skopeo copy")
        last = [0.0]

        def on_bytes(n: int) -> None:
            now = time.monotonic()
            if n and now - last[0] >= 1.0:
                last[0] = now
                ctx.progress("download", done=n, unit="bytes")

        await run_skopeo(argv, staging=staging, timeout=timeout, max_bytes=max_bytes,
                         on_line=lambda s: ctx.emit(EVT_LOG, {"message": s}),
                         on_bytes=on_bytes)
        pulled = time.monotonic() - t0
        ctx.progress("import")
        img = await store.import_path(f"{layout}:{OCI_TAG}", name or ref.default_name(),
                                      kind="oci")
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
    log.info("pulled image", extra={"image": ref.remote, "id": img.short_id,
                                    "seconds": round(time.monotonic() - t0, 3)})
    return {**img.summary(), "full_id": img.id, "ref": ref.remote,
            "pull_seconds": round(pulled, 3), "seconds": round(time.monotonic() - t0, 3)}


@router.op("images.pull")
async def images_pull(ctx: Context, args: Args) -> dict[str, Any]:
    """Pull an image from a registry (skopeo) into the node's image store."""
    ref = parse_ref(args.str("ref", max_len=imageref.MAX_REF))
    name = args.str("name", None, max_len=300)
    tls_verify = args.bool("tls_verify", True)
    creds = args.str("creds", None, max_len=4400)
    authfile = args.bytes("authfile", None, max_len=MAX_AUTHFILE)
    timeout = args.float("timeout", DEFAULT_TIMEOUT, min=1, max=86400)
    args.reject_unknown()
    if name is not None:
        check_image_name(name)
    auth = auth_json(ref, creds, authfile)
    if _slots.locked():
        ctx.progress("queued", message=f"{MAX_CONCURRENT} pulls are running; waiting")
    async with _slots:
        return await pull(ctx, ref, name=name, tls_verify=tls_verify, auth=auth,
                          timeout=timeout)


plugin = Plugin("pull", requires=("lifecycle",), router=router)
