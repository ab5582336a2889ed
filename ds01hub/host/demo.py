"""The demo: the whole system on one machine, for trying ds01hub out (``make demo``).

``ds01hub demo start`` writes a demo config into a state directory (default ``.state/demo`` in
the checkout), starts JupyterHub in the background on http://127.0.0.1:8000 and prints the
logins of the demo users; ``ds01hub demo stop`` stops it; ``ds01hub demo status`` says whether
it runs. The hub's log is ``<state>/jupyterhub.log``.

It rehearses a real install (``ds01hub install``) on one machine: each demo login is also a
Unix account (locked: no password, so ``su - alice`` from root is the way in), the users'
commands are on everyone's PATH from a world-readable venv (/opt/ds01hub/venv, links in
/usr/local/bin, as the install makes them), each user's workspace persists under
/srv/ds01hub/workspaces (owned by them, ``~/workspace`` links to it, /workspace in their
containers), stopped containers keep their GPU holds, and the admin commands find the demo hub
through its environment file (``<state>/ds01hub.env``, see ds01hub.host.siteenv).

The browser logins use JupyterHub's DummyAuthenticator and one shared password (made at random
per state directory): DEMO ONLY, never for a real deployment (a real install logs in the
host's Unix accounts through PAM). On a machine without NVIDIA GPUs the GPU inventory is
SIMULATED (``gpu_allocation.simulate`` in the demo's limits file), and the demo says so.

``ds01hub demo stop --purge`` also removes the demo's containers, its Unix accounts and their
workspaces, its state directory, and the users' commands when no real install owns them.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ds01hub.errors import Ds01hubError, render
from ds01hub.host import bootstrap, install, siteenv
from ds01hub.labels import escape_name


@dataclass(frozen=True)
class DemoUser:
    name: str
    role: str
    group: str
    admin: bool = False


#: The demo's people; their groups match config/resource-limits.yaml (the example limits).
DEMO_USERS = (
    DemoUser("alice", "student", "students"),
    DemoUser("bob", "student", "students"),
    DemoUser("carol", "researcher", "researchers"),
    DemoUser("dave", "admin", "admins", admin=True),
)
DEFAULT_PORT = 8000
ADMIN_GROUP = "ds01-admin"
#: Every demo container carries this label (with the state directory's hash): --purge finds them.
DEMO_LABEL = "ds01.demo"


class DemoError(Ds01hubError, RuntimeError):
    """The demo could not be started or stopped; the message says why and what to do."""

    status = 500  # the host's failure, not the caller's


@dataclass(frozen=True)
class DemoPaths:
    state_dir: Path

    @property
    def config(self) -> Path:
        return self.state_dir / "jupyterhub_config.py"

    @property
    def local_config(self) -> Path:
        return self.state_dir / "local_config.py"

    @property
    def limits(self) -> Path:
        return self.state_dir / "resource-limits.yaml"

    @property
    def log(self) -> Path:
        return self.state_dir / "jupyterhub.log"

    @property
    def pid(self) -> Path:
        return self.state_dir / "jupyterhub.pid"

    @property
    def proxy_pid(self) -> Path:
        return self.state_dir / "proxy.pid"

    @property
    def password(self) -> Path:
        return self.state_dir / "demo-password"

    @property
    def env_file(self) -> Path:
        return self.state_dir / "ds01hub.env"

    @property
    def admin_token(self) -> Path:
        return self.state_dir / "admin-token"

    @property
    def accounts(self) -> Path:
        """The Unix accounts this demo created (only those are removed by --purge)."""
        return self.state_dir / "accounts.json"

    @property
    def label_value(self) -> str:
        return bootstrap.hash_inputs([("state", str(self.state_dir).encode())])


# --------------------------------------------------------------------------------------------
# pure: what the demo writes


def demo_settings(
    paths: DemoPaths, args: argparse.Namespace, workspace_root: Path
) -> dict[str, str]:
    """The demo's environment file: the same DS01HUB_* settings a real install keeps in
    /etc/ds01hub/ds01hub.env, pointing at the demo's state directory."""
    return {
        "DS01HUB_STATE_DIR": str(paths.state_dir),
        "DS01HUB_BIND_URL": f"http://127.0.0.1:{args.port}",
        "DS01HUB_HUB_PORT": str(args.hub_port),
        "DS01HUB_PROXY_API_PORT": str(args.proxy_api_port),
        "DS01HUB_IMAGE": args.image,
        "DS01HUB_LIMITS": str(paths.limits),
        "DS01HUB_WORKSPACE_ROOT": str(workspace_root),
        "DS01HUB_ADMIN_TOKEN_FILE": str(paths.admin_token),
        "DS01HUB_BROKER_SOCKET": args.broker_socket,
    }


