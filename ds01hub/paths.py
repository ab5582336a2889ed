"""Where ds01hub keeps things on a host, and the environment variables that move them: the one
set of defaults every process, command and installer reads.

A path named by a flag or a setting wins, then its environment variable, then the default
here. Standard library only: `python3 -m ds01hub.host.bootstrap` and `ds01hub install` import
it before any venv exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "BROKER_SOCKET",
    "CONFIG_DIR",
    "DEFAULT_LIMITS_PATH",
    "DEFAULT_STATE_DIR",
    "DOCKER_PROXY_SOCKET",
    "DOCKER_SOCKET",
    "ENV_AGGREGATE_CGROUP_ROOT",
    "ENV_BROKER_SOCKET",
    "ENV_FILE",
    "ENV_FILE_VARIABLE",
    "ENV_LIMITS",
    "ENV_STATE_DIR",
    "HUB_GROUPS_FILE",
    "PROXY_STATE_DIR",
    "RUN_DIR",
    "WORKSPACE_ROOT",
    "aggregate_cgroup_root",
    "hub_groups_snapshot",
    "limits_named",
    "limits_path",
    "state_dir",
]

#: Every ds01hub process on a host shares this directory: allocator lock and reservations,
#: event log, label key, deployment id, build slots, the culler's warnings.
ENV_STATE_DIR = "DS01HUB_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/ds01hub")
#: The ds01-ops service's snapshot of the hub's groups (their `ds01` properties and members),
#: in the state directory: how the doors without the hub's database see group properties.
HUB_GROUPS_FILE = "hub-groups.json"
#: The Docker socket proxy's own state (its signing key copy, its lock).
PROXY_STATE_DIR = DEFAULT_STATE_DIR / "proxy"

#: The admin's files: the site's jupyterhub_config.py, resource-limits.yaml, ds01hub.env.
CONFIG_DIR = Path("/etc/ds01hub")
ENV_LIMITS = "DS01HUB_LIMITS"
DEFAULT_LIMITS_PATH = CONFIG_DIR / "resource-limits.yaml"
ENV_FILE_VARIABLE = "DS01HUB_ENV_FILE"
ENV_FILE = CONFIG_DIR / "ds01hub.env"

#: Where the cgroup v1 controllers are mounted, for per-user parents enforcing aggregate caps:
#: one key (in ds01hub.env) that the hub's spawner and the Docker proxy both read.
ENV_AGGREGATE_CGROUP_ROOT = "DS01HUB_AGGREGATE_CGROUP_ROOT"

#: The users' workspaces (bind-mounted into their containers), as installed.
WORKSPACE_ROOT = Path("/srv/ds01hub/workspaces")
#: The Docker engine's own socket (the proxy's upstream; docker-py's default).
DOCKER_SOCKET = Path("/var/run/docker.sock")

#: The sockets users' commands reach: the broker (ds01 commands) and the Docker proxy.
RUN_DIR = Path("/run/ds01hub")
ENV_BROKER_SOCKET = "DS01HUB_BROKER_SOCKET"
BROKER_SOCKET = RUN_DIR / "broker.sock"
DOCKER_PROXY_SOCKET = RUN_DIR / "docker.sock"


def state_dir(
    given: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """`given` (a flag or setting) when set, else `$DS01HUB_STATE_DIR`, else /var/lib/ds01hub."""
    environ = os.environ if environ is None else environ
    return Path(given or environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR)


def limits_path(
    given: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """`given` when set, else `$DS01HUB_LIMITS`, else /etc/ds01hub/resource-limits.yaml."""
    environ = os.environ if environ is None else environ
    return Path(given or environ.get(ENV_LIMITS) or DEFAULT_LIMITS_PATH)


def limits_named(
    given: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether someone named the limits file (a flag, a setting or `$DS01HUB_LIMITS`): a named
    file must exist; the default one may be absent (ds01hub.limits.load_limits_or_defaults)."""
    environ = os.environ if environ is None else environ
    return bool(given or environ.get(ENV_LIMITS))


def aggregate_cgroup_root(
    given: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """`given` when set, else `$DS01HUB_AGGREGATE_CGROUP_ROOT`, else "" (no per-user parents:
    aggregate caps are checked only)."""
    environ = os.environ if environ is None else environ
    return given or environ.get(ENV_AGGREGATE_CGROUP_ROOT, "")


def hub_groups_snapshot(
    given: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """The hub-groups snapshot in the state directory `given` (ds01hub.hub.group_snapshot)."""
    return state_dir(given, environ) / HUB_GROUPS_FILE
