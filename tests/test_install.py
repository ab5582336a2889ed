"""`ds01hub install` into a temporary root: what it writes, that a second run does nothing,
that the admin's files survive an upgrade, that uninstall keeps the data; the units pass
`systemd-analyze verify`; the site environment file's parser. (The install run for real on a
booted systemd: tests/test_install_systemd.py.)"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from ds01hub.host import install, siteenv

REPO = Path(__file__).resolve().parent.parent


def options(root: Path, **changes) -> install.Options:
    """An install into ``root``: no venv, images, accounts or systemctl (those need the host);
    the GPU group is one every Debian has."""
    layout = replace(install.Layout(), root=root, gpu_group="users")
    return install.Options(
        source=REPO, layout=layout, venv=False, images=False, accounts=False, **changes
    )


def test_install_writes_the_layout_and_a_second_run_does_nothing(tmp_path):
    opts = options(tmp_path)
    first = install.install(opts)
    layout = opts.layout
    assert first["done"], first
    assert stat.S_IMODE(layout.state.stat().st_mode) == 0o700
    assert stat.S_IMODE(layout.workspaces.stat().st_mode) == 0o711
    assert stat.S_IMODE((layout.etc / "admin-token").stat().st_mode) == 0o600
    assert len((layout.etc / "admin-token").read_text().strip()) == 64
    env = siteenv.parse((layout.etc / "ds01hub.env").read_text())
    assert env["DS01HUB_STATE_DIR"] == "/var/lib/ds01hub"  # as on the host, not the temp root
    assert env["DS01HUB_BIND_URL"].startswith("http://127.0.0.1:")  # no clear-text logins
    site = (layout.etc / "jupyterhub_config.py").read_text()
    assert 'c.JupyterHub.authenticator_class = "pam"' in site
    assert "load_subconfig('/opt/ds01hub/share/jupyterhub_config.py')" in site
    compile(site, "jupyterhub_config.py", "exec")
    assert (layout.share / "jupyterhub_config.py").read_text() == (
        REPO / "config/jupyterhub_config.py"
    ).read_text()
    # the users' commands and DS01's aliases, as links into the venv
    assert os.readlink(layout.bindir / "container-list") == str(layout.venv / "bin/container-list")
    assert os.readlink(layout.bindir / "new-user") == str(layout.venv / "bin/user-setup")
    assert os.readlink(layout.bindir / "new-project") == str(layout.venv / "bin/project-init")
    assert not (layout.bindir / "ds01hub-broker").exists()
    unit = (layout.units / "ds01hub.service").read_text()
    assert "ExecStart=/opt/ds01hub/venv/bin/jupyterhub -f /etc/ds01hub/jupyterhub_config.py" in unit
    assert "EnvironmentFile=/etc/ds01hub/ds01hub.env" in unit
    assert "/var/log/ds01hub/*.log" in layout.logrotate.read_text()

    second = install.install(opts)
    assert second == {"dry_run": False, "done": [], "then": []}
    assert install.install(opts, dry_run=True) == {"dry_run": True, "would": []}


def test_an_upgrade_keeps_the_admins_files_and_replaces_ds01hubs(tmp_path):
    opts = options(tmp_path)
    install.install(opts)
    layout = opts.layout
    token = (layout.etc / "admin-token").read_text()
    (layout.etc / "ds01hub.env").write_text("DS01HUB_BIND_URL=https://0.0.0.0:443\n")
    (layout.etc / "jupyterhub_config.py").write_text("# the admin's own\n")
    (layout.share / "jupyterhub_config.py").write_text("# stale base from an older version\n")
    (layout.units / "ds01hub.service").write_text("[Service]\n")
    result = install.install(opts)
    assert result["done"] == [
        f"write {layout.share / 'jupyterhub_config.py'}",
        f"write {layout.units / 'ds01hub.service'}",
    ]
    assert (layout.etc / "ds01hub.env").read_text() == "DS01HUB_BIND_URL=https://0.0.0.0:443\n"
    assert (layout.etc / "jupyterhub_config.py").read_text() == "# the admin's own\n"
    assert (layout.etc / "admin-token").read_text() == token


def test_install_never_replaces_a_command_that_is_not_its_own(tmp_path):
    opts = options(tmp_path)
    opts.layout.bindir.mkdir(parents=True)
    (opts.layout.bindir / "image-list").write_text("#!/bin/sh\necho the site's own\n")
    with pytest.raises(install.InstallError, match="image-list exists and is not ds01hub's"):
        install.install(opts)
    assert "the site's own" in (opts.layout.bindir / "image-list").read_text()


def test_uninstall_removes_the_install_and_keeps_config_state_logs_and_workspaces(tmp_path):
    opts = options(tmp_path)
    install.install(opts)
    layout = opts.layout
    (layout.state / "jupyterhub.sqlite").write_text("data")
    (layout.workspaces / "alice").mkdir()
    (layout.bindir / "someone-elses-tool").write_text("#!/bin/sh\n")
    dry = install.uninstall(layout, dry_run=True)
    assert dry["would"] and layout.prefix.exists()
    result = install.uninstall(layout)
    assert not layout.prefix.exists()
    assert not (layout.units / "ds01hub.service").exists()
    assert not (layout.bindir / "container-list").is_symlink()
    assert (layout.bindir / "someone-elses-tool").exists()
    assert (layout.state / "jupyterhub.sqlite").read_text() == "data"
    assert (layout.etc / "ds01hub.env").exists() and (layout.workspaces / "alice").is_dir()
    assert str(layout.etc) in result["kept"] and str(layout.state) in result["kept"]
    install.uninstall(layout, purge=True)
    assert not layout.etc.exists() and not layout.state.exists()
    assert (layout.workspaces / "alice").is_dir()  # the users' files: never removed


@pytest.mark.root
def test_install_restricts_existing_nvidia_device_nodes_to_the_gpu_group(tmp_path):
    """Simulated device nodes (plain files under the temp root's /dev): the install makes them
    root:<GPU group> 0660 and writes the driver's module options with the group's gid."""
    opts = options(tmp_path)
    dev = opts.layout.dev
    (dev / "nvidia-caps").mkdir(parents=True)
    nodes = [
        dev / "nvidia0",
        dev / "nvidiactl",
        dev / "nvidia-uvm",
        dev / "nvidia-caps/nvidia-cap3",  # a MIG instance's access capability
    ]
    for node in nodes:
        node.write_text("")
        node.chmod(0o666)
    config_cap = dev / "nvidia-caps/nvidia-cap1"  # MIG config: stays the driver's root 0400
    config_cap.write_text("")
    config_cap.chmod(0o400)
    (dev / "null").write_text("")
    (dev / "null").chmod(0o666)
    install.install(opts)
    gid = 100  # "users" on Debian
    for node in nodes:
        assert (node.stat().st_gid, stat.S_IMODE(node.stat().st_mode)) == (gid, 0o660), node
    assert stat.S_IMODE((dev / "null").stat().st_mode) == 0o666  # not an NVIDIA node
    assert (config_cap.stat().st_gid, stat.S_IMODE(config_cap.stat().st_mode)) == (0, 0o400)
    conf = (tmp_path / "etc/modprobe.d/ds01hub-nvidia.conf").read_text()
    assert f"NVreg_DeviceFileGID={gid} NVreg_DeviceFileMode=432" in conf  # 432 = 0o660
    rule = (tmp_path / "etc/udev/rules.d/70-ds01hub-nvidia.rules").read_text()
    assert 'GROUP="users", MODE="0660"' in rule
    assert install.install(opts)["done"] == []


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_the_units_pass_systemd_analyze_verify(tmp_path):
    """systemd's own checker on the units as installed: syntax, directives, the executables
    named (stand-ins at the installed paths under a temp root), the timer's service."""
    opts = options(tmp_path)
    install.install(opts)
    layout = opts.layout
    for script in ("jupyterhub", "ds01hub"):
        path = layout.venv / "bin" / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    # systemd's own units (the targets ours name), as on the host
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    units = sorted(layout.units.glob("ds01hub*"))
    assert [u.name for u in units] == sorted(install.render_units(layout))
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", *map(str, units)],
        capture_output=True,
        text=True,
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        if "ds01hub" in line and "Failed to prepare filename" not in line
    ]
    assert result.returncode == 0 and not problems, result.stderr


