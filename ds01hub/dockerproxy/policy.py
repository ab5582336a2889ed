"""The Docker socket filter proxy's policy: pure allow/deny decisions on plain data.

Nothing here touches a socket, a file or Docker. The proxy edge (`ds01hub.dockerproxy.server`)
parses a request, asks this module what it needs to know (which container a reference names, where a
bind mount really points), gathers those facts from the upstream engine and the file system,
and asks again for the decision. A decision is either a `Forward` -- the exact request to send
upstream, rebuilt from what was checked, so the proxy never decides on one string and forwards
another -- or a `Denied` exception carrying the HTTP status and the message the docker CLI
prints.

The model, for callers who are not admins:

- Deny by default. Only the endpoints in `classify` are reachable; everything else is 403.
- A container is the caller's iff it carries ``ds01.user=<caller>`` in a label set that this
  deployment signed for that very container name (`ds01hub.provenance`; `is_owned` for list
  entries, `ContainerFacts.owner` for look-ups); labels an image or a build step merely
  claims count for nobody. Everything else --
  unlabelled, unsigned, another user's, missing -- is `Invisible`: the edge answers with the
  engine's own reply for a reference that surely does not exist (`stand_in`), so another user's
  container, exec instance or image reads exactly like a missing one, byte for byte, and a walk
  over id prefixes learns nothing. References resolve as the engine resolves them (exact id,
  exact name, unique id prefix) among the caller's own containers only, and are forwarded as
  the resolved full id.
- Images: the caller may use (run, build FROM, tag, inspect, history, list) the images with a
  tag in their own namespace ``ds01-<user>/`` and the images an admin shares, matched by image
  id (`ImageFacts`, `image_visible`). Tags of other users' namespaces are cut from what is shown.
  Pulls are the admins' (a pulled tag would be shared by name).
- Requests are parsed the way the engine parses them and rebuilt canonically: decoded,
  dot-free, single-slash paths; no duplicate single-valued query parameters; JSON bodies whose
  object keys must be the exact canonical field names (Go's decoder matches keys
  case-insensitively, so ``"hostconfig"`` would otherwise slip past a checker that reads
  ``"HostConfig"``), re-serialised from what was checked.
- Create is rebuilt from an allow-list of fields. The ds01 labels are set and signed by the
  proxy (caller, no GPUs, every signed key explicit and every reserved key the image carries
  overwritten, so no image label is ever merged into one; routing labels refused; a name is
  assigned when none is given, since the signature covers it), the user's limits applied,
  and anything that reaches the host (privileged, capabilities, devices, host
  namespaces, binds outside the user's home/workspace, sockets, unconfined security options,
  sysctls, other users' containers as namespaces or volume sources) is refused.
- Mount provenance: every field that can bring a mount in is judged by the mounts it brings.
  ``VolumesFrom`` is replaced by the explicit mounts of its (own) source containers, each
  checked like the request's own (bind roots, volume drivers/options, read-only kept);
  ``Binds`` become structured ``Mounts`` of the resolved path with ``rprivate`` propagation, so
  no path can smuggle an option; a shared PID namespace counts like a host bind.
- Containers with host bind mounts run as the caller's uid:gid with ``no-new-privileges``
  (always forced): a root process in such a container could otherwise leave a set-uid root
  binary in the user's home -- root on the host. For the same reason ``docker cp`` into or out
  of such a container (the engine copies as root, through a bind whose host path may since have
  been swapped for a symbolic link) and ``exec --user`` other than the caller are refused.
- Image tags a user creates (build, tag, pull over an existing local image) must be in the
  user's own namespace ``ds01-<user>/`` (`ds01hub.actions.images.image_repository`): retagging a
  shared image would run the attacker's code in everyone's containers.
- BuildKit (``/session``, ``/grpc``, ``version=2``) is refused: its gRPC API would bypass the
  tag and network checks. Legacy builds (``DOCKER_BUILDKIT=0 docker build``) are allowed with
  the network limited to bridge/none, no remote contexts, no reserved or routing keys in
  ``--label``, and the user's memory/CPU limits. (A Dockerfile's own LABEL lines still reach
  the image and the build's step containers: harmless, because they are unsigned.)
- Renaming is refused: a container's name is part of its signed labels.
- Aggregate caps (`UserLimits.aggregate`, issue 17): a create or a start that would take the
  caller's containers together past their caps is refused (409, the hub's message:
  `check_aggregate`); the edge re-checks a start under the user's lock
  (`ds01hub.host.aggregate_gate`). With the site's cgroup root set, the container is created
  under the user's own parent cgroup (`aggregate.parent_for`), never one the caller names.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from ds01hub.actions.images import image_repository
from ds01hub.aggregate import ContainerUse, aggregate_refusal, parent_for
from ds01hub.dockerproxy import build_context
from ds01hub.errors import Ds01hubError
from ds01hub.labels import (
    AIME_NAME,
    CREATOR,
    GPUS,
    NAME_SEPARATOR,
    OWNER,
    PROJECT,
    USER,
    USER_SETTABLE,
    container_labels,
    container_name_of,
    escape_name,
    is_reserved,
    is_routing,
    labels_of,
    reserved_blanks,
    routing_keys,
)
from ds01hub.limits import AggregateLimits
from ds01hub.peer import Caller
from ds01hub.provenance import Provenance

MIN_API_VERSION = (1, 24)  # older versions accept HostConfig at start: a create-check bypass
MAX_JSON_BODY = 4 * 1024 * 1024
BUILDKIT_REFUSED = (
    "Permission denied: BuildKit is not available through the ds01 proxy (its API would "
    "bypass the tag and network checks); build with DOCKER_BUILDKIT=0 docker build, "
    "or use image-create"
)
GPU_HINT = (
    "GPUs are handed out by the ds01hub allocator: use `container-create NAME --gpus N` "
    "(or --mig PROFILE) instead of docker --gpus/--device"
)


class Denied(Ds01hubError):  # noqa: N818 -- reads as a decision: raise Denied(403, "...")
    """A refused request: `status` and `message` go back to the client as Docker's JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message, status=status)


def forbid(message: str) -> Denied:
    return Denied(403, message)


NOT_FOUND_TEXT = {
    "container": "No such container",
    "exec": "No such exec instance",
    "image": "No such image",
}


class Invisible(Denied):
    """An object the caller may not see -- missing, unmanaged or another user's.

    The edge does not send this message: it asks the engine about a stand-in reference that
    surely does not exist (`stand_in`) and answers with the engine's reply, so the refusal is
    the engine's own "not found", byte for byte, whatever the object was. `body` is the
    (checked) request body for that stand-in request, where the engine reads one first.
    """

    def __init__(self, kind: str, ref: str, body: Any = None, why: str = ""):
        super().__init__(404, f"{NOT_FOUND_TEXT[kind]}: {ref}")
        self.kind = kind
        self.ref = ref
        self.body = body
        self.why = why  # for the log only (admins): e.g. "owned by bob"
        # the stand-in request, where the edge cannot derive it from the route (list filters)
        self.rebuild: Callable[[str], Target] | None = None


@dataclass(frozen=True)
class StandIn:
    """A reference that cannot exist, and how to turn the engine's answer back."""

    ref: str
    undo: tuple[tuple[str, str], ...]

    def restore(self, data: bytes) -> bytes:
        for stand, original in self.undo:
            data = data.replace(stand.encode(), original.encode())
        return data


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^(sha256:)([0-9a-f]{64})$")


def stand_in(kind: str, ref: str, token: str) -> StandIn:
    """`ref` changed so that nothing can match it, keeping the shape the engine reports.

    `token` is fresh randomness from the edge (64 lowercase hex characters): a container or
    exec reference gets it appended; an image name gets it appended to its last path component
    (tag and digest kept), so the engine normalises it the same way; a full image id or digest
    gets its hex replaced by a random one of the same length.
    """
    mark = "zz" + token[:16]
    if kind != "image":
        return StandIn(ref + mark, ((ref + mark, ref),))
    digest = _DIGEST.match(ref)
    if _HEX64.match(ref) or digest:
        original = digest.group(2) if digest else ref
        fake = token[:64]
        return StandIn(ref.replace(original, fake), ((fake, original),))
    name, at, pinned = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    end = colon if colon > slash else len(name)
    return StandIn(name[:end] + mark + name[end:] + at + pinned, ((mark, ""),))


@dataclass(frozen=True)
class Settings:
    """Site policy. `bind_roots` are templates with ``{user}`` and ``{home}``; `trust` is the
    deployment's label key (None: nothing is anyone's, and creates are refused)."""

    bind_roots: tuple[str, ...] = ("{home}", "/workspace/{user}")
    allowed_networks: tuple[str, ...] = ("default", "bridge", "none")
    min_host_port: int = 1024
    # a classic build's context is read whole (its Dockerfile decides what may be built)
    max_build_context: int = 256 * 1024 * 1024
    trust: Provenance | None = None
    # where the cgroup v1 controllers are mounted ("": aggregate caps checked, not placed)
    aggregate_cgroup_root: str = ""
    # the proxy process as `ds01.creator` names it (`Owner.label`): while it lives, a created
    # container of its making does not count against the user's caps (its start passes the
    # user's lock here first: `ds01hub.aggregate.counts_toward_caps`)
    creator: str = ""

    def signer(self) -> Provenance:
        if self.trust is None:
            raise Denied(503, "the ds01 proxy runs without a label key (ask an admin)")
        return self.trust


