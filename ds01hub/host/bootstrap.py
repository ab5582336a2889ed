"""Bring a host up for ds01hub: packages, the Docker engine, the virtualenv and the images.

One implementation for ``make demo``, ``make test``, the test fixtures and admins
(``ds01hub bootstrap ...``). Every step checks first and does nothing when its result is
already there, so a second run is fast, and an engine that already answers is reused (never
stopped or restarted).

This module uses only the standard library and the ``docker`` command line, so it also runs
before the virtualenv exists: ``python3 -m ds01hub.host.bootstrap host`` from a source checkout.

Images (no registry is needed):

* the **base image** is a Debian rootfs made with ``mmdebstrap --variant=minbase`` and
  ``docker import``;
* the **single-user image** adds a virtualenv with jupyterhub-singleuser, jupyter-server,
  JupyterLab, ipywidgets and this project's own wheel (with its ``singleuser`` extra), so the
  ds01 server extension is really loaded. The dependencies are one layer and the project wheel
  the last, so a source change rebuilds only the last layer.

Both are tagged by a hash of their inputs (``ds01hub/base:<hash>``,
``ds01hub/singleuser:<hash>``) plus the alias ``:latest``, and reused when the tag exists.

Sites behind a TLS-intercepting proxy (common on university networks) pass their CA bundle with
``--ca-bundle``: it is copied into the single-user image and PIP_CERT, SSL_CERT_FILE and
REQUESTS_CA_BUNDLE point at it, for the build and for users' own ``pip install`` later.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ds01hub import paths
from ds01hub.errors import Ds01hubError, render

SIMULATED_GPU_BIN = Path("/usr/local/lib/ds01hub/simulated-gpu-bin")
GPU_HOOK_NAME = "nvidia-container-runtime-hook"
SIMULATED_GPU_HOOK = """#!/bin/sh
# ds01hub SIMULATED GPU hook: lets `docker run --gpus` start on a machine without NVIDIA GPUs.
# Installed by ds01hub.host.bootstrap only where no real nvidia-container-runtime-hook exists.
# Containers see NVIDIA_VISIBLE_DEVICES but get no device: for demos and tests only.
cat >/dev/null
exit 0
"""
DOCKERD_LOG = Path("/var/log/ds01hub-dockerd.log")
SYSTEMD_DROPIN = Path("/etc/systemd/system/docker.service.d/ds01hub-simulated-gpu.conf")
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

#: Debian packages for the host; the test tools drive a real browser and real terminals.
HOST_PACKAGES = ("docker.io", "mmdebstrap", "python3-venv", "git", "ca-certificates")
TEST_TOOL_PACKAGES = ("chromium", "tmux", "busybox-static")  # busybox: the CLI/proxy test image
#: live: a real LDAP server for the LDAP login test (the test starts its own on loopback; the
#: package's own service is kept from starting at install).
TEST_SERVICE_PACKAGES = ("slapd", "ldap-utils")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
PROXY_COMMAND = "configurable-http-proxy"

BASE_REPOSITORY = "ds01hub/base"
SINGLEUSER_REPOSITORY = "ds01hub/singleuser"
ALIAS_TAG = "latest"
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "ca-certificates",
    "git",
    "tini",
    "procps",
    "less",
    "curl",
)
#: The hub's own version when it is installed here (hub and single-user must match).
DEFAULT_JUPYTERHUB_VERSION = "6.1.1"
# notebook: "notebook" (Notebook 7) so the ds01 widgets also run in the plain notebook interface.
SINGLEUSER_EXTRA_REQUIREMENTS = ("jupyterlab", "notebook")
CA_BUNDLE_IN_IMAGE = "/etc/ds01hub/ca-bundle.crt"
SYSTEM_CA_BUNDLE_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"
#: What `docker import` sets in the base image.
BASE_IMAGE_CHANGES = ("ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]')


class BootstrapError(Ds01hubError, RuntimeError):
    """A step could not be done; the message says what failed and what to do about it."""

    status = 500  # the host's failure, not the caller's


# --------------------------------------------------------------------------------------------
# pure helpers


def hash_inputs(parts: Iterable[tuple[str, bytes]], length: int = 12) -> str:
    """A short, stable digest of named inputs (names are part of it: a rename is a change)."""
    digest = hashlib.sha256()
    for name, content in sorted(parts):
        digest.update(name.encode() + b"\0" + str(len(content)).encode() + b"\0")
        digest.update(content)
    return digest.hexdigest()[:length]


def base_image_recipe(
    suite: str = DEBIAN_SUITE, packages: Sequence[str] = BASE_PACKAGES, mirror: str | None = None
) -> dict:
    """Everything that decides what the base image contains."""
    return {
        "suite": suite,
        "variant": "minbase",
        "packages": sorted(set(packages)),
        "mirror": mirror or "",
    }


def base_image_tag(recipe: dict, repository: str = BASE_REPOSITORY) -> str:
    content = json.dumps(recipe, sort_keys=True).encode()
    return f"{repository}:{hash_inputs([('recipe', content)])}"


def mmdebstrap_command(recipe: dict, output: Path) -> list[str]:
    command = [
        "mmdebstrap",
        "--quiet",
        f"--variant={recipe['variant']}",
        "--include=" + ",".join(recipe["packages"]),
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        recipe["suite"],
        str(output),
    ]
    if recipe["mirror"]:
        command.append(recipe["mirror"])
    return command


def project_requirements(pyproject: dict, jupyterhub_version: str) -> list[str]:
    """What the single-user image installs before the project wheel: the project's own
    dependencies and its ``singleuser`` extra, with jupyterhub pinned to the hub's version."""
    project = pyproject["project"]
    requirements = [f"jupyterhub=={jupyterhub_version}", *SINGLEUSER_EXTRA_REQUIREMENTS]
    extras = project.get("optional-dependencies", {}).get("singleuser", [])
    for requirement in [*project.get("dependencies", []), *extras]:
        if requirement_name(requirement) != "jupyterhub":
            requirements.append(requirement)
    return requirements


def requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement ("Jupyter_Hub >=5" -> "jupyter-hub")."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", name.group(1)).lower() if name else requirement


def package_source_roots(pyproject: dict) -> list[str]:
    """The folders and files the project wheel is built from (not docs, tests or config)."""
    setuptools = pyproject.get("tool", {}).get("setuptools", {})
    roots = set(setuptools.get("package-dir", {}).values())
    for sources in setuptools.get("data-files", {}).values():
        roots.update(sources)
    return sorted(roots | {"pyproject.toml"})


def source_files(source: Path, roots: Iterable[str]) -> list[Path]:
    """The files under ``roots`` that go into the wheel (no caches or compiled files)."""
    files: list[Path] = []
    for root in roots:
        path = source / root
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for candidate in candidates:
            relative = candidate.relative_to(source)
            if candidate.is_file() and not _is_build_debris(relative):
                files.append(relative)
    return sorted(files)


def _is_build_debris(relative: Path) -> bool:
    return any(
        part == "__pycache__" or part.endswith(".egg-info") for part in relative.parts
    ) or relative.suffix in {".pyc", ".pyo"}


def dockerd_path(real_hook_found: bool, current_path: str) -> str:
    """dockerd's PATH: the simulated GPU hook first, unless a real NVIDIA hook exists."""
    if real_hook_found:
        return current_path
    return f"{SIMULATED_GPU_BIN}:{current_path}"


# --------------------------------------------------------------------------------------------
# running things


def say(message: str) -> None:
    print(f"[ds01hub bootstrap] {message}", file=sys.stderr, flush=True)


