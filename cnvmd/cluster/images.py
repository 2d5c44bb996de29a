"""Give a node the image a cnvm is deployed from (`deploy --node NODE|auto`).

The node that places the cnvm has the image (it resolves the name); it asks the
target which blobs it lacks (``image.want``: manifest, config, layers by digest),
sends those over bulk streams (``image.blob``: the target's image store checks each
blob against its digest, as for a teleport's layers) and has the target register
the image from them (``image.register``). Nothing is sent when the target has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from cnvmd.api import Args, Context, Router
from cnvmd.images import check_digest
from cnvmd.services import LIFECYCLE, PEERS
from proto.messages import ErrorCode, ProtoError

peer_router = Router()
CHUNK = 1 << 20
_DIGEST = r"sha256:[0-9a-f]{64}"
_IMAGE_NAME = r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}"


async def ensure_image(daemon: Any, target: str, ref: Any, ctx: Context | None = None) -> int:
    """Make sure `target` has image `ref` (as this node knows it); returns bytes sent.
    An image this node does not know is left to the target (it may have it)."""
    life = daemon.services.get(LIFECYCLE)
    if life is None or not isinstance(ref, str):
        return 0
    try:
        img = life.images.resolve(ref)
    except ProtoError:
        return 0
    blobs = [img.manifest_digest, img.config_digest, *(x.digest for x in img.layers)]
    svc = daemon.services.require(PEERS)
    want = await svc.call(target, "image.want", {"blobs": blobs}, timeout=30)
    missing = [b for b in (want or {}).get("missing", []) if b in blobs]
    sent = 0
    for i, dg in enumerate(missing):
        if ctx is not None:
            ctx.progress("image", done=i, total=len(missing), digest=dg[:19])
        p = life.images.blob_path(dg)
        stream = await svc.open_stream(target, "image.blob", {"digest": dg})
        async with stream:
            f = await asyncio.to_thread(open, p, "rb")
            try:
                while data := await asyncio.to_thread(f.read, CHUNK):
                    await stream.write(data)
                    sent += len(data)
            finally:
                f.close()
            stream.write_eof()
            ans = await stream.read_frame()
        if not isinstance(ans, dict) or not ans.get("ok"):
            raise ProtoError(ErrorCode.FAILED, f"{target} refused blob {dg[:19]}: "
                             f"{(ans or {}).get('error')}")
    name = img.names[0] if img.names else None
    await svc.call(target, "image.register",
                   {"manifest": img.manifest_digest, **({"name": name} if name else {})},
                   timeout=120)
    return sent


@peer_router.op("image.want", summary="which of these image blobs this node lacks")
async def image_want(ctx: Context, args: Args) -> dict[str, Any]:
    blobs = args.list("blobs", of=str)
    args.reject_unknown()
    if len(blobs) > 1024:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "too many blobs")
    for b in blobs:
        try:
            check_digest(b)
        except Exception:
            raise ProtoError(ErrorCode.INVALID_ARGUMENT, "bad blob digest") from None
    life = ctx.daemon.services.require(LIFECYCLE)
    return {"missing": await asyncio.to_thread(life.images.missing_blobs, blobs)}


@peer_router.op("image.register", summary="build an image from blobs already here")
async def image_register(ctx: Context, args: Args) -> dict[str, Any]:
    manifest = args.str("manifest", pattern=_DIGEST)
    name = args.str("name", None, pattern=_IMAGE_NAME)
    args.reject_unknown()
    life = ctx.daemon.services.require(LIFECYCLE)
    try:
        img = life.images.resolve(manifest)  # never: resolve takes ids, not manifests
    except ProtoError:
        img = None
    if img is None:
        img = await life.images.register(manifest, name)
    return {"id": img.id}


@peer_router.stream("image.blob")
async def image_blob(stream: Any, args: dict[str, Any]) -> None:
    """One blob from a member, verified against its digest by the store."""
    dg = args.get("digest") if isinstance(args, dict) else None
    try:
        dg = check_digest(dg)
    except Exception:
        raise ProtoError(ErrorCode.INVALID_ARGUMENT, "bad blob digest") from None
    life = stream.daemon.services.require(LIFECYCLE)
    store = life.images
    limit = int(getattr(store, "max_layer_size", 8 << 30))
    tmpdir = Path(stream.daemon.config.state_dir) / "transfer"
    await asyncio.to_thread(tmpdir.mkdir, 0o700, True, True)
    tmp = tmpdir / f"blob-{secrets.token_hex(8)}.part"
    await stream.write_frame({"ok": True})
    fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                 | os.O_NOFOLLOW, 0o600)
    try:
        n = 0
        try:
            while data := await stream.read(CHUNK):
                n += len(data)
                if n > limit:
                    raise ProtoError(ErrorCode.INVALID_ARGUMENT, "blob larger than the "
                                     "image store's layer limit")
                view = memoryview(data)
                while view:
                    k = await asyncio.to_thread(os.write, fd, view)
                    view = view[k:]
        finally:
            os.close(fd)
        await store.add_blob(tmp, dg)
        await stream.write_frame({"ok": True, "bytes": n})
    except ProtoError as exc:
        with contextlib.suppress(Exception):
            await stream.write_frame({"ok": False, "error": exc.message})
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(tmp.unlink)
