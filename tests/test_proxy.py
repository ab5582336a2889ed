"""The socket proxy end to end: the real docker CLI, run as two real Unix users, through a real
`ds01hub proxy` in front of the real engine -- plus raw HTTP attacks from those users.

The edge tests at the top are fast (HTTP framing: tests/test_proxy_http.py); the rest need
root (useradd, su) and a Docker engine.
Test containers use the CLI harness's 2 MB image made from the static busybox binary
(`docker import`): no registry, built in well under a second.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import wait_until
from harness.cli import BUSYBOX_IMAGE
from harness.cli import busybox_image as shared_busybox_image

from ds01hub import labels, provenance

# --------------------------------------------------------------------------- edge (fast)


def test_an_unreachable_engine_is_a_clear_502(tmp_path):
    import asyncio
    import socket

    from ds01hub.dockerproxy.server import Proxy, Upstream, serve

    dead = tmp_path / "engine.sock"
    socket.socket(socket.AF_UNIX).bind(str(dead))  # a socket file nobody listens on

    async def ping() -> bytes:
        listen = str(tmp_path / "proxy.sock")
        ready = asyncio.Event()
        server = asyncio.create_task(serve(Proxy(Upstream(str(dead))), listen, ready.set))
        await ready.wait()
        reader, writer = await asyncio.open_unix_connection(listen)
        writer.write(b"GET /_ping HTTP/1.1\r\nHost: d\r\n\r\n")
        answer = await reader.read()
        server.cancel()
        return answer

    answer = asyncio.run(ping())
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"unreachable" in answer


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        (["--upstream", "/nonexistent/docker.sock"], 1, "no such socket"),
        (["--admin-group", "no-such-group-ds01"], 2, "no such group"),
        (["--limits", "/nonexistent/limits.yaml"], 1, "--limits"),
        (["--log-level", "loud"], 2, "invalid choice"),
    ],
)
def test_command_line_errors(tmp_path, options, code, message):
    command = [
        sys.executable,
        "-c",
        "import sys; from ds01hub.cli.admin import main; sys.exit(main(sys.argv[1:]))",
        "proxy",
        "--listen",
        str(tmp_path / "p.sock"),
        *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == code
    assert message in result.stderr


def test_an_oversized_header_section_is_refused(tmp_path):
    import asyncio

    from ds01hub.dockerproxy.server import Proxy, Upstream, serve

    async def send_huge_head() -> bytes:
        listen = str(tmp_path / "proxy.sock")
        ready = asyncio.Event()
        server = asyncio.create_task(serve(Proxy(Upstream("/nonexistent")), listen, ready.set))
        await ready.wait()
        reader, writer = await asyncio.open_unix_connection(listen)
        writer.write(b"GET /_ping HTTP/1.1\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = await reader.read()
        server.cancel()
        return answer

    assert asyncio.run(send_huge_head()).startswith(b"HTTP/1.1 400 ")


# --------------------------------------------------------------------------- real engine

DOCKER = shutil.which("docker") or "/usr/local/bin/docker"
IMAGE = BUSYBOX_IMAGE
RUN = secrets.token_hex(3)


def admin_docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The engine directly, as root (set-up and verification, never through the proxy)."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    return subprocess.run(
        [DOCKER, *args], capture_output=True, text=True, check=check, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def busybox_image(docker_client):
    """The test image. Its tests are marked `docker` and `root`: the engine comes from the
    session fixture (started when none answers, an error when it cannot be), a non-root run
    skips them (conftest), and under CI any skip fails."""
    if not shutil.which("busybox"):
        pytest.skip("needs /bin/busybox (apt-get install busybox-static) for the test image")
    return shared_busybox_image(docker_client)


@pytest.fixture(scope="module")
def users(busybox_image):
    """Two real Unix users (removed at teardown with everything they made)."""
    names = [f"pxa{RUN}", f"pxb{RUN}"]
    for name in names:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    yield names
    for name in names:
        ids = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={name}").stdout.split()
        if ids:
            admin_docker("rm", "-f", *ids, check=False)
        images = admin_docker("images", "-q", f"ds01-{name}/*").stdout.split()
        if images:
            admin_docker("rmi", "-f", *set(images), check=False)
        subprocess.run(["userdel", "-r", name], capture_output=True)


@dataclass(frozen=True)
class RunningProxy:
    sock: Path
    log: Path
    process: subprocess.Popen
    state_dir: Path  # its label key and deployment id (a hub's state directory)


@contextmanager
def proxy_process(*options: str, state_dir: Path | None = None) -> Iterator[RunningProxy]:
    """A real `ds01hub proxy` on a socket every user can reach; the test image is shared. Its
    state directory (its create locks, and a hub's label key and deployment id) is its own
    unless `state_dir` (another proxy's: one deployment)."""
    directory = Path(tempfile.mkdtemp(prefix="ds01proxy-"))
    directory.chmod(0o755)
    sock = directory / "docker.sock"
    log = directory / "proxy.log"
    state = state_dir or directory / "state"
    options = (
        "--shared-image",
        IMAGE,
        "--state-dir",
        str(state),
        "--hub-state-dir",
        str(state),
        *options,
    )
    command = [
        sys.executable,
        "-c",
        "import sys; from ds01hub.cli.admin import main; sys.exit(main(sys.argv[1:]))",
        "proxy",
        "--listen",
        str(sock),
        "--upstream",
        "/var/run/docker.sock",
        *options,
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "proxy did not start"
            time.sleep(0.05)
        assert oct(sock.stat().st_mode & 0o777) == "0o666"
        yield RunningProxy(sock, log, process, state)
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy(users):
    with proxy_process() as running:
        yield running


def as_user(proxy, user: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a shell command line as `user` with DOCKER_HOST pointing at the proxy."""
    line = f"export DOCKER_HOST=unix://{proxy.sock}; {command}"
    return subprocess.run(
        ["su", "-s", "/bin/sh", user, "-c", line], capture_output=True, text=True, timeout=timeout
    )


def docker_as(proxy, user: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return as_user(proxy, user, shlex.join([DOCKER, *args]), timeout)


RAW_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.buffer.write(data)
"""


def raw_as(proxy, user: str | int, request: bytes) -> tuple[int, object]:
    """Send raw bytes as `user` (a name, or a bare uid) and parse the one response."""
    uid = user if isinstance(user, int) else pwd.getpwnam(user).pw_uid
    gid = uid if isinstance(user, int) else pwd.getpwnam(user).pw_gid
    result = subprocess.run(
        ["/usr/bin/python3", "-c", RAW_CLIENT, str(proxy.sock)],
        input=request,
        capture_output=True,
        user=uid,
        group=gid,
        extra_groups=[],
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" in head.lower():
        body = _dechunk(body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + rest[:size], rest[size + 2 :]
    return out


def http(
    method: str,
    path: str,
    body: object = None,
    *,
    chunked: bool = False,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: docker", "Connection: close"]
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        half = len(data) // 2
        parts = [p for p in (data[:half], data[half:]) if p]
        data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    elif body is not None:
        lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def run_detached(proxy, user: str, name: str, *extra: str) -> str:
    result = docker_as(
        proxy,
        user,
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "ds01.test=1",
        *extra,
        IMAGE,
        "sh",
        "-c",
        "while true; do echo tick; sleep 0.2; done",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def world(proxy, users):
    """alice and bob each with a running container; an unlabelled one made by root."""
    alice, bob = users
    alice_id = run_detached(proxy, alice, f"web-{alice}")
    bob_id = run_detached(proxy, bob, f"web-{bob}")
    loose = admin_docker(
        "run",
        "-d",
        "--name",
        f"loose-{RUN}",
        "--label",
        "ds01.test=1",
        "--label",
        f"ds01.user={alice}",
        IMAGE,
        "sleep",
        "600",
    ).stdout.strip()
    yield {"alice": alice, "bob": bob, "alice_id": alice_id, "bob_id": bob_id, "loose": loose}
    admin_docker("rm", "-f", loose, check=False)


def spawner_label_args(proxy, user: str, name: str, gpus: tuple[str, ...] = ()) -> list[str]:
    """`--label` options for the labels the spawner gives `user`'s container `name` (signed
    with the key the proxy reads)."""
    own = labels.container_labels(user=user, project=None, group=None, priority=10, gpus=gpus)
    signed = provenance.load(proxy.state_dir).sign(own, name)
    return [arg for key, value in signed.items() for arg in ("--label", f"{key}={value}")]


def still_running(cid: str) -> bool:
    return admin_docker("inspect", "-f", "{{.State.Running}}", cid).stdout.strip() == "true"


# --------------------------------------------------------------------------- what users may do


@pytest.mark.docker
@pytest.mark.root
def test_ps_shows_only_own_managed_containers(proxy, world):
    for user, own, other in [("alice", "alice_id", "bob_id"), ("bob", "bob_id", "alice_id")]:
        listed = docker_as(proxy, world[user], "ps", "-a", "--no-trunc", "-q")
        assert listed.returncode == 0, listed.stderr
        ids = listed.stdout.split()
        assert world[own] in ids
        assert world[other] not in ids and world["loose"] not in ids


@pytest.mark.docker
@pytest.mark.root
def test_unlabelled_containers_are_invisible(proxy, world):
    # root's container claims ds01.user=alice but lacks ds01.managed=true: not hers
    result = docker_as(proxy, world["alice"], "inspect", world["loose"])
    assert result.returncode != 0
    assert f"No such object: {world['loose']}" in result.stderr  # as if it did not exist
    result = docker_as(proxy, world["alice"], "container", "inspect", f"loose-{RUN}")
    assert result.returncode != 0
    assert f"No such container: loose-{RUN}" in result.stderr


@pytest.mark.docker
@pytest.mark.root
def test_created_containers_carry_forced_labels(proxy, world):
    alice = world["alice"]
    result = docker_as(
        proxy,
        alice,
        "create",
        "--label",
        "ds01.test=1",
        "--label",
        f"ds01.user={world['bob']}",
        "--label",
        "ds01.gpus=0",
        IMAGE,
        "true",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(
        admin_docker("inspect", "-f", "{{json .Config.Labels}}", result.stdout.strip()).stdout
    )
    assert found["ds01.user"] == alice and found["ds01.managed"] == "true"
    assert found["ds01.gpus"] == "" and found["ds01.signature"].startswith("v1:")
    name = admin_docker("inspect", "-f", "{{.Name}}", result.stdout.strip()).stdout.strip()
    assert name.startswith(f"/{alice}-")  # no --name: the proxy named it (the signature covers it)
    assert provenance.load(proxy.state_dir).verify(found, name)
    admin_docker("rm", result.stdout.strip())


@pytest.mark.docker
@pytest.mark.root
def test_everything_a_user_may_do_on_their_own_container(proxy, world):
    alice, name = world["alice"], f"own-{world['alice']}"
    run_detached(proxy, alice, name)
    steps = [
        ("inspect", "-f", "{{.State.Running}}", name),
        ("logs", "--tail", "1", name),
        ("top", name),
        ("stats", "--no-stream", name),
        ("exec", name, "echo", "exec-works"),
        ("cp", f"{name}:/bin/busybox", "/tmp/." + name),
        ("pause", name),
        ("unpause", name),
        ("restart", "-t", "0", name),
        ("kill", name),
        ("start", name),
        ("stop", "-t", "0", name),
    ]
    for step in steps:
        result = docker_as(proxy, alice, *step)
        assert result.returncode == 0, (step, result.stderr)
        if step[0] == "exec":
            assert result.stdout.strip() == "exec-works"
    renamed = docker_as(proxy, alice, "rename", name, name + "-2")  # its name is signed
    assert renamed.returncode != 0 and "renaming is not available" in renamed.stderr
    assert docker_as(proxy, alice, "rm", "-f", name).returncode == 0


@pytest.mark.docker
@pytest.mark.root
def test_streams_logs_follow_exec_tty_attach_and_stdin(proxy, world):
    alice, name = world["alice"], f"web-{world['alice']}"
    follow = as_user(proxy, alice, f"timeout 2 {DOCKER} logs -f --tail 0 {name}")
    assert follow.stdout.count("tick") >= 3  # lines kept arriving while following
    tty = as_user(
        proxy,
        alice,
        f"script -qec '{DOCKER} exec -it {name} sh -c \"test -t 0 && echo a-tty\"' /dev/null",
    )
    assert "a-tty" in tty.stdout, tty.stderr
    piped = as_user(proxy, alice, f"echo through-stdin | {DOCKER} exec -i {name} cat")
    assert piped.stdout.strip() == "through-stdin", piped.stderr
    attach = as_user(proxy, alice, f"timeout -s KILL 2 {DOCKER} attach --no-stdin {name}")
    assert "tick" in attach.stdout
    run = as_user(proxy, alice, f"{DOCKER} run --rm --label ds01.test=1 {IMAGE} echo ran")
    assert run.stdout.strip() == "ran", run.stderr


@pytest.mark.docker
@pytest.mark.root
def test_bind_mounts_of_home_run_as_the_user(proxy, world):
    alice = world["alice"]
    home = pwd.getpwnam(alice).pw_dir
    result = docker_as(
        proxy,
        alice,
        "run",
        "--rm",
        "--label",
        "ds01.test=1",
        "-v",
        f"{home}:/h",
        IMAGE,
        "sh",
        "-c",
        "id -u; touch /h/made-in-container",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(pwd.getpwnam(alice).pw_uid)
    assert Path(home, "made-in-container").stat().st_uid == pwd.getpwnam(alice).pw_uid


@pytest.mark.docker
@pytest.mark.root
def test_legacy_build_in_own_namespace_only(proxy, world, tmp_path):
    alice = world["alice"]
    context = Path(tempfile.mkdtemp(prefix="ds01ctx-"))
    context.chmod(0o755)
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN echo built > /built\n")
    (context / "Dockerfile").chmod(0o644)
    try:
        ok = as_user(proxy, alice, f"cd {context} && {DOCKER} build -q -t ds01-{alice}/img:1 .")
        assert ok.returncode == 0, ok.stderr
        poison = as_user(proxy, alice, f"cd {context} && {DOCKER} build -q -t {IMAGE} .")
        assert poison.returncode != 0 and "build tags must be" in poison.stderr
        host = as_user(
            proxy, alice, f"cd {context} && {DOCKER} build -q --network host -t ds01-{alice}/i ."
        )
        assert host.returncode != 0 and "build network" in host.stderr
    finally:
        shutil.rmtree(context)


# --------------------------------------------------------------------------- what is refused


OTHER_USER_OPERATIONS = [
    ("inspect", "{ref}"),
    ("logs", "{ref}"),
    ("top", "{ref}"),
    ("stats", "--no-stream", "{ref}"),
    ("exec", "{ref}", "true"),
    ("stop", "-t", "0", "{ref}"),
    ("start", "{ref}"),
    ("restart", "{ref}"),
    ("kill", "{ref}"),
    ("pause", "{ref}"),
    ("rename", "{ref}", "stolen"),
    ("rm", "-f", "{ref}"),
    ("cp", "{ref}:/bin/sh", "/tmp/x"),
    ("wait", "{ref}"),
    ("attach", "--no-stdin", "{ref}"),
]


def missing_hex(length: int) -> str | None:
    """A hex string that is no prefix of any container's or image's id here (None when every
    string of that length is one: short prefixes)."""
    ids = admin_docker("ps", "-aq", "--no-trunc").stdout.split()
    ids += [i.split(":")[-1] for i in admin_docker("images", "-aq", "--no-trunc").stdout.split()]
    for _ in range(100):
        candidate = secrets.token_hex(32)[:length]
        if not any(i.startswith(candidate) for i in ids):
            return candidate
    return None


def same_as_missing(proxy, user: str, args: list[str], ref: str, missing: str) -> None:
    """`args` about `ref` (hidden from `user`) and about `missing` (nonexistent) read the same."""
    hidden = docker_as(proxy, user, *[a.replace("{ref}", ref) for a in args], timeout=30)
    absent = docker_as(proxy, user, *[a.replace("{ref}", missing) for a in args], timeout=30)
    assert hidden.returncode == absent.returncode, (args, hidden.stderr, absent.stderr)
    assert hidden.stdout.replace(ref, "<REF>") == absent.stdout.replace(missing, "<REF>")
    assert hidden.stderr.replace(ref, "<REF>") == absent.stderr.replace(missing, "<REF>"), args


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize("how", ["name", "full id", "id prefix"])
@pytest.mark.parametrize("operation", OTHER_USER_OPERATIONS, ids=lambda o: o[0])
def test_other_users_container_reads_exactly_as_a_missing_one(proxy, world, operation, how):
    alice, bob = world["alice"], world["bob"]
    ref, missing = {
        "name": (f"web-{alice}", f"web-nobody{RUN}"),
        "full id": (world["alice_id"], missing_hex(64)),
        "id prefix": (world["alice_id"][:10], missing_hex(10)),
    }[how]
    same_as_missing(proxy, bob, list(operation), ref, missing)
    assert still_running(world["alice_id"])
    assert admin_docker("inspect", "-f", "{{.Name}}", world["alice_id"]).stdout.strip() == (
        f"/web-{alice}"
    )


@pytest.mark.docker
@pytest.mark.root
def test_a_name_that_is_a_prefix_of_another_users_id(proxy, world):
    """A reference resolves among the caller's own containers only (as if no one else's
    existed): bob's container named like a prefix of alice's id is his; for alice the same
    string is the prefix of her own id."""
    alice, bob = world["alice"], world["bob"]
    prefix = world["alice_id"][:12]
    decoy = run_detached(proxy, bob, prefix)
    stopped = docker_as(proxy, bob, "stop", "-t", "0", prefix)
    assert stopped.returncode == 0, stopped.stderr
    assert not still_running(decoy) and still_running(world["alice_id"])
    result = docker_as(proxy, alice, "inspect", "-f", "{{.Id}}", prefix)
    assert result.stdout.strip() == world["alice_id"], result.stderr
    admin_docker("rm", "-f", decoy)


@pytest.mark.docker
@pytest.mark.root
def test_a_prefix_walk_over_another_users_id_learns_nothing(proxy, world):
    alice_id, bob = world["alice_id"], world["bob"]
    bob_ids = admin_docker("ps", "-aq", "--no-trunc", "--filter", f"label=ds01.user={bob}")
    for length in (1, 2, 3, 6, 12, 64):
        prefix = alice_id[:length]
        if any(i.startswith(prefix) for i in bob_ids.stdout.split()):
            continue  # then it is (also) one of bob's own: not a walk over alice's
        missing = missing_hex(length)
        if missing is None:
            continue
        for path in ("/v1.41/containers/{}/json", "/v1.41/containers/{}/top"):
            hidden = raw_as(proxy, bob, http("GET", path.format(prefix)))
            absent = raw_as(proxy, bob, http("GET", path.format(missing)))
            assert hidden[0] == absent[0] == 404, (hidden, absent)
            assert json.dumps(hidden[1]).replace(prefix, "X") == json.dumps(absent[1]).replace(
                missing, "X"
            )


@pytest.mark.docker
@pytest.mark.root
def test_exec_ids_of_other_users_are_refused(proxy, world):
    alice, bob = world["alice"], world["bob"]
    status, created = raw_as(
        proxy, alice, http("POST", f"/v1.41/containers/{world['alice_id']}/exec", {"Cmd": ["true"]})
    )
    assert status == 201, created
    exec_id = created["Id"]
    missing = missing_hex(64)
    for method, path, body in [
        ("GET", "/v1.41/exec/{}/json", None),
        ("POST", "/v1.41/exec/{}/start", {"Detach": True}),
        ("POST", "/v1.41/exec/{}/resize?h=10&w=10", None),
        ("POST", "/exec/{}/start", {"Detach": True}),
    ]:
        hidden = raw_as(proxy, bob, http(method, path.format(exec_id), body))
        absent = raw_as(proxy, bob, http(method, path.format(missing), body))
        assert hidden[0] == absent[0] == 404, (path, hidden)
        assert hidden[1] == {"message": f"No such exec instance: {exec_id}"}
        assert absent[1] == {"message": f"No such exec instance: {missing}"}
    status, answer = raw_as(proxy, alice, http("GET", f"/v1.41/exec/{exec_id}/json"))
    assert status == 200 and answer["ContainerID"] == world["alice_id"]


CREATE_REFUSALS = [
    (["--privileged"], "privileged"),
    (["--cap-add", "SYS_ADMIN"], "capabilities"),
    (["--device", "/dev/null"], "devices"),
    (["--gpus", "all"], "container-create"),
    (["--pid", "host"], "PidMode"),
    (["--ipc", "host"], "IpcMode"),
    (["--network", "host"], "NetworkMode"),
    (["--uts", "host"], "UTSMode"),
    (["--userns", "host"], "UsernsMode"),
    (["-v", "/etc:/x"], "bind mounts must be inside"),
    (["-v", "/var/run/docker.sock:/var/run/docker.sock"], "binding sockets"),
    (["--mount", "type=bind,src=/,dst=/host"], "bind mounts must be inside"),
    (["-v", "somevolume:/x"], "named volume"),
    (["--security-opt", "seccomp=unconfined"], "security option"),
    (["--security-opt", "apparmor=unconfined"], "security option"),
    (["--sysctl", "net.ipv4.ip_forward=1"], "sysctls"),
    (["--cgroup-parent", "/"], "cgroup parent"),
    (["--runtime", "nvidia"], "Runtime"),
    (["--log-driver", "syslog"], "LogConfig.Type"),
    (["-p", "80:80"], "reserved"),
    (["--name", "default._.someoneelse"], "reserved"),
    (["--security-opt", "systempaths=unconfined"], "systempaths"),
    (["--label", "traefik.http.routers.r.rule=Host(`hub`)"], "routing labels"),
]


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize(
    ("flags", "why"), CREATE_REFUSALS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_dangerous_create_options_are_refused(proxy, world, flags, why):
    bob = world["bob"]
    before = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={bob}").stdout.split()
    result = docker_as(proxy, bob, "create", "--label", "ds01.test=1", *flags, IMAGE, "true")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr and why in result.stderr, result.stderr
    after = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={bob}").stdout.split()
    assert after == before


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize(
    "flag", ["--volumes-from", "--network container:", "--pid container:", "--ipc container:"]
)
def test_other_users_containers_as_namespaces_or_volumes_are_refused(proxy, world, flag):
    bob, alice_id = world["bob"], world["alice_id"]
    before = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={bob}").stdout.split()
    args = ["{ref}"] if flag == "--volumes-from" else [flag.split()[1] + "{ref}"]
    command = ["create", "--label", "ds01.test=1", flag.split()[0], *args, IMAGE, "true"]
    same_as_missing(proxy, bob, command, alice_id, missing_hex(64))
    after = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={bob}").stdout.split()
    assert after == before


@pytest.mark.docker
@pytest.mark.root
def test_a_bind_of_home_cannot_run_as_root(proxy, world):
    alice = world["alice"]
    home = pwd.getpwnam(alice).pw_dir
    result = docker_as(
        proxy,
        alice,
        "create",
        "--label",
        "ds01.test=1",
        "-u",
        "0",
        "-v",
        f"{home}:/h",
        IMAGE,
        "true",
    )
    assert result.returncode != 0 and "run as you" in result.stderr


@pytest.mark.docker
@pytest.mark.root
def test_raw_path_spellings_of_another_users_container(proxy, world):
    alice_id, bob = world["alice_id"], world["bob"]
    spellings = [
        f"/v1.41/containers/{alice_id}/json",
        f"/containers/{alice_id}/json",
        f"/v1.40/containers/{alice_id}/json",
        f"//v1.41//containers//{alice_id}//json",
        f"/v1.41/containers/%{ord(alice_id[0]):02x}{alice_id[1:]}/json",
        f"/v1.41/containers/x/../{alice_id}/json",
        f"/v1.41/./containers/{alice_id[:8]}/json",
    ]
    for path in spellings:
        status, answer = raw_as(proxy, bob, http("GET", path))
        assert status == 404, (path, answer)
        assert answer["message"].startswith("No such container: ")
        assert world["alice"] not in answer["message"]
    for method, path in [
        ("POST", f"/v1.41/containers/{alice_id}/stop"),
        ("POST", f"/v1.41/containers/{alice_id}/kill"),
        ("HEAD", f"/v1.41/containers/{alice_id}/archive?path=/tmp"),
        ("PUT", f"/v1.41/containers/{alice_id}/archive?path=/tmp"),
    ]:
        # (docker cp INTO a container stats with HEAD first, which cannot carry a message)
        status, _ = raw_as(proxy, bob, http(method, path, b"x" * 1024 if method == "PUT" else None))
        assert status == 404, (method, path)
    status, _ = raw_as(proxy, bob, http("POST", f"/v1.20/containers/{alice_id}/stop"))
    assert status == 400  # API versions before 1.24 are refused outright
    assert still_running(alice_id)


@pytest.mark.docker
@pytest.mark.root
def test_raw_create_tricks(proxy, world):
    bob = world["bob"]
    labels = {"ds01.test": "1"}
    tricks = [
        {"Image": IMAGE, "Labels": labels, "Privileged": True},  # top-level HostConfig field
        {"Image": IMAGE, "Labels": labels, "hostconfig": {"Privileged": True}},
        {"Image": IMAGE, "Labels": labels, "HostConfig": {"privileged": True}},
        {"Image": IMAGE, "Labels": labels, "HostConfig": {"Binds": ["/:/host"]}},
        {
            "Image": IMAGE,
            "Labels": labels,
            "HostConfig": {"Mounts": [{"type": "bind", "source": "/", "target": "/host"}]},
        },
    ]
    for body in tricks:
        for chunked in (False, True):
            status, answer = raw_as(
                proxy, bob, http("POST", "/v1.41/containers/create", body, chunked=chunked)
            )
            assert status == 403, (body, answer)
    duplicate = b'{"Image":"%s","HostConfig":{},"HostConfig":{"Privileged":true}}' % IMAGE.encode()
    status, _ = raw_as(proxy, bob, http("POST", "/v1.41/containers/create", duplicate))
    assert status == 400
    # a chunked, label-spoofing but otherwise fine create goes through with the labels forced
    spoof = {
        "Image": IMAGE,
        "Cmd": ["true"],
        "Labels": {"ds01.test": "1", "ds01.user": world["alice"]},
    }
    status, answer = raw_as(proxy, bob, http("POST", "/containers/create", spoof, chunked=True))
    assert status == 201, answer
    labels = json.loads(
        admin_docker("inspect", "-f", "{{json .Config.Labels}}", answer["Id"]).stdout
    )
    assert labels["ds01.user"] == bob
    admin_docker("rm", answer["Id"])


@pytest.mark.docker
@pytest.mark.root
def test_raw_request_smuggling_and_form_bodies(proxy, world):
    bob = world["bob"]
    own = world["bob_id"]
    form = http(
        "POST",
        f"/v1.41/containers/{own}/rename?name=fine",
        b"name=default._.x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    form = form.replace(b"Content-Type: application/json\r\n", b"")
    status, answer = raw_as(proxy, bob, form)
    assert status == 400 and "Content-Type" in answer["message"]
    smuggle = (
        b"POST /v1.41/containers/create HTTP/1.1\r\nHost: d\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    status, _ = raw_as(proxy, bob, smuggle)
    assert status == 400
    status, answer = raw_as(
        proxy, bob, http("POST", f"/v1.41/containers/{own}/start", {"Privileged": True})
    )
    assert status == 403 and "must not carry" in answer["message"]


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1.41/volumes"),
        ("POST", "/v1.41/volumes/create"),
        ("GET", "/v1.41/networks"),
        ("POST", "/v1.41/swarm/init"),
        ("GET", "/v1.41/plugins"),
        ("GET", "/v1.41/system/df"),
        ("POST", "/v1.41/containers/prune"),
        ("POST", "/v1.41/images/load"),
        ("POST", "/v1.41/containers/{own}/update"),
        ("POST", "/v1.41/commit?container={own}"),
    ],
)
def test_unknown_endpoints_are_refused_for_users(proxy, world, method, path):
    status, answer = raw_as(proxy, world["bob"], http(method, path.format(own=world["bob_id"]), {}))
    assert status == 403, answer
    assert "not available through the ds01 proxy" in answer["message"]


@pytest.mark.docker
@pytest.mark.root
def test_a_uid_without_an_account_is_refused(proxy, world):
    status, answer = raw_as(proxy, 54321, http("GET", "/v1.41/_ping"))
    assert status == 403 and "no account" in answer["message"]


@pytest.mark.docker
@pytest.mark.root
def test_root_has_full_access(proxy, world):
    env = dict(os.environ, DOCKER_HOST=f"unix://{proxy.sock}")
    result = subprocess.run(
        [DOCKER, "ps", "-aq", "--no-trunc"], capture_output=True, text=True, env=env, check=True
    )
    ids = result.stdout.split()
    assert {world["alice_id"], world["bob_id"], world["loose"]} <= set(ids)


@pytest.mark.docker
@pytest.mark.root
def test_denials_are_logged_with_user_method_path_and_reason(proxy, world):
    docker_as(proxy, world["bob"], "inspect", world["alice_id"])

    def denials() -> list[str]:  # the proxy may log just after it answered
        return [
            line
            for line in proxy.log.read_text().splitlines()
            if f"denied user={world['bob']} method=GET" in line and world["alice_id"] in line
        ]

    lines = wait_until(denials, 10, 0.05, "a denial line in the proxy log")
    assert any(line.endswith(f"(owned by {world['alice']})") for line in lines), lines


def settled_fd_count(pid: int) -> int:
    """Open descriptors of `pid` once connections still closing have closed."""
    fds = Path(f"/proc/{pid}/fd")
    counts = [len(list(fds.iterdir()))]
    while len(counts) < 4 or len(set(counts[-4:])) > 1:
        time.sleep(0.1)
        counts.append(len(list(fds.iterdir())))
        assert len(counts) < 100, counts
    return counts[-1]


@pytest.mark.docker
@pytest.mark.root
def test_a_client_that_hangs_up_releases_its_stream(proxy, world):
    """`docker logs -f` of a quiet container, killed: the proxy lets go of the engine at once."""
    alice, name = world["alice"], f"quiet-{world['alice']}"
    result = docker_as(
        proxy, alice, "run", "-d", "--name", name, "--label", "ds01.test=1", IMAGE, "sleep", "600"
    )
    assert result.returncode == 0, result.stderr
    before = settled_fd_count(proxy.process.pid)
    as_user(proxy, alice, f"timeout -s KILL 1 {DOCKER} logs -f {name}")
    assert settled_fd_count(proxy.process.pid) <= before
    docker_as(proxy, alice, "rm", "-f", name)


@pytest.mark.docker
@pytest.mark.root
def test_a_half_closed_client_still_gets_its_answer(proxy, world):
    client = RAW_CLIENT.replace(
        "s.sendall(sys.stdin.buffer.read())",
        "s.sendall(sys.stdin.buffer.read()); s.shutdown(socket.SHUT_WR)",
    )
    uid = pwd.getpwnam(world["alice"]).pw_uid
    request = b"GET /v1.41/version HTTP/1.1\r\nHost: d\r\n\r\n"
    result = subprocess.run(
        ["/usr/bin/python3", "-c", client, str(proxy.sock)],
        input=request,
        capture_output=True,
        user=uid,
        group=uid,
        extra_groups=[],
        timeout=30,
    )
    assert result.stdout.startswith(b"HTTP/1.1 200 OK"), result.stdout[:200]


@pytest.mark.docker
@pytest.mark.root
def test_listed_admins_get_full_access(world):
    with proxy_process("--admin", world["bob"]) as admin_proxy:
        listed = docker_as(admin_proxy, world["bob"], "ps", "-aq", "--no-trunc")
        assert world["alice_id"] in listed.stdout.split()
        still_user = docker_as(admin_proxy, world["alice"], "ps", "-aq", "--no-trunc")
        assert world["bob_id"] not in still_user.stdout.split()


@pytest.mark.docker
@pytest.mark.root
def test_limits_file_is_applied_to_created_containers(proxy, world, tmp_path):
    limits = tmp_path / "resource-limits.yaml"
    limits.write_text(
        "defaults:\n  max_cpus: 1\n  memory: 256m\n  shm_size: 32m\n  pids_limit: 200\n"
        "  max_containers_per_user: 100\n"
        f"user_overrides:\n  {world['bob']}:\n    max_containers_per_user: 1\n"
    )
    with proxy_process("--limits", str(limits), state_dir=proxy.state_dir) as limited:
        made = docker_as(
            limited,
            world["alice"],
            "create",
            "--label",
            "ds01.test=1",
            "--memory",
            "8g",
            IMAGE,
            "true",
        )
        assert made.returncode == 0, made.stderr
        host = json.loads(
            admin_docker("inspect", "-f", "{{json .HostConfig}}", made.stdout.strip()).stdout
        )
        admin_docker("rm", made.stdout.strip())
        assert host["Memory"] == 256 << 20 and host["MemorySwap"] == 256 << 20
        assert host["NanoCpus"] == 10**9 and host["PidsLimit"] == 200
        assert host["ShmSize"] == 32 << 20
        # bob already has a container: his limit of one is reached
        refused = docker_as(
            limited, world["bob"], "create", "--label", "ds01.test=1", IMAGE, "true"
        )
        assert refused.returncode != 0 and "max_containers_per_user: 1" in refused.stderr


@pytest.mark.docker
@pytest.mark.root
def test_exec_into_a_root_container_with_binds_runs_as_the_user(proxy, world):
    """A container made elsewhere (e.g. the spawner) whose image user is root, with the
    user's home bound: `docker exec` through the proxy runs as the user, not as root."""
    alice = world["alice"]
    entry = pwd.getpwnam(alice)
    name = f"default._.{alice}"
    cid = admin_docker(
        "run",
        "-d",
        "--name",
        name,
        "--label",
        "ds01.test=1",
        *spawner_label_args(proxy, alice, name),
        "-v",
        f"{entry.pw_dir}:/home/me",
        IMAGE,
        "sleep",
        "600",
    ).stdout.strip()
    try:
        result = docker_as(proxy, alice, "exec", cid, "id", "-u")
        assert result.stdout.strip() == str(entry.pw_uid), result.stderr
        root = docker_as(proxy, alice, "exec", "-u", "0", cid, "id", "-u")
        assert root.returncode != 0 and "run as you" in root.stderr
    finally:
        admin_docker("rm", "-f", cid)


@pytest.mark.docker
@pytest.mark.root
def test_a_stopped_gpu_container_cannot_be_started_behind_the_allocator(proxy, world):
    """The spawner's GPU container of alice, stopped: its hold may expire and slot 0 go to
    someone else, so a bare `docker start`/`restart` through the proxy must not bring it
    back (only ds01hub's own start checks the slot first); stopping and removing stay hers."""
    alice = world["alice"]
    name = f"gpu-{RUN}._.{alice}"
    cid = admin_docker(
        "create",
        "--name",
        name,
        "--label",
        "ds01.test=1",
        *spawner_label_args(proxy, alice, name, gpus=("0",)),
        IMAGE,
        "sleep",
        "600",
    ).stdout.strip()
    try:
        for command in ("start", "restart"):
            refused = docker_as(proxy, alice, command, name)
            assert refused.returncode != 0 and "container-start" in refused.stderr, refused
            status, _ = raw_as(proxy, alice, http("POST", f"/v1.41/containers/{cid}/{command}"))
            assert status == 403
        state = admin_docker("inspect", "-f", "{{.State.Status}}", cid).stdout.strip()
        assert state == "created"
        assert docker_as(proxy, alice, "rm", name).returncode == 0
    finally:
        admin_docker("rm", "-f", cid, check=False)


@pytest.mark.docker
@pytest.mark.root
def test_events_show_only_own_containers(proxy, world):
    since = int(time.time()) - 1  # the engine keeps only its last 256 events: make fresh ones
    for user in ("alice", "bob"):
        for action in ("pause", "unpause"):
            docker_as(proxy, world[user], action, f"web-{world[user]}")
    path = f"/v1.41/events?since={since}&until={int(time.time()) + 1}"
    status, answer = raw_as(proxy, world["bob"], http("GET", path))
    assert status == 200
    events = [json.loads(line) for line in answer.decode().splitlines() if line.strip()]
    assert {e["Action"] for e in events if e.get("id") == world["bob_id"]} >= {"pause", "unpause"}
    assert all(e["Type"] == "container" for e in events)
    assert all(e["Actor"]["Attributes"].get("ds01.user") == world["bob"] for e in events)


@pytest.mark.docker
@pytest.mark.root
def test_copy_into_an_own_container_without_binds(proxy, world):
    alice, name = world["alice"], f"web-{world['alice']}"
    source = Path(tempfile.mkdtemp(prefix="ds01cp-"))
    try:
        source.chmod(0o755)
        (source / "note.txt").write_text("copied in\n")
        (source / "note.txt").chmod(0o644)
        result = docker_as(proxy, alice, "cp", str(source / "note.txt"), f"{name}:/tmp/")
        assert result.returncode == 0, result.stderr
        inside = docker_as(proxy, alice, "exec", name, "cat", "/tmp/note.txt")
        assert inside.stdout == "copied in\n"
    finally:
        shutil.rmtree(source)


@pytest.mark.docker
@pytest.mark.root
def test_image_tags_only_in_the_users_namespace(proxy, world):
    alice = world["alice"]
    own = f"ds01-{alice}/copy:1"
    tagged = docker_as(proxy, alice, "tag", IMAGE, own)
    assert tagged.returncode == 0, tagged.stderr
    poison = docker_as(proxy, alice, "tag", IMAGE, "ds01hub/singleuser:latest")
    assert poison.returncode != 0 and "only tag images as" in poison.stderr
    pull = docker_as(proxy, alice, "pull", IMAGE)
    assert pull.returncode != 0 and "pulling and importing images is for admins" in pull.stderr
    shared = docker_as(proxy, alice, "rmi", IMAGE)
    assert shared.returncode != 0 and "only remove your own images" in shared.stderr
    removed = docker_as(proxy, alice, "rmi", own)
    assert removed.returncode == 0, removed.stderr
    assert admin_docker("image", "inspect", IMAGE, check=False).returncode == 0


# --------------------------------------------------------------------------- imported mounts


def root_owned_or_setuid(home: str) -> list[str]:
    """Files in `home` that a container could have left to take root: owned by root, or
    set-uid / set-gid."""
    found = []
    for path in Path(home).rglob("*"):
        info = path.lstat()
        if info.st_uid == 0 or info.st_mode & 0o6000:
            found.append(str(path))
    return found


PLANT = "cp /bin/busybox /h/planted && chmod 4755 /h/planted; id -u"


@pytest.fixture(scope="module")
def home_binder(proxy, world):
    """alice's container that binds her home (so it runs as her)."""
    alice = world["alice"]
    home = pwd.getpwnam(alice).pw_dir
    name = f"binder-{alice}"
    run_detached(proxy, alice, name, "-v", f"{home}:/h")
    return name


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize(
    "flags",
    [
        ["-u", "0", "--volumes-from", "{src}"],
        ["-u", "0", "--volumes-from", "{src}:rw"],
        ["-u", "0", "--volumes-from", "{src}:ro"],
        ["-u", "0:0", "--volumes-from", "{src}"],
        ["-u", "{uid}:0", "--volumes-from", "{src}"],
        ["-u", "0", "--pid", "container:{src}"],
    ],
    ids=lambda f: " ".join(f),
)
def test_imported_home_binds_cannot_run_as_root(proxy, world, home_binder, flags):
    """The attack that got root: a root container writes a set-uid binary through a bind of
    the home it imports from another (own) container."""
    alice = world["alice"]
    entry = pwd.getpwnam(alice)
    args = [f.format(src=home_binder, uid=entry.pw_uid) for f in flags]
    before = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={alice}").stdout.split()
    result = docker_as(
        proxy, alice, "run", "--rm", "--label", "ds01.test=1", *args, IMAGE, "sh", "-c", PLANT
    )
    assert result.returncode != 0 and "run as you" in result.stderr, result.stderr
    assert not Path(entry.pw_dir, "planted").exists()
    assert root_owned_or_setuid(entry.pw_dir) == []
    after = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={alice}").stdout.split()
    assert after == before


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize("mode", ["", ":rw"])
def test_volumes_from_without_a_user_runs_as_the_caller(proxy, world, home_binder, mode):
    """The image's user is root; imported binds make it the caller: nothing root-owned lands."""
    alice = world["alice"]
    entry = pwd.getpwnam(alice)
    result = docker_as(
        proxy,
        alice,
        "run",
        "--rm",
        "--label",
        "ds01.test=1",
        "--volumes-from",
        home_binder + mode,
        IMAGE,
        "sh",
        "-c",
        PLANT,
    )
    planted = Path(entry.pw_dir, "planted")
    try:
        assert result.stdout.strip().splitlines()[-1] == str(entry.pw_uid), result.stderr
        assert planted.stat().st_uid == entry.pw_uid  # written as alice: her own file
        assert root_owned_or_setuid(entry.pw_dir) in ([], [str(planted)])
        assert planted.stat().st_uid != 0
    finally:
        planted.unlink(missing_ok=True)


@pytest.mark.docker
@pytest.mark.root
def test_volumes_from_read_only_stays_read_only_and_raw_requests_alike(proxy, world, home_binder):
    alice = world["alice"]
    entry = pwd.getpwnam(alice)
    ro = docker_as(
        proxy, alice, "run", "--rm", "--label", "ds01.test=1", "--volumes-from",
        home_binder + ":ro", IMAGE, "sh", "-c", "touch /h/x && echo wrote",
    )  # fmt: skip
    assert "wrote" not in ro.stdout and not Path(entry.pw_dir, "x").exists()
    labels = {"ds01.test": "1"}
    for host in (
        {"VolumesFrom": [home_binder]},
        {"VolumesFrom": [f"{home_binder}:rw"], "Privileged": False},
        {"PidMode": f"container:{home_binder}"},
    ):
        body = {"Image": IMAGE, "User": "0", "Labels": labels, "Cmd": ["true"], "HostConfig": host}
        status, answer = raw_as(proxy, alice, http("POST", "/v1.41/containers/create", body))
        assert status == 403 and "run as you" in answer["message"], answer
        body["User"] = ""
        status, answer = raw_as(proxy, alice, http("POST", "/v1.41/containers/create", body))
        assert status == 201, answer
        made = json.loads(admin_docker("inspect", answer["Id"]).stdout)[0]
        admin_docker("rm", answer["Id"])
        assert made["Config"]["User"] == f"{entry.pw_uid}:{entry.pw_gid}"
        assert not made["HostConfig"].get("VolumesFrom")  # imported only as checked mounts
        for mount in made["Mounts"]:
            assert mount["Type"] != "bind" or mount["Propagation"] == "rprivate"


@pytest.mark.docker
@pytest.mark.root
def test_copying_out_of_a_container_with_binds_is_refused(proxy, world, home_binder):
    """The engine reads as root, through a bind whose host path may have been swapped."""
    alice = world["alice"]
    target = f"/tmp/ds01-cp-{RUN}"
    result = docker_as(proxy, alice, "cp", f"{home_binder}:/h/.profile", target)
    assert result.returncode != 0 and not Path(target).exists(), result.stderr
    path = f"/v1.41/containers/{home_binder}/archive?path=/h/.profile"
    status, answer = raw_as(proxy, alice, http("GET", path))
    assert status == 403 and "docker cp" in answer["message"]


@pytest.mark.docker
@pytest.mark.root
def test_a_colon_in_a_symlink_target_smuggles_no_bind_option(proxy, world):
    """A symlink in the home whose target contains ':rshared' once became a Binds string."""
    alice = world["alice"]
    entry = pwd.getpwnam(alice)
    real = Path(entry.pw_dir, "d:rshared")
    link = Path(entry.pw_dir, "lnk")
    real.mkdir()
    os.chown(real, entry.pw_uid, entry.pw_gid)
    link.symlink_to(real)
    try:
        made = docker_as(
            proxy, alice, "create", "--label", "ds01.test=1", "-v", f"{link}:/data", IMAGE, "true"
        )
        assert made.returncode == 0, made.stderr
        info = json.loads(admin_docker("inspect", made.stdout.strip()).stdout)[0]
        admin_docker("rm", made.stdout.strip())
        assert not info["HostConfig"].get("Binds")
        (mount,) = info["Mounts"]
        assert mount["Source"] == str(real) and mount["Destination"] == "/data"
        assert mount["Propagation"] == "rprivate"
    finally:
        link.unlink()
        real.rmdir()


# --------------------------------------------------------------------------- other users' images


@pytest.fixture(scope="module")
def bobs_image(proxy, world):
    """bob's private image ds01-bob/secret:1 (a file only he should read)."""
    bob = world["bob"]
    context = Path(tempfile.mkdtemp(prefix="ds01ctx-"))
    context.chmod(0o755)
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nRUN echo bobs-secret > /secret\n")
    (context / "Dockerfile").chmod(0o644)
    tag = f"ds01-{bob}/secret:1"
    try:
        built = as_user(
            proxy, bob, f"cd {context} && DOCKER_BUILDKIT=0 {DOCKER} build -q -t {tag} ."
        )
        assert built.returncode == 0, built.stderr
    finally:
        shutil.rmtree(context)
    image_id = admin_docker("image", "inspect", "-f", "{{.Id}}", tag).stdout.strip()
    return {"tag": tag, "id": image_id}


IMAGE_OPERATIONS = [
    ("run", "--rm", "--label", "ds01.test=1", "{ref}", "cat", "/secret"),
    ("create", "--label", "ds01.test=1", "{ref}"),
    ("image", "inspect", "{ref}"),
    ("history", "{ref}"),
    ("tag", "{ref}", "ds01-{me}/stolen:1"),
    ("images", "--filter", "before={ref}"),
    ("images", "--filter", "since={ref}"),
    ("save", "-o", "/dev/null", "{ref}"),
    ("pull", "{ref}"),
]


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize("how", ["tag", "full id", "sha256 id", "id prefix"])
@pytest.mark.parametrize("operation", IMAGE_OPERATIONS, ids=lambda o: " ".join(o[:2]))
def test_other_users_image_reads_exactly_as_a_missing_one(proxy, world, bobs_image, operation, how):
    alice = world["alice"]
    digest = bobs_image["id"].split(":", 1)[1]
    fake = missing_hex(64)
    ref, missing = {
        "tag": (bobs_image["tag"], f"ds01-{world['bob']}/nothing:1"),
        "full id": (digest, fake),
        "sha256 id": (bobs_image["id"], "sha256:" + fake),
        "id prefix": (digest[:12], missing_hex(12)),
    }[how]
    args = [a.replace("{me}", f"{alice}") for a in operation]
    before = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={alice}").stdout.split()
    same_as_missing(proxy, alice, args, ref, missing)
    after = admin_docker("ps", "-aq", "--filter", f"label=ds01.user={alice}").stdout.split()
    assert after == before
    tags = admin_docker("image", "inspect", "-f", "{{json .RepoTags}}", bobs_image["id"]).stdout
    assert json.loads(tags) == [bobs_image["tag"]]


@pytest.mark.docker
@pytest.mark.root
def test_image_lists_show_own_and_shared_images_only(proxy, world, bobs_image):
    alice, bob = world["alice"], world["bob"]
    own = f"ds01-{alice}/mine:1"
    assert docker_as(proxy, alice, "tag", IMAGE, own).returncode == 0
    copy = docker_as(proxy, bob, "tag", IMAGE, f"ds01-{bob}/copy-of-shared:1")
    assert copy.returncode == 0, copy.stderr
    try:
        status, listing = raw_as(proxy, alice, http("GET", "/v1.41/images/json?all=1"))
        assert status == 200
        text = json.dumps(listing)
        assert bobs_image["id"] not in text and f"ds01-{bob}" not in text
        assert own in text and IMAGE in text
        shown = docker_as(proxy, alice, "images", "--format", "{{.Repository}}:{{.Tag}}")
        assert f"ds01-{bob}" not in shown.stdout and own in shown.stdout
        status, document = raw_as(proxy, alice, http("GET", f"/v1.41/images/{IMAGE}/json"))
        assert status == 200 and f"ds01-{bob}/copy-of-shared:1" not in document["RepoTags"]
    finally:
        admin_docker("rmi", own, f"ds01-{bob}/copy-of-shared:1", check=False)


BUILDS = [
    ("FROM {ref}\n", []),
    ("ARG BASE={ref}\nFROM $BASE\n", []),
    ("ARG BASE\nFROM ${{BASE}}\n", ["--build-arg", "BASE={ref}"]),
    ("FROM {shared} AS ok\nCOPY --from={ref} /secret /s\n", []),
    ("FROM {shared}\nCOPY --from={ref} /secret /s\n", []),
    ("FROM {shared}\n", ["--cache-from", "{ref}"]),
]


@pytest.mark.docker
@pytest.mark.root
@pytest.mark.parametrize(("dockerfile", "flags"), BUILDS, ids=lambda v: repr(v)[:40])
def test_builds_cannot_read_other_users_images(proxy, world, bobs_image, dockerfile, flags):
    alice = world["alice"]
    context = Path(tempfile.mkdtemp(prefix="ds01ctx-"))
    context.chmod(0o755)
    outputs = []
    try:
        for ref in (bobs_image["tag"], f"ds01-{world['bob']}/nothing:1"):
            (context / "Dockerfile").write_text(dockerfile.format(ref=ref, shared=IMAGE))
            (context / "Dockerfile").chmod(0o644)
            extra = shlex.join([f.format(ref=ref) for f in flags])
            result = as_user(
                proxy,
                alice,
                f"cd {context} && DOCKER_BUILDKIT=0 {DOCKER} build -q {extra} "
                f"-t ds01-{alice}/stolen:1 .",
            )
            assert result.returncode != 0, result.stdout
            outputs.append(result.stderr.replace(ref, "<REF>"))
    finally:
        shutil.rmtree(context)
    assert "that you may use" in outputs[0]
    assert outputs[0] == outputs[1]  # existing or not: the same refusal
    assert admin_docker("image", "inspect", f"ds01-{alice}/stolen:1", check=False).returncode


@pytest.mark.docker
@pytest.mark.root
def test_a_raw_build_context_cannot_hide_its_from(proxy, world, bobs_image):
    import io
    import tarfile

    alice, secret = world["alice"], bobs_image["tag"]

    def context(*entries) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data, link in entries:
                info = tarfile.TarInfo(name)
                if link:
                    info.type, info.linkname = tarfile.SYMTYPE, link
                    archive.addfile(info)
                else:
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    ok = f"FROM {IMAGE}\n".encode()
    bad = f"FROM {secret}\n".encode()
    tricks = [
        context(("Dockerfile", ok, None), ("./Dockerfile", bad, None)),
        context(("d", b"", "."), ("d/Dockerfile", bad, None)),
        context(("Dockerfile", b"", "real"), ("real", bad, None)),
        context(("dockerfile", bad, None)),
        context(
            (
                "Dockerfile",
                b"FROM " + IMAGE.encode() + b"\nRUN x \\\n  #c\nFROM " + secret.encode() + b"\n",
                None,
            )
        ),
    ]
    for body in tricks:
        request = http(
            "POST",
            f"/v1.41/build?t=ds01-{alice}/stolen:1",
            body,
            headers={"Content-Type": "application/x-tar"},
        ).replace(b"Content-Type: application/json\r\n", b"")
        status, answer = raw_as(proxy, alice, request)
        assert status == 403, answer
    assert admin_docker("image", "inspect", f"ds01-{alice}/stolen:1", check=False).returncode


# --------------------------------------------------------------------------- quota race


@pytest.mark.docker
@pytest.mark.root
def test_parallel_creates_never_exceed_the_container_limit(proxy, world, tmp_path):
    """20 creates at once, through two proxy processes sharing a state directory (the first
    proxy's: one deployment, whose containers of alice's count): exactly the limit is made; the
    others are refused, naming the limit."""
    alice = world["alice"]
    managed = ("--filter", f"label=ds01.user={alice}", "--filter", "label=ds01.managed=true")
    have = len(admin_docker("ps", "-aq", *managed).stdout.split())
    limit = have + 5
    limits = tmp_path / "limits.yaml"
    limits.write_text(f"defaults:\n  max_containers_per_user: {limit}\n")
    state = proxy.state_dir
    body = json.dumps({"Image": IMAGE, "Cmd": ["true"], "Labels": {"ds01.test": "1"}})
    script = (
        "import json, socket, sys, threading\n"
        "results = []\n"
        "def create(path):\n"
        "    s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(path)\n"
        f"    body = {body!r}.encode()\n"
        "    s.sendall(b'POST /v1.41/containers/create HTTP/1.1\\r\\nHost: d\\r\\n'\n"
        "              b'Connection: close\\r\\nContent-Type: application/json\\r\\n'\n"
        "              b'Content-Length: %d\\r\\n\\r\\n' % len(body) + body)\n"
        "    data = b''\n"
        "    while chunk := s.recv(65536): data += chunk\n"
        "    results.append(data.decode(errors='replace'))\n"
        "socks = sys.argv[1:]\n"
        "threads = [threading.Thread(target=create, args=(socks[i % 2],)) for i in range(20)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(json.dumps(results))\n"
    )
    with (
        proxy_process("--limits", str(limits), state_dir=state) as one,
        proxy_process("--limits", str(limits), state_dir=state) as two,
    ):
        done = subprocess.run(
            ["/usr/bin/python3", "-c", script, str(one.sock), str(two.sock)],
            capture_output=True,
            text=True,
            user=pwd.getpwnam(alice).pw_uid,
            group=pwd.getpwnam(alice).pw_gid,
            extra_groups=[],
            timeout=240,
        )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    made = [a for a in answers if a.startswith("HTTP/1.1 201")]
    refused = [a for a in answers if a.startswith("HTTP/1.1 403")]
    now = admin_docker("ps", "-aq", *managed).stdout.split()
    for answer in made:
        admin_docker("rm", json.loads(answer.split("\r\n\r\n", 1)[1])["Id"])
    assert len(made) == 5 and len(now) == limit, [a[:200] for a in answers]
    assert len(refused) == 15
    assert all(f"max_containers_per_user: {limit}" in a for a in refused)


# --------------------------------------------------------------------------- leaks


@pytest.mark.docker
@pytest.mark.root
def test_a_name_conflict_does_not_reveal_whose_container_it_is(proxy, world):
    bob, alice_id = world["bob"], world["alice_id"]
    result = docker_as(
        proxy,
        bob,
        "create",
        "--label",
        "ds01.test=1",
        "--name",
        f"web-{world['alice']}",
        IMAGE,
        "true",
    )
    assert result.returncode != 0 and "already in use" in result.stderr
    assert alice_id not in result.stderr and alice_id[:12] not in result.stderr
    rename = docker_as(proxy, bob, "rename", f"web-{bob}", f"web-{world['alice']}")
    assert rename.returncode != 0 and alice_id not in rename.stderr, rename.stderr


@pytest.mark.docker
@pytest.mark.root
def test_info_shows_the_callers_own_figures(proxy, world):
    for user in (world["alice"], world["bob"]):
        status, info = raw_as(proxy, user, http("GET", "/v1.41/info"))
        own = admin_docker(
            "ps",
            "-aq",
            "--filter",
            f"label=ds01.user={user}",
            "--filter",
            "label=ds01.managed=true",
        )
        assert status == 200 and info["Containers"] == len(own.stdout.split())
        shown = docker_as(proxy, user, "info", "--format", "{{.Containers}}")
        assert shown.stdout.strip() == str(len(own.stdout.split())), shown.stderr
    everyone = json.loads(admin_docker("info", "--format", "{{json .}}").stdout)["Containers"]
    assert info["Containers"] < everyone


@pytest.mark.docker
@pytest.mark.root
def test_container_list_filters_naming_other_containers_read_as_missing(proxy, world):
    bob = world["bob"]
    for key in ("before", "since"):
        same_as_missing(
            proxy,
            bob,
            ["ps", "-a", "--filter", f"{key}={{ref}}"],
            f"web-{world['alice']}",
            f"nobody{RUN}",
        )
    own = docker_as(proxy, bob, "ps", "-aq", "--filter", f"since=web-{bob}")
    assert own.returncode == 0, own.stderr
