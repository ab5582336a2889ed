"""The demo: the whole system on one machine, for trying ds01hub out (``make demo``).

``ds01hub demo start`` writes a demo config into a state directory (default ``.state/demo`` in
the checkout), starts JupyterHub in the background on http://127.0.0.1:8000 and prints the
logins of the demo users; ``ds01hub demo stop`` stops it; ``ds01hub demo status`` says whether
it runs. The hub's log is ``<state>/jupyterhub.log``.

The demo logs users in with JupyterHub's DummyAuthenticator and one shared password (made at
random per state directory): DEMO ONLY, never for a real deployment. On a machine without NVIDIA
GPUs the GPU inventory is SIMULATED (``gpu_allocation.simulate`` in the demo's limits file), and
the demo says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ds01hub import bootstrap


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


class DemoError(RuntimeError):
    """The demo could not be started or stopped; the message says why and what to do."""


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


# --------------------------------------------------------------------------------------------
# pure: what the demo writes


def render_demo_config(
    paths: DemoPaths, site_config: Path, port: int, hub_port: int, proxy_api_port: int, image: str
) -> str:
    """The demo's hub config: the site config plus demo users and the demo authenticator."""
    groups: dict[str, dict] = {}
    for user in DEMO_USERS:
        groups.setdefault(user.group, {"users": []})["users"].append(user.name)
    env = {
        "DS01HUB_STATE_DIR": str(paths.state_dir),
        "DS01HUB_BIND_URL": f"http://127.0.0.1:{port}",
        "DS01HUB_HUB_PORT": str(hub_port),
        "DS01HUB_PROXY_API_PORT": str(proxy_api_port),
        "DS01HUB_IMAGE": image,
        "DS01HUB_LIMITS": str(paths.limits),
    }
    return f"""\
# ds01hub DEMO configuration, written by `ds01hub demo start`: edits are lost at the next start.
import os
from pathlib import Path

c = get_config()  # noqa: F821
os.environ.update({env!r})
load_subconfig({str(site_config)!r})  # noqa: F821

# DEMO ONLY: every demo user logs in with one shared password. Never use this in production.
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = Path({str(paths.password)!r}).read_text().strip()
c.Authenticator.allowed_users = {sorted(u.name for u in DEMO_USERS)!r}
c.Authenticator.admin_users = {sorted(u.name for u in DEMO_USERS if u.admin)!r}
c.JupyterHub.load_groups = {groups!r}
c.DockerSpawner.prefix = "ds01demo"
c.DockerSpawner.remove = True

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
    paths.config.write_text(
        render_demo_config(
            paths,
            source / "config" / "jupyterhub_config.py",
            args.port,
            args.hub_port,
            args.proxy_api_port,
            args.image,
        )
    )
    return simulated


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
    if pid is None:
        if not bootstrap.image_exists(args.image):
            raise DemoError(
                f"image {args.image} not found: build it with `ds01hub bootstrap images` "
                "(or `make demo`)"
            )
        source = bootstrap.find_source()
        simulated = write_demo_files(paths, source, args)
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
        "gpu_inventory": "simulated" if simulated else "nvidia",
        "password": secret,
        "users": [asdict(user) for user in DEMO_USERS],
    }


def _limits_simulated(paths: DemoPaths) -> bool:
    import yaml

    limits = yaml.safe_load(paths.limits.read_text()) if paths.limits.exists() else {}
    return bool((limits.get("gpu_allocation") or {}).get("simulate"))


def stop(args: argparse.Namespace) -> dict:
    """Stop the demo hub (it stops the users' containers and its proxy first)."""
    paths = demo_paths(args)
    pid = running_pid(paths)
    if pid is None:
        return {"state": "not running", "state_dir": str(paths.state_dir)}
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.3)
    if Path(f"/proc/{pid}").exists():
        raise DemoError(f"jupyterhub (pid {pid}) did not stop within {args.timeout:.0f}s")
    return {"state": "stopped", "pid": pid, "state_dir": str(paths.state_dir)}


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
        return f"demo: {result['state']} ({result['state_dir']})"
    lines = [
        f"ds01hub demo {result['state']}: {result['url']}  (log: {result['log']})",
        f"DEMO logins (DummyAuthenticator, password for all: {result['password']}):",
    ]
    lines += [f"  {u['name']:<12} {u['role']:<10} group {u['group']}" for u in result["users"]]
    if result["gpu_inventory"] == "simulated":
        lines.append(
            "GPUs: SIMULATED inventory (no NVIDIA GPU on this machine; "
            "gpu_allocation.simulate in the demo's resource-limits.yaml)"
        )
    lines.append("Stop it with: make demo-stop")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    actions = {"start": start, "stop": stop, "status": status}
    try:
        result = actions[args.action](args)
    except (DemoError, bootstrap.BootstrapError) as error:
        print(f"ds01hub demo: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start/stop the demo hub on this machine (DEMO ONLY: shared password)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the demo's config, database and log live (default: .state/demo in the "
        "source checkout)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="public port on 127.0.0.1")
    parser.add_argument("--hub-port", type=int, default=8081, help="hub port on the bridge")
    parser.add_argument("--proxy-api-port", type=int, default=8001, help="proxy API port")
    parser.add_argument(
        "--image",
        default=f"{bootstrap.SINGLEUSER_REPOSITORY}:{bootstrap.ALIAS_TAG}",
        help="single-user image (default %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_command)
