"""Users' images on a cluster: pushed to the cluster's registry, pinned by digest, recorded.

On one host a user's image is a local tag `ds01-<user>/<name>:latest`, and only the user can put
a tag there (the socket proxy's namespace rule). On a Docker Swarm the server may run on any
node, so `image-create` builds on the manager (the host's one `BuildManager`, as on one host)
and then *publishes* the image: pushes it to the cluster's registry as
`<registry>/ds01-<user>/<name>:latest` and records the digest the registry answered in an
`ImageRecord`. Nodes pull what the record names, `<registry>/ds01-<user>/<name>@sha256:...`.

Why a record and the digest, not the tag: the registry is reachable on the cluster's private
network (an insecure registry has no accounts), so a tag there proves nothing: anyone who
reaches it can push over `ds01-bob/x:latest`. A digest names content (the engine checks what
it pulls against it), and the record that ties the digest to its owner is signed with the
deployment's key (`Provenance.record_signature`, kind "image") and kept as a Swarm *config*
object on the manager (cluster state, as services are: a hub restarted on another manager
finds it; users never reach the manager's API). Image labels play no part: they are user data.

Who may run a recorded image: its owner, and hub admins (`resolve_user_image`); anybody else
is told there is no such image of theirs, the same answer as for a missing one.
`delete_published` removes the tag from the registry too (registry API `DELETE` of the
manifest by digest; the registry must allow deletes) unless a server still uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import docker.errors

from ds01hub import labels
from ds01hub.actions import images
from ds01hub.provenance import Provenance

__all__ = [
    "ImageRecord",
    "Registry",
    "delete_published",
    "find_record",
    "publish",
    "publisher",
    "records",
    "resolve_user_image",
]

#: The kind of record signature (`Provenance.record_signature`) an image record carries.
RECORD_KIND = "image"
RECORD_USER = "ds01.image.user"
RECORD_NAME = "ds01.image.name"
RECORD_REFERENCE = "ds01.image.reference"
RECORD_SIGNATURE = "ds01.image.signature"
#: `host[:port]` as image references name a registry (a dot, a port or localhost tells it
#: from a repository path's first component)
REGISTRY_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*(?::[0-9]{1,5})?$"
)
#: One path component of a repository (the distribution project's reference grammar).
COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
#: The distribution project's limit on a repository name.
MAX_REPOSITORY = 255
#: What a manifest DELETE asks for: the registry finds the manifest by digest either way, but
#: answers 404 for a schema it is not asked for.
MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


@dataclass(frozen=True)
class Registry:
    """The cluster's registry: `host` as nodes name it in image references
    (`registry.lab:5000`), `url` where the hub reaches its HTTP API (default `http://<host>`)."""

    host: str
    url: str

    @classmethod
    def configured(cls, host: str, url: str = "", setting: str = "registry") -> Registry | None:
        """The registry of these settings, None when `host` is empty (one host: no registry);
        ImageError naming `setting` for a host or URL that cannot be used."""
        if not host:
            return None
        if not REGISTRY_RE.match(host):
            raise images.ImageError(
                f"{setting} {host[:80]!r} is not a registry address",
                hint="give host[:port] as nodes reach it, e.g. registry.lab:5000",
            )
        url = (url or f"http://{host}").rstrip("/")
        if not re.match(r"^https?://[^\s/?#]+$", url):
            raise images.ImageError(
                f"{setting}_url {url[:80]!r} must be http(s)://host[:port] (nothing after it)"
            )
        return cls(host, url)

    def repository(self, user: str, name: str) -> str:
        """`<host>/ds01-<user>/<name>`; ImageError for a name Docker cannot take."""
        path = f"{images.image_repository(user)}/{images.validate_image_name(name)}"
        if not all(COMPONENT_RE.match(part) for part in path.split("/")):
            raise images.ImageError(f"{path[:80]!r} cannot be a repository in a registry")
        if len(path) > MAX_REPOSITORY - len(self.host) - 1:
            raise images.ImageError(
                f"the registry repository for user {user[:40]!r}'s image {name!r} would be "
                f"longer than {MAX_REPOSITORY} characters",
                hint="use a shorter image name",
            )
        return f"{self.host}/{path}"


@dataclass(frozen=True)
class ImageRecord:
    """A published image as ds01hub recorded it: whose, which name, the pinned reference."""

    user: str
    name: str
    reference: str  # <registry>/<repository>@sha256:...
    created: str
    config_id: str

    @property
    def repository(self) -> str:
        return self.reference.split("@", 1)[0]

    @property
    def path(self) -> str:
        """The repository without its registry: `ds01-<user>/<name>`."""
        return self.repository.split("/", 1)[1]

    @property
    def digest(self) -> str:
        return self.reference.split("@", 1)[1]


def _fields(user: str, name: str, reference: str) -> tuple[str, str, str]:
    return (user, name, reference)


def record_labels(trust: Provenance, user: str, name: str, reference: str) -> dict[str, str]:
    """The signed labels of an image record."""
    return {
        labels.DEPLOYMENT: trust.deployment,
        RECORD_USER: user,
        RECORD_NAME: name,
        RECORD_REFERENCE: reference,
        RECORD_SIGNATURE: trust.record_signature(RECORD_KIND, _fields(user, name, reference)),
    }


def parse_record(trust: Provenance, config: Mapping[str, Any]) -> ImageRecord | None:
    """The record a Swarm config holds, or None unless this deployment signed it."""
    spec = config.get("Spec") or {}
    found = spec.get("Labels") or {}
    user, name, reference = (
        str(found.get(k) or "") for k in (RECORD_USER, RECORD_NAME, RECORD_REFERENCE)
    )
    if found.get(labels.DEPLOYMENT) != trust.deployment or not (user and name and reference):
        return None
    if not trust.verify_record(
        RECORD_KIND, _fields(user, name, reference), found.get(RECORD_SIGNATURE)
    ):
        return None
    if "@" not in reference or not DIGEST_RE.match(reference.split("@", 1)[1]):
        return None
    return ImageRecord(user, name, reference, str(config.get("CreatedAt") or ""), str(config["ID"]))


def records(client: Any, trust: Provenance, user: str | None = None) -> list[ImageRecord]:
    """This deployment's verified image records (of `user`), oldest first."""
    wanted = [f"{labels.DEPLOYMENT}={trust.deployment}"]
    if user is not None:
        wanted.append(f"{RECORD_USER}={user}")
    found = (parse_record(trust, c) for c in client.api.configs(filters={"label": wanted}))
    return sorted((r for r in found if r is not None), key=lambda r: r.created)


