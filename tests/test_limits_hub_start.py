"""The hub checks its limits file when it starts: DS01Spawner wraps JupyterHub's
`init_spawners` when JupyterHub imports it (as it loads its spawner classes), and a broken file
stops the hub with the problems in its log (the real hub: tests/test_limits_e2e.py)."""

from __future__ import annotations

import asyncio
import logging
import sys
import types

import pytest
from traitlets.config import Config

from ds01hub.spawner import DS01Spawner
from ds01hub.spawner import spawner as spawner_module


def fake_hub_module(config: Config, spawner_class: type) -> tuple[types.ModuleType, object]:
    """A `jupyterhub.app` with what the check uses of JupyterHub (config, log, exit,
    init_spawners), and its application; a new class each time (the check wraps the class)."""

    class JupyterHub:
        def __init__(self) -> None:
            self.config, self.spawner_class = config, spawner_class
            self.log = logging.getLogger("ds01-test-hub")
            self.spawners_initialised = False

        def exit(self, code: int) -> None:
            raise SystemExit(code)

        async def init_spawners(self) -> None:
            self.spawners_initialised = True

    module = types.ModuleType("jupyterhub.app")
    module.JupyterHub = JupyterHub
    return module, JupyterHub()


def config_for(tmp_path, limits_text: str) -> Config:
    path = tmp_path / "limits.yaml"
    path.write_text(limits_text)
    config = Config()
    config.DS01Spawner.limits_path = str(path)
    config.DS01Spawner.state_dir = str(tmp_path / "state")
    config.DockerSpawner.image = "ds01hub/singleuser:test"  # DockerSpawner derives a name: user
    return config


def test_a_starting_hub_stops_on_a_broken_limits_file_with_its_problems(
    tmp_path, monkeypatch, caplog
):
    config = config_for(tmp_path, "defaults:\n  memory: 8g\n  memory: 0\n")
    module, app = fake_hub_module(config, DS01Spawner)
    monkeypatch.setitem(sys.modules, "jupyterhub.app", module)
    spawner_module._prepare_at_hub_start()
    spawner_module._prepare_at_hub_start()  # a second import changes nothing

    with caplog.at_level(logging.INFO, logger="ds01-test-hub"), pytest.raises(SystemExit) as caught:
        asyncio.run(app.init_spawners())

    assert caught.value.code == 1 and not app.spawners_initialised
    (record,) = caplog.records
    assert record.levelname == "CRITICAL"
    message = record.getMessage()
    assert "2 problems in the limits file" in message and "the hub does not start" in message
    assert f"{tmp_path / 'limits.yaml'}:3: defaults.memory: the key 'memory' appears" in message
    assert not any(key[0] == str(tmp_path / "limits.yaml") for key in DS01Spawner._contexts)


def test_another_spawner_class_is_left_alone(tmp_path, monkeypatch):
    from dockerspawner import DockerSpawner

    module, app = fake_hub_module(config_for(tmp_path, "defaults: [broken\n"), DockerSpawner)
    monkeypatch.setitem(sys.modules, "jupyterhub.app", module)
    spawner_module._prepare_at_hub_start()
    asyncio.run(app.init_spawners())
    assert app.spawners_initialised


def test_outside_a_hub_importing_the_spawner_wraps_nothing(monkeypatch):
    monkeypatch.delitem(sys.modules, "jupyterhub.app", raising=False)
    spawner_module._prepare_at_hub_start()  # no JupyterHub in this process: nothing to do
