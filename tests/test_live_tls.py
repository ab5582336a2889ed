"""TLS on the hub's own port, as the installed config does it (DS01HUB_SSL_CERT/KEY and
DS01HUB_HTTP_REDIRECT_PORT in the environment file): a real hub from config/jupyterhub_config.py
with a self-signed certificate made by openssl answers over https; plain http on that port is
refused; the redirect port sends http to https."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from harness import docker_bridge_ip, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
REPO = Path(__file__).resolve().parent.parent


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "hub.crt", directory / "hub.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def site_hub(directory: Path, env: dict[str, str]):
    """`jupyterhub -f config/jupyterhub_config.py` with the site's DS01HUB_* settings."""
    log = directory / "hub.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(REPO / "config/jupyterhub_config.py")],
            cwd=directory,
            env=os.environ | env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield process, log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_hub_answers_over_https_and_not_over_plain_http(docker_client, tmp_path):
    cert, key = self_signed(tmp_path)
    port, redirect = free_port(), free_port()
    env = {
        "DS01HUB_STATE_DIR": str(tmp_path / "state"),
        "DS01HUB_BIND_URL": f"https://127.0.0.1:{port}",
        "DS01HUB_HUB_PORT": str(free_port(docker_bridge_ip())),
        "DS01HUB_PROXY_API_PORT": str(free_port()),
        "DS01HUB_SERVICE_PORT": str(free_port(docker_bridge_ip())),
        "DS01HUB_OPS_PORT": str(free_port()),
        "DS01HUB_BROKER_SOCKET": str(tmp_path / "broker.sock"),
        "DS01HUB_LIMITS": str(REPO / "config/resource-limits.yaml"),
        "DS01HUB_SSL_CERT": str(cert),
        "DS01HUB_SSL_KEY": str(key),
        "DS01HUB_HTTP_REDIRECT_PORT": str(redirect),
    }
    with site_hub(tmp_path, env) as (process, log):
        deadline, answer = time.monotonic() + 90, None
        while answer is None or answer.status_code != 200:  # 404 until the hub's route is up
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            with contextlib.suppress(requests.ConnectionError):
                answer = requests.get(f"https://127.0.0.1:{port}/hub/api/", verify=cert, timeout=5)
            time.sleep(0.3)
        assert "version" in answer.json()
        # the certificate is the one served: an unpinned client refuses the self-signed one
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{port}/hub/api/", timeout=5)
        # plain http on the https port gets no page
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/hub/api/", timeout=5)
        # the redirect port sends plain http to https
        moved = requests.get(
            f"http://127.0.0.1:{redirect}/hub/login", allow_redirects=False, timeout=5
        )
        assert moved.status_code in (301, 302, 307, 308)
        assert moved.headers["Location"] == f"https://127.0.0.1:{port}/hub/login"
