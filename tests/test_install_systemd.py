"""`ds01hub install` for real, on a host whose PID 1 is systemd: a container booted from a
Debian image (mmdebstrap, like the base image) with systemd as its init.

What is real there: systemd 252 and the units it starts, the venv built from that host's
/usr/bin/python3 in /opt/ds01hub, the groups (groupadd), JupyterHub with PAM logins,
configurable-http-proxy, the ds01 broker and services, the Docker socket proxy, a fresh Unix
user (useradd) and their commands, a second install, an upgrade, uninstall and --purge.

What comes from the machine the test runs on, and why:
- the Docker engine: its socket is mounted (the install's own engine step is not what is
  tested; an engine that answers must be used as it is, never installed or started);
- the docker CLI, node and configurable-http-proxy: mounted read-only from this machine's
  (the install finds configurable-http-proxy on PATH, as on a host that has it; its npm path is
  bootstrap's, tested by `make test`'s host setup);
- the packages: a wheelhouse made here (`pip wheel` of install.wheelhouse_requirements, the
  versions of this checkout's .venv), installed with `--wheelhouse` (no package index);
- the network: none (`--network none`). The hub binds its own port on Docker's bridge
  address (bootstrap.docker_bridge_ip: the address of `docker0`), so a bridge of that name and
  address is made in the container's own, otherwise empty network namespace. Nothing touches
  this machine's interfaces.

The hub there shares this machine's Docker engine with other tests, so its site config (an
admin's file, which the install keeps) makes ds01-ops decide but change nothing (no culls, no
removal of stopped containers). Run it (root, under the engine lock):

    flock /tmp/ds01-engine.lock .venv/bin/pytest tests/test_install_systemd.py -q
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.naming import SESSION_PID_LABEL, TEST_LABEL, unique_name

from ds01hub.host import bootstrap, install

pytestmark = [pytest.mark.docker, pytest.mark.root]

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "fixtures" / "systemd_probe.py"
IMAGE_REPOSITORY = "ds01hub-test/systemd-host"
#: The booted host: systemd as PID 1, the Python the install builds its venv from, iproute2
#: for the bridge address, libstdc++ for the mounted node.
IMAGE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "ca-certificates",
    "iproute2",
    "libstdc++6",
)
IMAGE_CHANGES = ("ENV container=docker", "ENV LANG=C.UTF-8", 'CMD ["/sbin/init"]')
IN_HOST = {  # where the mounted and copied things are inside the booted host
    "source": "/src",
    "wheelhouse": "/wheelhouse",
    "probe": "/usr/local/share/ds01hub-test/systemd_probe.py",
    "node": "/usr/local/bin/node",
    "docker": "/usr/local/bin/docker",
    "chp_package": "/usr/local/lib/node_modules/configurable-http-proxy",
}
HUB_API = "http://127.0.0.1:8000/hub/api"
UNITS = (install.HUB_UNIT, install.PROXY_UNIT, install.SWEEP_TIMER)
#: tests only: this hub's ds01-ops must not act on the shared engine (see the module docstring).
OPS_CHANGES_NOTHING = """
# -- tests/test_install_systemd.py: this hub shares the test machine's Docker engine, so ds01-ops
# decides but changes nothing there (no culls, no removal of stopped containers).
_services = c.JupyterHub.services
_services = _services.get_value([]) if hasattr(_services, "get_value") else list(_services)
for _service in _services:
    if _service["name"] == "ds01-ops":
        _service["command"] = [
            *_service["command"], "--OpsService.dry_run=True", "--OpsService.remove_stopped=False"
        ]
