"""ds01hub's JupyterHub configuration: a lab's deployment and `make demo` use this one file.

Run with ``jupyterhub -f config/jupyterhub_config.py``. Site settings come from the environment
(or from a small file that sets them and then ``load_subconfig``s this one, as the demo does):

  DS01HUB_STATE_DIR       hub database, cookie secret, pid files (default /var/lib/ds01hub)
  DS01HUB_BIND_URL        the public URL of the proxy (default http://127.0.0.1:8000)
  DS01HUB_HUB_PORT        the hub's own port, on the Docker bridge address (default 8081)
  DS01HUB_PROXY_API_PORT  configurable-http-proxy's API port, loopback only (default 8001)
  DS01HUB_IMAGE           the single-user image (default ds01hub/singleuser:latest, built by
                          `ds01hub bootstrap images`)
  DS01HUB_LIMITS          the resource-limits YAML (default /etc/ds01hub/resource-limits.yaml;
                          config/resource-limits.yaml is the example)
  DS01HUB_SSL_CERT/_KEY   TLS: the hub's certificate chain and key (PEM); the public URL is
                          then https. DS01HUB_HTTP_REDIRECT_PORT: also redirect http there
  DS01HUB_WORKSPACE_ROOT  one persistent workspace per user under it (their own uid/gid, the
                          same files over SSH and at /workspace in their containers)
  DS01HUB_ADMIN_TOKEN_FILE the hub API token of the admin commands (`ds01hub cull`)
  DS01HUB_GPU_GROUP       the NVIDIA device nodes' group: containers get it (ds01hub.gpu.access)
  DS01HUB_AGGREGATE_CGROUP_ROOT  /sys/fs/cgroup: users' aggregate caps enforced by per-user parent
                          cgroups (DS01Spawner.aggregate_cgroup_root; the proxy reads it too)

`ds01hub install` keeps these in /etc/ds01hub/ds01hub.env and runs this file from its own
/etc/ds01hub/jupyterhub_config.py (which adds the authenticator). Each part of ds01hub adds its
own small section below.
"""

import os
from pathlib import Path

from ds01hub.host.bootstrap import docker_bridge_ip

c = get_config()  # noqa: F821

# -- foundation: state, addresses ------------------------------------------------------------
state_dir = Path(os.environ.get("DS01HUB_STATE_DIR", "/var/lib/ds01hub"))
state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
c.JupyterHub.db_url = f"sqlite:///{state_dir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state_dir / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(state_dir / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(state_dir / "proxy.pid")

c.JupyterHub.bind_url = os.environ.get("DS01HUB_BIND_URL", "http://127.0.0.1:8000")
c.ConfigurableHTTPProxy.api_url = (
    f"http://127.0.0.1:{os.environ.get('DS01HUB_PROXY_API_PORT', '8001')}"
)
# Containers reach the hub API on the Docker bridge address (found at start, not hard-coded);
# binding there rather than 0.0.0.0 keeps the hub's own port off every other network.
_hub_url = f"http://{docker_bridge_ip()}:{os.environ.get('DS01HUB_HUB_PORT', '8081')}"
c.JupyterHub.hub_bind_url = _hub_url
c.JupyterHub.hub_connect_url = _hub_url

# -- live: TLS on the hub's own port (or a reverse proxy in front: docs/going-live.md) --------
if os.environ.get("DS01HUB_SSL_CERT"):
    c.JupyterHub.ssl_cert = os.environ["DS01HUB_SSL_CERT"]
    c.JupyterHub.ssl_key = os.environ.get("DS01HUB_SSL_KEY", "")  # JupyterHub names a missing one
    if os.environ.get("DS01HUB_HTTP_REDIRECT_PORT"):  # plain http there answers with a redirect
        c.ConfigurableHTTPProxy.command = [
            "configurable-http-proxy",
            "--redirect-port",
            os.environ["DS01HUB_HTTP_REDIRECT_PORT"],
        ]