# -- the site environment file ------------------------------------------------------------------


def test_the_environment_file_reads_ds01hub_settings_only(tmp_path):
    text = '# comment\n; also\n\nDS01HUB_A=1\nDS01HUB_B="two words"\nDS01HUB_C=\n'
    assert siteenv.parse(text) == {"DS01HUB_A": "1", "DS01HUB_B": "two words", "DS01HUB_C": ""}
    with pytest.raises(siteenv.SiteEnvError, match="line 1: LD_PRELOAD is not a ds01hub setting"):
        siteenv.parse("LD_PRELOAD=/tmp/x.so\n")
    with pytest.raises(siteenv.SiteEnvError, match="line 2: 'export X' is not NAME=value"):
        siteenv.parse("DS01HUB_A=1\nexport X\n")


@pytest.mark.root
def test_an_environment_file_others_could_write_is_refused(tmp_path):
    path = tmp_path / "ds01hub.env"
    path.write_text("DS01HUB_BROKER_SOCKET=/tmp/evil.sock\n")
    path.chmod(0o646)
    env = {"DS01HUB_ENV_FILE": str(path)}
    with pytest.raises(siteenv.SiteEnvError, match="must be owned by root and writable by root"):
        siteenv.load(env)
    assert "DS01HUB_BROKER_SOCKET" not in env
    path.chmod(0o644)
    env = {"DS01HUB_ENV_FILE": str(path), "DS01HUB_BROKER_SOCKET": "/run/mine.sock"}
    assert siteenv.load(env) == path
    assert env["DS01HUB_BROKER_SOCKET"] == "/run/mine.sock"  # the environment wins