def run(command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, its output going to ours; a failure names the command."""
    say("$ " + " ".join(command))
    try:
        return subprocess.run(command, check=True, **kwargs)
    except FileNotFoundError as error:
        raise BootstrapError(f"{command[0]} is not installed ({error})") from error
    except subprocess.CalledProcessError as error:
        raise BootstrapError(
            f"`{' '.join(command)}` failed with exit status {error.returncode}"
        ) from error


def lock_file() -> Path:
    """Root's lock lives in /var/lib/ds01hub (not in world-writable /tmp); others' in ~/.cache."""
    directory = paths.DEFAULT_STATE_DIR if os.geteuid() == 0 else Path.home() / ".cache" / "ds01hub"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "bootstrap.lock"


def unignore_sigint() -> None:
    """A job started in the background by a non-interactive shell (``make test &``, CI runners)
    inherits SIGINT *ignored*, and passes that on through exec to every process it starts. But
    JupyterHub stops its managed services with SIGINT: they would never stop. Restoring Python's
    handler here makes the children start with the default action again."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """One image build at a time on this host (several test sessions may start together)."""
    with open(lock_file(), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# host: packages, configurable-http-proxy, the Docker engine


def missing_packages(names: Iterable[str]) -> list[str]:
    missing = []
    for name in names:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", name], capture_output=True, text=True
        )
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            missing.append(name)
    return missing


def ensure_packages(names: Iterable[str], start_services: bool = True) -> list[str]:
    """Install the Debian packages that are missing; returns what was installed. Without
    ``start_services`` a package's own daemon is not started (Debian's policy-rc.d, 101)."""
    missing = missing_packages(names)
    if not missing:
        return []
    if not start_services and not POLICY_RC.exists():
        POLICY_RC.write_text("#!/bin/sh\n# ds01hub bootstrap: no service starts now\nexit 101\n")
        POLICY_RC.chmod(0o755)
        try:
            return ensure_packages(missing)
        finally:
            POLICY_RC.unlink()
    if os.geteuid() != 0:
        raise BootstrapError(
            f"missing Debian packages {', '.join(missing)}: run as root or install them"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL)
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return missing


def ensure_proxy_command() -> str:
    """configurable-http-proxy (JupyterHub's proxy), from npm when it is not on PATH."""
    found = shutil.which(PROXY_COMMAND)
    if found:
        return found
    if not shutil.which("npm"):  # NodeSource's nodejs bundles npm and conflicts with Debian's
        ensure_packages(["nodejs", "npm"])
    run(["npm", "install", "--global", "--no-fund", "--no-audit", PROXY_COMMAND])
    found = shutil.which(PROXY_COMMAND)
    if not found:
        raise BootstrapError(f"npm installed {PROXY_COMMAND} but it is not on PATH")
    return found


def docker_answers(timeout: float = 20) -> bool:
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=timeout,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def real_gpu_hook() -> str | None:
    """An installed NVIDIA container runtime hook, ignoring our simulated one."""
    directories = [
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and Path(entry) != SIMULATED_GPU_BIN
    ]
    directories += ["/usr/bin", "/usr/local/bin"]
    return shutil.which(GPU_HOOK_NAME, path=os.pathsep.join(directories))


def install_simulated_gpu_hook(directory: Path = SIMULATED_GPU_BIN) -> Path:
    """The SIMULATED hook: Docker registers its 'nvidia' device driver when a binary of this
    name is on dockerd's PATH, so GPU device requests start on machines without NVIDIA GPUs."""
    hook = directory / GPU_HOOK_NAME
    if not hook.exists() or hook.read_text() != SIMULATED_GPU_HOOK:
        directory.mkdir(parents=True, exist_ok=True)
        hook.write_text(SIMULATED_GPU_HOOK)
        hook.chmod(0o755)
        say(f"installed the SIMULATED GPU hook {hook}")
    return hook


def wait_for_engine(timeout: float, log_hint: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if docker_answers(timeout=5):
            return
        time.sleep(1)
    raise BootstrapError(f"the Docker engine did not answer within {timeout:.0f}s; {log_hint}")


def start_dockerd(path: str, log_path: Path = DOCKERD_LOG, timeout: float = 90) -> None:
    """Start dockerd in its own session (it outlives us), logging to ``log_path``."""
    say(f"starting dockerd (log: {log_path})")
    with open(log_path, "ab") as log:
        subprocess.Popen(
            ["dockerd"],
            env=os.environ | {"PATH": path},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tail = ""
    with contextlib.suppress(OSError):
        tail = log_path.read_text(errors="replace")[-3000:]
    wait_for_engine(timeout, f"{log_path} ends:\n{tail}")


def systemd_runs() -> bool:
    return Path("/run/systemd/system").is_dir()


def write_systemd_dropin(path: str) -> None:
    """docker.service gets the same PATH (with the SIMULATED hook) as a dockerd we start."""
    dropin = SYSTEMD_DROPIN
    content = f"[Service]\nEnvironment=PATH={path}\n"
    if not dropin.exists() or dropin.read_text() != content:
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(content)
        run(["systemctl", "daemon-reload"])


def ensure_docker_engine() -> str:
    """Reuse an engine that answers (never restarted); otherwise install docker.io if needed and
    start the engine: under systemd as docker.service, else dockerd in its own session. Where
    no real NVIDIA hook exists, the SIMULATED one is installed on the engine's PATH first.
    Returns 'running' or 'started'."""
    if docker_answers():
        return "running"
    real_hook = real_gpu_hook()
    if not real_hook:
        install_simulated_gpu_hook()
    path = dockerd_path(bool(real_hook), STANDARD_PATH)
    if systemd_runs() and not real_hook:
        write_systemd_dropin(path)
    ensure_packages(["docker.io"])
    if docker_answers():  # the package's service started it
        return "running"
    if systemd_runs():
        run(["systemctl", "start", "docker"])
        wait_for_engine(90, "see `journalctl -u docker`")
    else:
        start_dockerd(path)
    return "started"


SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_ipv4(interface: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("256s", interface.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24])


def docker_bridge_ip(network: str = "bridge") -> str:
    """The host's address on Docker's default bridge: containers reach the hub there. Docker's
    default bridge often records no gateway, so the bridge interface itself is asked."""
    result = subprocess.run(
        ["docker", "network", "inspect", network, "--format", "{{json .}}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BootstrapError(f"docker network inspect {network}: {result.stderr.strip()}")
    attrs = json.loads(result.stdout)
    for config in (attrs.get("IPAM") or {}).get("Config") or []:
        if config.get("Gateway"):
            return config["Gateway"]
    interface = (attrs.get("Options") or {}).get("com.docker.network.bridge.name", "docker0")
    try:
        return interface_ipv4(interface)
    except OSError as error:
        raise BootstrapError(f"no IPv4 address on Docker's bridge {interface}: {error}") from error


def ensure_host(test_tools: bool = False) -> dict:
    """Debian packages, configurable-http-proxy and a running Docker engine."""
    packages = [*HOST_PACKAGES, *(TEST_TOOL_PACKAGES if test_tools else ())]
    installed = ensure_packages(packages)
    if test_tools:
        installed += ensure_packages(TEST_SERVICE_PACKAGES, start_services=False)
    proxy = ensure_proxy_command()
    engine = ensure_docker_engine()
    return {"installed_packages": installed, "proxy": proxy, "docker_engine": engine}


# --------------------------------------------------------------------------------------------
# the virtualenv


def ensure_venv(source: Path, venv: Path, extras: str = "test") -> str:
    """A virtualenv with this project installed editable; reinstalled when pyproject changes."""
    stamp = venv / ".ds01hub-installed"
    wanted = hash_inputs(
        [("pyproject", (source / "pyproject.toml").read_bytes()), ("x", extras.encode())]
    )
    if stamp.exists() and stamp.read_text().strip() == wanted and (venv / "bin/python").exists():
        return "up to date"
    if not (venv / "bin/python").exists():
        run([sys.executable if _has_venv_module() else "python3", "-m", "venv", str(venv)])
    target = f"{source}[{extras}]" if extras else str(source)
    run([str(venv / "bin/pip"), "install", "--quiet", "--upgrade", "pip"])
    # setuptools says "Editable installation ... be careful with folders in your working
    # directory" on every editable install: known and meant here, so that one note is muted.
    quiet = os.environ | {"PYTHONWARNINGS": "ignore:Editable installation"}
    run([str(venv / "bin/pip"), "install", "--quiet", "-e", target], env=quiet)
    stamp.write_text(wanted + "\n")
    return "installed"


def _has_venv_module() -> bool:
    return subprocess.run([sys.executable, "-c", "import ensurepip, venv"]).returncode == 0


# --------------------------------------------------------------------------------------------
# images


@dataclass
class ImageResult:
    tag: str
    alias: str
    built: bool
    inputs: dict = field(default_factory=dict)


def image_exists(tag: str) -> bool:
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True)
    return result.returncode == 0


def tag_alias(tag: str) -> str:
    alias = f"{tag.rsplit(':', 1)[0]}:{ALIAS_TAG}"
    run(["docker", "tag", tag, alias], stdout=subprocess.DEVNULL)
    return alias


def ensure_base_image(mirror: str | None = None) -> ImageResult:
    """The Debian base image (mmdebstrap + docker import), reused when its tag exists."""
    return ensure_rootfs_image(base_image_recipe(mirror=mirror))


def ensure_rootfs_image(recipe: dict, repository: str = BASE_REPOSITORY) -> ImageResult:
    """An image of a Debian rootfs made by ``recipe`` (see base_image_recipe; its optional
    ``changes`` are the image settings, default BASE_IMAGE_CHANGES) with mmdebstrap and
    ``docker import``, tagged ``repository:<hash of the recipe>`` and reused when that tag
    exists. The base image is one; the tests' booted systemd host another."""
    tag = base_image_tag(recipe, repository)
    with exclusive():
        if image_exists(tag):
            return ImageResult(tag, tag_alias(tag), built=False, inputs=recipe)
        ensure_packages(["mmdebstrap"])
        with tempfile.TemporaryDirectory(prefix="ds01hub-rootfs-") as directory:
            rootfs = Path(directory) / "rootfs.tar"
            run(mmdebstrap_command(recipe, rootfs))
            changes = recipe.get("changes", BASE_IMAGE_CHANGES)
            run(
                ["docker", "import", *(f"--change={c}" for c in changes), str(rootfs), tag],
                stdout=subprocess.DEVNULL,
            )
        return ImageResult(tag, tag_alias(tag), built=True, inputs=recipe)


def find_source(start: Path | None = None) -> Path:
    """The source checkout this module belongs to (needed to build the project wheel)."""
    candidate = (start or Path(__file__)).resolve()
    for directory in [candidate, *candidate.parents]:
        if (directory / "pyproject.toml").is_file() and (directory / "ds01hub").is_dir():
            return directory
    raise BootstrapError(
        "no ds01hub source checkout found: building the single-user image needs one "
        "(pass --source DIR)"
    )


def jupyterhub_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("jupyterhub")
    except PackageNotFoundError:
        return DEFAULT_JUPYTERHUB_VERSION


@dataclass(frozen=True)
class SingleuserInputs:
    """What decides the single-user image: its tag is the hash of all of it."""

    base_image: str
    dockerfile: bytes
    requirements: list[str]
    ca_bundle: bytes | None
    files: dict[str, bytes]  # package source, relative path -> content
    pip_index_url: str = ""  # a site's package index or mirror ("": pip's default, PyPI)

    def tag(self) -> str:
        parts = [
            ("base", self.base_image.encode()),
            ("dockerfile", self.dockerfile),
            ("requirements", "\n".join(self.requirements).encode()),
            ("ca-bundle", self.ca_bundle or b""),
            *((f"src/{name}", content) for name, content in self.files.items()),
        ]
        if self.pip_index_url:  # only when set: existing tags stay valid
            parts.append(("pip-index-url", self.pip_index_url.encode()))
        return f"{SINGLEUSER_REPOSITORY}:{hash_inputs(parts)}"


def singleuser_context_dir(source: Path) -> Path:
    return source / "config" / "images" / "singleuser"


def collect_singleuser_inputs(
    source: Path, base_image: str, ca_bundle: Path | None, pip_index_url: str | None = None
) -> SingleuserInputs:
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    if ca_bundle is not None and not ca_bundle.is_file():
        raise BootstrapError(f"--ca-bundle {ca_bundle}: no such file (give a PEM bundle or 'none')")
    return SingleuserInputs(
        base_image=base_image,
        dockerfile=(singleuser_context_dir(source) / "Dockerfile").read_bytes(),
        requirements=project_requirements(pyproject, jupyterhub_version()),
        ca_bundle=ca_bundle.read_bytes() if ca_bundle else None,
        files=project_files(source),
        pip_index_url=pip_index_url or "",
    )


def project_files(source: Path) -> dict[str, bytes]:
    """What the project wheel is built from: relative path -> content (see source_files)."""
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    return {
        str(relative): (source / relative).read_bytes()
        for relative in source_files(source, package_source_roots(pyproject))
    }


def build_project_wheel(
    files: dict[str, bytes],
    source: Path,
    wheel_dir: Path,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Path:
    """Build this project's wheel into ``wheel_dir`` from a copy of exactly ``files`` (the work
    tree may change meanwhile, and a build leaves nothing behind in the checkout) with
    ``python``'s pip (in ``env``: pip's own settings, such as a wheelhouse). Returns the wheel."""
    with tempfile.TemporaryDirectory(prefix="ds01hub-wheel-") as directory:
        project = Path(directory)
        for name, content in files.items():
            target = project / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        for extra in ("README.md", "LICENSE"):  # the metadata names them
            if (source / extra).exists():
                (project / extra).write_bytes((source / extra).read_bytes())
        before = set(wheel_dir.glob("ds01hub-*.whl")) if wheel_dir.exists() else set()
        run(
            [
                python,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "-w",
                str(wheel_dir),
                str(project),
            ],
            env=env,
        )
    built = sorted(set(wheel_dir.glob("ds01hub-*.whl")) - before) or sorted(
        wheel_dir.glob("ds01hub-*.whl")
    )
    if not built:
        raise BootstrapError(f"pip wheel built no ds01hub wheel in {wheel_dir}")
    return built[-1]


def write_build_context(inputs: SingleuserInputs, source: Path, context: Path) -> None:
    """The docker build context: Dockerfile, requirements, CA bundle and the project wheel,
    built from exactly the hashed sources."""
    (context / "Dockerfile").write_bytes(inputs.dockerfile)
    (context / "requirements.txt").write_text("\n".join(inputs.requirements) + "\n")
    (context / "ca-bundle.crt").write_bytes(inputs.ca_bundle or b"")
    build_project_wheel(inputs.files, source, context / "wheels")


def ensure_singleuser_image(
    base_image: str,
    ca_bundle: Path | None = HOST_CA_BUNDLE,
    source: Path | None = None,
    pip_index_url: str | None = None,
) -> ImageResult:
    """The single-user image on ``base_image``, reused when its tag exists. ``pip_index_url``:
    a package index or mirror for this build and for users' own builds and installs later
    (written to the image's /etc/pip.conf)."""
    source = source or find_source()
    inputs = collect_singleuser_inputs(source, base_image, ca_bundle, pip_index_url)
    tag = inputs.tag()
    summary = {
        "base_image": base_image,
        "requirements": inputs.requirements,
        "ca_bundle": str(ca_bundle) if ca_bundle else None,
        "source_files": len(inputs.files),
    }
    with exclusive():
        if image_exists(tag):
            return ImageResult(tag, tag_alias(tag), built=False, inputs=summary)
        with tempfile.TemporaryDirectory(prefix="ds01hub-singleuser-") as directory:
            context = Path(directory)
            write_build_context(inputs, source, context)
            ca_path = CA_BUNDLE_IN_IMAGE if inputs.ca_bundle else SYSTEM_CA_BUNDLE_IN_IMAGE
            run(
                [
                    "docker",
                    "build",
                    "--build-arg",
                    f"BASE_IMAGE={base_image}",
                    "--build-arg",
                    f"CA_BUNDLE={ca_path}",
                    "--build-arg",
                    f"DS01HUB_PIP_INDEX_URL={inputs.pip_index_url}",
                    "--tag",
                    tag,
                    str(context),
                ],
                env=os.environ | {"DOCKER_BUILDKIT": "0"},
                stdout=sys.stderr,
            )
        return ImageResult(tag, tag_alias(tag), built=True, inputs=summary)


def ensure_images(
    ca_bundle: Path | None = HOST_CA_BUNDLE,
    source: Path | None = None,
    mirror: str | None = None,
    pip_index_url: str | None = None,
) -> dict[str, ImageResult]:
    """Base and single-user image. ``mirror``: the Debian mirror written into the base image
    (so apt in users' image builds uses it too); ``pip_index_url``: the package index."""
    base = ensure_base_image(mirror=mirror)
    singleuser = ensure_singleuser_image(
        base.tag, ca_bundle=ca_bundle, source=source, pip_index_url=pip_index_url
    )
    return {"base": base, "singleuser": singleuser}


def stale_tags(tags: Iterable[str], repositories: Iterable[str], keep: Iterable[str]) -> list[str]:
    """The hash tags of `repositories` other than those to `keep` and the `:latest` alias."""
    repositories, keep = set(repositories), set(keep)
    stale = []
    for tag in tags:
        repository, _, name = tag.rpartition(":")
        if repository in repositories and name != ALIAS_TAG and tag not in keep:
            stale.append(tag)
    return sorted(stale)


def prune_images(
    keep: Iterable[str], repositories: Iterable[str] = (BASE_REPOSITORY, SINGLEUSER_REPOSITORY)
) -> dict[str, list[str]]:
    """Remove the older hash tags that each source change leaves behind. Never forced: Docker
    keeps an image that a container (running or stopped) or a user's own image is made from,
    and only untags one that still has another tag. Returns what was removed and what kept."""
    listing = subprocess.run(
        ["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    result: dict[str, list[str]] = {"removed": [], "kept": []}
    for tag in stale_tags(listing, repositories, keep):
        answer = subprocess.run(["docker", "rmi", tag], capture_output=True, text=True)
        if answer.returncode == 0:
            result["removed"].append(tag)
        else:
            reason = answer.stderr.strip().rpartition("Error response from daemon: ")[2]
            result["kept"].append(f"{tag} ({reason or 'docker refused'})")
    return result


# --------------------------------------------------------------------------------------------
# command line: `ds01hub bootstrap` and `python3 -m ds01hub.host.bootstrap`


def _ca_bundle_argument(value: str) -> Path | None:
    return None if value.lower() == "none" else Path(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "step",
        choices=("host", "venv", "images", "all"),
        help="host: Debian packages, configurable-http-proxy, the Docker engine; venv: the "
        "virtualenv with this project; images: base + single-user image; all: every step",
    )
    parser.add_argument(
        "--ca-bundle",
        type=_ca_bundle_argument,
        default=HOST_CA_BUNDLE,
        metavar="PEM|none",
        help="CA bundle copied into the single-user image for pip/HTTPS (sites behind a "
        "TLS-intercepting proxy need their site bundle); 'none' keeps the image's own "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--test-tools",
        action="store_true",
        help="also install what the browser and terminal tests drive (chromium, tmux)",
    )
    parser.add_argument("--source", type=Path, help="source checkout (default: this one)")
    parser.add_argument("--venv", type=Path, help="virtualenv path (default: SOURCE/.venv)")
    parser.add_argument(
        "--debian-mirror",
        default=os.environ.get("DS01HUB_DEBIAN_MIRROR") or None,
        metavar="URL",
        help="Debian mirror for the base image, kept in its apt sources for users' image builds "
        "(default: $DS01HUB_DEBIAN_MIRROR, else Debian's own)",
    )
    parser.add_argument(
        "--pip-index-url",
        default=os.environ.get("DS01HUB_PIP_INDEX_URL") or None,
        metavar="URL",
        help="package index or mirror for the single-user image, kept in its /etc/pip.conf for "
        "users' image builds and installs (default: $DS01HUB_PIP_INDEX_URL, else PyPI)",
    )
    parser.add_argument(
        "--prune",
        action="store_true",
        help="images step: then remove older ds01hub/base and ds01hub/singleuser hash tags "
        "that no container or user image needs (one is left behind by each source change)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    result: dict = {}
    try:
        if args.step in ("host", "all"):
            result["host"] = ensure_host(test_tools=args.test_tools)
        if args.step in ("venv", "all"):
            source = args.source or find_source()
            result["venv"] = ensure_venv(source, args.venv or source / ".venv")
        if args.step in ("images", "all"):
            images = ensure_images(
                args.ca_bundle, args.source, args.debian_mirror, args.pip_index_url
            )
            result["images"] = {name: asdict(image) for name, image in images.items()}
            if args.prune:
                result["pruned"] = prune_images(image.tag for image in images.values())
    except BootstrapError as error:
        print(render(error, "ds01hub bootstrap"), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, image in result.get("images", {}).items():
            state = "built" if image["built"] else "reused"
            print(f"{name} image: {image['tag']} ({state}), alias {image['alias']}")
        pruned = result.get("pruned", {})
        for tag in pruned.get("removed", ()):
            print(f"removed old image tag {tag}")
        for line in pruned.get("kept", ()):
            print(f"kept old image tag {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m ds01hub.host.bootstrap", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
