"""Image references for `images pull`: parsed and validated alike by cnvmctl and cnvmd.

Accepted (skopeo transport syntax, the transports cnvm supports)::

    docker://[REGISTRY[:PORT]/]REPO[:TAG][@sha256:HEX]   a registry image
    [REGISTRY[:PORT]/]REPO[:TAG][@sha256:HEX]            the same (docker:// implied)
    oci-archive:PATH[:REF]                               a client-side OCI archive
    docker-archive:PATH[:REPO:TAG]                       a client-side `docker save` tar

The registry grammar is the one of docker/distribution's reference package (path
components of lowercase letters and digits joined by one '.', '_', '__' or dashes;
the first component is a registry when it holds a '.' or ':' or is ``localhost``),
matched whole (``fullmatch``: a trailing newline or an option-like ``-x`` never
passes). A missing tag means ``latest``, as docker and skopeo read it. Only sha256
digests. Archive paths are the client's: the daemon never takes them (see
cnvmctl/commands/pull.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REF = 512
"""Longest reference accepted (docker's own limit on the name part is 255)."""
MAX_NAME = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
REGISTRY_REF = re.compile(
    rf"(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?")
"""A docker reference; `domain` is only a registry when `_is_registry` says so."""
_ARCHIVE = re.compile(r"(?P<transport>oci-archive|docker-archive):(?P<rest>[^\0\n]+)")
TRANSPORTS = ("docker", "oci-archive", "docker-archive")


class RefError(ValueError):
    """Not a reference cnvm can pull (message is one line for the user)."""


def _is_registry(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost" or part != part.lower()


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. For ``docker``: registry ("" = skopeo's default), repository,
    tag, digest. For archives: ``path`` (client side) and the optional ``ref`` inside."""

    transport: str
    registry: str = ""
    repository: str = ""
    tag: str | None = None
    digest: str | None = None
    path: str = ""
    ref: str | None = None

    @property
    def remote(self) -> str:
        """The registry reference without transport: ``NAME@DIGEST`` when pinned (skopeo
        takes no tag and digest together; the digest decides), else ``NAME:TAG`` with
        the tag defaulted to ``latest``."""
        name = f"{self.registry}/{self.repository}" if self.registry else self.repository
        if self.digest:
            return f"{name}@{self.digest}"
        return f"{name}:{self.tag or 'latest'}"

    @property
    def skopeo(self) -> str:
        """What skopeo reads as the source."""
        if self.transport == "docker":
            return f"docker://{self.remote}"
        return f"{self.transport}:{self.path}" + (f":{self.ref}" if self.ref else "")

    def default_name(self) -> str:
        """The name the pulled image gets in the store: docker's, ``[REGISTRY/]REPO:TAG``
        (a digest-only reference: ``REPO:sha256-<12 hex>``)."""
        name = f"{self.registry}/{self.repository}" if self.registry else self.repository
        if self.tag is None and self.digest:
            return f"{name}:sha256-{self.digest.removeprefix('sha256:')[:12]}"
        return f"{name}:{self.tag or 'latest'}"


def parse(ref: object) -> ImageRef:
    """Parse and validate a reference; RefError with a one-line reason otherwise."""
    if not isinstance(ref, str) or not ref:
        raise RefError("an image reference is required")
    if len(ref) > MAX_REF:
        raise RefError(f"image reference longer than {MAX_REF} characters")
    m = _ARCHIVE.fullmatch(ref)
    if m is not None:
        return _archive(m.group("transport"), m.group("rest"))
    body = ref.removeprefix("docker://")
    if body.startswith("//") or "://" in body:
        raise RefError(f"unsupported transport in {ref[:80]!r}: use docker://, "
                       "oci-archive: or docker-archive:")
    m = REGISTRY_REF.fullmatch(body)
    if m is None:
        raise RefError(f"malformed image reference {body[:80]!r}: expected "
                       "[REGISTRY[:PORT]/]REPO[:TAG][@sha256:DIGEST], lowercase repository")
    domain, path = m.group("domain"), m.group("path")
    if domain is not None and not _is_registry(domain):
        path, domain = f"{domain}/{path}", None  # e.g. library/busybox: no registry
    if domain is not None and domain != domain.lower():
        raise RefError(f"registry {domain!r} must be lowercase")
    if len(path) + len(domain or "") + 1 > MAX_NAME:
        raise RefError(f"repository name longer than {MAX_NAME} characters")
    if domain is not None and ":" in domain and not 1 <= int(domain.rsplit(":", 1)[1]) <= 65535:
        raise RefError(f"bad port in registry {domain!r}")
    return ImageRef("docker", registry=domain or "", repository=path, tag=m.group("tag"),
                    digest=m.group("digest"))


def _archive(transport: str, rest: str) -> ImageRef:
    """``PATH[:REF]``: the path is everything up to the first ':' (paths with ':' are
    not supported, as in skopeo); for docker-archive REF is ``REPO:TAG``."""
    path, _, inner = rest.partition(":")
    if not path:
        raise RefError(f"{transport}: needs a file path")
    if inner:
        if transport == "docker-archive":
            m = REGISTRY_REF.fullmatch(inner)
            if m is None or m.group("digest") or m.group("tag") is None:
                raise RefError(f"docker-archive: {inner[:80]!r} is not REPO:TAG")
        elif not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}", inner):
            raise RefError(f"oci-archive: bad reference name {inner[:80]!r}")
    return ImageRef(transport, path=path, ref=inner or None)


def looks_like_registry_ref(s: str) -> bool:
    """Is a string given as a *path* really a registry reference (``images import
    docker.io/library/busybox:latest``)? True for ``docker://…`` and for a reference
    whose first component is a registry or that has a tag or digest."""
    if s.startswith("docker://"):
        return True
    m = REGISTRY_REF.fullmatch(s)
    if m is None:
        return False
    return bool(m.group("tag") or m.group("digest")
                or (m.group("domain") and _is_registry(m.group("domain"))))