# -- foundation: servers are containers; named servers are a user's projects -----------------
# The spawner: "docker" is plain DockerSpawner; DS01Spawner ("ds01") adds limits and GPUs.
c.JupyterHub.spawner_class = "ds01"
c.DockerSpawner.image = os.environ.get("DS01HUB_IMAGE", "ds01hub/singleuser:latest")
c.DockerSpawner.network_name = "bridge"
c.DockerSpawner.notebook_dir = "/workspace"
c.JupyterHub.allow_named_servers = True
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 120

# -- cli: the ds01 broker, through which SSH users' commands (container-*, image-*) act ------
# A managed service on a unix socket: the kernel (SO_PEERCRED) says who is calling, so users
# need no token and no docker group. Services get a bare environment: pass on what it reads.
from ds01hub.hub.services import configure_broker  # noqa: E402

configure_broker(
    c,
    socket_path=os.environ.get("DS01HUB_BROKER_SOCKET", "/run/ds01hub/broker.sock"),
    # state_dir: the spawner's (its label key says which containers are this hub's), where the
    # culler also leaves its warnings, which each command shows its user
    broker_args=[f"--Broker.base_image={c.DockerSpawner.image}", f"--Broker.state_dir={state_dir}"],
    environment={k: os.environ[k] for k in ("DS01HUB_LIMITS", "DOCKER_HOST") if k in os.environ},
)

# -- notebook: the ds01 service behind the notebook widgets (quota, containers, image builds) --
# A managed service: the only part that builds images or reads Docker for a notebook; single-user
# servers reach it on the Docker bridge address with their own token ($DS01_SERVICE_URL is set
# for them). DS01HUB_SERVICE_PORT (default 10101); DS01HUB_CA_BUNDLE: a PEM bundle trusted in
# image builds (sites behind a TLS-intercepting proxy, e.g. /etc/ssl/certs/ca-certificates.crt).
from ds01hub.hub.services import configure_notebook  # noqa: E402

_ca_bundle = os.environ.get("DS01HUB_CA_BUNDLE", "")
configure_notebook(
    c,
    url=f"http://{docker_bridge_ip()}:{os.environ.get('DS01HUB_SERVICE_PORT', '10101')}",
    # state_dir: the spawner's, whose label key says which containers are this hub's
    service_args=[
        f"--DS01Service.base_image={c.DockerSpawner.image}",
        f"--DS01Service.state_dir={state_dir}",
    ]
    + ([f"--DS01Service.ca_bundle={_ca_bundle}"] if _ca_bundle else []),
    environment={k: os.environ[k] for k in ("DS01HUB_LIMITS", "DOCKER_HOST") if k in os.environ},
)

# -- ops: ds01-ops (GPU-aware idle culler, hold expiry/cleanup, admin page, state metrics) ----
# A managed service on loopback: admins open /services/ds01-ops/ (HubOAuth + admin check);
# Prometheus scrapes /services/ds01-ops/metrics and /hub/metrics with a `read:metrics` token.
# DS01HUB_OPS_PORT (default 10102); DS01HUB_CULL_INTERVAL seconds between passes (300);
# DS01HUB_CULL_WARN_BEFORE lead time of the users' warning in seconds (600).
from ds01hub.hub.services import configure_ops  # noqa: E402

configure_ops(
    c,
    url=f"http://127.0.0.1:{os.environ.get('DS01HUB_OPS_PORT', '10102')}",
    state_dir=state_dir,  # the spawner's: same holdings, same event log; hub pages announce culls
    service_args=[
        f"--OpsService.interval={os.environ.get('DS01HUB_CULL_INTERVAL', '300')}",
        f"--OpsService.warn_before={os.environ.get('DS01HUB_CULL_WARN_BEFORE', '600')}",
    ],
    # DS01HUB_AGGREGATE_CGROUP_ROOT: the lifecycle pass removes users' unused parent cgroups
    environment={
        k: os.environ[k]
        for k in ("DS01HUB_LIMITS", "DOCKER_HOST", "DS01HUB_AGGREGATE_CGROUP_ROOT")
        if k in os.environ
    },
)

