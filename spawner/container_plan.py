"""What one spawn's container looks like, pure: limits + choice + GPU slots -> Docker arguments.

`ContainerPlan` holds the labels, environment and docker-py host-config keywords that the
spawner adds to DockerSpawner's own; `recreate_reason` compares a plan with an existing
(stopped) container, because device requests, limits and the image are fixed when a container
is created: a restart whose GPUs or limits changed must create the container anew.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, replace
from typing import Any

from ds01hub import labels
from ds01hub.gpu.inventory import Slot
from ds01hub.limits import ResolvedLimits
from ds01hub.provenance import Provenance

from .options import SpawnChoice, normalize_image

__all__ = ["ContainerPlan", "device_requests", "gpu_environment", "recreate_reason"]


#: docker-py host-config keyword -> the HostConfig field `docker inspect` shows.
def device_requests(slots: Sequence[Slot]) -> list[dict[str, Any]]:
    """One NVIDIA device request naming the slots' UUIDs (MIG-... for MIG instances)."""
    if not slots:
        return []
    return [{"driver": "nvidia", "device_ids": [s.uuid for s in slots], "capabilities": [["gpu"]]}]


def gpu_environment(slots: Sequence[Slot], simulated: bool) -> dict[str, str]:
    """The container sees exactly its slots. Without GPUs, `NVIDIA_VISIBLE_DEVICES=void` keeps
    an image whose ENV says `all` from getting every GPU where nvidia is the default runtime."""
    if not slots:
        return {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": "", "DS01_GPUS": ""}
    uuids = ",".join(s.uuid for s in slots)
    env = {
        "NVIDIA_VISIBLE_DEVICES": uuids,
        "CUDA_VISIBLE_DEVICES": uuids,
        "DS01_GPUS": labels.format_slot_list([s.id for s in slots]),
        "DS01_GPU_PROFILES": ",".join(s.profile or "full" for s in slots),
    }
    if simulated:
        env["DS01_GPUS_SIMULATED"] = "1"
    return env


@dataclass(frozen=True)
class ContainerPlan:
    """The ds01 part of one container's create call, for the container called `name`; its
    labels are signed with `trust` (the deployment's key), over that name."""

    user: str
    project: str | None
    limits: ResolvedLimits
    choice: SpawnChoice
    slots: tuple[Slot, ...] = ()
    simulated: bool = False
    run_as: tuple[int, int] | None = None
    workspace: tuple[str, str] | None = None  # (host directory, mount point)
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    image_labels: Mapping[str, str] = field(default_factory=dict)  # the image's own labels
    # the process creating it (`allocation_state.Owner.label()`): a never-started container
    # whose creator lives is a spawn in progress, not a ghost
    creator: str = ""
    _: KW_ONLY
    name: str
    trust: Provenance

    @property
    def slot_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.slots)

    def labels(self) -> dict[str, str]:
        """`extra_labels` under the signed ds01 labels. Every signed key is set explicitly, and
        every other reserved key the image carries is set empty: Docker merges an image's
        labels into the container only for keys the create leaves unset."""
        own = labels.container_labels(
            user=self.user,
            project=self.project,
            group=self.limits.group,
            priority=self.limits.priority,
            gpus=self.slot_ids,
            gpu_uuids=[s.uuid for s in self.slots],
            image=self.choice.image,
        ) | {labels.CREATOR: self.creator}
        blanks = labels.reserved_blanks(self.image_labels)
        return {**self.extra_labels, **blanks, **self.trust.sign(own, self.name)}

    def environment(self) -> dict[str, str]:
        env = gpu_environment(self.slots, self.simulated)
        if self.choice.max_cpus is not None:
            env["CPU_LIMIT"] = f"{self.choice.max_cpus:g}"
        if self.choice.memory is not None:
            env["MEM_LIMIT"] = str(self.choice.memory)
        if self.run_as and self.workspace:
            env["HOME"] = self.workspace[1]
        return env

    def enforced_limits(self) -> ResolvedLimits:
        """The user's limits with the choice's CPUs and memory (a profile may lower them)."""
        return replace(self.limits, max_cpus=self.choice.max_cpus, memory=self.choice.memory)

    def host_config(self) -> dict[str, Any]:
        """docker-py keywords: the limits (choice's cpu/memory, which may be lower), the GPUs,
        the workspace bind."""
        config = self.enforced_limits().host_config()
        config["device_requests"] = device_requests(self.slots)
        if self.workspace:
            host, mount = self.workspace
            config["binds"] = {host: {"bind": mount, "mode": "rw"}}
        return config

    def create_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"labels": self.labels()}
        if self.run_as:
            kwargs["user"] = f"{self.run_as[0]}:{self.run_as[1]}"
        return kwargs


def _expected_host_fields(plan: ContainerPlan) -> dict[str, Any]:
    return plan.enforced_limits().api_host_config()


def recreate_reason(attrs: Mapping[str, Any], plan: ContainerPlan) -> str | None:
    """Why an existing container cannot be restarted as it is for `plan` (None = it can)."""
    record = labels.ContainerRecord.from_docker(attrs, plan.trust)
    if record is None:
        return "its ds01 labels are not signed by this hub (made before label signing?)"
    if record.gpus != plan.slot_ids:
        old = ",".join(record.gpus) or "none"
        return f"its GPU slots changed ({old} -> {','.join(plan.slot_ids) or 'none'})"
    image = (attrs.get("Config") or {}).get("Image", "")
    if normalize_image(image) != normalize_image(plan.choice.image):
        return f"the image changed ({image} -> {plan.choice.image})"
    host = attrs.get("HostConfig") or {}
    for key, wanted in _expected_host_fields(plan).items():
        if host.get(key) != wanted:
            return f"the limits changed ({key} {host.get(key)!r} -> {wanted!r})"
    if plan.run_as and (attrs.get("Config") or {}).get("User") != plan.create_kwargs()["user"]:
        return "the user id it runs as changed"
    if plan.workspace and not any(
        bind.split(":")[:2] == list(plan.workspace) for bind in host.get("Binds") or []
    ):
        return "its workspace mount changed"
    return None