c.JupyterHub.services = _services
"""


# -- the booted host ----------------------------------------------------------------------------


@dataclass
class Machine:
    """The running container whose PID 1 is systemd."""

    name: str

    def sh(
        self, script: str, user: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """``script`` in bash as root, or in a login shell of ``user`` (su -)."""
        inner = ["bash", "-c", script] if user is None else ["su", "-", user, "-c", script]
        result = subprocess.run(
            ["docker", "exec", self.name, *inner], capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in {self.name}{' as ' + user if user else ''}: {script}\n"
                f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def probe(self, *args: str, user: str | None = None) -> dict:
        command = shlex.join(["/usr/bin/python3", IN_HOST["probe"], *args])
        return json.loads(self.sh(command, user=user).stdout)

    def install(self, arguments: str, source: str = IN_HOST["source"]) -> dict:
        """`ds01hub install ... --json` (stdout is the result; progress goes to stderr)."""
        result = self.sh(f"cd {source} && {arguments} --json", timeout=600)
        return json.loads(result.stdout)

    def active_since(self, unit: str) -> int:
        """When ``unit`` last became active (monotonic microseconds): a restart changes it."""
        value = self.sh(f"systemctl show -p ActiveEnterTimestampMonotonic --value {unit}")
        return int(value.stdout.strip())

    def unit_state(self, unit: str) -> tuple[str, str, str]:
        """(LoadState, ActiveState, UnitFileState) of ``unit``."""
        shown = self.sh(f"systemctl show -p LoadState -p ActiveState -p UnitFileState {unit}")
        state = dict(line.split("=", 1) for line in shown.stdout.splitlines())
        return state["LoadState"], state["ActiveState"], state["UnitFileState"]

    def hub_answers(self, wait: float = 120) -> dict:
        # configurable-http-proxy answers 404 until the hub has added its own route
        answer = self.probe("http", HUB_API, "--wait", str(wait), "--want", "200")
        assert answer["status"] == 200, (answer, self.hub_log())
        return json.loads(answer["body"])

    def hub_log(self) -> str:
        return self.sh(
            "systemctl status --no-pager -l ds01hub ds01hub-proxy 2>&1;"
            " tail -n 60 /var/log/ds01hub/jupyterhub.log /var/log/ds01hub/docker-proxy.log",
            check=False,
        ).stdout


def systemd_image_recipe() -> dict:
    recipe = bootstrap.base_image_recipe(packages=IMAGE_PACKAGES)
    return recipe | {"changes": list(IMAGE_CHANGES)}


@pytest.fixture(scope="module")
def systemd_image(docker_client) -> str:
    """The booted host's image, tagged by the hash of its recipe: built once per engine."""
    return bootstrap.ensure_rootfs_image(systemd_image_recipe(), IMAGE_REPOSITORY).tag


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """The install's packages as wheels, at the versions of this checkout's venv."""
    directory = tmp_path_factory.mktemp("wheelhouse")
    constraints = directory.parent / "constraints.txt"
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    constraints.write_text(frozen)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = install.wheelhouse_requirements(pyproject)
    bootstrap.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(directory)]
        + ["-c", str(constraints), *requirements]
    )
    return directory


