"""Session fixtures of the ds01hub test suite (docs/architecture.md, "Test harness").

Unmarked tests are fast unit tests and use none of these. ``docker``/``e2e`` tests get a real
Docker engine (started by ds01hub.host.bootstrap when none answers, with the SIMULATED GPU hook),
real images (built once, tagged by a hash of their inputs, reused) and real JupyterHubs.
"""

from __future__ import annotations

import os

import pytest
from harness import HubFactory

from ds01hub.host import bootstrap


def in_ci() -> bool:
    """Under CI (`CI=true`, set by .ci/run) the machine was set up by `make test`: a test
    that cannot run there is a broken environment, never a pass."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


# -- foundation: engine, images, hubs ----------------------------------------------------------


def pytest_configure(config):
    # Hubs and their services started by the tests must stop on SIGINT, also under CI.
    bootstrap.unignore_sigint()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A `root` test on a non-root account is skipped (a failure under CI, below)."""
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.skip("needs root (creates Unix users, binds privileged sockets): run as root")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped test FAILS the run, with the skip's reason: a machine that `make
    test` set up and that cannot run a test is a broken CI, not a green one."""
    report = yield
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        markers = sorted({m.name for m in item.iter_markers()} - {"parametrize"})
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true (markers: {', '.join(markers) or 'none'}): "
            f"{_skip_reason(report.longrepr)}"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Under CI a module that skips itself at import fails too (the same rule as above)."""
    report = yield
    if in_ci() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped under CI=true: {_skip_reason(report.longrepr)}"
    return report


def _skip_reason(longrepr: object) -> str:
    """The reason of a skip report (pytest keeps it as (file, line, reason))."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.fixture(scope="session")
def docker_client():
    """A docker-py client of a running engine (reused when one answers, else started)."""
    import docker

    bootstrap.ensure_docker_engine()
    client = docker.from_env(timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """Tag of the Debian base image (mmdebstrap + docker import)."""
    return bootstrap.ensure_base_image().tag


@pytest.fixture(scope="session")
def singleuser_image(base_image) -> str:
    """Tag of the single-user image with this checkout's wheel (the ds01 extension loaded)."""
    ca_bundle = bootstrap.HOST_CA_BUNDLE if bootstrap.HOST_CA_BUNDLE.exists() else None
    return bootstrap.ensure_singleuser_image(base_image, ca_bundle=ca_bundle).tag


@pytest.fixture(scope="session")
def hub_factory(docker_client, singleuser_image, tmp_path_factory):
    """Start real JupyterHubs: ``hub_factory(extra_config="...", spawner="docker")`` -> Hub.

    ``extra_config`` is config-file text run after the defaults (``c`` is the config);
    ``spawner`` is any ``JupyterHub.spawner_class`` ("docker", "ds01", "simple", ...).
    Every hub is stopped, and its containers removed, at the end of the session; use
    ``with hub_factory(...) as hub:`` to stop one sooner.
    """
    factory = HubFactory(
        base_directory=tmp_path_factory.mktemp("hubs"),
        hub_ip=bootstrap.docker_bridge_ip(),
        image=singleuser_image,
        docker_client=docker_client,
    )
    factory.remove_containers_of_dead_sessions()
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def hub(hub_factory):
    """A shared default hub (DockerSpawner with the single-user image). Use fresh user names
    (``harness.unique_name``) so tests do not see each other's servers."""
    return hub_factory()


@pytest.fixture
def chromium():
    """A real headless Chromium (Playwright, Debian's /usr/bin/chromium), one per test: the
    Playwright sync API allows only one instance at a time in a thread."""
    from harness.browser import launch_chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


# -- swarm: one three-node cluster per run, shared by every `swarm` test file ----------------


@pytest.fixture(scope="session")
def swarm_cluster(docker_client):
    """Three dind nodes + a registry (tests/harness/swarm.py), started once per run: a cluster
    takes about a minute to form. `.image` is a tiny busybox image in its registry. Tests
    leave it as they found it (nodes active, services removed by `swarm_manager`)."""
    from harness.cli import busybox_image
    from harness.swarm import SwarmCluster

    swarm = SwarmCluster().start()
    try:
        swarm.image = swarm.push_image(busybox_image(docker_client), "ds01test/busybox:1")
        yield swarm
    finally:
        swarm.close()


@pytest.fixture
def swarm_manager(swarm_cluster):
    """A client of the manager's engine; removes the test's services (label ds01.test=1)."""
    import contextlib

    client = swarm_cluster.manager.client()
    yield client
    for service in client.api.services(filters={"label": "ds01.test=1"}):
        with contextlib.suppress(Exception):
            client.api.remove_service(service["ID"])
    client.close()
