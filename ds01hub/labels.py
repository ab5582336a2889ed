"""Container naming and the `ds01.*` / `aime.mlc.*` labels: Docker is the source of truth.

Every managed container says, in its labels, whose it is and which GPU slots it holds, so the
allocation state can be rebuilt from `docker ps -a` at any time (nothing to lose when the hub is
killed). `ContainerRecord` is the parsed, typed view of one container that the allocator, the
CLIs and the culler share.

Labels are only believed when ds01hub wrote them (docs/architecture.md, "Trust: labels"): the
keys with a reserved prefix (`RESERVED_PREFIXES`, `ROUTING_PREFIXES`) are set by ds01hub alone,
and `ContainerRecord.from_docker` returns a record only for a container whose signed fields
(`SIGNED_KEYS`) carry a valid `ds01.signature` of this deployment (`ds01hub.provenance`).
Everything else -- unsigned, badly signed, another deployment's -- is not ours: never shown to
users, never counted.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import escapism

from ds01hub.units import utcnow

if TYPE_CHECKING:
    from ds01hub.provenance import Provenance

__all__ = [
    "AIME_GPUS",
    "AIME_MANAGED",
    "AIME_NAME",
    "AIME_USER",
    "CREATED_AT",
    "CREATOR",
    "DEFAULT_PROJECT",
    "DEPLOYMENT",
    "GPUS",
    "GPU_UUIDS",
    "GROUP",
    "IMAGE",
    "MANAGED",
    "NAME_SEPARATOR",
    "OWNER",
    "PRIORITY",
    "PROJECT",
    "RESERVED_PREFIXES",
    "ROUTING_PREFIXES",
    "SIGNATURE",
    "SIGNED_KEYS",
    "USER",
    "ContainerRecord",
    "container_labels",
    "container_name",
    "container_name_of",
    "escape_name",
    "format_slot_list",
    "USER_SETTABLE",
    "is_reserved",
    "is_routing",
    "labels_of",
    "parse_docker_time",
    "reserved_blanks",
    "routing_keys",
    "parse_slot_list",
    "unescape_name",
]

MANAGED = "ds01.managed"
USER = "ds01.user"
PROJECT = "ds01.project"
GROUP = "ds01.group"
PRIORITY = "ds01.priority"
GPUS = "ds01.gpus"
GPU_UUIDS = "ds01.gpu_uuids"
IMAGE = "ds01.image"
CREATED_AT = "ds01.created_at"
DEPLOYMENT = "ds01.deployment"
OWNER = "ds01.owner"
CREATOR = "ds01.creator"
SIGNATURE = "ds01.signature"
AIME_USER = "aime.mlc.USER"
AIME_NAME = "aime.mlc.NAME"
AIME_MANAGED = "aime.mlc.DS01_MANAGED"
AIME_GPUS = "aime.mlc.GPUS"
#: A mark tests put on what they create (the proxy's users may set it too).
TEST = "ds01.test"
#: Reserved keys a user may give their own containers (ds01.project is then signed as theirs);
#: every other ds01.* / aime.mlc.* key is the system's, overwritten in a user's create.
USER_SETTABLE = frozenset({PROJECT, TEST})

#: The fields `ds01.signature` covers (with the container name), in this order, forever:
#: everything a reader takes a decision on. Never reorder; a new field needs a new scheme.
SIGNED_KEYS = (
    MANAGED,
    DEPLOYMENT,
    USER,
    OWNER,
    PROJECT,
    GROUP,
    PRIORITY,
    GPUS,
    GPU_UUIDS,
    IMAGE,
    CREATED_AT,
    AIME_USER,
    AIME_NAME,
    AIME_MANAGED,
    AIME_GPUS,
    CREATOR,
)
#: Label keys only ds01hub may set (images and users' requests never count for them).
RESERVED_PREFIXES = ("ds01.", "aime.mlc.")
#: Reverse proxies that route by container labels (Traefik, caddy-docker-proxy): a user's
#: container must never carry them, whoever set them.
ROUTING_PREFIXES = ("traefik.", "caddy")

DEFAULT_PROJECT = "default"
NAME_SEPARATOR = "._."

_SAFE = set(string.ascii_lowercase + string.digits)
# Docker states in which a container is using (or about to use) its GPUs.
RUNNING_STATES = frozenset({"running", "paused", "restarting"})


def escape_name(text: str) -> str:
    """Docker-safe and reversible, like DockerSpawner: lowercase letters and digits kept,
    everything else `-XX` (hex). Because `.` and `_` are always escaped, the `._.` separator
    can never appear inside an escaped part, so `{project}._.{user}` is unambiguous."""
    return escapism.escape(text, safe=_SAFE, escape_char="-")


def unescape_name(text: str) -> str:
    return escapism.unescape(text, escape_char="-")


def container_name(user: str, project: str | None = None) -> str:
    """`{project}._.{user}`; the unnamed server is project `default`."""
    return f"{escape_name(project or DEFAULT_PROJECT)}{NAME_SEPARATOR}{escape_name(user)}"


def parse_slot_list(text: str | None) -> tuple[str, ...]:
    """'0,1:2' -> ('0', '1:2'); '' or None -> ()."""
    if not text:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def format_slot_list(slots: Sequence[str]) -> str:
    return ",".join(slots)


def container_labels(
    *,
    user: str,
    project: str | None,
    group: str | None,
    priority: int,
    gpus: Sequence[str] = (),
    gpu_uuids: Sequence[str] = (),
    image: str = "",
    created_at: datetime | None = None,
) -> dict[str, str]:
    """The full label set of a managed container (Docker labels are strings)."""
    created = (created_at or utcnow()).astimezone(UTC)
    project = project or DEFAULT_PROJECT
    slots = format_slot_list(gpus)
    return {
        MANAGED: "true",
        USER: user,
        PROJECT: project,
        GROUP: group or "",
        PRIORITY: str(priority),
        GPUS: slots,
        GPU_UUIDS: ",".join(gpu_uuids),
        IMAGE: image,
        CREATED_AT: created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        AIME_USER: user,
        AIME_NAME: project,
        AIME_MANAGED: "true",
        AIME_GPUS: slots,
    }


def is_reserved(key: str) -> bool:
    """A key only ds01hub may set (`ds01.*`, `aime.mlc.*`)."""
    return key.startswith(RESERVED_PREFIXES)


def is_routing(key: str) -> bool:
    """A reverse-proxy routing key (`traefik.*`, `caddy*`): never on a user's container."""
    return key.startswith(ROUTING_PREFIXES)


