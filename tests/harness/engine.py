"""A Docker engine of a test's own, for tests that stop and restart it (the shared engine is
never stopped, restarted or reconfigured).

`PrivateEngine` runs a second dockerd on this host with its own socket, data root, exec root
(so its own containerd), pidfile and an empty config file (not /etc/docker/daemon.json), a
bridge interface of its own (created here, on a free 10.213.x.0/24, removed at the end) and no
iptables rules, so it touches nothing of the shared engine's. Never `--bridge=none`: dockerd
20.10 then DELETES the host's `docker0` interface (the shared engine's bridge) at start. Tests
give its containers the host's network. The SIMULATED GPU hook is on its PATH, as for the
shared engine (ds01hub.host.bootstrap), so GPU device requests start. Images come from the shared
engine (`docker save | docker load`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from ds01hub.host import bootstrap
from harness.wait import wait_until


class PrivateEngine:
    """See the module docstring. `start()`, `stop()` (SIGTERM, as `systemctl stop docker`
    does), `start()` again on the same data; `close()` stops it and removes everything."""

    def __init__(self) -> None:
        # Short: containerd's sockets live under the exec root (unix paths max 108 bytes).
        self.directory = Path(tempfile.mkdtemp(prefix="ds01e-", dir="/tmp"))
        self.socket = self.directory / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.pidfile = self.directory / "docker.pid"
        self.log_path = self.directory / "dockerd.log"
        (self.directory / "daemon.json").write_text("{}\n")
        self.bridge = f"ds01e{secrets.token_hex(4)}"  # interface names: at most 15 bytes
        self._bridge_made = False
        self.process: subprocess.Popen | None = None
        self._clients: list = []

    def _make_bridge(self) -> None:
        """Our own bridge interface on a /24 of 10.213.0.0/16 that no route uses yet."""
        routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        for _ in range(50):
            subnet = f"10.213.{secrets.randbelow(250) + 1}"
            if f"{subnet}." not in routes:
                break
        else:
            raise AssertionError(f"no free 10.213.x.0/24 for a private bridge:\n{routes}")
        for command in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{subnet}.1/24", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            subprocess.run(command, check=True, capture_output=True)
            self._bridge_made = True

    def command(self) -> list[str]:
        d = self.directory
        return [
            "dockerd",
            f"--config-file={d / 'daemon.json'}",
            f"--host={self.url}",
            f"--data-root={d / 'data'}",
            f"--exec-root={d / 'exec'}",
            f"--pidfile={self.pidfile}",
            f"--bridge={self.bridge}",
            "--iptables=false",
            "--ip-masq=false",
        ]

    def start(self, timeout: float = 60) -> PrivateEngine:
        if not self._bridge_made:
            self._make_bridge()
        path = bootstrap.dockerd_path(bool(bootstrap.real_gpu_hook()), bootstrap.STANDARD_PATH)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=os.environ | {"PATH": path},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(self.answers, timeout, 0.2, lambda: f"private dockerd:\n{self.log()}")
        return self

    def answers(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"private dockerd exited:\n{self.log()}")
        result = subprocess.run(
            ["docker", "-H", self.url, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            timeout=30,
        )
        return result.returncode == 0

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM and wait until dockerd has exited (it stops its containers first)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)

    def client(self):
        """A docker-py client of this engine (closed by `close()`)."""
        import docker

        client = docker.DockerClient(base_url=self.url, version="auto", timeout=120)
        self._clients.append(client)
        return client

    def load_image(self, tag: str) -> None:
        """Copy an image of the shared engine into this one."""
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        load = subprocess.run(
            ["docker", "-H", self.url, "load", "--quiet"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=300,
        )
        save.stdout.close()
        if save.wait(60) != 0 or load.returncode != 0:
            raise AssertionError(f"docker save | load of {tag} failed: {load.stderr}")

    def log(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return "(no dockerd log)"

    def close(self) -> None:
        """Remove this engine's containers, stop it, remove its directory."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(Exception):
                for container in self.client().containers.list(all=True):
                    container.remove(force=True, v=True)
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self.stop()
        # dockerd leaves its default network namespace mounted (exec root/netns/default):
        # unmount what is left below our directory (ours only), never remove through a mount.
        for mount in sorted(_mounts_under(self.directory), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], capture_output=True, timeout=30)
        if not _mounts_under(self.directory):
            shutil.rmtree(self.directory, ignore_errors=True)
        if self._bridge_made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)

    def __enter__(self) -> PrivateEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _mounts_under(directory: Path) -> list[str]:
    """Mount points below `directory`."""
    prefix = str(directory) + "/"
    with open("/proc/self/mounts") as mounts:
        return [p for p in (line.split()[1] for line in mounts) if p.startswith(prefix)]
