"""The hub side of ds01hub's services: each one's name, role and scopes, and the helpers that
register it in a JupyterHub config (call them from jupyterhub_config.py).

JupyterHub starts managed services with a bare environment: the broker's and the notebook
service's registrations pass the hub's `$DS01HUB_STATE_DIR` on
(`provenance.service_environment`); ds01-ops gets its state directory as an option.

Before ds01hub's packages, a jupyterhub_config.py imported these from the services' modules:
the old names are in docs/architecture.md ("Renamed").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ds01hub import paths, provenance
from ds01hub.services.broker.protocol import DEFAULT_SOCKET
from ds01hub.services.ops.warnings import hub_announcement

BROKER_SERVICE = "ds01-broker"
NOTEBOOK_SERVICE = "ds01"
NOTEBOOK_PORT = 10101
NOTEBOOK_ACCESS_SCOPE = f"access:services!service={NOTEBOOK_SERVICE}"
OPS_SERVICE = "ds01-ops"
OPS_PORT = 10102
#: What the culler's token may do: see users, their groups, activity and servers; stop servers.
OPS_SCOPES = ["list:users", "read:users", "read:users:activity", "read:servers", "servers"]


# A config file loaded with load_subconfig() starts from an empty config, where list and dict
# values are LazyConfigValues: append/extend/update on them merge with the parent file's values
# instead of replacing them. Where the value is a real list (one file), it is merged here.


def replace_named(section, key: str, entry: dict) -> None:
    """Add `entry` to a list of named dicts in a config section, replacing one of the same
    name. In a file loaded with load_subconfig the value is a LazyConfigValue: appending to it
    merges with the parent file's list instead of replacing it."""
    current = section[key]
    if isinstance(current, list):
        section[key] = [e for e in current if e.get("name") != entry["name"]] + [entry]
    else:
        current.append(entry)


# -- the broker (ds01hub.services.broker) -----------------------------------------------------


def broker_scopes(auto_create_users: bool = True) -> list[str]:
    """Least privilege: start/stop/delete and read servers, read users (groups, activity),
    report activity of shells, and, only when the broker creates hub users on first use,
    `admin:users`."""
    scopes = ["servers", "read:users", "users:activity"]
    return scopes + (["admin:users"] if auto_create_users else [])


def configure_broker(
    c,
    *,
    socket_path: str = DEFAULT_SOCKET,
    broker_args: list[str] | tuple[str, ...] = (),
    environment: dict[str, str] | None = None,
    auto_create_users: bool = True,
) -> None:
    """Register the broker in a JupyterHub config `c` (call from jupyterhub_config.py): the
    managed service (`python -m ds01hub.services.broker`), its role, and named servers (one per
    project), which the users' commands rely on."""
    args = [f"--Broker.socket_path={socket_path}", *broker_args]
    if not auto_create_users:
        args.append("--Broker.auto_create_users=False")
    service = {
        "name": BROKER_SERVICE,
        "command": [sys.executable, "-m", "ds01hub.services.broker", *args],
        "environment": provenance.service_environment(environment),
    }
    role = {
        "name": BROKER_SERVICE,
        "services": [BROKER_SERVICE],
        "scopes": broker_scopes(auto_create_users),
    }
    replace_named(c.JupyterHub, "services", service)
    replace_named(c.JupyterHub, "load_roles", role)
    c.JupyterHub.allow_named_servers = True


# -- the notebook service (ds01hub.services.notebook) -----------------------------------------


def configure_notebook(
    c,
    *,
    url: str = f"http://127.0.0.1:{NOTEBOOK_PORT}",
    container_url: str | None = None,
    service_args: Iterable[str] = (),
    environment: dict[str, str] | None = None,
) -> None:
    """Register the ds01 service in a JupyterHub config ``c`` (call from jupyterhub_config.py).

    * the managed service itself (``python -m ds01hub.services.notebook``) listening on ``url``;
    * its role: read users and their groups and servers, start servers (project containers);
    * ``access:services!service=ds01`` for every user and in every server's token, so the
      server extension can call the service with ``$JUPYTERHUB_API_TOKEN``;
    * ``DS01_SERVICE_URL`` in the single-user environment: ``container_url`` (how containers
      reach the service, e.g. ``http://172.17.0.1:10101/services/ds01/``), default ``url``.
    """
    prefix = f"/services/{NOTEBOOK_SERVICE}/"
    service = {
        "name": NOTEBOOK_SERVICE,
        "url": url,
        "command": [sys.executable, "-m", "ds01hub.services.notebook", *service_args],
        "oauth_no_confirm": True,
        "environment": provenance.service_environment(environment),
        # an API behind the notebook widgets, not a page: kept out of the Services menu
        "display": False,
    }
    replace_named(c.JupyterHub, "services", service)
    _add_roles(
        c,
        [
            {
                "name": "ds01-service",
                "services": [NOTEBOOK_SERVICE],
                "scopes": ["read:users", "read:users:groups", "read:servers", "servers"],
            }
        ],
        {
            "user": ["self"],
            "server": ["users:activity!user", "access:servers!server"],
        },
    )
    reach = (container_url or url).rstrip("/")
    if not reach.endswith(prefix.rstrip("/")):
        reach += prefix.rstrip("/")
    c.Spawner.environment.update({"DS01_SERVICE_URL": reach + "/"})