def find_record(client: Any, trust: Provenance, user: str, name: str) -> ImageRecord | None:
    """The newest record of `user`'s image `name`."""
    mine = [r for r in records(client, trust, user) if r.user == user and r.name == name]
    return mine[-1] if mine else None


def _save_record(client: Any, trust: Provenance, user: str, name: str, reference: str) -> None:
    digest = hashlib.sha256(f"{trust.deployment}\0{user}\0{name}\0{reference}".encode()).hexdigest()
    try:
        client.api.create_config(
            f"ds01-image-{digest[:40]}",
            reference.encode(),
            labels=record_labels(trust, user, name, reference),
        )
    except docker.errors.APIError as error:
        if error.status_code != 409:  # 409: the same record exists (the same image re-pushed)
            raise images.ImageError(
                f"cannot record the image {reference} on the swarm manager: "
                f"{error.explanation or error}",
                hint="image builds must run on a swarm manager when a registry is configured",
            ) from None


# -- publish: push and record ------------------------------------------------------------


def publish(client: Any, registry: Registry, trust: Provenance, spec: images.ImageSpec) -> str:
    """Push the built `spec.tag` to the registry and record it; the pinned reference. Older
    records of the image go, and their manifests too unless a server uses them. Blocking."""
    repository = registry.repository(spec.user, spec.name)
    try:
        client.api.tag(spec.tag, repository, "latest")
        digest = ""
        for line in client.api.push(repository, "latest", stream=True, decode=True):
            if "error" in line:
                raise images.ImageError(
                    f"pushing {repository}:latest failed: {images.plain_text(str(line['error']))}",
                    hint=f"check that the registry {registry.host} runs and that this engine "
                    "trusts it (insecure-registries or its certificate)",
                )
            aux = line.get("aux")
            if isinstance(aux, Mapping) and DIGEST_RE.match(str(aux.get("Digest", ""))):
                digest = str(aux["Digest"])
    except docker.errors.APIError as error:
        raise images.ImageError(
            f"pushing {repository} failed: {error.explanation or error}"
        ) from None
    finally:
        with contextlib.suppress(docker.errors.APIError):  # the local name stays ds01-<user>/...
            client.api.remove_image(f"{repository}:latest", noprune=True)
    if not digest:
        raise images.ImageError(f"the registry did not answer a digest for {repository}")
    reference = f"{repository}@{digest}"
    older = [r for r in records(client, trust, spec.user) if r.name == spec.name]
    _save_record(client, trust, spec.user, spec.name, reference)
    used = _used_images(client)
    for record in older:
        if record.reference == reference:
            continue
        client.api.remove_config(record.config_id)
        if record.reference not in used and record.digest != digest:
            _delete_manifest(registry, record)
    return reference


def publisher(
    client: Any, registry: Registry, trust: Provenance
) -> Callable[[images.ImageSpec, images.BuildEvent], Iterator[images.BuildEvent]]:
    """What follows a successful build in a cluster (`builds.docker_builder`): the push, told
    as log lines, then the build's `done` (or an `error`)."""

    def run(spec: images.ImageSpec, done: images.BuildEvent) -> Iterator[images.BuildEvent]:
        yield images.BuildEvent("log", f"pushing {spec.tag} to the registry {registry.host}", 1.0)
        try:
            reference = publish(client, registry, trust, spec)
        except images.ImageError as error:
            yield images.BuildEvent("error", str(error), 1.0)
            return
        yield images.BuildEvent("log", f"pushed as {reference}", 1.0)
        yield done

    return run


