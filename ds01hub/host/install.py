"""Install ds01hub on a real host: ``ds01hub install`` / ``make install`` (and ``uninstall``).

What goes where (docs/going-live.md explains each part)::

    /opt/ds01hub/venv/            a virtualenv from the system's /usr/bin/python3, world-readable,
                                  with this project (and its [ldap,oauth] extras) installed
    /opt/ds01hub/share/           ds01hub's base hub config, the example limits and the
                                  authenticator examples: replaced on every upgrade
    /usr/local/bin/               the users' commands (container-*, image-*, project-init,
                                  user-setup, DS01's new-user/new-project) and `ds01hub`,
                                  as links into the venv: on everyone's PATH
    /etc/ds01hub/                 jupyterhub_config.py (the site's, loads the base),
                                  resource-limits.yaml, ds01hub.env (see ds01hub.host.siteenv),
                                  admin-token (0600, for `ds01hub cull`): written once, kept
    /var/lib/ds01hub/             hub database, event log, allocator state (0700)
    /var/log/ds01hub/             hub and proxy logs, rotated by /etc/logrotate.d/ds01hub
    /srv/ds01hub/workspaces/      one workspace per user, owned by them (0711 root above)
    groups                        ds01-admin (admins), ds01-users (may log in), ds01-gpu
                                  (may open the NVIDIA devices: see ds01hub.gpu.access)
    systemd units                 ds01hub.service (the hub: proxy, broker, ds01 services),
                                  ds01hub-proxy.service (the Docker socket proxy),
                                  ds01hub-gpu-access.timer (expires GPU access grants)
    udev rule, modprobe options   the NVIDIA device nodes: root:ds01-gpu 0660

Every step checks first and does only what is missing or out of date, so a second run changes
nothing, and a run after ``git pull`` is the upgrade: the venv and the share/ files are
replaced, the admin's files in /etc/ds01hub are kept, and a running unit restarts only when
something it runs changed (the hub for its config, the venv or its token; the proxy for the
venv). ``--dry-run`` prints the steps that a run would do. ``uninstall`` stops and removes the
units, links, venv and system files, and keeps config, state, logs, workspaces and groups
unless ``--purge`` (workspaces, the users' own files, are never removed).

Hosts without a package index install from a wheelhouse (``--wheelhouse DIR``: pip installs
from it alone), made on a machine with the index and the same Python by ``pip wheel -w DIR -r``
of what ``--wheelhouse-requirements`` prints.

Standard library only (like ds01hub.host.bootstrap, whose helpers it uses): it runs before the venv
exists, as ``python3 -m ds01hub.host.install`` from a source checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import secrets
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ds01hub import paths
from ds01hub.errors import Ds01hubError, render
from ds01hub.gpu import access as gpu_access
from ds01hub.host import bootstrap, siteenv

SYSTEM_PYTHON = Path("/usr/bin/python3")
VENV_EXTRAS = "ldap,oauth"
#: DS01's names for two of the users' commands, kept on PATH for its users.
ALIASES = {"new-user": "user-setup", "new-project": "project-init"}
#: Console scripts that are not commands for people (the hub starts the broker itself).
INTERNAL_SCRIPTS = frozenset({"ds01hub-broker"})
HUB_UNIT = "ds01hub.service"
PROXY_UNIT = "ds01hub-proxy.service"
SWEEP_SERVICE = "ds01hub-gpu-access.service"
SWEEP_TIMER = "ds01hub-gpu-access.timer"
STARTED_UNITS = (HUB_UNIT, PROXY_UNIT, SWEEP_TIMER)


class InstallError(Ds01hubError, RuntimeError):
    """A step cannot be done; the message says what and how to fix it."""

    status = 500  # the host's failure, not the caller's


@dataclass(frozen=True)
class Layout:
    """Where everything goes. ``root`` prefixes every path (tests install into a temp dir;
    accounts, systemctl and udev are only touched when it is ``/``)."""

    root: Path = Path("/")
    admin_group: str = "ds01-admin"
    users_group: str = "ds01-users"
    gpu_group: str = gpu_access.GPU_GROUP

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def real(self) -> bool:
        return self.root == Path("/")

    prefix = property(lambda self: self.at("/opt/ds01hub"))
    venv = property(lambda self: self.at("/opt/ds01hub/venv"))
    share = property(lambda self: self.at("/opt/ds01hub/share"))
    bindir = property(lambda self: self.at("/usr/local/bin"))
    etc = property(lambda self: self.at(str(paths.CONFIG_DIR)))
    state = property(lambda self: self.at(str(paths.DEFAULT_STATE_DIR)))
    logs = property(lambda self: self.at("/var/log/ds01hub"))
    workspaces = property(lambda self: self.at(str(paths.WORKSPACE_ROOT)))
    units = property(lambda self: self.at("/etc/systemd/system"))
    logrotate = property(lambda self: self.at("/etc/logrotate.d/ds01hub"))
    dev = property(lambda self: self.at("/dev"))

    def unreal(self, path: Path) -> str:
        """``path`` as it is on the installed host (without the test root)."""
        return "/" + str(path.relative_to(self.root)) if not self.real else str(path)


# --------------------------------------------------------------------------------------------
# pure: what the install writes


def env_settings(layout: Layout) -> tuple[dict[str, str], dict[str, str]]:
    """The environment file's first content: (values, comment per value)."""
    u = layout.unreal
    values = {
        "DS01HUB_STATE_DIR": u(layout.state),
        "DS01HUB_LIMITS": u(layout.etc / "resource-limits.yaml"),
        "DS01HUB_BIND_URL": "http://127.0.0.1:8000",
        "DS01HUB_HUB_PORT": "8081",
        "DS01HUB_PROXY_API_PORT": "8001",
        "DS01HUB_IMAGE": f"{bootstrap.SINGLEUSER_REPOSITORY}:{bootstrap.ALIAS_TAG}",
        "DS01HUB_WORKSPACE_ROOT": u(layout.workspaces),
        "DS01HUB_ADMIN_TOKEN_FILE": u(layout.etc / "admin-token"),
        "DS01HUB_ADMIN_GROUP": layout.admin_group,
        "DS01HUB_GPU_GROUP": layout.gpu_group,
        "DS01HUB_SSL_CERT": "",
        "DS01HUB_SSL_KEY": "",
        "DS01HUB_HTTP_REDIRECT_PORT": "",
        "DS01HUB_CA_BUNDLE": "",
        "DS01HUB_PIP_INDEX_URL": "",
        "DS01HUB_DEBIAN_MIRROR": "",
        "DS01HUB_AGGREGATE_CGROUP_ROOT": "",
    }
    comments = {
        "DS01HUB_STATE_DIR": "ds01hub site settings: read by ds01hub.service (EnvironmentFile=), "
        "its\njupyterhub_config.py and the admin commands. Root-owned, not secret "
        "(users' commands\nread it too). Restart the hub after a change: systemctl restart "
        "ds01hub\n\nHub database, event log, allocator state (back it up: ds01hub backup DIR)",
        "DS01HUB_LIMITS": "The resource-limits YAML (re-read when it changes)",
        "DS01HUB_BIND_URL": "Where users reach the hub. Loopback until TLS is set up: logins "
        "carry passwords.\nWith DS01HUB_SSL_CERT/KEY: https://0.0.0.0:443; behind a TLS "
        "reverse proxy: keep loopback",
        "DS01HUB_HUB_PORT": "The hub's own port, on the Docker bridge (containers reach it there)",
        "DS01HUB_PROXY_API_PORT": "configurable-http-proxy's API port (loopback)",
        "DS01HUB_IMAGE": "The single-user image (ds01hub bootstrap images builds it)",
        "DS01HUB_WORKSPACE_ROOT": "One workspace per user (owned by them, /workspace in their "
        "containers,\nthe same files over SSH); containers run as the user's own uid/gid",
        "DS01HUB_ADMIN_TOKEN_FILE": "The hub API token of the admin commands (ds01hub cull), "
        "root only",
        "DS01HUB_ADMIN_GROUP": "Members act for other users (--user), see every container "
        "through the proxy,\nand are hub admins",
        "DS01HUB_GPU_GROUP": "Group of the NVIDIA device nodes; containers get it, people only "
        "through\nds01hub grant-gpu-access USER --for 24h",
        "DS01HUB_SSL_CERT": "TLS: the hub's certificate chain and key (PEM); empty: plain HTTP",
        "DS01HUB_HTTP_REDIRECT_PORT": "With TLS: also listen on this port (e.g. 80) and "
        "redirect to https",
        "DS01HUB_CA_BUNDLE": "A CA bundle trusted in image builds (TLS-intercepting proxies)",
        "DS01HUB_PIP_INDEX_URL": "Image builds: a package index or mirror (also for ds01hub "
        "install's images),\nand a Debian mirror for the base image",
        "DS01HUB_AGGREGATE_CGROUP_ROOT": "Aggregate caps enforced by the kernel (cgroup v1, "
        "Docker's cgroupfs driver):\n/sys/fs/cgroup puts each capped user's containers under "
        "their own parent cgroup,\nat every door (hub, Docker proxy; ds01-ops removes unused "
        "parents); empty: checked only",
    }
    return values, comments