def routing_keys(found: Mapping[str, str]) -> list[str]:
    """The reverse-proxy routing keys among `found`, sorted."""
    return sorted(k for k in found if is_routing(k))


def reserved_blanks(image_labels: Mapping[str, str]) -> dict[str, str]:
    """For a create from an image with `image_labels`: each reserved key set to "" so that the
    engine merges none of the image's values into the container's reserved keys."""
    return {k: "" for k in image_labels if is_reserved(k)}


def container_name_of(attrs: Mapping[str, Any]) -> str:
    """The container's own name without the leading `/`, from an inspect document (`Name`)
    or a list entry (`Names`, where legacy link aliases look like `/other/alias`)."""
    if attrs.get("Name"):
        return str(attrs["Name"]).removeprefix("/")
    names = [str(n).removeprefix("/") for n in attrs.get("Names") or []]
    return next((n for n in names if "/" not in n), names[0] if names else "")


def labels_of(attrs: Mapping[str, Any]) -> Mapping[str, str]:
    """The labels of an inspect document (`Config.Labels`) or a list entry (`Labels`)."""
    found = (attrs.get("Config") or {}).get("Labels") if "Config" in attrs else attrs.get("Labels")
    return found or {}


def parse_docker_time(value: Any) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds, `Z`) or epoch seconds -> aware UTC datetime.
    Docker's zero time (`0001-01-01T00:00:00Z`, never started/finished) -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    text = str(value)
    if text.startswith("0001-01-01"):
        return None
    text = text.replace("Z", "+00:00")
    if "." in text:  # trim nanoseconds to microseconds for fromisoformat
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ContainerRecord:
    """One managed container as the allocator and the front ends see it.

    `state` is Docker's (`running`, `exited`, `created`, ...); `running` is True for states in
    which the container uses its GPUs. `finished_at` is when it stopped (None while running or
    when Docker does not say: the list API omits it, so callers inspect stopped containers).
    """

    id: str
    name: str
    user: str
    project: str
    group: str | None
    priority: int
    gpus: tuple[str, ...]
    gpu_uuids: tuple[str, ...]
    image: str
    state: str
    created_at: datetime | None
    finished_at: datetime | None
    deployment: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @classmethod
    def from_docker(cls, attrs: Mapping[str, Any], trust: Provenance) -> ContainerRecord | None:
        """From an inspect document (`container.attrs`) or a list entry (`/containers/json`);
        None unless ds01hub of `trust`'s deployment signed this container's labels."""
        if not trust.verify(labels_of(attrs), container_name_of(attrs)):
            return None
        return cls.claimed(attrs)

    @classmethod
    def claimed(cls, attrs: Mapping[str, Any]) -> ContainerRecord | None:
        """What the labels *claim*, unverified (None without `ds01.managed=true` and a user).

        Only for documents `from_docker` has already accepted, and for admin views that show
        unverified containers as such (`ds01hub status --all-deployments`): anyone who can
        build an image can make a container claim anything."""
        config = attrs.get("Config") or {}
        labels = labels_of(attrs)
        if labels.get(MANAGED) != "true" or not labels.get(USER):
            return None
        state_field = attrs.get("State")
        if isinstance(state_field, Mapping):  # inspect
            state = state_field.get("Status", "")
            finished = parse_docker_time(state_field.get("FinishedAt"))
        else:  # list entry: State is a word, no FinishedAt
            state, finished = str(state_field or ""), None
        created = parse_docker_time(labels.get(CREATED_AT)) or parse_docker_time(
            attrs.get("Created")
        )
        if state == "created" and finished is None:
            # Created but never started (e.g. a spawn that died between create and start):
            # it holds like a stopped container from its creation, so nothing leaks.
            finished = created
        try:
            priority = int(labels.get(PRIORITY, ""))
        except ValueError:
            priority = 0
        return cls(
            id=str(attrs.get("Id", "")),
            name=container_name_of(attrs),
            user=labels[USER],
            project=labels.get(PROJECT) or DEFAULT_PROJECT,
            group=labels.get(GROUP) or None,
            priority=priority,
            gpus=parse_slot_list(labels.get(GPUS)),
            gpu_uuids=parse_slot_list(labels.get(GPU_UUIDS)),
            image=labels.get(IMAGE, "") or str(config.get("Image") or attrs.get("Image") or ""),
            state=state,
            created_at=created,
            finished_at=finished,
            deployment=labels.get(DEPLOYMENT, ""),
            labels=dict(labels),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "user": self.user,
            "project": self.project,
            "group": self.group,
            "priority": self.priority,
            "gpus": list(self.gpus),
            "gpu_uuids": list(self.gpu_uuids),
            "image": self.image,
            "state": self.state,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "deployment": self.deployment,
        }
