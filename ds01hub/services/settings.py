"""Settings that several ds01hub services declare alike, declared once (traitlets mixins).

Each service mixes in what it uses (`class Broker(HostSettings, ImageBuildSettings,
Application)`); traitlets reads a class's settings under every name in its MRO, so
`c.Broker.state_dir`, `c.DS01Service.max_concurrent_builds` and `--OpsService.limits_path` keep
working, and `c.HostSettings.state_dir` sets it for every service at once.
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import Integer, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from ds01hub import paths, provenance
from ds01hub.actions import images
from ds01hub.actions.builds import MAX_CONCURRENT_BUILDS, BuildManager, docker_builder
from ds01hub.actions.registry import Registry, delete_published, publisher

__all__ = ["HostSettings", "ImageBuildSettings", "RegistrySettings"]


class HostSettings(Configurable):
    """Where the host's limits file and shared state are (ds01hub.paths)."""

    limits_path = Unicode(
        "",
        help="""The resource-limits YAML. Empty: $DS01HUB_LIMITS, else
        /etc/ds01hub/resource-limits.yaml; with neither set and no file there, the built-in
        defaults (ds01hub.limits.load_limits_or_defaults). Used for quotas, GPU hold times and
        the culler's timeouts; re-read when it changes, a broken edit keeps the last good
        file.""",
    ).tag(config=True)

    state_dir = Unicode(
        help="""The state directory every ds01hub process on the host shares (the
        spawner's): its label key and deployment id decide which containers are this hub's;
        the allocator's claims, the event log, the build slots and the culler's pending
        warnings live there. Default: $DS01HUB_STATE_DIR, else /var/lib/ds01hub.""",
    ).tag(config=True)

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return str(paths.state_dir())


class RegistrySettings(Configurable):
    """The cluster's image registry (ds01hub.actions.registry): where `image-create` publishes
    users' images so that every node can pull them. Unset on one host."""

    registry = Unicode(
        "",
        help="""A Docker Swarm's registry as its nodes name it in image references
        (host[:port], e.g. registry.lab:5000; README "More than one machine"). Set: each
        image a user builds is pushed there as <registry>/ds01-<user>/<name>, and its digest
        recorded (signed, as a Swarm config on the manager) so that servers run exactly that
        image on any node, and only its owner's (and admins'). Empty (one host): images stay
        local.""",
    ).tag(config=True)

    registry_url = Unicode(
        "",
        help="""Where this host reaches the registry's HTTP API (http(s)://host[:port]), for
        image-delete's DELETE of the manifest. Empty: http://<registry>.""",
    ).tag(config=True)

    @validate("registry", "registry_url")
    def _usable_registry(self, proposal: Any) -> str:
        """A bad address stops the service at its start, named (traitlets' config error),
        rather than at the first build."""
        value = str(proposal["value"])
        name = f"{type(self).__name__}.{proposal['trait'].name}"
        try:
            if proposal["trait"].name == "registry":
                Registry.configured(value, setting=name)
            elif value:
                Registry.configured("registry", value, setting=name.removesuffix("_url"))
        except images.ImageError as error:
            hint = f"; {error.hint}" if error.hint else ""
            raise TraitError(f"{error.message}{hint}") from None
        return value

    def cluster_registry(self) -> Registry | None:
        """The configured registry, None on one host (ImageError for a bad setting)."""
        return Registry.configured(
            self.registry, self.registry_url, f"{type(self).__name__}.registry"
        )


class ImageBuildSettings(RegistrySettings):
    """How users' images are built (ds01hub.actions.builds): the same through every door."""

    base_image = Unicode(
        help="""Image that users' images are built FROM: the lab's single-user image, the
        admin's choice, never the user's. Default: $DS01HUB_SINGLEUSER_IMAGE.""",
    ).tag(config=True)

    @default("base_image")
    def _default_base_image(self) -> str:
        return os.environ.get("DS01HUB_SINGLEUSER_IMAGE", "")

    ca_bundle = Unicode(
        "",
        help="""PEM CA bundle trusted inside image builds (pip, requests, OpenSSL, apt). Set
        it when the host reaches PyPI/Debian through a TLS-intercepting proxy, e.g.
        /etc/ssl/certs/ca-certificates.crt. Empty: builds use the image's own CAs.""",
    ).tag(config=True)

    max_images_per_user = Integer(10, help="Images one user may keep (0 = no limit).").tag(
        config=True
    )

    max_concurrent_builds = Integer(
        MAX_CONCURRENT_BUILDS,
        help="Image builds running at once on the host, all users and both doors (the broker "
        "and the ds01 service share the slots through the state directory); more wait in a "
        "queue.",
    ).tag(config=True)

    build_memory_limit = Integer(
        4 * 1024**3, help="Memory (bytes) for each build step's container (0 = unlimited)."
    ).tag(config=True)

    def build_manager(self, docker_client: Any, state_dir: str | os.PathLike) -> BuildManager:
        """The door's build manager with these settings; its slots are the host's (in
        `state_dir`), shared with the other door."""
        registry = self.cluster_registry()
        run_build = docker_builder(
            docker_client,
            self.base_image,
            self.ca_bundle,
            self.build_memory_limit,
            who=f"{type(self).__name__}.base_image",
            publish=None
            if registry is None
            else publisher(docker_client, registry, provenance.load(state_dir)),
        )
        return BuildManager(run_build, state_dir, max_concurrent=self.max_concurrent_builds)

    def delete_image(
        self, docker_client: Any, state_dir: str | os.PathLike, user: str, name: str
    ) -> str:
        """Remove `user`'s image `name` (the removed tag): the local tag on one host; on a
        cluster also its manifests in the registry and its records."""
        registry = self.cluster_registry()
        if registry is None:
            return images.delete_user_image(docker_client, user, name)
        trust = provenance.load(state_dir)
        return delete_published(docker_client, registry, trust, user, name)