def render_site_config(layout: Layout) -> str:
    """/etc/ds01hub/jupyterhub_config.py: the site's own file, written once and then the
    admin's. It loads ds01hub's base config (replaced on upgrade), then says how users log in."""
    share = layout.unreal(layout.share)
    groups = {layout.users_group, layout.admin_group}
    return f"""\
# ds01hub site configuration: written once by `ds01hub install`, then yours (kept on upgrade).
# The hub runs `jupyterhub -f /etc/ds01hub/jupyterhub_config.py` (ds01hub.service); the
# DS01HUB_* settings in /etc/ds01hub/ds01hub.env are read by the base config loaded here.
# After a change: systemctl restart ds01hub. Guide: {share}/docs/going-live.md
c = get_config()  # noqa: F821
load_subconfig({share + "/jupyterhub_config.py"!r})  # noqa: F821  (ds01hub's base config)

# -- logins: the host's Unix accounts (PAM), so the browser user IS the SSH user ----------------
# Members of {layout.users_group} may log in; members of {layout.admin_group} are hub admins.
#   adduser alice {layout.users_group}
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {sorted(groups)!r}
c.PAMAuthenticator.admin_groups = {{{layout.admin_group!r}}}
# LDAP or OpenID Connect instead (examples, tested: docs/going-live.md "Logins"):
#   load_subconfig({share + "/auth/ldap.py"!r})
#   load_subconfig({share + "/auth/oidc.py"!r})

# -- restarts and upgrades keep users' containers running -------------------------------------
c.JupyterHub.cleanup_servers = False

# -- more of your own settings below (profiles, cgroup parents, ...): see the base config ------
"""


