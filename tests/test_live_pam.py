"""The SSH users' path on a real host: a Unix user with a real password logs in through PAM in
headless Chromium and gets a server (DS01Spawner, workspace under workspace_root, running as
their own uid); the same person, as that Unix account (`su - USER -c ...`, the users' commands
from a world-readable venv as `ds01hub install` makes it), lists the same container, creates
another, opens a shell in it on a real pty, and sees the same workspace files as the browser."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness.browser import log_in
from harness.cli import PtySession, broker_socket_path, wait_for_socket
from harness.ds01_spawner import Ds01Hub
from harness.live import commands  # noqa: F401  (fixture)

pytestmark = [pytest.mark.root, pytest.mark.browser, pytest.mark.e2e, pytest.mark.docker]
REPO = Path(__file__).resolve().parent.parent

if os.geteuid() != 0:  # pragma: no cover
    pytest.skip("needs root to create Unix users", allow_module_level=True)


@pytest.fixture
def person():
    """A Unix account with a real password, in a group of its own that may log in."""
    name, group = f"d01p{secrets.token_hex(3)}", f"d01pg{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    home = f"/tmp/{name}-home"
    subprocess.run(["groupadd", group], check=True)
    subprocess.run(
        [
            "useradd",
            "--create-home",
            "--home-dir",
            home,
            "--shell",
            "/bin/bash",
            "--groups",
            group,
            name,
        ],
        check=True,
    )
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    try:
        yield name, password, group
    finally:
        subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False)
        shutil.rmtree(home, ignore_errors=True)


def as_user(name: str, socket_path: str, command: str) -> subprocess.CompletedProcess:
    """A command in the user's login shell, as over SSH."""
    return subprocess.run(
        ["su", "-", name, "-c", f"export DS01HUB_BROKER_SOCKET={socket_path}; {command}"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pam_login_in_the_browser_and_the_same_account_over_ssh(
    hub_factory,
    tmp_path,
    chromium,
    commands,  # noqa: F811 (the fixture imported above)
    person,
):
    name, password, group = person
    parent = Path(tempfile.mkdtemp(prefix="ds01t-ws-"))
    parent.chmod(0o755)
    workspaces = parent / "workspaces"
    workspaces.mkdir(mode=0o711)
    try:
        with broker_socket_path() as socket_path:
            ds01 = Ds01Hub(
                hub_factory,
                tmp_path,
                extra_config=f"""
c.JupyterHub.authenticator_class = "pam"
c.Authenticator.allow_all = False
c.PAMAuthenticator.allowed_groups = {{{group!r}}}
c.DS01Spawner.workspace_root = {str(workspaces)!r}
c.DS01Spawner.user_id_source = "passwd"
from ds01hub.hub.services import configure_broker
configure_broker(c, socket_path={socket_path!r},
                 broker_args=["--Broker.limits_path={tmp_path / "limits.yaml"}",
                              "--Broker.state_dir={tmp_path / "state"}"])
""",
            )
            hub = ds01.hub
            wait_for_socket(socket_path, hub)
            context = chromium.new_context()
            try:
                page = context.new_page()
                log_in(page, hub.hub_url, name, "not the password")
                assert "Invalid username or password" in page.content()
                log_in(page, hub.hub_url, name, password)
                page.wait_for_url("**/hub/spawn**", timeout=60_000)
                page.click("input[type=submit], button[type=submit]")
                page.wait_for_url(f"**/user/{name}/lab**", timeout=240_000)
                browser_container = hub.container_of(name)
                uid = pwd.getpwnam(name).pw_uid
                assert browser_container.attrs["Config"]["User"].startswith(f"{uid}:")

                # the same account over SSH: the same container, listed
                bin_ = commands
                listed = as_user(name, socket_path, f"{bin_}/container-list")
                assert listed.returncode == 0, listed.stderr
                assert "default" in listed.stdout and "running" in listed.stdout
                created = as_user(name, socket_path, f"{bin_}/container-create shell1")
                assert created.returncode == 0, created.stderr + hub.log()

                # a shell in it on a real pty; a file written there is the browser's too
                argv = [
                    "su",
                    "-",
                    name,
                    "-c",
                    f"DS01HUB_BROKER_SOCKET={socket_path} {bin_}/container-run shell1",
                ]
                with PtySession(None, "", "", argv=argv) as shell:
                    shell.expect("$ ", timeout=120)
                    shell.send("id -u; echo written-over-ssh > /workspace/from-ssh.txt; exit\n")
                    assert str(uid) in shell.expect("still running", timeout=60)
                on_host = workspaces / name / "from-ssh.txt"
                assert on_host.read_text() == "written-over-ssh\n"
                assert on_host.stat().st_uid == uid
                seen = page.request.get(f"{hub.user_url(name)}api/contents/from-ssh.txt")
                assert seen.ok and seen.json()["content"] == "written-over-ssh\n"
                # and a file the user makes on the host, in their workspace, too
                made = as_user(name, socket_path, f"echo from-host > {workspaces / name}/h.txt")
                assert made.returncode == 0, made.stderr
                seen = page.request.get(f"{hub.user_url(name)}api/contents/h.txt")
                assert seen.ok and seen.json()["content"] == "from-host\n"
            finally:
                context.close()
                hub.stop()
    finally:
        shutil.rmtree(parent, ignore_errors=True)