@dataclass(frozen=True)
class UserLimits:
    """The caller's limits as the proxy applies them (API-form HostConfig entries)."""

    host_config: Mapping[str, Any] = field(default_factory=dict)
    allowed_images: tuple[str, ...] | None = None
    max_containers: int | None = None
    aggregate: AggregateLimits | None = None  # caps on all of the user's containers together
    #: limit field -> where it came from (`hub_groups.G`, `groups.G`, ...: ResolvedLimits)
    sources: Mapping[str, str] = field(default_factory=dict)

    def user_parent(self, user: str, settings: Settings) -> str | None:
        """The per-user cgroup parent `user`'s containers are created under: with aggregate
        caps and the site's cgroup root set (else None, as for a systemd slice)."""
        if self.aggregate is None or not settings.aggregate_cgroup_root:
            return None
        return parent_for(self.host_config.get("CgroupParent"), user)

    def source(self, name: str) -> str:
        """' from SOURCE' for a refusal's message, so users know whom to ask."""
        where = self.sources.get(name)
        return f" from {where}" if where else ""


@dataclass(frozen=True)
class MountFacts:
    """One mount of an existing container (an entry of its inspect document's ``Mounts``)."""

    type: str
    destination: str
    source: str = ""
    name: str = ""  # volumes
    driver: str = ""
    rw: bool = True

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> MountFacts:
        return cls(
            type=str(data.get("Type") or ""),
            destination=str(data.get("Destination") or ""),
            source=str(data.get("Source") or ""),
            name=str(data.get("Name") or ""),
            driver=str(data.get("Driver") or ""),
            rw=bool(data.get("RW", True)),
        )

    @property
    def anonymous_volume(self) -> bool:
        return self.type == "volume" and bool(_HEX64.match(self.name)) and self.driver == "local"


@dataclass(frozen=True)
class ContainerFacts:
    """What the upstream engine says about a container (``GET /containers/{ref}/json``).

    `has_host_binds` is true for anything through which the container may reach host files:
    bind mounts, named volumes (an admin's volume may bind a host path: treated as one without
    a look-up) and a PID namespace shared with another container (``/proc/PID/root``). `owner`
    is the user its *signed* labels name (None: nobody's -- unmanaged, unsigned, forged or
    another deployment's; `ds01hub.provenance`). `uses_gpus`: it gets GPU devices when it
    starts (device requests, which only ds01hub's spawner sets, or GPU slots in its labels).
    """

    id: str
    labels: Mapping[str, str]
    has_host_binds: bool = False
    mounts: tuple[MountFacts, ...] = ()
    names: tuple[str, ...] = ()
    owner: str | None = None
    uses_gpus: bool = False

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any], trust: Provenance | None) -> ContainerFacts:
        found = dict(labels_of(data))
        signed = trust is not None and trust.verify(found, container_name_of(data))
        host = data.get("HostConfig") or {}
        mounts = tuple(MountFacts.from_inspect(m) for m in data.get("Mounts") or [])
        reaches_host = any(m.type != "tmpfs" and not m.anonymous_volume for m in mounts)
        return cls(
            id=data["Id"],
            labels=found,
            has_host_binds=reaches_host or str(host.get("PidMode") or "").startswith("container:"),
            mounts=mounts,
            names=(str(data.get("Name") or ""),),
            owner=found.get(USER) if signed else None,
            uses_gpus=bool(host.get("DeviceRequests") or host.get("Devices") or found.get(GPUS)),
        )


@dataclass(frozen=True)
class VolumeFacts:
    """What the engine says about a named volume (``GET /volumes/{name}``)."""

    name: str
    driver: str
    options: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> VolumeFacts:
        return cls(
            name=str(data.get("Name") or ""),
            driver=str(data.get("Driver") or ""),
            options={str(k): str(v) for k, v in (data.get("Options") or {}).items()},
        )

    @property
    def bind_device(self) -> str | None:
        """The host path of a local volume that binds one (``o=bind``, ``device=PATH``)."""
        if "bind" in self.options.get("o", "").split(","):
            return self.options.get("device", "")
        return None


@dataclass(frozen=True)
class ImageFacts:
    """What the engine says about an image (``GET /images/{ref}/json``)."""

    id: str
    repo_tags: tuple[str, ...] = ()
    on_build: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)  # what the engine merges into a
    # container made from it, for every key the create leaves unset

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> ImageFacts:
        config = data.get("Config") or {}
        return cls(
            id=str(data.get("Id") or ""),
            repo_tags=tuple(str(t) for t in data.get("RepoTags") or []),
            on_build=tuple(str(t) for t in config.get("OnBuild") or []),
            labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        )


@dataclass(frozen=True)
class PathFacts:
    """Where a host path really points (symlinks resolved) and whether it is a socket."""

    real: str
    is_socket: bool = False


# --------------------------------------------------------------------------------------------
# Request targets