def _merge_role(
    roles: list[dict], name: str, default_scopes: list[str], add: Iterable[str]
) -> None:
    for role in roles:
        if role.get("name") == name:
            role["scopes"] = list(dict.fromkeys([*role.get("scopes", default_scopes), *add]))
            return
    roles.append({"name": name, "scopes": list(dict.fromkeys([*default_scopes, *add]))})


def _add_roles(c, new_roles: list[dict], extend: dict[str, list[str]]) -> None:
    """Add ``new_roles`` and ``NOTEBOOK_ACCESS_SCOPE`` to the roles named in ``extend`` (whose
    default scopes are given, since redefining a role replaces its scopes)."""
    roles = c.JupyterHub.load_roles
    if not isinstance(roles, list):
        roles.extend(new_roles)
        roles.extend(
            {"name": name, "scopes": [*defaults, NOTEBOOK_ACCESS_SCOPE]}
            for name, defaults in extend.items()
        )
        return
    roles = _as_list(roles) + new_roles
    for name, defaults in extend.items():
        _merge_role(roles, name, defaults, [NOTEBOOK_ACCESS_SCOPE])
    c.JupyterHub.load_roles = roles


def _as_list(value) -> list:
    return [dict(v) if isinstance(v, dict) else v for v in value] if isinstance(value, list) else []


# -- the hub's pages (ds01hub/hub/templates) ------------------------------------------------

TEMPLATES = Path(__file__).with_name("templates")


def configure_pages(c: Any) -> None:
    """The hub's pages with ds01hub's additions (`c.JupyterHub.template_paths`): a "GPUs"
    navbar entry for admins (the ds01-ops page), the spawn-pending page that ticks a GPU
    wait's countdown, and the spawn page that shows a refusal's HTML message (details folded,
    a way back) instead of its plain text. Each extends JupyterHub's own template
    (`templates/...`)."""
    paths = c.JupyterHub.template_paths
    if isinstance(paths, list):
        if str(TEMPLATES) not in paths:
            c.JupyterHub.template_paths = [str(TEMPLATES), *paths]
    elif str(TEMPLATES) not in paths.to_dict().get("prepend", []):
        paths.prepend([str(TEMPLATES)])


# -- ds01-ops (ds01hub.services.ops) ----------------------------------------------------------


def configure_ops(
    c: Any,
    *,
    url: str = f"http://127.0.0.1:{OPS_PORT}",
    state_dir: str | os.PathLike | None = None,
    service_args: Iterable[str] = (),
    environment: Mapping[str, str] | None = None,
    announce: bool = True,
) -> None:
    """Register the ds01-ops managed service in a JupyterHub config `c`: its command (on
    `state_dir`, default `$DS01HUB_STATE_DIR` or /var/lib/ds01hub: the spawner's), its role
    (`OPS_SCOPES`), and admin-only access to its page (admins hold `access:services`).
    With `announce`, the hub's pages show each user their pending culls as a banner
    (`template_vars["announcement"]`). The hub's pages get ds01hub's (`configure_pages`).
    Prometheus scrapes `/services/ds01-ops/metrics` with a token that has `read:metrics`."""
    state_dir = paths.state_dir(state_dir)
    service = {
        "name": OPS_SERVICE,
        "url": url,
        "command": [
            sys.executable,
            "-m",
            "ds01hub.services.ops",
            f"--OpsService.state_dir={state_dir}",
            *service_args,
        ],
        "oauth_no_confirm": True,
        "environment": dict(environment or {}),
        "display": False,
    }
    role = {"name": OPS_SERVICE, "services": [OPS_SERVICE], "scopes": OPS_SCOPES}
    replace_named(c.JupyterHub, "services", service)
    replace_named(c.JupyterHub, "load_roles", role)
    configure_pages(c)
    if announce:
        c.JupyterHub.template_vars.update({"announcement": hub_announcement(state_dir)})


QUEUE_SERVICE = "ds01-queue"
QUEUE_SCOPES = ["servers", "read:users", "read:servers"]


def configure_queue(c: Any, state_dir: str | os.PathLike | None = None) -> None:
    """Let users leave a spawn request queued ("wait for a GPU", the `queue` spawn option):
    the hub starts such a server itself when its GPU is granted, through its own REST API,
    with the token of a token-only service (`QUEUE_SCOPES`), kept in the state directory
    (`queue-token`, mode 0600, made on first use) and given to `DS01Spawner.queue_api_token`."""
    state_dir = paths.state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = provenance.secret_file(state_dir / "queue-token")
    replace_named(c.JupyterHub, "services", {"name": QUEUE_SERVICE, "api_token": token})
    role = {"name": QUEUE_SERVICE, "services": [QUEUE_SERVICE], "scopes": QUEUE_SCOPES}
    replace_named(c.JupyterHub, "load_roles", role)
    c.DS01Spawner.queue_api_token = token
