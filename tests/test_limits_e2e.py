"""The limits file under a real JupyterHub running DS01Spawner: checked when the hub starts (a
broken file stops it, listing the problems), and a broken edit keeps spawns on the last good
file, is reported (hub log, /hub/metrics) and is read without blocking the hub for anyone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests
from harness import unique_name
from harness.ds01_spawner import LIMITS_YAML, Ds01Hub
from harness.hub import HubError
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

# Runs in the hub process (its config): reads of a file holding "# slow" wait for a gate file,
# so the test knows the hub is inside a slow parse for as long as it wants.
SLOW_READS = """
import pathlib as _pathlib, time as _time
import ds01hub.limits as _limits
_real_load = _limits.load_limits
def _slow_load(path):
    if b"# slow" in _pathlib.Path(path).read_bytes():
        _pathlib.Path({started!r}).touch()
        _deadline = _time.monotonic() + 120
        while not _pathlib.Path({gate!r}).exists() and _time.monotonic() < _deadline:
            _time.sleep(0.05)
    return _real_load(path)
_limits.load_limits = _slow_load
c.DS01Spawner.limits_parse_timeout = 300
"""


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def hub_metric(hub, name: str, limits_path: Path) -> float | None:
    text = requests.get(
        f"{hub.url}/hub/metrics", headers={"Authorization": f"token {hub.admin_token}"}, timeout=30
    ).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("file") == str(limits_path):
                return sample.value
    return None


def test_a_hub_on_a_broken_limits_file_refuses_to_start_and_lists_the_problems(
    hub_factory, tmp_path
):
    limits = tmp_path / "limits.yaml"
    limits.write_text(
        "groups:\n  students: {members: [alice]}\n"
        "defaults:\n  memory: 0\n"
        "groups:\n  guests: {members: [eve]}\n"
    )
    config = f"c.DS01Spawner.limits_path = {str(limits)!r}\n"
    with pytest.raises(HubError) as caught:
        hub_factory(config, spawner="ds01")
    log = str(caught.value)
    assert "jupyterhub exited with 1" in log
    assert "the hub does not start on it" in log
    assert f"{limits}:4: defaults.memory: invalid memory: 0 means no limit to Docker" in log
    duplicate = "groups: the key 'groups' appears twice in one mapping (lines 1 and 5)"
    assert f"{limits}:5: {duplicate}" in log
    assert "Traceback" not in log


def test_a_broken_edit_keeps_spawns_on_the_last_good_file_and_never_blocks_the_hub(
    hub_factory, tmp_path, docker_client
):
    started, gate = tmp_path / "parse-started", tmp_path / "parse-may-finish"
    ds01 = Ds01Hub(
        hub_factory, tmp_path, extra_config=SLOW_READS.format(started=str(started), gate=str(gate))
    )
    hub, path = ds01.hub, ds01.limits_path
    alice, bob = unique_name("lim"), unique_name("oth")
    try:
        hub.create_user(alice, groups=["students"])
        hub.create_user(bob)
        assert hub_metric(hub, "ds01_limits_last_reload_ok", path) == 1

        # an edit that would silently replace the defaults: a second `defaults:` key
        path.write_text(LIMITS_YAML.format(seed=ds01.tag) + "# slow\ndefaults: {memory: 64g}\n")
        spawn = threading.Thread(target=hub.start_server, args=(alice,), daemon=True)
        spawn.start()
        wait_for(started.exists, what="the spawn to start reading the edited file")
        # the hub is inside the slow read: it still answers everyone else
        assert hub.api("GET", f"/users/{bob}", timeout=10).status_code == 200
        assert hub.api("GET", "/", timeout=10).status_code == 200
        assert not gate.exists()
        gate.touch()

        spawn.join(120)
        hub.wait_ready(alice)
        container = hub.container_of(alice)
        assert container.attrs["HostConfig"]["Memory"] == 512 << 20  # the last good file
        assert hub_metric(hub, "ds01_limits_last_reload_ok", path) == 0
        assert hub_metric(hub, "ds01_limits_reload_failures_total", path) == 1
        log = hub.log(400_000)
        assert "1 problem in the limits file" in log and "keeping the last good" in log
        assert f"{path}:" in log and "the key 'defaults' appears twice" in log
        assert "the last good limits apply" in log
        assert max(len(line) for line in log.splitlines()) < 2000

        # fixed again: the next spawn reads it and the metric says so
        hub.stop_server(alice)
        path.write_text(LIMITS_YAML.format(seed=ds01.tag).replace("memory: 512m", "memory: 640m"))
        hub.start_server(alice)
        hub.wait_ready(alice)
        assert hub.container_of(alice).attrs["HostConfig"]["Memory"] == 640 << 20
        assert hub_metric(hub, "ds01_limits_last_reload_ok", path) == 1
    finally:
        gate.touch()
        hub.stop()