def render_units(layout: Layout) -> dict[str, str]:
    """The systemd units: file name -> content."""
    u = layout.unreal
    venv, etc, logs = u(layout.venv), u(layout.etc), u(layout.logs)
    docs = u(layout.share / "docs" / "going-live.md")
    path = f"{venv}/bin:{bootstrap.STANDARD_PATH}"
    return {
        HUB_UNIT: f"""\
[Unit]
Description=ds01hub: JupyterHub with GPU quotas (proxy, ds01 broker and services)
Documentation=file://{docs}
After=network-online.target docker.service
Wants=network-online.target docker.service

[Service]
EnvironmentFile={etc}/ds01hub.env
Environment=PATH={path}
WorkingDirectory={u(layout.state)}
ExecStart={venv}/bin/jupyterhub -f {etc}/jupyterhub_config.py
StandardOutput=append:{logs}/jupyterhub.log
StandardError=inherit
# SIGTERM to the hub only: it stops its proxy and services itself, then the rest is killed.
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=5
UMask=0022

[Install]
WantedBy=multi-user.target
""",
        PROXY_UNIT: f"""\
[Unit]
Description=ds01hub Docker socket proxy: each user sees and touches only their own containers
Documentation=file://{docs}
After=docker.service
Wants=docker.service

[Service]
EnvironmentFile={etc}/ds01hub.env
# The socket is 0666 on purpose: every caller is identified by the kernel (SO_PEERCRED), and
# what they may do follows from who they are, not from who could open the file.
ExecStart={venv}/bin/ds01hub proxy --listen /run/ds01hub/docker.sock \\
    --upstream /var/run/docker.sock --admin-group {layout.admin_group} \\
    --limits {etc}/resource-limits.yaml
StandardOutput=append:{logs}/docker-proxy.log
StandardError=inherit
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
""",
        SWEEP_SERVICE: f"""\
[Unit]
Description=ds01hub: end expired GPU access grants (ds01hub grant-gpu-access --sweep)
Documentation=file://{docs}

[Service]
Type=oneshot
EnvironmentFile={etc}/ds01hub.env
ExecStart={venv}/bin/ds01hub grant-gpu-access --sweep
""",
        SWEEP_TIMER: """\
[Unit]
Description=ds01hub: end expired GPU access grants every 5 minutes

[Timer]
OnBootSec=1min
OnUnitActiveSec=5min
Persistent=true

[Install]
WantedBy=timers.target
""",
    }


def render_logrotate(layout: Layout) -> str:
    """Weekly, 8 kept, compressed; copytruncate because systemd holds the files open
    (StandardOutput=append:)."""
    return f"""\
# ds01hub logs (written by ds01hub install)
{layout.unreal(layout.logs)}/*.log {{
    weekly
    rotate 8
    compress
    delaycompress
    missingok
    notifempty
    copytruncate
}}
"""