# -- run: which reference a server of `user` may use ---------------------------------------


def user_image_path(requested: str) -> str | None:
    """`ds01-<x>/<name>` when `requested` names a user's image (with or without a registry,
    `:latest` or a digest), else None. ImageError for a user image under another tag."""
    reference = requested.strip()
    parts = reference.split("/")
    if len(parts) == 3 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    if len(parts) != 2 or not parts[0].startswith("ds01-"):
        return None
    name, _, digest = parts[1].partition("@")
    name, _, tag = name.partition(":")
    if tag not in ("", "latest") or (digest and not DIGEST_RE.match(digest)):
        raise images.ImageError(
            f"image {requested[:120]!r}: users' images have only the tag latest",
            hint=f"use {parts[0]}/{name}",
        )
    return f"{parts[0]}/{name}"


def resolve_user_image(
    found: list[ImageRecord], requested: str, user: str, *, admin: bool = False
) -> str | None:
    """The pinned reference a server of `user` runs for `requested`, from the verified
    `found` records; None when `requested` is no user's image (the caller's own rules for
    other images apply). ImageNotFoundError for another user's image (unless `admin`) or
    one that was never published, in the same words (which images others have is theirs)."""
    path = user_image_path(requested)
    if path is None:
        return None
    digest = requested.partition("@")[2]
    candidates = [r for r in found if r.path == path and (admin or r.user == user)]
    chosen = next((r for r in reversed(candidates) if not digest or r.digest == digest), None)
    if chosen is None:
        raise images.ImageNotFoundError(
            f"you have no image {path!r} on the cluster's registry",
            hint="image-list shows yours; image-create builds and publishes one",
        )
    return chosen.reference


# -- delete ------------------------------------------------------------------------------


def _used_images(client: Any) -> set[str]:
    """The images of every service (a stopped server's too: it starts again from it)."""
    return {
        str(((s.get("Spec") or {}).get("TaskTemplate") or {}).get("ContainerSpec", {}).get("Image"))
        for s in client.api.services()
    }


def _registry_call(registry: Registry, method: str, path: str, digest: str) -> str | None:
    """One registry API v2 call on a manifest; the answer's digest, None when it is gone."""
    url = f"{registry.url}/v2/{path}/manifests/{digest}"
    request = urllib.request.Request(url, method=method, headers={"Accept": MANIFEST_TYPES})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (admin's URL)
            return str(answer.headers.get("Docker-Content-Digest") or "")
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        hint = (
            "the registry refuses deletes: set storage.delete.enabled: true in its config"
            if error.code == 405
            else "see the registry's log"
        )
        raise images.ImageError(
            f"the registry answered {error.code} to {method} {path}@{digest}", hint=hint
        ) from None
    except OSError as error:
        raise images.ImageError(
            f"cannot reach the registry at {registry.url} ({method} {path}@{digest}): {error}",
            hint="check the registry_url setting and that the registry runs",
        ) from None


def _delete_manifest(registry: Registry, record: ImageRecord) -> None:
    """DELETE the recorded manifest by digest; gone already is fine."""
    _registry_call(registry, "DELETE", record.path, record.digest)


def _delete_tag(registry: Registry, path: str) -> None:
    """DELETE whatever `path:latest` names now (the registry deletes by digest only): a push
    past ds01hub over the tag goes with it."""
    digest = _registry_call(registry, "HEAD", path, "latest")
    if digest and DIGEST_RE.match(digest):
        _registry_call(registry, "DELETE", path, digest)


def delete_published(
    client: Any, registry: Registry, trust: Provenance, user: str, name: str
) -> str:
    """Remove `user`'s image `name`: the manager's local tag, every recorded digest of it in
    the registry and the records. ImageInUseError while a server (service) uses it,
    ImageNotFoundError when there is neither a local image nor a record."""
    tag = images.image_tag(user, name)
    mine = [r for r in records(client, trust, user) if r.user == user and r.name == name]
    used = _used_images(client) & {r.reference for r in mine}
    if used:
        raise images.ImageInUseError(
            f"image {tag} is used by a server ({sorted(used)[0]})",
            hint="delete that server first (container-remove NAME, or the hub's home page)",
        )
    try:
        images.delete_user_image(client, user, name)
    except images.ImageNotFoundError:
        if not mine:
            raise
    for record in mine:
        _delete_manifest(registry, record)
    _delete_tag(registry, registry.repository(user, name).split("/", 1)[1])
    for record in mine:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_config(record.config_id)
    return tag
