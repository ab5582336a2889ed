"""Labels through images and classic-builder steps, on the real engine, as two real Unix users
through a real `ds01hub proxy`: a container that merely *claims* another user's ownership or
a GPU slot counts for nobody -- not the victim's `docker ps` or events, not the allocator, not
`ds01hub status`, not the broker's container list, not the culler."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness.cli import busybox_image
from test_proxy import DOCKER, admin_docker, as_user, docker_as, http, proxy_process, raw_as

from ds01hub import labels, provenance
from ds01hub.actions.operations import OperationsContext, UserOperations
from ds01hub.gpu.allocator import GpuAllocator, docker_lister
from ds01hub.gpu.inventory import load_inventory
from ds01hub.limits import load_limits
from ds01hub.services.ops.culler import Culler

pytestmark = [pytest.mark.docker, pytest.mark.root]

LIMITS = "gpu_allocation:\n  simulate: {gpus: 2, seed: provenance}\n"
#: A build step that waits for the test (a file it creates), at most ten minutes.
WAIT_STEP = "for i in $(seq 3000); do ls /tmp/go >/dev/null 2>&1 && break; sleep 0.2; done"


@pytest.fixture(scope="module")
def people():
    """An attacker and a victim: two real Unix users, removed with what they made."""
    import os
    import secrets

    if os.geteuid() != 0:
        pytest.skip("needs root: creates Unix users and runs the docker CLI as them")
    run = secrets.token_hex(3)
    names = [f"lpa{run}", f"lpv{run}"]
    for name in names:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    yield names
    for name in names:
        for key in ("ds01.user", "aime.mlc.USER"):
            ids = admin_docker("ps", "-aq", "--filter", f"label={key}={name}").stdout.split()
            if ids:
                admin_docker("rm", "-f", *ids, check=False)
        images = admin_docker("images", "-q", f"ds01-{name}/*").stdout.split()
        if images:
            admin_docker("rmi", "-f", *set(images), check=False)
        subprocess.run(["userdel", "-r", name], capture_output=True)


@pytest.fixture(scope="module")
def proxy(people, docker_client):
    busybox_image(docker_client)
    with proxy_process() as running:
        yield running


def find_step_container(victim: str, build: subprocess.Popen, timeout: float = 120) -> str:
    """The id of the running build-step container that claims the victim (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = admin_docker(
            "ps", "-q", "--no-trunc", "--filter", f"label=ds01.user={victim}"
        ).stdout.split()
        if ids:
            return ids[0]
        if build.poll() is not None:
            raise AssertionError(f"the build ended early: {build.communicate()[1]}")
        time.sleep(0.2)
    raise AssertionError("the build step container did not appear")


def status_json(state_dir: Path, limits: Path, *flags: str) -> dict:
    command = [
        sys.executable,
        "-c",
        "import sys; from ds01hub.cli.admin import main; sys.exit(main(sys.argv[1:]))",
        "status",
        "--json",
        "--limits",
        str(limits),
        "--state-dir",
        str(state_dir),
        *flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_classic_builder_step_that_claims_another_user_counts_for_nobody(
    proxy, people, docker_client, tmp_path
):
    attacker, victim = people
    trust = provenance.load(proxy.state_dir)
    since = int(time.time()) - 1
    context = Path(tempfile.mkdtemp(prefix="ds01ctx-"))
    context.chmod(0o755)
    claims = {
        labels.MANAGED: "true",
        labels.USER: victim,
        labels.PROJECT: "default",
        labels.GPUS: "0",
        labels.PRIORITY: "100",
        labels.DEPLOYMENT: trust.deployment,  # no secret: the attacker sees it on their own
        labels.AIME_USER: victim,
    }
    label_line = " ".join(f'{k}="{v}"' for k, v in claims.items())
    (context / "Dockerfile").write_text(
        f"FROM {busybox_image(docker_client)}\nLABEL {label_line}\nRUN {WAIT_STEP}\n"
    )
    (context / "Dockerfile").chmod(0o644)
    tag = f"ds01-{attacker}/evil:1"
    line = f"export DOCKER_HOST=unix://{proxy.sock}; cd {context} && {DOCKER} build -q -t {tag} ."
    build = subprocess.Popen(
        ["su", "-s", "/bin/sh", attacker, "-c", f"DOCKER_BUILDKIT=0 {line}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    step = None
    try:
        step = find_step_container(victim, build)
        seen = json.loads(admin_docker("inspect", step).stdout)[0]
        assert seen["Config"]["Labels"][labels.GPUS] == "0"  # the engine did copy the claims

        # the victim's docker CLI through the proxy: not in ps, not inspectable, no events
        listed = docker_as(proxy, victim, "ps", "-a", "-q", "--no-trunc")
        assert listed.returncode == 0 and step not in listed.stdout.split()
        assert docker_as(proxy, victim, "inspect", step).returncode != 0
        assert docker_as(proxy, attacker, "inspect", step).returncode != 0  # nobody's
        path = f"/v1.41/events?since={since}&until={int(time.time()) + 1}"
        status, answer = raw_as(proxy, victim, http("GET", path))
        assert status == 200 and step not in answer.decode()

        # the allocator's holdings and `ds01hub status` (this deployment's state directory)
        limits_file = tmp_path / "limits.yaml"
        limits_file.write_text(LIMITS)
        config = load_limits(limits_file)
        allocator = GpuAllocator(
            docker_client,
            load_inventory(config.gpu_allocation),
            proxy.state_dir,
            limits=config,
            container_lister=docker_lister(docker_client, trust=trust),
        )
        assert [h for h in allocator.holdings() if h.container_id == step] == []
        assert step not in {r.id for r in allocator.records()}
        slots = {row["slot"]: row for row in status_json(proxy.state_dir, limits_file)["slots"]}
        assert slots["0"]["user"] is None
        every = status_json(proxy.state_dir, limits_file, "--all-deployments")["other_claims"]
        (claim,) = [c for c in every if c["id"] == step[:12]]
        assert (claim["claimed_user"], claim["verdict"]) == (victim, "unsigned or forged")

        # the broker's (and the ds01 service's) container list for the victim
        context_ = OperationsContext(hub=None, docker=docker_client, trust=trust)
        assert UserOperations(context_, victim)._containers() == []

        # the culler's candidates
        culler = Culler(None, docker_client, None, None, state_dir=proxy.state_dir, trust=trust)
        assert step not in {r.id for r in culler.running_records().values()}
    finally:
        if step:  # let the build finish
            admin_docker("exec", step, "touch", "/tmp/go", check=False)
        elif build.poll() is None:
            build.kill()
        err = build.communicate(timeout=300)[1] if build.returncode is None else ""
        shutil.rmtree(context)
    assert build.returncode == 0, err

    # the image carries the claims; a container made from it through the proxy is the
    # attacker's own, with no GPU, whatever the image says
    run = docker_as(proxy, attacker, "run", "-d", "--label", "ds01.test=1", tag, "sleep", "600")
    assert run.returncode == 0, run.stderr
    made = json.loads(admin_docker("inspect", run.stdout.strip()).stdout)[0]
    found = made["Config"]["Labels"]
    assert found[labels.USER] == found[labels.AIME_USER] == attacker
    assert (found[labels.GPUS], found[labels.PRIORITY], found[labels.PROJECT]) == ("", "0", "")
    record = labels.ContainerRecord.from_docker(made, trust)
    assert record.user == attacker and record.gpus == ()
    assert record.id not in {h.container_id for h in allocator.holdings()}
    own = docker_as(proxy, attacker, "ps", "-q", "--no-trunc").stdout.split()
    assert record.id in own
    assert record.id not in docker_as(proxy, victim, "ps", "-aq", "--no-trunc").stdout.split()

    # and asking the builder for such labels outright is refused
    refused = as_user(
        proxy,
        attacker,
        f"cd /tmp && echo 'FROM {tag}' | DOCKER_BUILDKIT=0 {DOCKER} build -q "
        f"--label ds01.user={victim} -t ds01-{attacker}/again:1 -",
    )
    assert refused.returncode != 0 and "reserved to ds01hub" in refused.stderr


def test_a_routing_label_in_an_image_refuses_the_create(proxy, people, docker_client):
    attacker = people[0]
    tag = f"ds01-{attacker}/routed:1"
    made = as_user(
        proxy,
        attacker,
        f"cd /tmp && printf 'FROM {busybox_image(docker_client)}\\nLABEL traefik.enable=true\\n' "
        f"| DOCKER_BUILDKIT=0 {DOCKER} build -q -t {tag} -",
    )
    assert made.returncode == 0, made.stderr
    refused = docker_as(proxy, attacker, "create", "--label", "ds01.test=1", tag, "true")
    assert refused.returncode != 0
    assert f"image {tag} has label 'traefik.enable'" in refused.stderr