# -- restarts on upgrade, the wheelhouse -------------------------------------------------------


def _restart_steps(monkeypatch, done: list[install.Step], running: set[str]) -> list[str]:
    """What after_steps would do on a host where systemd runs and ``running`` units run."""
    monkeypatch.setattr(install.bootstrap, "systemd_runs", lambda: True)
    monkeypatch.setattr(install, "_active", lambda unit: unit in running)
    opts = install.Options(source=REPO, images=False)
    return [step.what for step in install.after_steps(opts, done)]


def test_an_upgrade_restarts_only_the_running_units_whose_files_changed(monkeypatch):
    hub_config = install.Step("write hub config", lambda: True, lambda: None, (install.HUB_UNIT,))
    venv = install.Step(
        "virtualenv", lambda: True, lambda: None, (install.HUB_UNIT, install.PROXY_UNIT)
    )
    running = {install.HUB_UNIT, install.PROXY_UNIT}
    assert _restart_steps(monkeypatch, [hub_config], running)[0] == (
        "restart ds01hub.service to use the new files"
    )
    assert _restart_steps(monkeypatch, [venv], running)[0] == (
        "restart ds01hub.service, ds01hub-proxy.service to use the new files"
    )
    # a first install: nothing runs yet, the units are started, not restarted
    first = _restart_steps(monkeypatch, [venv], set())
    assert not any(what.startswith("restart") for what in first), first


def test_the_wheelhouse_holds_the_dependencies_and_the_build_requirements(tmp_path):
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = install.wheelhouse_requirements(pyproject)
    assert set(pyproject["project"]["dependencies"]) <= set(wanted)
    assert set(pyproject["build-system"]["requires"]) <= set(wanted)  # the project's own wheel
    assert set(pyproject["project"]["optional-dependencies"]["ldap"]) <= set(wanted)
    env = install.pip_environment(tmp_path)
    assert (env["PIP_NO_INDEX"], env["PIP_FIND_LINKS"]) == ("1", str(tmp_path))
    assert install.pip_environment(None) is None
    missing = replace(options(tmp_path), wheelhouse=tmp_path / "nowhere")
    with pytest.raises(install.InstallError, match="--wheelhouse .*nowhere: no such directory"):
        install.install(missing)