def render_demo_config(paths: DemoPaths, site_config: Path, users: tuple[DemoUser, ...]) -> str:
    """The demo's hub config: its environment file, the site config, then demo users and the
    demo authenticator."""
    groups: dict[str, dict] = {}
    for user in users:
        groups.setdefault(user.group, {"users": []})["users"].append(user.name)
    return f"""\
# ds01hub DEMO configuration, written by `ds01hub demo start`: edits are lost at the next start.
import os
from pathlib import Path

from ds01hub.host import siteenv

c = get_config()  # noqa: F821
# The DS01HUB_* settings, as a real install's /etc/ds01hub/ds01hub.env holds them.
os.environ.update(siteenv.parse(Path({str(paths.env_file)!r}).read_text()))
load_subconfig({str(site_config)!r})  # noqa: F821

# DEMO ONLY: every demo user logs in with one shared password. Never use this in production
# (a real install logs in the host's Unix accounts: PAM).
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = Path({str(paths.password)!r}).read_text().strip()
c.Authenticator.allowed_users = {sorted(u.name for u in users)!r}
c.Authenticator.admin_users = {sorted(u.name for u in users if u.admin)!r}
c.JupyterHub.load_groups = {groups!r}
c.DockerSpawner.prefix = "ds01demo"
# Stopped containers stay (and hold their GPUs for gpu_hold_after_stop), as on a real install.
c.DockerSpawner.remove = False
c.DockerSpawner.extra_create_kwargs = {{"labels": {{{DEMO_LABEL!r}: {paths.label_value!r}}}}}

# Your own demo settings (kept across restarts) go in local_config.py next to this file.
if Path({str(paths.local_config)!r}).exists():
    load_subconfig({str(paths.local_config)!r})  # noqa: F821
"""


def demo_limits(site_limits: dict, gpus_present: bool) -> tuple[dict, bool]:
    """The demo's limits: the example file, using this machine's NVIDIA GPUs where it has any
    and the file's SIMULATED inventory (``gpu_allocation.simulate``) where it has none.
    Returns (limits, simulated)."""
    allocation = dict(site_limits.get("gpu_allocation") or {})
    if gpus_present:
        allocation.pop("simulate", None)
    elif not allocation.get("simulate"):
        raise DemoError(
            "this machine has no NVIDIA GPU and the limits file declares no simulated one: "
            "add gpu_allocation.simulate (see config/resource-limits.yaml)"
        )
    return site_limits | {"gpu_allocation": allocation}, not gpus_present


def fit_cpus(limits: dict, cpu_count: int) -> tuple[dict, list[str]]:
    """Cap ``max_cpus`` at this machine's CPU count (Docker refuses more than it has), so the
    example limits of a lab server also start containers on a small demo machine.
    Returns (limits, the sections that were capped)."""
    capped: list[str] = []

    def cap(section: dict, name: str) -> dict:
        value = section.get("max_cpus")
        if isinstance(value, int | float) and value > cpu_count:
            capped.append(name)
            return section | {"max_cpus": cpu_count}
        return section

    fitted = dict(limits)
    if isinstance(limits.get("defaults"), dict):
        fitted["defaults"] = cap(limits["defaults"], "defaults")
    for key in ("groups", "user_overrides"):
        if isinstance(limits.get(key), dict):
            fitted[key] = {
                name: cap(section, f"{key}.{name}") if isinstance(section, dict) else section
                for name, section in limits[key].items()
            }
    return fitted, capped


# --------------------------------------------------------------------------------------------
# edges


def demo_paths(args: argparse.Namespace) -> DemoPaths:
    state_dir = args.state_dir or bootstrap.find_source() / ".state" / "demo"
    return DemoPaths(state_dir.resolve())


