"""Settings that several ds01hub services declare alike, declared once (traitlets mixins).

Each service mixes in what it uses (`class Broker(HostSettings, ImageBuildSettings,
Application)`); traitlets reads a class's settings under every name in its MRO, so
`c.Broker.state_dir`, `c.DS01Service.max_concurrent_builds` and `--OpsService.limits_path` keep
working, and `c.HostSettings.state_dir` sets it for every service at once.
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import Integer, Unicode, default
from traitlets.config import Configurable

from ds01hub import paths
from ds01hub.actions.builds import MAX_CONCURRENT_BUILDS, BuildManager, docker_builder

__all__ = ["HostSettings", "ImageBuildSettings"]


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


class ImageBuildSettings(Configurable):
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
        run_build = docker_builder(
            docker_client,
            self.base_image,
            self.ca_bundle,
            self.build_memory_limit,
            who=f"{type(self).__name__}.base_image",
        )
        return BuildManager(run_build, state_dir, max_concurrent=self.max_concurrent_builds)