def host_tools() -> dict[str, Path]:
    """This machine's docker CLI, node and configurable-http-proxy package, to mount."""
    found = {name: shutil.which(name) for name in ("docker", "node", bootstrap.PROXY_COMMAND)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not on PATH: run `make host-test` first")
    proxy = Path(found[bootstrap.PROXY_COMMAND]).resolve()  # .../configurable-http-proxy/bin/...
    return {
        "docker": Path(found["docker"]).resolve(),
        "node": Path(found["node"]).resolve(),
        "chp_package": proxy.parents[1],
    }


def source_archive(site_config: str) -> bytes:
    """A tar (root's files) of the checkout at /src as `git clone` plus the working tree's
    changes give it (tracked and untracked files, not ignored ones), the probe, and the admin's
    own site config in /etc/ds01hub (made before the install, which keeps it)."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = {
        f"{IN_HOST['source'].lstrip('/')}/{relative}": (REPO / relative).read_bytes()
        for relative in (raw.decode() for raw in listed if raw)
        if (REPO / relative).is_file()
    }
    files[IN_HOST["probe"].lstrip("/")] = PROBE.read_bytes()
    files["etc/ds01hub/jupyterhub_config.py"] = site_config.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        directories = sorted({str(p) for name in files for p in Path(name).parents[:-1]})
        for name in directories:
            archive.addfile(_root_entry(name, tarfile.DIRTYPE, 0o755))
        for name, content in files.items():
            archive.addfile(
                _root_entry(name, tarfile.REGTYPE, 0o644, len(content)), io.BytesIO(content)
            )
    return buffer.getvalue()


def _root_entry(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, size
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def docker_run_command(name: str, image: str, wheelhouse: Path) -> list[str]:
    """systemd as PID 1 on a cgroup v1 host (Docker 20.10), no network of its own."""
    mounts = {
        "/var/run/docker.sock": "/var/run/docker.sock",
        str(bootstrap.HOST_CA_BUNDLE): f"{bootstrap.HOST_CA_BUNDLE}:ro",
        str(wheelhouse): f"{IN_HOST['wheelhouse']}:ro",
        **{str(path): f"{IN_HOST[tool]}:ro" for tool, path in host_tools().items()},
    }
    return [
        "docker",
        "run",
        "--detach",
        "--name",
        name,
        "--label",
        f"{TEST_LABEL}=1",
        "--label",
        f"{SESSION_PID_LABEL}={os.getpid()}",
        "--network",
        "none",
        "--cgroupns=host",
        "--volume",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/run/lock",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-add",
        "NET_ADMIN",  # for the bridge in its own network namespace
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--stop-signal",
        "SIGRTMIN+3",  # systemd's "halt"
        *(part for source, target in mounts.items() for part in ("--volume", f"{source}:{target}")),
        image,
    ]


def emulate_docker_bridge(machine: Machine) -> None:
    """The bridge address the hub binds (see the module docstring), in the container's own
    network namespace: it has nothing but `lo` there, which also proves it is not this
    machine's namespace."""
    interfaces = machine.sh("ls /sys/class/net").stdout.split()
    assert interfaces == ["lo"], f"not an empty network namespace of its own: {interfaces}"
    address = bootstrap.docker_bridge_ip()
    machine.sh(
        f"ip link add docker0 type bridge && ip addr add {address}/16 dev docker0"
        " && ip link set docker0 up"
    )


@pytest.fixture(scope="module")
def machine(systemd_image, wheelhouse) -> Iterator[Machine]:
    """The booted host with the checkout at /src and the host tools in place; removed at the
    end, also after a failure."""
    name = f"ds01hub-systemd-{unique_name('t')}"
    site_config = install.render_site_config(install.Layout()) + OPS_CHANGES_NOTHING
    try:
        bootstrap.run(
            docker_run_command(name, systemd_image, wheelhouse), stdout=subprocess.DEVNULL
        )
        booted = Machine(name)
        state = booted.sh(  # systemctl answers once systemd's bus is up; then it waits
            "for i in $(seq 240); do state=$(systemctl is-system-running --wait 2>/dev/null);"
            ' [ -n "$state" ] && break; sleep 0.5; done; echo "$state"',
            check=False,
        )
        assert state.stdout.strip() == "running", booted.sh(
            "systemctl --failed --no-pager", check=False
        ).stdout
        subprocess.run(
            ["docker", "cp", "-", f"{name}:/"], input=source_archive(site_config), check=True
        )
        booted.sh(
            f"{IN_HOST['node']} --version && ln -s {IN_HOST['chp_package']}/bin/"
            f"{bootstrap.PROXY_COMMAND} /usr/local/bin/{bootstrap.PROXY_COMMAND}"
        )
        emulate_docker_bridge(booted)
        yield booted
    finally:
        subprocess.run(["docker", "stop", "--time", "30", name], capture_output=True)
        subprocess.run(["docker", "rm", "--force", "--volumes", name], capture_output=True)


@pytest.fixture(scope="module")
def installed(machine, singleuser_image) -> dict:
    """The first `ds01hub install` (as `make install` runs it: from the checkout, before any
    venv exists), and the hub answering. The single-user image of this checkout is built on
    this machine first, so the install reuses it."""
    first = machine.install(
        f"python3 -m ds01hub.host.install --wheelhouse {IN_HOST['wheelhouse']}"
        f" --ca-bundle {bootstrap.HOST_CA_BUNDLE}"
    )
    machine.hub_answers()
    return first


# -- the tests ----------------------------------------------------------------------------------


def test_the_install_starts_the_units_and_the_hub_answers(machine, installed):
    done = installed["done"] + installed["then"]
    assert not any(step.startswith("host:") for step in done), done  # engine answers: reused
    assert machine.sh("dpkg-query -W docker.io", check=False).returncode != 0  # not installed
    assert installed["then"][-1] == f"enable and start {', '.join(UNITS)}"
    assert not any(step.startswith("restart") for step in done)  # nothing ran before
    for unit in UNITS:
        assert machine.unit_state(unit) == ("loaded", "active", "enabled"), machine.hub_log()
    venv_python = machine.sh("readlink -f /opt/ds01hub/venv/bin/python").stdout.strip()
    assert venv_python.startswith("/usr/bin/python3")  # the system's, nothing under /root
    version = machine.sh(
        "/opt/ds01hub/venv/bin/python -c 'import jupyterhub; print(jupyterhub.__version__)'"
    )
    assert machine.hub_answers()["version"] == version.stdout.strip()
    # the hub's managed services: ds01-ops on loopback, the ds01 service on the bridge address
    for url in (
        "http://127.0.0.1:10102/services/ds01-ops/metrics",
        f"http://{bootstrap.docker_bridge_ip()}:10101/services/ds01/",
    ):
        assert machine.probe("http", url, "--wait", "60")["status"] is not None, url
    # the timer's job (oneshot: `systemctl start` fails when it does), and an admin command
    # that finds the hub and its token through /etc/ds01hub/ds01hub.env alone
    machine.sh(f"systemctl start {install.SWEEP_SERVICE}")
    assert "no running servers" in machine.sh("ds01hub cull --once --dry-run").stdout


def test_the_sockets_groups_and_modes_are_as_the_security_model_says(machine, installed):
    proxy, broker = "/run/ds01hub/docker.sock", "/run/ds01hub/broker.sock"
    for path in (proxy, broker):
        machine.sh(f"for i in $(seq 120); do [ -S {path} ] && exit 0; sleep 0.5; done; exit 1")
    found = machine.probe(
        "stat",
        proxy,
        broker,
        "/run/ds01hub",
        "/var/lib/ds01hub",
        "/etc/ds01hub/admin-token",
        "/srv/ds01hub/workspaces",
    )
    root_socket = {"kind": "socket", "owner": "root", "group": "root", "mode": "0666"}
    assert found[proxy].items() >= root_socket.items(), found[proxy]
    assert found[broker].items() >= root_socket.items(), found[broker]
    assert found["/run/ds01hub"]["mode"] == "0755"
    assert found["/var/lib/ds01hub"]["mode"] == "0700"
    assert found["/etc/ds01hub/admin-token"]["mode"] == "0600"
    assert found["/srv/ds01hub/workspaces"]["mode"] == "0711"
    for group in ("ds01-admin", "ds01-users", "ds01-gpu"):
        machine.sh(f"getent group {group}")


def test_a_fresh_unix_user_runs_the_commands_through_the_broker_and_the_proxy(machine, installed):
    user = unique_name("u")
    machine.sh(f"useradd --create-home --shell /bin/bash {user}")
    found = machine.sh("command -v container-list && container-list --help", user=user)
    assert found.stdout.startswith("/usr/local/bin/container-list\n")
    listed = machine.sh("container-list --json", user=user)  # through the broker, as them
    assert json.loads(listed.stdout) == [], listed
    # the Docker socket proxy knows who calls: the engine's containers (this one at least) are
    # not theirs, so they see none
    assert machine.probe("unix", "/var/run/docker.sock", "/containers/json")["body"] != "[]"
    answer = machine.probe("unix", "/run/ds01hub/docker.sock", "/containers/json", user=user)
    assert (answer["status"], json.loads(answer["body"])) == (200, []), answer


def test_a_second_install_changes_nothing_and_an_upgrade_restarts_only_the_hub(machine, installed):
    before = {unit: machine.active_since(unit) for unit in UNITS}
    wheelhouse = f"--wheelhouse {IN_HOST['wheelhouse']}"
    again = machine.install(f"ds01hub install --source {IN_HOST['source']} {wheelhouse}")
    assert again == {"dry_run": False, "done": [], "then": []}
    assert {unit: machine.active_since(unit) for unit in UNITS} == before
    # an upgrade that changes only the hub's base config: the hub restarts, the proxy does not
    site_config = machine.sh("cat /etc/ds01hub/jupyterhub_config.py").stdout
    machine.sh(f"echo '# a newer base config' >> {IN_HOST['source']}/config/jupyterhub_config.py")
    upgrade = machine.install(f"ds01hub install --source {IN_HOST['source']} {wheelhouse}")
    assert upgrade["done"] == ["write /opt/ds01hub/share/jupyterhub_config.py"]
    assert upgrade["then"] == [f"restart {install.HUB_UNIT} to use the new files"]
    assert machine.active_since(install.HUB_UNIT) > before[install.HUB_UNIT]
    assert machine.active_since(install.PROXY_UNIT) == before[install.PROXY_UNIT]
    assert machine.sh("cat /etc/ds01hub/jupyterhub_config.py").stdout == site_config  # kept
    assert (
        "# a newer base config"
        in machine.sh("tail -1 /opt/ds01hub/share/jupyterhub_config.py").stdout
    )
    machine.hub_answers()


def test_uninstall_keeps_config_and_state_and_purge_removes_them(machine, installed):
    machine.sh("test -s /var/lib/ds01hub/jupyterhub.sqlite")
    removed = machine.install("ds01hub uninstall")  # the venv's own command removes its venv
    assert set(removed["kept"]) >= {"/etc/ds01hub", "/var/lib/ds01hub", "/var/log/ds01hub"}
    for unit in UNITS:
        assert machine.unit_state(unit)[:2] == ("not-found", "inactive"), unit
    assert machine.probe("http", HUB_API)["status"] is None  # nothing listens any more
    gone = machine.probe(
        "stat", "/opt/ds01hub", "/usr/local/bin/container-list", "/run/ds01hub/docker.sock"
    )
    assert not any(entry["exists"] for entry in gone.values()), gone
    kept = machine.probe(
        "stat",
        "/etc/ds01hub/ds01hub.env",
        "/etc/ds01hub/jupyterhub_config.py",
        "/var/lib/ds01hub/jupyterhub.sqlite",
        "/var/log/ds01hub/jupyterhub.log",
    )
    assert all(entry["exists"] for entry in kept.values()), kept
    machine.sh("getent group ds01-admin")

    purged = machine.install("python3 -m ds01hub.host.install uninstall --purge")
    assert purged["kept"] == ["/srv/ds01hub/workspaces"]  # the users' files: never removed
    gone = machine.probe("stat", "/etc/ds01hub", "/var/lib/ds01hub", "/var/log/ds01hub")
    assert not any(entry["exists"] for entry in gone.values()), gone
    assert machine.sh("getent group ds01-admin", check=False).returncode == 2
    assert machine.sh("ls /etc/systemd/system/*/ds01hub* 2>/dev/null", check=False).stdout == ""