def nvidia_gpus_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def running_pid(paths: DemoPaths) -> int | None:
    """The demo hub's pid when it runs (a stale pid file is ignored)."""
    try:
        pid = int(paths.pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    return pid if b"jupyterhub" in cmdline and str(paths.config).encode() in cmdline else None


def password(paths: DemoPaths) -> str:
    if not paths.password.exists():
        paths.password.write_text(secrets.token_urlsafe(9) + "\n")
        paths.password.chmod(0o600)
    return paths.password.read_text().strip()


def write_demo_files(paths: DemoPaths, source: Path, args: argparse.Namespace) -> bool:
    """Write config and limits into the state directory; returns whether GPUs are simulated."""
    import yaml

    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    site_limits_file = source / "config" / "resource-limits.yaml"
    if not site_limits_file.exists():
        raise DemoError(f"{site_limits_file} is missing: the demo's limits are made from it")
    site_limits = yaml.safe_load(site_limits_file.read_text()) or {}
    limits, simulated = demo_limits(site_limits, nvidia_gpus_present())
    cpus = os.cpu_count() or 1
    limits, capped = fit_cpus(limits, cpus)
    header = f"# ds01hub DEMO limits, generated from {site_limits_file} by `ds01hub demo start`.\n"
    if capped:
        header += f"# max_cpus capped at this machine's {cpus} CPUs in: {', '.join(capped)}\n"
    paths.limits.write_text(header + yaml.safe_dump(limits, sort_keys=False))
    settings = demo_settings(paths, args, args.workspace_root)
    paths.env_file.write_text(siteenv.render(settings))
    if not paths.admin_token.exists():
        paths.admin_token.write_text(secrets.token_hex(32) + "\n")
        paths.admin_token.chmod(0o600)
    paths.config.write_text(
        render_demo_config(paths, source / "config" / "jupyterhub_config.py", demo_users(args))
    )
    return simulated


def demo_users(args: argparse.Namespace) -> tuple[DemoUser, ...]:
    """The demo's people, their names prefixed with --user-prefix (several demos, tests)."""
    return tuple(replace(u, name=f"{args.user_prefix}{u.name}") for u in DEMO_USERS)


# -- the rehearsal of a real host: accounts, workspaces, commands on PATH ----------------------


def ensure_admin_group() -> None:
    """`ds01-admin`: the broker's and the socket proxy's admin group (as the install makes it)."""
    try:
        grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        bootstrap.run(["groupadd", "--system", ADMIN_GROUP])


def ensure_accounts(paths: DemoPaths, users: tuple[DemoUser, ...], workspace_root: Path) -> list:
    """A locked Unix account per demo login (admins in ds01-admin), its workspace (owned by
    it, 0750: the spawner's layout) and a ~/workspace link to it. Accounts that existed
    before are used as they are and never removed by --purge."""
    ensure_admin_group()
    created = set(_created_accounts(paths))
    workspace_root.mkdir(parents=True, exist_ok=True)
    workspace_root.chmod(0o711)
    for user in users:
        try:
            entry = pwd.getpwnam(user.name)
        except KeyError:
            command = ["useradd", "--create-home", "--shell", "/bin/bash", user.name]
            bootstrap.run(command + (["--groups", ADMIN_GROUP] if user.admin else []))
            entry = pwd.getpwnam(user.name)
            created.add(user.name)
            paths.accounts.write_text(json.dumps(sorted(created)) + "\n")
        workspace = workspace_root / escape_name(user.name)
        if not workspace.exists():
            workspace.mkdir(mode=0o750)
            os.chown(workspace, entry.pw_uid, entry.pw_gid)
        link = Path(entry.pw_dir) / "workspace"
        if not link.exists() and not link.is_symlink():
            link.symlink_to(workspace)
            os.lchown(link, entry.pw_uid, entry.pw_gid)
    return sorted(created)


def _created_accounts(paths: DemoPaths) -> list[str]:
    with contextlib.suppress(OSError, ValueError):
        return list(json.loads(paths.accounts.read_text()))
    return []


def ensure_commands(args: argparse.Namespace, source: Path) -> None:
    """The users' commands for the demo's Unix users, as the install puts them (a venv from
    /usr/bin/python3 in /opt/ds01hub, links in /usr/local/bin): nothing under /root."""
    install.install_commands(source, replace(install.Layout(), root=args.install_root))


def wait_until_up(url: str, paths: DemoPaths, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"jupyterhub exited ({process.returncode}); see {paths.log}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{url}/hub/api/", timeout=5) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise DemoError(f"the hub did not answer on {url} within {timeout:.0f}s; see {paths.log}")


def start(args: argparse.Namespace) -> dict:
    paths = demo_paths(args)
    url = f"http://127.0.0.1:{args.port}"
    pid = running_pid(paths)
    users = demo_users(args)
    if pid is None:
        if not bootstrap.image_exists(args.image):
            raise DemoError(
                f"image {args.image} not found: build it with `ds01hub bootstrap images` "
                "(or `make demo`)"
            )
        source = bootstrap.find_source()
        simulated = write_demo_files(paths, source, args)
        ensure_accounts(paths, users, args.workspace_root)
        if not args.no_commands:
            ensure_commands(args, source)
        secret = password(paths)
        bootstrap.unignore_sigint()
        with open(paths.log, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(paths.config)],
                cwd=paths.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until_up(url, paths, process, args.timeout)
        pid, state = process.pid, "started"
    else:
        simulated, secret, state = _limits_simulated(paths), password(paths), "already running"
    return {
        "state": state,
        "url": url,
        "pid": pid,
        "state_dir": str(paths.state_dir),
        "log": str(paths.log),
        "env_file": str(paths.env_file),
        "gpu_inventory": "simulated" if simulated else "nvidia",
        "password": secret,
        "users": [asdict(user) for user in users],
        "workspace_root": str(args.workspace_root),
    }


def _limits_simulated(paths: DemoPaths) -> bool:
    import yaml

    limits = yaml.safe_load(paths.limits.read_text()) if paths.limits.exists() else {}
    return bool((limits.get("gpu_allocation") or {}).get("simulate"))


def stop(args: argparse.Namespace) -> dict:
    """Stop the demo hub (it stops the users' containers and its proxy first); with --purge
    also remove what the demo made (see the module docstring)."""
    paths = demo_paths(args)
    pid = running_pid(paths)
    result: dict = {"state": "not running", "state_dir": str(paths.state_dir)}
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.3)
        if Path(f"/proc/{pid}").exists():
            raise DemoError(f"jupyterhub (pid {pid}) did not stop within {args.timeout:.0f}s")
        result = {"state": "stopped", "pid": pid, "state_dir": str(paths.state_dir)}
    if args.purge:
        result["purged"] = purge(paths, args)
    return result