@dataclass(frozen=True)
class Target:
    """A request target parsed like the engine parses it, rebuilt canonically by `render`."""

    method: str
    version: str | None
    segments: tuple[str, ...]
    query: tuple[tuple[str, str], ...] = ()

    def render(self) -> str:
        prefix = f"/v{self.version}" if self.version is not None else ""
        path = prefix + "/" + "/".join(quote(s, safe="-._~:@+") for s in self.segments)
        return path + ("?" + urlencode(self.query, quote_via=quote) if self.query else "")

    def param(self, key: str, default: str | None = None) -> str | None:
        """A single-valued query parameter; a repeated one is refused (Go reads the first)."""
        values = self.params(key)
        if len(values) > 1:
            raise Denied(400, f"query parameter {key!r} given more than once")
        return values[0] if values else default

    def params(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    def with_query(self, **changes: str | list[str] | None) -> Target:
        """This target with the named parameters replaced (None removes them)."""
        kept = [(k, v) for k, v in self.query if k not in changes]
        for key, value in changes.items():
            if value is None:
                continue
            kept += [(key, v) for v in ([value] if isinstance(value, str) else value)]
        return Target(self.method, self.version, self.segments, tuple(kept))

    def with_segment(self, index: int, value: str) -> Target:
        segments = list(self.segments)
        segments[index] = value
        return Target(self.method, self.version, tuple(segments), self.query)


_VERSION = re.compile(r"^v([0-9.]+)$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TOKEN = re.compile(r"^[A-Z]+$")


def _decode(text: str, what: str) -> str:
    if _BAD_ESCAPE.search(text):
        raise Denied(400, f"invalid %-escape in request {what}")
    try:
        raw = bytes(_percent_bytes(text))
        decoded = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Denied(400, f"non-ASCII request {what}") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise Denied(400, f"control character in request {what}")
    return decoded


def _percent_bytes(text: str) -> Iterable[int]:
    i = 0
    while i < len(text):
        if text[i] == "%":
            yield int(text[i + 1 : i + 3], 16)
            i += 3
        else:
            yield ord(text[i])
            i += 1


def parse_target(method: str, raw_target: str) -> Target:
    """Parse an origin-form target: decode, collapse slashes and dot segments, split the query.

    Absolute-form targets, fragments, bad escapes, control characters, ``;`` in the query (Go
    drops such pairs, Python would keep them) and dot segments above the root are refused.
    """
    if not _TOKEN.match(method):
        raise Denied(400, f"invalid method {method!r}")
    if not raw_target.startswith("/") or "#" in raw_target:
        raise Denied(400, "request target must be an absolute path")
    raw_path, _, raw_query = raw_target.partition("?")
    path = _decode(raw_path, "path")
    segments: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not segments:
                raise Denied(400, "request path climbs above the root")
            segments.pop()
            continue
        segments.append(part)
    version = None
    if segments and (match := _VERSION.match(segments[0])):
        version = match.group(1)
        segments = segments[1:]
    if ";" in raw_query:
        raise Denied(400, "';' is not a query separator")
    _decode(raw_query.replace("+", " "), "query")
    query = tuple(parse_qsl(raw_query, keep_blank_values=True))
    return Target(method, version, tuple(segments), query)


def check_api_version(target: Target) -> None:
    if target.version is None:
        return
    try:
        parts = tuple(int(p) for p in target.version.split("."))
    except ValueError:
        raise Denied(400, f"malformed API version {target.version!r}") from None
    if parts < MIN_API_VERSION:
        oldest = ".".join(map(str, MIN_API_VERSION))
        raise Denied(400, f"API version {target.version} is too old; use {oldest} or newer")


# --------------------------------------------------------------------------------------------
# Routes


class Kind(Enum):
    PUBLIC = "public"
    INFO = "info"
    IMAGE_LIST = "image-list"
    LIST_CONTAINERS = "list-containers"
    EVENTS = "events"
    CREATE = "create"
    CONTAINER = "container"
    EXEC = "exec"
    IMAGE_READ = "image-read"
    IMAGE_PULL = "image-pull"
    IMAGE_TAG = "image-tag"
    IMAGE_DELETE = "image-delete"
    BUILD = "build"


@dataclass(frozen=True)
class Route:
    kind: Kind
    action: str = ""
    ref: str | None = None  # container ref, exec id or image name


PUBLIC_ENDPOINTS = {
    ("GET", "_ping"),
    ("HEAD", "_ping"),
    ("GET", "version"),
}
CONTAINER_ACTIONS = {
    ("GET", "json"),
    ("GET", "logs"),
    ("GET", "stats"),
    ("GET", "top"),
    ("GET", "changes"),
    ("GET", "export"),
    ("GET", "archive"),
    ("HEAD", "archive"),
    ("PUT", "archive"),
    ("GET", "attach/ws"),
    ("POST", "attach"),
    ("POST", "start"),
    ("POST", "stop"),
    ("POST", "restart"),
    ("POST", "kill"),
    ("POST", "pause"),
    ("POST", "unpause"),
    ("POST", "wait"),
    ("POST", "resize"),
    ("POST", "exec"),
    ("POST", "rename"),
    ("DELETE", ""),
}
HIDDEN_OBJECTS = {
    "networks": "network",
    "volumes": "volume",
    "plugins": "plugin",
    "secrets": "secret",
    "configs": "config",
    "nodes": "node",
    "services": "service",
    "tasks": "task",
}
EXEC_ACTIONS = {("GET", "json"), ("POST", "start"), ("POST", "resize")}
IMAGE_READ_ACTIONS = {("GET", "json"), ("GET", "history")}


def classify(target: Target) -> Route:
    """Which allowed endpoint this is, or `Denied` (deny by default)."""
    method, segs = target.method, target.segments
    joined = "/".join(segs)
    if joined in ("session", "grpc"):
        raise forbid(BUILDKIT_REFUSED)
    if (method, joined) in PUBLIC_ENDPOINTS:
        return Route(Kind.PUBLIC)
    if (method, joined) == ("GET", "info"):
        return Route(Kind.INFO)
    if (method, joined) == ("GET", "images/json"):
        return Route(Kind.IMAGE_LIST)
    if (method, joined) == ("GET", "containers/json"):
        return Route(Kind.LIST_CONTAINERS)
    if (method, joined) == ("GET", "events"):
        return Route(Kind.EVENTS)
    if (method, joined) == ("POST", "containers/create"):
        return Route(Kind.CREATE)
    if (method, joined) == ("POST", "build"):
        return Route(Kind.BUILD)
    if (method, joined) == ("POST", "images/create"):
        return Route(Kind.IMAGE_PULL)
    if len(segs) >= 2 and segs[0] == "containers":
        action = "/".join(segs[2:])
        if (method, action) in CONTAINER_ACTIONS:
            return Route(Kind.CONTAINER, action, segs[1])
    if len(segs) >= 3 and segs[0] == "exec" and (method, "/".join(segs[2:])) in EXEC_ACTIONS:
        return Route(Kind.EXEC, "/".join(segs[2:]), segs[1])
    if len(segs) >= 2 and segs[0] == "images":
        return _classify_image(method, segs)
    if method == "GET" and len(segs) in (2, 3) and segs[0] in HIDDEN_OBJECTS:
        # `docker inspect NAME` tries every object type in turn and reports the first error
        # that is not "not found": answer like an engine with no such objects at all
        raise Denied(404, f"No such {HIDDEN_OBJECTS[segs[0]]}: {segs[1]}")
    raise forbid(f"Permission denied: {method} /{joined} is not available through the ds01 proxy")


def _classify_image(method: str, segs: tuple[str, ...]) -> Route:
    # Image names contain slashes: /images/{name:.*}/json, DELETE /images/{name:.*}
    if method == "DELETE":
        return Route(Kind.IMAGE_DELETE, "", "/".join(segs[1:]))
    name, action = "/".join(segs[1:-1]), segs[-1]
    if name and (method, action) in IMAGE_READ_ACTIONS:
        return Route(Kind.IMAGE_READ, action, name)
    if name and (method, action) == ("POST", "tag"):
        return Route(Kind.IMAGE_TAG, action, name)
    path = "/".join(segs)
    raise forbid(f"Permission denied: {method} /{path} is not available through the ds01 proxy")


# --------------------------------------------------------------------------------------------
# Ownership


def check_owner(
    caller: Caller, ref: str, facts: ContainerFacts | None, kind: str = "container"
) -> ContainerFacts:
    """The container if it is the caller's; anything else is `Invisible` (as if missing)."""
    if facts is None or facts.owner != caller.user:
        why = f"owned by {facts.owner}" if facts is not None and facts.owner else "not managed"
        raise Invisible(kind, ref, why=why if facts is not None else "missing")
    return facts


def resolve_among(ref: str, own: Iterable[Mapping[str, Any]]) -> str | None:
    """The id `ref` names among the caller's own containers (list entries: Id, Names).

    The engine's order: exact id, exact name, unique id prefix. Other users' containers do not
    take part, so a name or prefix that also matches someone else's resolves as if theirs did
    not exist. An ambiguous prefix among the caller's own is the engine's own error.
    """
    entries = [(str(c.get("Id") or ""), [str(n) for n in c.get("Names") or []]) for c in own]
    for cid, _ in entries:
        if cid == ref:
            return cid
    for cid, names in entries:
        if "/" + ref.lstrip("/") in names:
            return cid
    if not ref or not re.fullmatch(r"[0-9a-f]+", ref):
        return None
    matches = [cid for cid, _ in entries if cid.startswith(ref)]
    if len(matches) > 1:
        raise Denied(500, f"multiple IDs found with provided prefix: {ref}")
    return matches[0] if matches else None


def owned_labels(user: str, trust: Provenance) -> dict[str, str]:
    """Label filters that only `user`'s signed containers of `trust`'s deployment pass (the
    owner tag is a keyed hash: a container that merely claims the user lacks it)."""
    return {
        **dict(f.split("=", 1) for f in trust.label_filters()),
        USER: user,
        OWNER: trust.owner_tag(user),
    }


def is_owned(entry: Mapping[str, Any], user: str, trust: Provenance) -> bool:
    """Whether a container (a list entry or inspect document) is `user`'s: its labels name
    them and this deployment signed those labels for this container's name."""
    found = labels_of(entry)
    return found.get(USER) == user and trust.verify(found, container_name_of(entry))


def filter_owned_containers(
    listing: list[Mapping[str, Any]], user: str, trust: Provenance
) -> list[Any]:
    """The response of ``GET /containers/json`` reduced to the caller's containers."""
    return [c for c in listing if isinstance(c, Mapping) and is_owned(c, user, trust)]


def owner_filters(
    raw: str | None, user: str, trust: Provenance, extra: Mapping[str, list[str]] | None = None
) -> str:
    """The ``filters`` query value with the ownership label filters added (ANDed upstream)."""
    filters: dict[str, list[str]] = {}
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise Denied(400, "filters is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise Denied(400, "filters must be a JSON object")
        for key, values in parsed.items():
            # both the current {"k": ["v"]} and the legacy {"k": {"v": true}} forms
            if isinstance(values, dict):
                values = [v for v, on in values.items() if on]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise Denied(400, f"filters[{key!r}] must be a list of strings")
            filters[str(key)] = list(values)
    labels = filters.setdefault("label", [])
    labels += [f"{k}={v}" for k, v in owned_labels(user, trust).items()]
    for key, values in dict(extra or {}).items():
        filters[key] = list(values)
    return json.dumps(filters, separators=(",", ":"))


def check_container_name(caller: Caller, name: str | None) -> None:
    """Names in the hub's ``{project}._.{user}`` form must end in the caller's own user part.

    The spawner finds a user's server container by that name: a container called
    ``default._.alice`` made by bob would be started as alice's notebook.
    """
    if not name or NAME_SEPARATOR not in name:
        return
    own = escape_name(caller.user)
    if name.lstrip("/").rsplit(NAME_SEPARATOR, 1)[1] != own:
        raise forbid(
            f"Permission denied: container names ending in '{NAME_SEPARATOR}<user>' are "
            f"reserved for that user; yours must end in '{NAME_SEPARATOR}{own}'"
        )


# --------------------------------------------------------------------------------------------
# Strict JSON


def parse_json_body(body: bytes, what: str) -> Any:
    """Parse a request body, refusing duplicate keys (Go keeps the last, merging objects)."""
    if len(body) > MAX_JSON_BODY:
        raise Denied(413, f"{what} body is larger than {MAX_JSON_BODY} bytes")
    if not body.strip():
        return {}

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            folded = key.casefold()
            if folded in seen:
                raise Denied(400, f"{what}: key {key!r} appears more than once")
            seen.add(folded)
        return dict(pairs)

    try:
        value = json.loads(body, object_pairs_hook=unique)
    except (ValueError, RecursionError) as error:
        if isinstance(error, Denied):
            raise
        raise Denied(400, f"{what} body is not valid JSON: {error}") from None
    return {} if value is None else value


def is_empty(value: Any) -> bool:
    """Docker's zero value: what leaving the field out means."""
    if value is None or value is False or value == 0 or value == "":
        return True
    if isinstance(value, dict):
        return not value  # a key is data (a volume path, a port, a network name)
    if isinstance(value, list):
        return all(is_empty(v) for v in value)
    return False


Check = Callable[[Any], Any]


def accept(value: Any) -> Any:
    return value


def strict_object(what: str, value: Any, checks: Mapping[str, Check]) -> dict[str, Any]:
    """Keep only known fields (exact spelling), each passed through its check.

    Unknown fields with a zero value are dropped (newer clients send many); unknown fields with
    a value are refused -- deny by default.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Denied(400, f"{what} must be a JSON object")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in checks:
            checked = checks[key](item)
            if not is_empty(checked) or isinstance(checked, bool):
                out[key] = checked
        elif not is_empty(item):
            raise forbid(f"Permission denied: {what}.{key} is not allowed through the ds01 proxy")
    return out


def must_be_empty(what: str, hint: str = "") -> Check:
    def check(value: Any) -> Any:
        if not is_empty(value):
            raise forbid(
                f"Permission denied: {what} is not allowed" + (f" ({hint})" if hint else "")
            )
        return None

    return check


def must_be_null(what: str) -> Check:
    def check(value: Any) -> Any:
        if value is not None:
            raise forbid(
                f"Permission denied: setting {what} is not allowed "
                "(--security-opt systempaths=unconfined)"
            )
        return None

    return check


def one_of(what: str, allowed: Iterable[Any]) -> Check:
    allowed = tuple(allowed)

    def check(value: Any) -> Any:
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed)
            raise forbid(f"Permission denied: {what}={value!r} is not allowed (allowed: {shown})")
        return value

    return check


def of_type(what: str, *types: type) -> Check:
    def check(value: Any) -> Any:
        if value is not None and not isinstance(value, types):
            raise Denied(400, f"{what} has the wrong type ({type(value).__name__})")
        return value

    return check


def int_range(what: str, low: int | None = None, high: int | None = None) -> Check:
    def check(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise Denied(400, f"{what} must be an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            raise forbid(f"Permission denied: {what}={value} is outside {low}..{high}")
        return value

    return check


# --------------------------------------------------------------------------------------------
# Container create


CONTAINER_NAMESPACE_FIELDS = ("NetworkMode", "PidMode", "IpcMode")


@dataclass(frozen=True)
class CreateNeeds:
    """What the edge must look up before `check_create` can decide."""

    containers: tuple[str, ...]  # references to other containers (namespaces, volumes-from)
    paths: tuple[str, ...]  # host paths: bind sources and the caller's bind roots
    image: str | None = None  # the image to run


@dataclass(frozen=True)
class CreateFacts:
    """The looked-up facts: `containers` are the caller's own (None: not visible to them)."""

    containers: Mapping[str, ContainerFacts | None] = field(default_factory=dict)
    paths: Mapping[str, PathFacts] = field(default_factory=dict)
    existing_containers: int = 0
    limits: UserLimits | None = None
    volumes: Mapping[str, VolumeFacts | None] = field(default_factory=dict)
    image: ImageFacts | None = None
    shared_images: frozenset[str] = frozenset()


def bind_roots(caller: Caller, settings: Settings) -> tuple[str, ...]:
    return tuple(
        posixpath.normpath(t.format(user=caller.user, home=caller.home))
        for t in settings.bind_roots
    )


def create_needs(caller: Caller, body: Mapping[str, Any], settings: Settings) -> CreateNeeds:
    found = body.get("HostConfig")
    host: Mapping[str, Any] = found if isinstance(found, dict) else {}
    refs: list[str] = []
    for key in CONTAINER_NAMESPACE_FIELDS:
        mode = host.get(key)
        if isinstance(mode, str) and mode.startswith("container:"):
            refs.append(mode.split(":", 1)[1])
    for source in host.get("VolumesFrom") or []:
        if isinstance(source, str):
            refs.append(source.split(":", 1)[0])
    paths = [src for src, _ in _bind_sources(host)] + list(bind_roots(caller, settings))
    image = body.get("Image") if isinstance(body.get("Image"), str) else None
    return CreateNeeds(tuple(dict.fromkeys(refs)), tuple(dict.fromkeys(paths)), image)


def import_needs(
    host: Any, containers: Mapping[str, ContainerFacts | None]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(host paths, volume names) the mounts of the ``VolumesFrom`` sources bring in."""
    paths: list[str] = []
    volumes: list[str] = []
    sources = host.get("VolumesFrom") if isinstance(host, dict) else None
    for entry in sources if isinstance(sources, list) else []:
        facts = containers.get(str(entry).partition(":")[0])
        for mount in facts.mounts if facts else ():
            if mount.type == "bind":
                paths.append(mount.source)
            elif mount.type == "volume" and mount.name:
                volumes.append(mount.name)
    return tuple(dict.fromkeys(paths)), tuple(dict.fromkeys(volumes))


def volume_needs(volumes: Mapping[str, VolumeFacts | None]) -> tuple[str, ...]:
    """Host paths that local bind volumes point at (checked like bind sources)."""
    return tuple(
        dict.fromkeys(v.bind_device for v in volumes.values() if v and v.bind_device is not None)
    )


def _bind_sources(host: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(host path, where it came from) for every bind in Binds and Mounts."""
    found = []
    for bind in host.get("Binds") or []:
        if isinstance(bind, str) and bind.startswith("/"):
            found.append((bind.split(":", 1)[0], f"bind {bind}"))
    for mount in host.get("Mounts") or []:
        if isinstance(mount, dict) and mount.get("Type") == "bind":
            found.append((str(mount.get("Source", "")), f"mount {mount.get('Source')}"))
    return found


BIND_MODES = frozenset({"ro", "rw", "nocopy", "private", "rprivate", "slave", "rslave"})
PROPAGATIONS = ("", "private", "rprivate", "slave", "rslave")
RESTART_POLICIES = ("", "no", "always", "unless-stopped", "on-failure")
LOG_DRIVERS = ("", "json-file", "local")
LOG_OPTIONS = frozenset({"max-size", "max-file", "compress", "mode", "max-buffer-size"})
CONFIG_ACCEPTED = [
    "Hostname",
    "Domainname",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "Cmd",
    "Entrypoint",
    "Shell",
    "ArgsEscaped",
    "WorkingDir",
    "MacAddress",
    "StopSignal",
    "StopTimeout",
    "Healthcheck",
    "ExposedPorts",
    "Volumes",
    "OnBuild",
    "NetworkDisabled",
]
HOST_ACCEPTED = [
    "AutoRemove",
    "ConsoleSize",
    "Init",
    "ReadonlyRootfs",
    "PublishAllPorts",
    "Dns",
    "DnsOptions",
    "DnsSearch",
    "ExtraHosts",
    "Tmpfs",
    "CapDrop",
    "CpusetCpus",
    "CpusetMems",
    "MemoryReservation",
    "MemorySwappiness",
    "ContainerIDFile",
]
HOST_FORBIDDEN = {
    "Privileged": "privileged containers",
    "CapAdd": "adding capabilities",
    "Devices": f"host devices ({GPU_HINT})",
    "DeviceRequests": f"device requests ({GPU_HINT})",
    "DeviceCgroupRules": "device cgroup rules",
    "Sysctls": "sysctls",
    "Links": "legacy links",
    "GroupAdd": "extra groups",
    "CgroupParent": "a cgroup parent (it would escape your limits)",
    "Ulimits": "ulimits",
    "StorageOpt": "storage options",
    "OomKillDisable": "disabling the OOM killer",
    "KernelMemory": "kernel memory settings",
    "KernelMemoryTCP": "kernel memory settings",
    "CpuRealtimePeriod": "realtime scheduling",
    "CpuRealtimeRuntime": "realtime scheduling",
    "VolumeDriver": "volume drivers",
    "Cgroup": "cgroup modes",
}


def bind_mount(source: str, target: str, read_only: bool) -> dict[str, Any]:
    """A checked host bind as a structured mount: no string for a path to smuggle options
    into, propagation fixed to rprivate."""
    return {
        "Type": "bind",
        "Source": source,
        "Target": target,
        "ReadOnly": read_only,
        "BindOptions": {"Propagation": "rprivate"},
    }


class CreateCheck:
    """One create request's check: construct with the caller and facts, call `run(body)`."""

    def __init__(self, caller: Caller, settings: Settings, facts: CreateFacts):
        self.caller = caller
        self.settings = settings
        self.facts = facts
        self.limits = facts.limits or UserLimits()
        # a root of "/" or "/srv" (a service account's home) would open far too much
        resolved = [
            facts.paths[r].real if r in facts.paths else r for r in bind_roots(caller, settings)
        ]
        self.roots = [r for r in resolved if len(PurePosixPath(r).parts) > 2]
        self.host_binds = False
        self.bind_mounts: list[dict[str, Any]] = []  # Binds, as structured mounts
        self.imported: dict[str, dict[str, Any]] = {}  # VolumesFrom, by destination

    def run(self, body: Mapping[str, Any], name: str) -> dict[str, Any]:
        """The checked body of a create of the container called `name`."""
        limit = self.limits.max_containers
        if limit is not None and self.facts.existing_containers >= limit:
            raise forbid(
                f"Permission denied: you already have {self.facts.existing_containers} "
                f"containers (max_containers_per_user: {limit}"
                f"{self.limits.source('max_containers_per_user')}); remove one first "
                "(docker rm NAME)"
            )
        later = ("Image", "Env", "Labels", "User", "HostConfig")
        checks: dict[str, Check] = {key: accept for key in (*CONFIG_ACCEPTED, *later)}
        checks["NetworkingConfig"] = self.networking
        out = strict_object("create", body, checks)
        # HostConfig first: whether it binds host paths decides the container's user
        out["HostConfig"] = self.host_config(out.get("HostConfig"))
        out["Image"] = self.image(out.get("Image"))
        out["Labels"] = self.labels(out.get("Labels"), out["Image"], name)
        out["Env"] = self.env(of_type("Env", list)(out.get("Env")))
        out["User"] = self.user(out.get("User"))
        checked = {k: v for k, v in out.items() if v is not None}
        # last, so that a hidden image and a missing one fail at the same point, with the
        # engine's own answer for a create with a missing image (nothing is created)
        if not image_visible(self.caller, self.facts.image, self.facts.shared_images):
            raise Invisible("image", out["Image"], body=checked)
        assert self.facts.image is not None
        if not any(_same_name(out["Image"], tag) for tag in self.facts.image.repo_tags):
            # found by id or id prefix: forward the full id, which no new image can share
            checked["Image"] = self.facts.image.id
        return checked

    def image(self, value: Any) -> Any:
        allowed = self.limits.allowed_images
        if not isinstance(value, str) or not value:
            raise Denied(400, "create: Image is required")
        if allowed is not None and not any(fnmatch.fnmatchcase(value, p) for p in allowed):
            raise forbid(
                f"Permission denied: image {value!r} is not in your allowed images "
                f"({', '.join(allowed)}{self.limits.source('allowed_images')})"
            )
        return value

    def labels(self, value: Any, image: str, name: str) -> dict[str, str]:
        """The user's own labels plus the ds01 set signed for the caller (no GPUs) and `name`.

        Docker merges the image's labels into the container for every key the create leaves
        unset, so each reserved key the image carries is set here too (empty), and the signed
        keys are all set: no image label ever lands on a reserved key. Routing labels are
        refused, whether in the request or in the image.
        """
        if value is not None and not isinstance(value, dict):
            raise Denied(400, "create: Labels must be an object")
        facts = self.facts
        seen = image_visible(self.caller, facts.image, facts.shared_images)
        # a hidden image fails later, exactly as a missing one: its labels tell nothing here
        image_labels = facts.image.labels if seen and facts.image else {}
        for where, found in (("label", value or {}), (f"image {image} has label", image_labels)):
            if routing := routing_keys(found):
                raise forbid(
                    f"Permission denied: {where} {routing[0]!r}: reverse-proxy routing labels "
                    "are reserved to admins (they could claim the hub's own address)"
                )
        kept = {
            k: str(v) for k, v in (value or {}).items() if k in USER_SETTABLE or not is_reserved(k)
        }
        own = container_labels(
            user=self.caller.user, project=None, group=None, priority=0, image=image
        )
        own[PROJECT] = own[AIME_NAME] = kept.get(PROJECT, "")
        own[CREATOR] = self.settings.creator
        signed = self.settings.signer().sign(own, name)
        return reserved_blanks(image_labels) | kept | signed

    def env(self, value: Any) -> list[str]:
        """Hide GPUs from the NVIDIA runtime: images such as nvidia/cuda set
        NVIDIA_VISIBLE_DEVICES=all, which a default nvidia runtime would honour."""
        kept = [e for e in value or [] if not str(e).startswith("NVIDIA_VISIBLE_DEVICES=")]
        return kept + ["NVIDIA_VISIBLE_DEVICES=void"]

    def user(self, value: Any) -> str | None:
        """With host binds the container runs as the caller, exactly (see module docstring)."""
        return run_as_caller(self.caller, value, "--user") if self.host_binds else value

    def host_config(self, value: Any) -> dict[str, Any]:
        checks: dict[str, Check] = {key: accept for key in HOST_ACCEPTED}
        checks |= {key: must_be_empty(what) for key, what in HOST_FORBIDDEN.items()}
        # an empty list here is not "unset": it removes the defaults (systempaths=unconfined)
        checks |= {key: must_be_null(key) for key in ("MaskedPaths", "ReadonlyPaths")}
        checks |= {
            "Binds": self.binds,
            "Mounts": self.mounts,
            "VolumesFrom": self.volumes_from,
            "NetworkMode": self.network_mode,
            "PidMode": self.namespace("PidMode", ("",)),
            "IpcMode": self.namespace("IpcMode", ("", "none", "private", "shareable")),
            "UTSMode": one_of("UTSMode", ("",)),
            "UsernsMode": one_of("UsernsMode", ("",)),
            "CgroupnsMode": one_of("CgroupnsMode", ("", "private")),
            "SecurityOpt": self.security_opt,
            "Runtime": one_of("Runtime", ("", "runc")),
            "Isolation": one_of("Isolation", ("", "default")),
            "PortBindings": self.port_bindings,
            "RestartPolicy": self.restart_policy,
            "LogConfig": self.log_config,
            "OomScoreAdj": int_range("OomScoreAdj", 0, 1000),
            "CpuShares": int_range("CpuShares", 0, 1024),
            "BlkioWeight": int_range("BlkioWeight", 0, 0),
            "ShmSize": int_range("ShmSize", 0),
            "Memory": int_range("Memory", 0),
            "MemorySwap": int_range("MemorySwap", -1),
            "NanoCpus": int_range("NanoCpus", 0),
            "CpuPeriod": int_range("CpuPeriod", 0),
            "CpuQuota": int_range("CpuQuota", 0),
            "PidsLimit": int_range("PidsLimit", -1),
        }
        for blkio in (
            "BlkioWeightDevice",
            "BlkioDeviceReadBps",
            "BlkioDeviceWriteBps",
            "BlkioDeviceReadIOps",
            "BlkioDeviceWriteIOps",
        ):
            checks[blkio] = must_be_empty(blkio)
        # host binds decide the user: find them before the rest (the order of keys is the client's)
        self.host_binds = bool(_bind_sources(value)) if isinstance(value, dict) else False
        out = strict_object("HostConfig", value, checks)
        self.place_mounts(out)
        opts = [o for o in out.get("SecurityOpt", []) if not o.startswith("no-new-privileges")]
        out["SecurityOpt"] = opts + ["no-new-privileges:true"]
        return self.apply_limits(out)

    def place_mounts(self, host: dict[str, Any]) -> None:
        """Binds and imported mounts join ``Mounts``; the request's own win a destination.

        (The engine lets Binds and Mounts override VolumesFrom at the same destination.)
        """
        mounts = list(host.get("Mounts") or []) + self.bind_mounts
        taken = {posixpath.normpath(str(m.get("Target", ""))) for m in mounts}
        taken |= {posixpath.normpath(b) for b in host.get("Binds") or []}
        taken |= {posixpath.normpath(str(t)) for t in host.get("Tmpfs") or {}}
        mounts += [m for dest, m in self.imported.items() if dest not in taken]
        host.pop("VolumesFrom", None)
        if mounts:
            host["Mounts"] = mounts
        if not host.get("Binds"):
            host.pop("Binds", None)

    def apply_limits(self, host: dict[str, Any]) -> dict[str, Any]:
        """The user's limits win over larger (or missing) requests; smaller requests stay."""
        limits = dict(self.limits.host_config)
        if "NanoCpus" in limits and (host.get("CpuQuota") or host.get("CpuPeriod")):
            raise forbid(
                "Permission denied: use --cpus (CPU quota/period would bypass your CPU limit)"
            )
        for key in ("Memory", "NanoCpus", "PidsLimit", "ShmSize"):
            if key in limits:
                asked = host.get(key)
                host[key] = (
                    asked if isinstance(asked, int) and 0 < asked <= limits[key] else (limits[key])
                )
        if "Memory" in limits:
            host["MemorySwap"] = host["Memory"]  # no swap beyond the memory limit
        for key, value in limits.items():
            if key not in ("Memory", "NanoCpus", "PidsLimit", "ShmSize", "MemorySwap"):
                host[key] = value  # admin-chosen settings (IpcMode, CgroupParent)
        parent = self.limits.user_parent(self.caller.user, self.settings)
        if parent is not None:
            host["CgroupParent"] = parent  # the caller's own parent (their caps), never theirs
        host.setdefault("NetworkMode", "default")
        return host

    def check_path(self, source: str, where: str) -> str:
        facts = self.facts.paths.get(source)
        if facts is None:
            raise Denied(500, f"proxy error: {where} was not resolved")
        if facts.is_socket:
            raise forbid(f"Permission denied: {where}: binding sockets is not allowed")
        real = facts.real
        if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in self.roots):
            raise forbid(
                f"Permission denied: {where}: bind mounts must be inside " + " or ".join(self.roots)
            )
        return real

    def binds(self, value: Any) -> list[str]:
        """Anonymous volumes stay; host binds become structured mounts (`place_mounts`)."""
        out = []
        for bind in of_type("Binds", list)(value) or []:
            if not isinstance(bind, str):
                raise Denied(400, "Binds entries must be strings")
            parts = bind.split(":")
            if len(parts) == 1:
                out.append(bind)  # anonymous volume at a container path
                continue
            if len(parts) > 3:
                raise Denied(400, f"malformed bind {bind!r}")
            source, target = parts[0], parts[1]
            modes = parts[2].split(",") if len(parts) == 3 else []
            if bad := [m for m in modes if m not in BIND_MODES]:
                raise forbid(f"Permission denied: bind option {','.join(bad)} is not allowed")
            if not source.startswith("/"):
                raise forbid(
                    f"Permission denied: named volume {source!r}: named volumes are "
                    "not available through the ds01 proxy; bind a directory of your "
                    "home or workspace instead"
                )
            real = self.check_path(source, f"bind {bind}")
            self.bind_mounts.append(bind_mount(real, target, read_only="ro" in modes))
        return out

    def mounts(self, value: Any) -> list[dict[str, Any]]:
        return [self.mount(m) for m in of_type("Mounts", list)(value) or []]

    def mount(self, value: Any) -> dict[str, Any]:
        common: dict[str, Check] = {
            "Type": one_of("Mounts.Type", ("bind", "volume", "tmpfs")),
            "Target": of_type("Mounts.Target", str),
            "Source": of_type("Mounts.Source", str),
            "ReadOnly": of_type("Mounts.ReadOnly", bool),
            "Consistency": accept,
            "BindOptions": lambda v: strict_object(
                "Mounts.BindOptions",
                v,
                {
                    "Propagation": one_of("Mounts.BindOptions.Propagation", PROPAGATIONS),
                    "NonRecursive": of_type("NonRecursive", bool),
                },
            ),
            "VolumeOptions": lambda v: strict_object(
                "Mounts.VolumeOptions",
                v,
                {
                    "NoCopy": of_type("NoCopy", bool),
                    "Labels": of_type("Labels", dict),
                },
            ),
            "TmpfsOptions": lambda v: strict_object(
                "Mounts.TmpfsOptions",
                v,
                {
                    "SizeBytes": int_range("SizeBytes", 0),
                    "Mode": int_range("Mode", 0, 0o7777),
                },
            ),
        }
        out = strict_object("Mounts", value, common)
        kind, source = out.get("Type"), out.get("Source", "")
        if kind == "bind":
            out["Source"] = self.check_path(source, f"mount {source}")
            recursive = (out.get("BindOptions") or {}).get("NonRecursive")
            out["BindOptions"] = {"Propagation": "rprivate"}
            if recursive:
                out["BindOptions"]["NonRecursive"] = True
        elif kind == "volume" and source:
            raise forbid(
                f"Permission denied: named volume {source!r}: named volumes are not "
                "available through the ds01 proxy"
            )
        elif kind is None:
            raise Denied(400, "Mounts entries need a Type")
        return out

    def own_container(self, ref: str) -> ContainerFacts:
        """One of the caller's containers; missing and other users' read the same (404)."""
        facts = self.facts.containers.get(ref)
        if facts is None or facts.owner != self.caller.user:
            raise Denied(404, f"No such container: {ref}")
        return facts

    def namespace(self, key: str, plain: tuple[str, ...]) -> Check:
        def check(value: Any) -> Any:
            value = value or ""
            if isinstance(value, str) and value.startswith("container:"):
                if key == "PidMode":
                    # /proc/PID/root of the other container's processes reaches its mounts
                    self.host_binds = True
                return "container:" + self.own_container(value.split(":", 1)[1]).id
            return one_of(key, plain + ("container:<your own container>",))(value)

        return check

    def network_mode(self, value: Any) -> Any:
        allowed = ("",) + self.settings.allowed_networks
        return self.namespace("NetworkMode", allowed)(value)

    def volumes_from(self, value: Any) -> None:
        """Replaced by the source containers' mounts, each checked (`place_mounts` adds them).

        The engine would import them without any of this proxy's rules (a root container
        writing through another container's bind of the home); as explicit mounts they are
        checked like the request's own, and the container runs as the caller when one is a
        host path. Read-only stays read-only (``:rw`` cannot upgrade it, as in the engine).
        """
        for entry in of_type("VolumesFrom", list)(value) or []:
            if not isinstance(entry, str):
                raise Denied(400, "VolumesFrom entries must be strings")
            ref, _, mode = entry.partition(":")
            if mode not in ("", "ro", "rw"):
                raise Denied(400, f"VolumesFrom mode {mode!r} must be ro or rw")
            source = self.own_container(ref)
            for mount in source.mounts:
                imported = self.imported_mount(mount, mode != "ro", f"--volumes-from {ref}")
                self.imported[posixpath.normpath(mount.destination)] = imported
        return None

    def imported_mount(self, mount: MountFacts, writable: bool, where: str) -> dict[str, Any]:
        read_only = not (mount.rw and writable)
        where = f"{where}: {mount.destination}"
        if mount.type == "bind":
            self.host_binds = True
            return bind_mount(self.check_path(mount.source, where), mount.destination, read_only)
        if mount.type == "tmpfs":
            return {"Type": "tmpfs", "Target": mount.destination, "ReadOnly": read_only}
        volume = self.facts.volumes.get(mount.name) if mount.type == "volume" else None
        if volume is None:
            raise forbid(f"Permission denied: {where}: a {mount.type or 'unknown'} mount")
        if volume.bind_device is not None:
            self.host_binds = True
            return bind_mount(
                self.check_path(volume.bind_device, where), mount.destination, read_only
            )
        if volume.driver != "local" or volume.options:
            raise forbid(
                f"Permission denied: {where}: volume {volume.name} (driver {volume.driver}, "
                f"options {dict(volume.options)}) is not importable through the ds01 proxy"
            )
        if not mount.anonymous_volume:
            self.host_binds = True  # an admin's named volume: as careful as with a bind
        return {
            "Type": "volume",
            "Source": volume.name,
            "Target": mount.destination,
            "ReadOnly": read_only,
            "VolumeOptions": {"NoCopy": True},
        }

    def security_opt(self, value: Any) -> list[str]:
        opts = of_type("SecurityOpt", list)(value) or []
        for opt in opts:
            if not re.fullmatch(r"no-new-privileges([:=]true)?", str(opt)):
                raise forbid(
                    f"Permission denied: security option {opt!r} is not allowed "
                    "(only no-new-privileges)"
                )
        return list(opts)

    def port_bindings(self, value: Any) -> Any:
        for port, bindings in (of_type("PortBindings", dict)(value) or {}).items():
            for binding in bindings or []:
                host_port = str((binding or {}).get("HostPort") or "")
                low = host_port.split("-")[0]
                if low and (not low.isdigit() or int(low) < self.settings.min_host_port):
                    raise forbid(
                        f"Permission denied: publishing {port} on host port "
                        f"{host_port}: host ports below "
                        f"{self.settings.min_host_port} are reserved"
                    )
        return value

    def restart_policy(self, value: Any) -> Any:
        out = strict_object(
            "RestartPolicy",
            value,
            {
                "Name": one_of("RestartPolicy.Name", RESTART_POLICIES),
                "MaximumRetryCount": int_range("MaximumRetryCount", 0),
            },
        )
        if self.limits.aggregate is not None and out.get("Name") == "always":
            # the engine starts such a container again when dockerd restarts, even one the
            # user stopped: past the aggregate check (unless-stopped leaves stopped ones)
            raise forbid(
                "Permission denied: --restart always is not available with aggregate limits "
                "(the engine would start a stopped container again, past your caps); use "
                "--restart unless-stopped"
            )
        return out

    def log_config(self, value: Any) -> Any:
        out = strict_object(
            "LogConfig",
            value,
            {
                "Type": one_of("LogConfig.Type", LOG_DRIVERS),
                "Config": of_type("LogConfig.Config", dict),
            },
        )
        if bad := set(out.get("Config") or {}) - LOG_OPTIONS:
            raise forbid(f"Permission denied: log options {', '.join(sorted(bad))} are not allowed")
        return out

    def networking(self, value: Any) -> Any:
        config = strict_object("NetworkingConfig", value, {"EndpointsConfig": accept})
        endpoints = of_type("EndpointsConfig", dict)(config.get("EndpointsConfig")) or {}
        for name, endpoint in endpoints.items():
            if name not in self.settings.allowed_networks:
                raise forbid(
                    f"Permission denied: network {name!r} is not allowed (allowed: "
                    f"{', '.join(self.settings.allowed_networks)})"
                )
            strict_object(f"EndpointsConfig.{name}", endpoint, {})
        return {"EndpointsConfig": {name: {} for name in endpoints}} if endpoints else {}


def check_create(
    caller: Caller, target: Target, body: Any, facts: CreateFacts, settings: Settings = Settings()
) -> tuple[Target, bytes]:
    """The create request to forward: labels signed, limits applied, dangerous options refused.

    The signature covers the container's name, so a create without one gets one here
    (`<user>-<12 hex>`): a label set signed for no name in particular would verify on any
    container, such as a build step whose image carries a copy of it."""
    if not isinstance(body, dict):
        raise Denied(400, "create body must be a JSON object")
    name = (target.param("name") or "").removeprefix("/")
    check_container_name(caller, name)
    if not name:
        name = f"{escape_name(caller.user)}-{secrets.token_hex(6)}"
        target = target.with_query(name=name)
    checked = CreateCheck(caller, settings, facts).run(body, name)
    return target, json.dumps(checked, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------------
# Actions on existing containers and exec instances


def check_aggregate(
    caller: Caller,
    limits: UserLimits | None,
    running: Sequence[ContainerUse],
    name: str,
    host: Mapping[str, Any],
) -> None:
    """Refuse (409, the hub's message) a container `name` with `host` (its HostConfig, as
    checked or as Docker has it) that would take the caller past their aggregate caps beside
    their `running` containers (`ds01hub.host.aggregate_gate.counted_uses`)."""
    if limits is None or limits.aggregate is None:
        return
    new = ContainerUse.from_host_config(name, host)
    refusal = aggregate_refusal(caller.user, limits.aggregate, running, new)
    if refusal:
        raise Denied(409, refusal)


def check_container_action(
    caller: Caller, route: Route, target: Target, facts: ContainerFacts | None, body: bytes
) -> tuple[Target, bytes | None]:
    """The request to forward for an action on a container, addressed by its full id.

    `body` is only inspected where it matters (exec create, start); None in the result means
    "stream the client's body through unchanged".
    """
    ref = route.ref or ""
    owned = check_owner(caller, ref, facts)
    resolved = target.with_segment(1, owned.id)
    method, action = target.method, route.action
    if (method, action) == ("DELETE", "") and target.param("link") not in (None, "", "0", "false"):
        raise forbid("Permission denied: removing links is not allowed")
    if action == "rename":
        raise forbid(
            "Permission denied: renaming is not available through the ds01 proxy (a "
            "container's name is part of its signed ds01 labels); create a new container "
            "with --name instead"
        )
    if action == "archive" and owned.has_host_binds:
        raise forbid(
            "Permission denied: docker cp into or out of a container with host bind mounts "
            "is refused (the engine copies as root, through binds of your home); copy the "
            "files in your home directory on the host instead"
        )
    if action in ("start", "restart") and owned.uses_gpus:
        # the allocator must check, under its lock, that the slots are still this container's
        # alone before it starts (`GpuAllocator.begin_start`): the hub's path does, a bare
        # `docker start` cannot (its hold may have expired and the GPU gone to someone else)
        raise forbid(
            "Permission denied: a container with GPUs is started through ds01hub, which first "
            "checks that its GPUs are still free for it: run `container-start NAME` (or start "
            "the server in the browser)"
        )
    if action == "start":
        if parse_json_body(body, "start"):
            raise forbid("Permission denied: a start request must not carry a HostConfig")
        return resolved, b""
    if action == "exec":
        return resolved, check_exec_create(caller, owned, body)
    return resolved, None


def check_exec_create(caller: Caller, container: ContainerFacts, body: bytes) -> bytes:
    config = parse_json_body(body, "exec")
    checked = strict_object(
        "exec",
        config,
        {
            key: accept
            for key in (
                "AttachStdin",
                "AttachStdout",
                "AttachStderr",
                "Tty",
                "ConsoleSize",
                "DetachKeys",
                "Detach",
                "Env",
                "Cmd",
                "WorkingDir",
            )
        }
        | {"Privileged": must_be_empty("privileged exec"), "User": accept},
    )
    if container.has_host_binds:
        # also when no user is named: the container's own user may be root (an image that
        # starts as root and drops privileges), and root there can plant set-uid files
        checked["User"] = run_as_caller(caller, checked.get("User"), "exec --user")
    return json.dumps(checked, separators=(",", ":")).encode()


def run_as_caller(caller: Caller, requested: Any, what: str) -> str:
    """The caller's own uid:gid, for processes that can write into bind-mounted host paths.

    A different user (root, or the caller's uid with another group, which could plant a
    set-gid file) is refused rather than silently changed.
    """
    own = f"{caller.uid}:{caller.gid}"
    if requested in (None, "", str(caller.uid), own, caller.user):
        return own
    raise forbid(
        f"Permission denied: processes in containers with host bind mounts run as you "
        f"({own}); {what} {requested} is not allowed"
    )


def check_list(caller: Caller, target: Target, settings: Settings) -> Target:
    filters = owner_filters(target.param("filters"), caller.user, settings.signer())
    return target.with_query(filters=filters)


def check_events(caller: Caller, target: Target, settings: Settings) -> Target:
    extra = {"type": ["container"]}
    filters = owner_filters(target.param("filters"), caller.user, settings.signer(), extra)
    return target.with_query(filters=filters)


# --------------------------------------------------------------------------------------------
# Images and builds


def in_user_namespace(caller: Caller, reference: str) -> bool:
    """Whether a reference names an image under ``ds01-<user>/`` (Docker Hub's domain, which
    clients may or may not spell out, names the same local image)."""
    return _repository(reference).startswith(image_repository(caller.user) + "/")


def _repository(reference: str) -> str:
    repository = reference.split("@", 1)[0]
    for hub in ("docker.io/", "index.docker.io/"):
        repository = repository.removeprefix(hub)
    return repository


def in_any_user_namespace(reference: str) -> bool:
    """Whether a reference lies in some user's namespace ``ds01-*/`` (theirs, or another's)."""
    return _repository(reference).split("/", 1)[0].startswith("ds01-") and "/" in _repository(
        reference
    )


def _same_name(reference: str, tag: str) -> bool:
    """Whether `reference` names `tag` (the engine's name resolution, which wins over ids)."""
    if "@" in reference:
        return True  # a digest: the engine matched it by name and digest
    name = _repository(reference)
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name.removeprefix("library/") == _repository(tag).removeprefix("library/")


def image_visible(caller: Caller, image: ImageFacts | None, shared: frozenset[str]) -> bool:
    """Whether the caller may use this image: an admin shares its id, or it carries a tag in
    the caller's namespace (only they can put one there). A missing image is not visible."""
    if image is None:
        return False
    return image.id in shared or any(in_user_namespace(caller, t) for t in image.repo_tags)


def shown_tag(caller: Caller, reference: str) -> bool:
    """Tags and digests of other users' namespaces are not shown (they name their images)."""
    return in_user_namespace(caller, reference) or not in_any_user_namespace(reference)


def shared_by_pattern(listing: Iterable[Mapping[str, Any]], patterns: Iterable[str]) -> set[str]:
    """Ids of images with a tag matching an admin's pattern (limits ``allowed_images``).

    Tags in users' namespaces never match: ``ds01-*`` must not share everyone's images.
    """
    patterns = tuple(patterns)
    return {
        str(image.get("Id"))
        for image in listing
        for tag in image.get("RepoTags") or []
        if not in_any_user_namespace(tag) and any(fnmatch.fnmatchcase(tag, p) for p in patterns)
    }


def filter_image_document(caller: Caller, data: Any) -> Any:
    """An image inspect document without other users' tags and digests."""
    if isinstance(data, dict):
        for key in ("RepoTags", "RepoDigests"):
            if isinstance(data.get(key), list):
                data[key] = [t for t in data[key] if shown_tag(caller, str(t))]
    return data


def filter_image_list(caller: Caller, listing: Any, shared: frozenset[str]) -> list[Any]:
    """``GET /images/json`` reduced to the images the caller may use, without others' tags."""
    kept = []
    for entry in listing if isinstance(listing, list) else []:
        image = ImageFacts(str(entry.get("Id")), tuple(entry.get("RepoTags") or ()))
        if image_visible(caller, image, shared):
            kept.append(filter_image_document(caller, entry))
    return kept


def filter_image_history(caller: Caller, history: Any) -> Any:
    """``GET /images/X/history`` without other users' tags on the layers."""
    for layer in history if isinstance(history, list) else []:
        if isinstance(layer, dict) and isinstance(layer.get("Tags"), list):
            layer["Tags"] = [t for t in layer["Tags"] if shown_tag(caller, str(t))] or None
    return history


def check_image_tag(caller: Caller, target: Target) -> Target:
    repo = target.param("repo") or ""
    if not in_user_namespace(caller, repo):
        raise forbid(
            f"Permission denied: you may only tag images as {image_repository(caller.user)}/NAME"
        )
    return target


def image_list_refs(target: Target) -> list[tuple[str, str]]:
    """Images that ``before``/``since`` filters of an image list name (the engine looks them
    up and fails on a missing one: they must be visible, or read as missing)."""
    return [(key, ref) for key, ref in _filter_values(target) if key in ("before", "since")]


def _filter_values(target: Target) -> list[tuple[str, str]]:
    raw = target.param("filters")
    if not raw:
        return []
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise Denied(400, "filters is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise Denied(400, "filters must be a JSON object")
    found = []
    for key, values in parsed.items():
        if isinstance(values, dict):
            values = [v for v, on in values.items() if on]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise Denied(400, f"filters[{key!r}] must be a list of strings")
        found += [(str(key), v) for v in values]
    return found


def replace_filter(target: Target, key: str, old: str, new: str) -> Target:
    """The target with one value of one filter replaced (a resolved id, or a stand-in)."""
    parsed = json.loads(target.param("filters") or "{}")
    values = parsed.get(key)
    if isinstance(values, dict):
        values = [v for v, on in values.items() if on]
    parsed[key] = [new if v == old else v for v in values or []]
    return target.with_query(filters=json.dumps(parsed, separators=(",", ":")))


def container_list_refs(target: Target) -> list[tuple[str, str]]:
    """Containers that ``before``/``since`` filters of a container list name."""
    return [(key, ref) for key, ref in _filter_values(target) if key in ("before", "since")]


_CONFLICT = re.compile(r'(is already in use by )container "[0-9a-f]{64}"')


def redact_conflict(message: str) -> str:
    """The engine's name-conflict text without the other container's full id (it may be
    another user's: the name is taken, which cannot be hidden, but whose it is can)."""
    return _CONFLICT.sub(r"\g<1>another container", message)


INFO_COUNTS = ("Containers", "ContainersRunning", "ContainersPaused", "ContainersStopped")


def own_info(info: Any, own: Iterable[Mapping[str, Any]], images: int) -> Any:
    """``/info`` with the caller's own container and image figures instead of everyone's."""
    if not isinstance(info, dict):
        return info
    states = [str(c.get("State") or "") for c in own]
    info["Containers"] = len(states)
    info["ContainersRunning"] = sum(s in ("running", "restarting") for s in states)
    info["ContainersPaused"] = states.count("paused")
    info["ContainersStopped"] = (
        info["Containers"] - info["ContainersRunning"] - info["ContainersPaused"]
    )
    info["Images"] = images
    return info


def check_image_delete(caller: Caller, route: Route) -> None:
    if not in_user_namespace(caller, route.ref or ""):
        raise forbid(
            f"Permission denied: you may only remove your own images "
            f"({image_repository(caller.user)}/NAME:TAG, by name)"
        )


PULL_REFUSED = (
    "Permission denied: pulling and importing images is for admins (a pulled or imported "
    "image would be shared by its name): ask one to pull it and share it "
    "(ds01hub proxy --shared-image); your own images are built as {namespace}/NAME"
)


def check_pull(caller: Caller) -> None:
    """Pulls and imports are refused, whatever the reference (so the answer says nothing
    about which images exist): users use their own images and the ones admins share."""
    raise forbid(PULL_REFUSED.format(namespace=image_repository(caller.user)))


BUILD_NETWORKS = ("", "default", "bridge", "none")
BUILD_FORBIDDEN = (
    "pull",  # would replace the (shared) local base image with the registry's
    "remote",  # the engine would fetch a context from anywhere, as root
    "cgroupparent",
    "session",
    "outputs",
    "ulimits",
    "isolation",
    "squash",
    "platform",  # a base image found locally but for another platform would be pulled over it
)


def check_build_labels(raw: str | None) -> None:
    """``docker build --label``: the image would hand these to every container made from it."""
    if not raw:
        return
    try:
        found = json.loads(raw)
    except ValueError:
        raise Denied(400, "build labels are not valid JSON") from None
    if found is None:
        return
    if not isinstance(found, dict):
        raise Denied(400, "build labels must be a JSON object")
    if bad := sorted(k for k in found if is_reserved(str(k)) or is_routing(str(k))):
        raise forbid(
            f"Permission denied: build label {bad[0]!r}: ds01.*, aime.mlc.* and reverse-proxy "
            "routing labels are reserved to ds01hub; choose another key"
        )


def check_build(caller: Caller, target: Target, limits: UserLimits | None) -> Target:
    """Legacy builds only; tags in the user's namespace; no reserved or routing labels; the
    user's memory/CPU limits.

    The images the build reads (FROM, ``COPY --from``, ``cachefrom``) are checked by
    `build_images` and `check_build_image` once the edge has the context."""
    if target.param("version") not in (None, "", "1"):
        raise forbid(BUILDKIT_REFUSED)
    check_build_labels(target.param("labels"))
    for key in BUILD_FORBIDDEN:
        value = target.param(key)
        if value not in (None, "", "[]", "null", "0", "false"):
            raise forbid(f"Permission denied: build option {key} is not allowed")
    network = target.param("networkmode") or ""
    if network not in BUILD_NETWORKS:
        raise forbid(
            f"Permission denied: build network {network!r} is not allowed "
            f"(allowed: {', '.join(repr(n) for n in BUILD_NETWORKS)})"
        )
    for tag in target.params("t"):
        if not in_user_namespace(caller, tag):
            raise forbid(
                f"Permission denied: build tags must be "
                f"{image_repository(caller.user)}/NAME[:TAG] (got {tag!r})"
            )
    host = dict((limits or UserLimits()).host_config)
    changes: dict[str, str | None] = {}
    if "Memory" in host:
        changes |= {"memory": str(host["Memory"]), "memswap": str(host["Memory"])}
    if "NanoCpus" in host:
        changes |= {"cpuperiod": "100000", "cpuquota": str(host["NanoCpus"] // 10000)}
    if "ShmSize" in host:
        changes["shmsize"] = str(host["ShmSize"])
    return target.with_query(**changes) if changes else target


def build_images(target: Target, context: bytes, limit: int) -> list[build_context.ImageUse]:
    """The images a classic build reads: its Dockerfile's FROM/--from and ``cachefrom``."""
    raw_args = target.param("buildargs")
    try:
        build_args = json.loads(raw_args) if raw_args else {}
    except ValueError:
        raise Denied(400, "buildargs is not valid JSON") from None
    if not isinstance(build_args, dict) or not all(
        isinstance(v, str | None) for v in build_args.values()
    ):
        raise Denied(400, "buildargs must be a JSON object of strings")
    try:
        text = build_context.dockerfile_from_context(context, target.param("dockerfile"), limit)
        uses = build_context.image_uses(text, build_args)
    except build_context.ContextError as error:
        raise forbid(f"Permission denied: {error}") from None
    raw_cache = target.param("cachefrom")
    try:
        cache = json.loads(raw_cache) if raw_cache else []
    except ValueError:
        raise Denied(400, "cachefrom is not valid JSON") from None
    if not isinstance(cache, list) or not all(isinstance(c, str) for c in cache):
        raise Denied(400, "cachefrom must be a JSON list of image names")
    return uses + [build_context.ImageUse(c, "--cache-from") for c in cache]


def check_build_image(
    caller: Caller, use: build_context.ImageUse, image: ImageFacts | None, shared: frozenset[str]
) -> list[build_context.ImageUse]:
    """Refuse an image the caller may not use (missing ones alike: the engine would pull
    them); the images its ONBUILD triggers read, to check in turn."""
    if not image_visible(caller, image, shared):
        raise forbid(
            f"Permission denied: {use.where}: no image {use.reference!r} that you may use "
            f"(yours are {image_repository(caller.user)}/NAME; shared ones are listed by "
            "docker images)"
        )
    assert image is not None
    try:
        return build_context.onbuild_uses(image.on_build, use.reference)
    except build_context.ContextError as error:
        raise forbid(f"Permission denied: {error}") from None


def build_cache_sources(target: Target, image_ids: Iterable[str]) -> Target:
    """The build limited to the caller's own and shared images as cache sources.

    Without ``cachefrom`` the classic builder reuses any local layer built from the same parent
    and step -- another user's: "Using cache" would tell that they ran exactly this step. With
    it, a cached layer counts only when it is an ancestor of one of these images. (An unknown
    entry is skipped by the engine, so the list is never empty: no cache at all then.)
    """
    sources = list(dict.fromkeys([*image_ids, "scratch"]))
    return target.with_query(cachefrom=json.dumps(sources, separators=(",", ":")))