# -- queue: "wait for a GPU" requests (the `queue` spawn option, `container-create --queue`) ---
# kept in the state directory; the hub starts such a server itself when its GPU is granted,
# with the token of the token-only service ds01-queue (state_dir/queue-token, mode 0600).
from ds01hub.hub.services import configure_queue  # noqa: E402

configure_queue(c, state_dir)

# -- spawner: DS01Spawner (limits, quotas, GPUs on every spawn) -------------------------------
# Limits come from $DS01HUB_LIMITS (re-read when the file changes), allocator state from
# `state_dir` (shared with the broker, the culler and `ds01hub status`). Users pick a profile,
# an image and a GPU in the options form; the CLI sends the same keys as user_options
# (docs/architecture.md, "Spawn options"). Every setting: `jupyterhub --help-all | grep DS01`.
c.DS01Spawner.state_dir = str(state_dir)
# A spawn waits this long in the GPU queue (priority, then arrival) before giving up; keep it
# under Spawner.start_timeout, which bounds the whole start.
c.DS01Spawner.gpu_wait_timeout = 120
c.DS01Spawner.profile_list = [
    {
        "display_name": "CPU only",
        "slug": "cpu",
        "description": "Notebooks, data preparation, small models",
        "default": True,
    },
    {
        "display_name": "One GPU",
        "slug": "gpu",
        "description": "A whole GPU for training",
        "ds01_override": {"gpus": 1},
    },
    {
        "display_name": "MIG slice (2g.20gb)",
        "slug": "mig",
        "description": "A slice of a MIG-partitioned GPU: enough for most coursework",
        "ds01_override": {"mig": "2g.20gb"},
    },
]
# -- live: persistent workspaces, the user's own uid/gid --------------------------------------
# A lab host with Unix accounts: each user's workspace (workspace_root/<user>, theirs, 0750) is
# /workspace in every container of theirs, and the container runs as their uid/gid, so the
# files are the same over SSH and in the browser, and survive every container.
if os.environ.get("DS01HUB_WORKSPACE_ROOT"):
    c.DS01Spawner.workspace_root = os.environ["DS01HUB_WORKSPACE_ROOT"]
    c.DS01Spawner.user_id_source = "passwd"
# A cgroup parent per group lets the host cap a whole group:
#   c.DS01Spawner.cgroup_parents = {"students": "ds01-students"}

# -- live: the NVIDIA device nodes are root:<GPU group> 0660 (ds01hub install); a container's
# process, running as the user, gets the group to open the devices of its own device request.
_gpu_group = os.environ.get("DS01HUB_GPU_GROUP", "")
if _gpu_group:
    import grp  # noqa: E402

    try:
        c.DockerSpawner.extra_host_config = {"group_add": [str(grp.getgrnam(_gpu_group).gr_gid)]}
    except KeyError:
        raise SystemExit(
            f"DS01HUB_GPU_GROUP={_gpu_group}: no such group (ds01hub install creates it)"
        ) from None

# -- live: the admin commands' hub token (`ds01hub cull` reads the same file) -----------------
_admin_token_file = os.environ.get("DS01HUB_ADMIN_TOKEN_FILE", "")
if _admin_token_file and Path(_admin_token_file).is_file():
    from ds01hub.hub.services import OPS_SCOPES, replace_named  # noqa: E402

    replace_named(
        c.JupyterHub,
        "services",
        {"name": "ds01hub-cli", "api_token": Path(_admin_token_file).read_text().strip()},
    )
    replace_named(
        c.JupyterHub,
        "load_roles",
        {"name": "ds01hub-cli", "services": ["ds01hub-cli"], "scopes": OPS_SCOPES},
    )
