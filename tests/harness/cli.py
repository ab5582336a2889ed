"""Helpers for the CLI and broker tests: real Unix users, the users' commands run as them, and
the broker as its own process.

The commands run under `/usr/bin/python3` with the dev venv's site-packages added: the venv's
interpreter lives under /root (mode 0700), which the test users cannot enter, just as a real
deployment installs ds01hub where every user can run it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SITE_PACKAGES = sysconfig.get_paths()["purelib"]
USER_PYTHON = "/usr/bin/python3"
LAUNCHER = (
    "import site, sys; site.addsitedir(sys.argv.pop(1)); "
    "from ds01hub.cli.user.commands import entry; sys.exit(entry(sys.argv[1])(sys.argv[2:]))"
)


@dataclass(frozen=True)
class UnixUser:
    name: str
    uid: int
    gid: int
    home: str


@contextlib.contextmanager
def unix_user(prefix: str = "d01t", name: str | None = None):
    """A fresh Unix user (removed with its home at the end, even on failure). An explicit
    `name` is taken as it is (`useradd --badname`: e.g. a case variant of another user)."""
    name = name or f"{prefix}{secrets.token_hex(3)}"
    home = f"/tmp/{name}-home"
    subprocess.run(
        ["useradd", "--badname", "--create-home", "--home-dir", home, "--shell", "/bin/bash"]
        + [name],
        check=True,
    )
    try:
        entry = pwd.getpwnam(name)
        yield UnixUser(name, entry.pw_uid, entry.pw_gid, home)
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def user_env(home: str, socket_path: str, **extra: str) -> dict[str, str]:
    env = {
        "HOME": home,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "DS01HUB_BROKER_SOCKET": socket_path,
    }
    env.update(extra)
    return env


def command_line(command: str, *args: str) -> list[str]:
    return [USER_PYTHON, "-c", LAUNCHER, SITE_PACKAGES, command, *args]


def run_as(
    user: UnixUser | int,
    socket_path: str,
    command: str,
    *args: str,
    input: str | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run one of the users' commands as `user` (a UnixUser, or a bare uid with no account)."""
    uid, gid, home = (
        (user.uid, user.gid, user.home) if isinstance(user, UnixUser) else (user, user, "/tmp")
    )
    return subprocess.run(
        command_line(command, *args),
        user=uid,
        group=gid,
        extra_groups=[],
        env=user_env(home, socket_path),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/tmp",
    )


class BrokerProcess:
    """`python -m ds01hub.services.broker` on a socket in a fresh 0755 directory (for tests that do
    not need the hub to start it)."""

    def __init__(self, hub_api_url: str, token: str, *extra_args: str):
        self.directory = tempfile.mkdtemp(prefix="ds01t-broker-")
        os.chmod(self.directory, 0o755)
        self.socket_path = os.path.join(self.directory, "broker.sock")
        self.log_path = Path(self.directory) / "broker.log"
        args = [
            f"--Broker.socket_path={self.socket_path}",
            f"--Broker.hub_api_url={hub_api_url}",
            f"--Broker.api_token={token}",
            *extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ds01hub.services.broker", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"broker did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


BUSYBOX_IMAGE = "ds01hub-test/cli-busybox:4"
BUSYBOX_APPLETS = (
    "sh",
    "hostname",
    "touch",
    "ls",
    "sleep",
    "cat",
    "id",
    "echo",
    "pwd",
    "true",
    "stty",
    "ps",
    "seq",
    "wc",
)


def busybox_image(client) -> str:
    """A tiny image with the host's static busybox (sh, hostname, ls, ...), built once."""
    import io
    import tarfile

    import docker.errors

    try:
        client.images.get(BUSYBOX_IMAGE)
        return BUSYBOX_IMAGE
    except docker.errors.ImageNotFound:
        pass
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(shutil.which("busybox"), arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            archive.addfile(link)
        for directory in ("tmp", "etc", "root"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            archive.addfile(info)
    repository, tag = BUSYBOX_IMAGE.split(":")
    client.api.import_image_from_data(
        buffer.getvalue(), repository=repository, tag=tag, changes=['LABEL ds01.test="1"']
    )
    return BUSYBOX_IMAGE


def managed_container(
    client, state_dir, user: str, project: str, image: str, test_id: str, gpus: str = ""
):
    """A running container labelled as the spawner labels its containers (ds01hub.labels,
    signed with the key in `state_dir`: the broker's), for tests of the broker's Docker side
    before/without a spawn."""
    from ds01hub import labels, provenance

    container_labels = labels.container_labels(
        user=user,
        project=project,
        group=None,
        priority=0,
        gpus=[g for g in gpus.split(",") if g],
        image=image,
    )
    name = labels.container_name(user, project) + f"-{test_id}"
    container_labels = provenance.load(state_dir).sign(container_labels, name)
    container_labels.update({"ds01.test": "1", "ds01.test.cli": test_id})
    return client.containers.run(
        image, ["sleep", "100000"], name=name, labels=container_labels, detach=True
    )


class PtySession:
    """One of the users' commands run as `user` on a real pseudo-terminal that is its
    controlling terminal (so window-size changes deliver SIGWINCH), like a person over SSH."""

    def __init__(
        self,
        user: UnixUser,
        socket_path: str,
        command: str,
        *args: str,
        rows: int = 24,
        cols: int = 80,
        argv: list[str] | None = None,
    ):
        """`argv` (live tests): run that instead, as the caller (e.g. `su - USER -c ...`, the
        way a login shell gets there); `user`, `socket_path` and `command` are then unused."""
        import fcntl
        import pty
        import termios

        self.master, slave = pty.openpty()
        self.resize(rows, cols)

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        as_user = {"user": user.uid, "group": user.gid, "extra_groups": []} if argv is None else {}
        self.process = subprocess.Popen(
            argv or command_line(command, *args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            **as_user,
            env=user_env(user.home, socket_path, TERM="xterm") if argv is None else None,
            start_new_session=True,
            preexec_fn=take_terminal,
            cwd="/tmp",
        )
        os.close(slave)
        self.seen = b""

    def resize(self, rows: int, cols: int) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, marker: str, timeout: float = 30) -> str:
        """Read until `marker` appears in the output since the last expect; return that part."""
        import select

        wanted = marker.encode()
        data = b""
        deadline = time.monotonic() + timeout
        while wanted not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"did not see {marker!r} in {data!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # the command ended and the terminal closed
                break
            if not chunk:
                break
            data += chunk
        self.seen += data
        if wanted not in data:
            raise AssertionError(f"did not see {marker!r} in {data!r}")
        return data.decode(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        os.close(self.master)

    def __enter__(self) -> PtySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def broker_socket_path():
    """A socket path in a fresh 0755 directory that every test user can reach; removed after."""
    directory = tempfile.mkdtemp(prefix="ds01t-sock-")
    os.chmod(directory, 0o755)
    try:
        yield os.path.join(directory, "broker.sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def wait_for_socket(path: str, hub, timeout: float = 60) -> None:
    """Until the hub's managed broker listens on `path` (the hub log on failure)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"no broker socket at {path}:\n{hub.log()}")
        time.sleep(0.2)