def user_scripts(pyproject: dict) -> list[str]:
    """The console scripts that go on everyone's PATH (every one but the internal ones)."""
    scripts = pyproject.get("project", {}).get("scripts", {})
    return sorted(name for name in scripts if name not in INTERNAL_SCRIPTS)


def command_links(layout: Layout, scripts: Iterable[str]) -> dict[Path, Path]:
    """/usr/local/bin/<name> -> the venv's script, DS01's aliases included."""
    links = {layout.bindir / name: layout.venv / "bin" / name for name in scripts}
    links.update(
        {layout.bindir / alias: layout.venv / "bin" / target for alias, target in ALIASES.items()}
    )
    return links


# --------------------------------------------------------------------------------------------
# steps


@dataclass
class Step:
    """One thing the install does: ``needed()`` says whether it has to, ``apply()`` does it."""

    what: str
    needed: Callable[[], bool]
    apply: Callable[[], None]
    restarts: tuple[str, ...] = ()  # when done, these units (if running) restart to use it


def _write(path: Path, content: str, mode: int, group: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.ds01hub-new")
    temporary.write_text(content)
    os.chmod(temporary, mode)
    if group is not None:
        os.chown(temporary, 0, grp.getgrnam(group).gr_gid)
    os.replace(temporary, path)


def file_step(
    path: Path,
    content: str,
    mode: int = 0o644,
    keep: bool = False,
    restarts: tuple[str, ...] = (),
) -> Step:
    """Write ``path`` when it is missing, or (unless ``keep``) when its content or mode
    differ. ``keep``: the admin's file once written."""

    def needed() -> bool:
        if not path.exists():
            return True
        if keep:
            return False
        return path.read_text() != content or (path.stat().st_mode & 0o7777) != mode

    verb = "create" if keep else "write"
    return Step(f"{verb} {path}", needed, lambda: _write(path, content, mode), restarts)


def directory_step(path: Path, mode: int) -> Step:
    def needed() -> bool:
        return not path.is_dir() or (path.stat().st_mode & 0o7777) != mode

    def apply() -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)

    return Step(f"directory {path} (mode {mode:04o})", needed, apply)


def link_step(link: Path, target: Path) -> Step:
    """A link on PATH; never replaces a file or a link that is not ours."""

    def needed() -> bool:
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return False
        if (link.exists() or link.is_symlink()) and not _ours(link, target.parent):
            raise InstallError(
                f"{link} exists and is not ds01hub's: move it away (or rename it) and "
                "run the install again"
            )
        return True

    def apply() -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)

    return Step(f"link {link} -> {target}", needed, apply)


def _ours(link: Path, bin_dir: Path) -> bool:
    return link.is_symlink() and Path(os.readlink(link)).parent == bin_dir


def group_step(name: str) -> Step:
    def needed() -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return True
        return False

    return Step(f"group {name}", needed, lambda: bootstrap.run(["groupadd", "--system", name]))


def token_step(path: Path) -> Step:
    """The admin commands' hub API token: made once with `secrets`, root only."""
    return Step(
        f"create {path} (hub API token of `ds01hub cull`, mode 0600)",
        lambda: not path.exists(),
        lambda: _write(path, secrets.token_hex(32) + "\n", 0o600),
        restarts=(HUB_UNIT,),  # the hub registers it at start
    )


# -- the system venv ----------------------------------------------------------------------------


def venv_stamps(source: Path, extras: str) -> dict[str, str]:
    """What the installed venv was made from: its dependencies (pyproject + extras) and the
    project's own files. A change of the first reinstalls everything, of the second only
    the project."""
    pyproject = (source / "pyproject.toml").read_bytes()
    return {
        "dependencies": bootstrap.hash_inputs([("pyproject", pyproject), ("x", extras.encode())]),
        "project": bootstrap.hash_inputs(bootstrap.project_files(source).items()),
    }


def _read_stamps(venv: Path) -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((venv / ".ds01hub-install.json").read_text())
    return {}


def pip_environment(wheelhouse: Path | None) -> dict[str, str] | None:
    """The environment of the install's pip commands: with a wheelhouse, pip installs from it
    alone (pip's own PIP_NO_INDEX and PIP_FIND_LINKS), for hosts without a package index;
    without one, the install's own (None)."""
    if wheelhouse is None:
        return None
    return {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}