def purge(paths: DemoPaths, args: argparse.Namespace) -> list[str]:
    """Remove the demo's containers, the accounts it created with their homes and workspaces,
    its state directory, and the users' commands unless a real install owns them."""
    removed = []
    listing = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={DEMO_LABEL}={paths.label_value}"],
        capture_output=True,
        text=True,
    )
    for container in listing.stdout.split():
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        removed.append(f"container {container}")
    for name in _created_accounts(paths):
        workspace = args.workspace_root / escape_name(name)
        if workspace.is_dir() and not workspace.is_symlink():
            shutil.rmtree(workspace)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        removed.append(f"account {name} (home and workspace)")
    if paths.state_dir.exists():
        shutil.rmtree(paths.state_dir)
        removed.append(f"state {paths.state_dir}")
    layout = replace(install.Layout(), root=args.install_root)
    if not args.no_commands and not (layout.etc / "ds01hub.env").exists():
        removed += [what.removeprefix("remove ") for what in install.uninstall(layout)["done"]]
    return removed


def status(args: argparse.Namespace) -> dict:
    paths = demo_paths(args)
    pid = running_pid(paths)
    return {
        "state": "running" if pid else "not running",
        "pid": pid,
        "state_dir": str(paths.state_dir),
        "log": str(paths.log),
    }


# --------------------------------------------------------------------------------------------
# command line


def describe(result: dict) -> str:
    if "users" not in result:
        purged = "".join(f"\nremoved {what}" for what in result.get("purged", ()))
        return f"demo: {result['state']} ({result['state_dir']}){purged}"
    lines = [
        f"ds01hub demo {result['state']}: {result['url']}  (log: {result['log']})",
        f"DEMO logins (DummyAuthenticator, password for all: {result['password']}):",
    ]
    lines += [f"  {u['name']:<12} {u['role']:<10} group {u['group']}" for u in result["users"]]
    first = result["users"][0]["name"]
    lines += [
        "Each login is also a Unix account (locked; a real install logs in Unix accounts "
        "through PAM). Try the SSH users' path:",
        f"  su - {first} -c container-list       (container-create NAME, container-run NAME, ...)",
        f"Workspaces (the same files over SSH and at /workspace in the browser): "
        f"{result['workspace_root']}/<user>, linked as ~/workspace",
        "Admin commands find this hub by themselves: ds01hub status, ds01hub gpus, "
        "ds01hub cull --once --dry-run",
    ]
    if result["gpu_inventory"] == "simulated":
        lines.append(
            "GPUs: SIMULATED inventory (no NVIDIA GPU on this machine; "
            "gpu_allocation.simulate in the demo's resource-limits.yaml)"
        )
    lines.append("Stop it with: make demo-stop (and remove its accounts too: make demo-purge)")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    actions = {"start": start, "stop": stop, "status": status}
    try:
        result = actions[args.action](args)
    except (DemoError, bootstrap.BootstrapError) as error:
        print(render(error, "ds01hub demo"), file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0