def wheelhouse_requirements(pyproject: dict, extras: str = VENV_EXTRAS) -> list[str]:
    """What a wheelhouse holds (``pip wheel -w DIR`` of these on a machine with the index and
    the same Python: docs/going-live.md): the project's dependencies with the venv's extras,
    pip, and the project's build requirements (the install builds the project's own wheel)."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    return [
        *project.get("dependencies", []),
        *(requirement for extra in extras.split(",") for requirement in optional.get(extra, [])),
        "pip",
        *pyproject["build-system"]["requires"],
    ]


def venv_step(
    source: Path,
    venv: Path,
    extras: str = VENV_EXTRAS,
    python: Path = SYSTEM_PYTHON,
    pip_env: dict[str, str] | None = None,
) -> Step:
    """The system venv: from ``python`` (the system's, so nothing lives under /root), this
    project installed from a wheel of exactly its sources (not editable: the checkout may be
    private), world-readable. ``pip_env``: see pip_environment."""
    wanted = venv_stamps(source, extras)

    def needed() -> bool:
        return _read_stamps(venv) != wanted or not (venv / "bin" / "python").exists()

    def apply() -> None:
        if not python.exists():
            bootstrap.ensure_packages(["python3", "python3-venv"])
        have = _read_stamps(venv)
        old_umask = os.umask(0o022)
        try:
            if not (venv / "bin" / "python").exists():
                bootstrap.ensure_packages(["python3-venv"])
                bootstrap.run([str(python), "-m", "venv", str(venv)])
                have = {}
            pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
            with bootstrap_wheel_dir() as wheel_dir:
                wheel = bootstrap.build_project_wheel(
                    bootstrap.project_files(source), source, wheel_dir, pip[0], pip_env
                )
                if have.get("dependencies") != wanted["dependencies"]:
                    bootstrap.run([*pip, "install", "--quiet", "--upgrade", "pip"], env=pip_env)
                    bootstrap.run([*pip, "install", "--quiet", f"{wheel}[{extras}]"], env=pip_env)
                else:
                    reinstall = ["install", "--quiet", "--no-deps", "--force-reinstall"]
                    bootstrap.run([*pip, *reinstall, str(wheel)], env=pip_env)
        finally:
            os.umask(old_umask)
        (venv / ".ds01hub-install.json").write_text(json.dumps(wanted) + "\n")

    return Step(f"virtualenv {venv} (from {python})", needed, apply, (HUB_UNIT, PROXY_UNIT))


@contextlib.contextmanager
def bootstrap_wheel_dir():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ds01hub-install-") as directory:
        yield Path(directory)


#: The Debian packages the install itself needs (the venv, TLS to the package index). Docker's
#: engine comes from bootstrap.ensure_docker_engine only where none answers, so a site's own
#: engine (docker-ce, say) is used as it is; mmdebstrap only when the base image is built.
INSTALL_PACKAGES = ("python3-venv", "ca-certificates")


def host_step() -> Step:
    """The packages, configurable-http-proxy and a running Docker engine (bootstrap's
    functions; an engine that answers is never installed, started or restarted)."""

    def needed() -> bool:
        return (
            bool(bootstrap.missing_packages(INSTALL_PACKAGES))
            or shutil.which(bootstrap.PROXY_COMMAND) is None
            or not bootstrap.docker_answers()
        )

    def apply() -> None:
        bootstrap.ensure_packages(INSTALL_PACKAGES)
        bootstrap.ensure_proxy_command()
        bootstrap.ensure_docker_engine()

    return Step("host: Debian packages, configurable-http-proxy, the Docker engine", needed, apply)


def install_commands(source: Path, layout: Layout) -> list[str]:
    """Only the users' commands (the venv and the links on PATH): what the demo and the tests
    put on a host that has no full install. Returns the steps done."""
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    steps = [venv_step(source, layout.venv)] + [
        link_step(link, target)
        for link, target in command_links(layout, user_scripts(pyproject)).items()
    ]
    done = []
    for step in steps:
        if step.needed():
            bootstrap.say(step.what)
            step.apply()
            done.append(step.what)
    return done


# -- the units ----------------------------------------------------------------------------------


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return (
        bootstrap.run(["systemctl", *args])
        if check
        else subprocess.run(["systemctl", *args], capture_output=True, text=True)
    )


def _active(unit: str) -> bool:
    return systemctl("is-active", "--quiet", unit, check=False).returncode == 0


def units_enabled_step(layout: Layout) -> Step:
    def needed() -> bool:
        return any(
            systemctl("is-enabled", "--quiet", unit, check=False).returncode != 0
            or not _active(unit)
            for unit in STARTED_UNITS
        )

    return Step(
        f"enable and start {', '.join(STARTED_UNITS)}",
        needed,
        lambda: systemctl("enable", "--now", *STARTED_UNITS),
    )


# --------------------------------------------------------------------------------------------
# the plan


@dataclass
class Options:
    source: Path
    layout: Layout = field(default_factory=Layout)
    venv: bool = True
    images: bool = True
    systemd: bool = True  # write units; enable/start them where systemd runs
    accounts: bool = True  # groups (only on the real root)
    ca_bundle: Path | None = bootstrap.HOST_CA_BUNDLE
    wheelhouse: Path | None = None  # pip installs from this directory alone (no index)


def plan(options: Options) -> list[Step]:
    """Every step of an install, in order (each one checks whether it is needed)."""
    layout, source = options.layout, options.source
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    steps: list[Step] = []
    if options.images and layout.real:
        steps.append(host_step())
    if options.accounts and layout.real:
        steps += [
            group_step(name) for name in (layout.admin_group, layout.users_group, layout.gpu_group)
        ]
    steps += [
        directory_step(layout.prefix, 0o755),
        directory_step(layout.etc, 0o755),
        directory_step(layout.state, 0o700),
        directory_step(layout.logs, 0o750),
        directory_step(layout.workspaces.parent, 0o755),
        directory_step(layout.workspaces, 0o711),  # users reach their own, list nobody's
    ]
    if options.venv:
        steps.append(venv_step(source, layout.venv, pip_env=pip_environment(options.wheelhouse)))
    steps += share_steps(layout, source)
    steps += config_steps(layout, source)
    steps += [
        link_step(link, target)
        for link, target in command_links(layout, user_scripts(pyproject)).items()
    ]
    steps.append(file_step(layout.logrotate, render_logrotate(layout)))
    steps += gpu_access.install_steps(layout, file_step, Step, options.accounts)
    if options.systemd:
        steps += [
            file_step(layout.units / name, content, restarts=(name,))
            for name, content in render_units(layout).items()
        ]
    return steps


def share_steps(layout: Layout, source: Path) -> list[Step]:
    """ds01hub's own files in /opt/ds01hub/share: replaced on every upgrade."""
    files = {
        "jupyterhub_config.py": source / "config" / "jupyterhub_config.py",
        "resource-limits.example.yaml": source / "config" / "resource-limits.yaml",
        "auth/ldap.py": source / "config" / "auth" / "ldap.py",
        "auth/oidc.py": source / "config" / "auth" / "oidc.py",
        "docs/going-live.md": source / "docs" / "going-live.md",
        "docs/student-guide.md": source / "docs" / "student-guide.md",
    }
    return [
        file_step(
            layout.share / name,
            path.read_text(),
            restarts=(HUB_UNIT,) if name.endswith(".py") else (),  # the hub's config
        )
        for name, path in files.items()
        if path.exists()
    ]


def config_steps(layout: Layout, source: Path) -> list[Step]:
    """/etc/ds01hub: written when missing, then the admin's (kept on upgrade)."""
    values, comments = env_settings(layout)
    return [
        file_step(layout.etc / "jupyterhub_config.py", render_site_config(layout), keep=True),
        file_step(
            layout.etc / "resource-limits.yaml",
            (source / "config" / "resource-limits.yaml").read_text(),
            keep=True,
        ),
        file_step(layout.etc / "ds01hub.env", siteenv.render(values, comments), keep=True),
        token_step(layout.etc / "admin-token"),
    ]


def after_steps(options: Options, done: list[Step]) -> list[Step]:
    """What follows from the steps done: images, systemd reload, (re)start."""
    steps: list[Step] = []
    layout = options.layout
    if options.images and options.venv:
        steps.append(
            images_step(options, venv_changed=any(s.what.startswith("virtualenv") for s in done))
        )
    live = options.systemd and layout.real and bootstrap.systemd_runs()
    if live:
        if any(s.what.startswith(f"write {layout.units}") for s in done):
            steps.append(
                Step("systemctl daemon-reload", lambda: True, lambda: systemctl("daemon-reload"))
            )
        # only the running ones: the next step starts those that are not (a first install)
        changed = {unit for step in done for unit in step.restarts}
        restart = [unit for unit in render_units(layout) if unit in changed and _active(unit)]
        if restart:
            steps.append(
                Step(
                    f"restart {', '.join(restart)} to use the new files",
                    lambda: True,
                    lambda: systemctl("try-restart", *restart),
                )
            )
        steps.append(units_enabled_step(layout))
    return steps


def images_step(options: Options, venv_changed: bool) -> Step:
    """The base and single-user images (ds01hub bootstrap images, run with the new venv), with
    the site's mirror settings from the environment file. Needed when the installed project
    changed (the image carries its wheel) or the image is missing; `ds01hub bootstrap images`
    rebuilds by hand (a new CA bundle, say)."""
    env = dict(os.environ)
    with contextlib.suppress(siteenv.SiteEnvError, OSError):
        path = options.layout.etc / "ds01hub.env"
        if path.exists():
            for name, value in siteenv.parse(path.read_text(), str(path)).items():
                env.setdefault(name, value)
    ca = str(options.ca_bundle) if options.ca_bundle else "none"
    command = [
        str(options.layout.venv / "bin" / "ds01hub"),
        "bootstrap",
        "images",
        "--source",
        str(options.source),
        "--ca-bundle",
        ca,
    ]
    env.update(pip_environment(options.wheelhouse) or {})  # the project wheel's build
    image = env.get("DS01HUB_IMAGE") or f"{bootstrap.SINGLEUSER_REPOSITORY}:{bootstrap.ALIAS_TAG}"
    return Step(
        "images: base and single-user (reused when up to date)",
        lambda: venv_changed or not bootstrap.image_exists(image),
        # its report goes to stderr with the rest of the progress: stdout is the install's result
        lambda: bootstrap.run(
            command, env={k: v for k, v in env.items() if v != ""}, stdout=sys.stderr
        ),
    )


def install(options: Options, dry_run: bool = False) -> dict:
    """Run (or with ``dry_run`` list) the steps that are needed. Returns what was done."""
    if os.geteuid() != 0 and options.layout.real:
        raise InstallError("ds01hub install needs root (sudo make install)")
    if options.wheelhouse is not None and not options.wheelhouse.is_dir():
        raise InstallError(
            f"--wheelhouse {options.wheelhouse}: no such directory (make one on a machine with "
            "the package index: docs/going-live.md, 'Hosts without a package index')"
        )
    done: list[Step] = []
    for step in plan(options):
        if step.needed():
            if not dry_run:
                bootstrap.say(step.what)
                step.apply()
            done.append(step)
    later = [step for step in after_steps(options, done) if step.needed()]
    if dry_run:
        return {"dry_run": True, "would": [s.what for s in done + later]}
    for step in later:
        bootstrap.say(step.what)
        step.apply()
    return {"dry_run": False, "done": [s.what for s in done], "then": [s.what for s in later]}


def uninstall(layout: Layout, purge: bool = False, dry_run: bool = False) -> dict:
    """Undo the install. Config, state, logs and groups stay unless ``purge``; workspaces (the
    users' files) always stay."""
    actions: list[tuple[str, Callable[[], None]]] = []
    units = list(render_units(layout))
    if layout.real and bootstrap.systemd_runs():
        present = [u for u in units if (layout.units / u).exists()]
        if present:
            actions.append(
                (
                    f"stop and disable {', '.join(present)}",
                    lambda: systemctl("disable", "--now", *present, check=False),
                )
            )
    for unit in units:
        actions += _remove_action(layout.units / unit)
    for link in sorted(layout.bindir.glob("*")) if layout.bindir.is_dir() else []:
        if _ours(link, layout.venv / "bin"):
            actions += _remove_action(link)
    actions += _remove_action(layout.prefix)
    actions += _remove_action(layout.logrotate)
    actions += gpu_access.uninstall_actions(layout, _remove_action)
    if purge:
        for path in (layout.etc, layout.state, layout.logs):
            actions += _remove_action(path)
        if layout.real:
            for name in (layout.admin_group, layout.users_group, layout.gpu_group):
                with contextlib.suppress(KeyError):
                    grp.getgrnam(name)
                    actions.append(
                        (f"remove group {name}", lambda n=name: bootstrap.run(["groupdel", n]))
                    )
    if layout.real and bootstrap.systemd_runs() and units:
        actions.append(("systemctl daemon-reload", lambda: systemctl("daemon-reload")))
    if not dry_run:
        for what, action in actions:
            bootstrap.say(what)
            action()
    kept = [str(p) for p in (layout.etc, layout.state, layout.logs) if not purge and p.exists()]
    return {
        "dry_run": dry_run,
        ("would" if dry_run else "done"): [what for what, _ in actions],
        "kept": kept + ([str(layout.workspaces)] if layout.workspaces.exists() else []),
    }


def _remove_action(path: Path) -> list[tuple[str, Callable[[], None]]]:
    if not (path.exists() or path.is_symlink()):
        return []

    def remove() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    return [(f"remove {path}", remove)]


# --------------------------------------------------------------------------------------------
# command line


def _layout(args: argparse.Namespace) -> Layout:
    return replace(Layout(), root=args.root.resolve()) if args.root else Layout()


def run_install(args: argparse.Namespace) -> int:
    if args.wheelhouse_requirements:
        source = args.source or bootstrap.find_source()
        pyproject = tomllib.loads((source / "pyproject.toml").read_text())
        print("\n".join(wheelhouse_requirements(pyproject)))
        return 0
    try:
        source = args.source or bootstrap.find_source()
        options = Options(
            source=source.resolve(),
            layout=_layout(args),
            venv=not args.no_venv,
            images=not args.no_images,
            systemd=not args.no_systemd,
            ca_bundle=args.ca_bundle,
            wheelhouse=args.wheelhouse.resolve() if args.wheelhouse else None,
        )
        result = install(options, dry_run=args.dry_run)
    except (InstallError, bootstrap.BootstrapError, gpu_access.GpuAccessError) as error:
        print(render(error, "ds01hub install"), file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    try:
        result = uninstall(_layout(args), purge=args.purge, dry_run=args.dry_run)
    except (InstallError, bootstrap.BootstrapError) as error:
        print(render(error, "ds01hub uninstall"), file=sys.stderr)
        return 1
    _print(result, args.json)
    return 0


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    lines = result.get("would") if result["dry_run"] else result.get("done", [])
    lines = list(lines or []) + list(result.get("then", []))
    prefix = "would: " if result["dry_run"] else "done: "
    print("\n".join(prefix + line for line in lines) if lines else "nothing to do")
    for path in result.get("kept", []):
        print(f"kept: {path}")


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would be done")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--root",
        type=Path,
        help=argparse.SUPPRESS,  # tests: install under a temp directory
    )


def add_install_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--source", type=Path, help="source checkout (default: this one)")
    parser.add_argument(
        "--ca-bundle",
        type=lambda v: None if v.lower() == "none" else Path(v),
        default=bootstrap.HOST_CA_BUNDLE,
        metavar="PEM|none",
        help="CA bundle copied into the single-user image (default %(default)s)",
    )
    parser.add_argument(
        "--wheelhouse",
        type=Path,
        default=os.environ.get("DS01HUB_WHEELHOUSE") or None,
        metavar="DIR",
        help="install the venv's packages from the wheels in DIR alone, no package index "
        "(hosts without one; default $DS01HUB_WHEELHOUSE)",
    )
    parser.add_argument(
        "--wheelhouse-requirements",
        action="store_true",
        help="print what a wheelhouse must hold, one requirement a line, and exit: on a machine "
        "with the index and the same Python, `pip wheel -w DIR -r` that list",
    )
    parser.add_argument("--no-venv", action="store_true", help="skip the system venv")
    parser.add_argument("--no-images", action="store_true", help="skip building the images")
    parser.add_argument("--no-systemd", action="store_true", help="write no systemd units")
    parser.set_defaults(handler=run_install)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """`install` and `uninstall`: defined here, not in `ds01hub.cli.admin`, because
    `python3 -m ds01hub.host.install` runs them before any venv exists (stdlib only)."""
    install_parser = subparsers.add_parser(
        "install",
        help="install ds01hub on this host (idempotent; re-run to upgrade)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_install_arguments(install_parser)
    uninstall_parser = subparsers.add_parser(
        "uninstall",
        help="remove what `ds01hub install` put on this host (keeps config, state, logs)",
        description="Stop and remove the units, the commands on PATH, /opt/ds01hub and the "
        "system files. Config (/etc/ds01hub), state (/var/lib/ds01hub), logs and groups stay "
        "unless --purge; the users' workspaces always stay.",
    )
    add_common(uninstall_parser)
    uninstall_parser.add_argument(
        "--purge", action="store_true", help="also remove config, state, logs and groups"
    )
    uninstall_parser.set_defaults(handler=run_uninstall)


def main(argv: list[str] | None = None) -> int:
    """``python3 -m ds01hub.host.install [--dry-run]`` (before any venv exists) = ``ds01hub
    install``;
    ``python3 -m ds01hub.host.install uninstall [--purge]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python3 -m ds01hub.host.install", description=__doc__)
    subparsers = parser.add_subparsers(dest="command")
    add_commands(subparsers)
    args = parser.parse_args(
        argv if argv and argv[0] in ("install", "uninstall") else ["install", *argv]
    )
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
