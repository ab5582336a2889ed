"""User images: use-case templates, strict package validation, Dockerfile rendering, builds.

One implementation for two front ends: the ``image-*`` commands on the host and the notebook
``ImageBuilder`` (through the hub-side service, the only part that talks to Docker).

A user image is built ``FROM`` the lab's single-user image (chosen by the admin, never by the
user) with extra pip and apt packages, and tagged ``ds01-{user}/{name}:latest``. Package names
end up in a Dockerfile, so they are validated strictly (letters, digits and the few characters
that package names and version pins need) *and* rendered without a shell where possible
(exec-form ``RUN [...]`` with JSON-encoded arguments): either measure alone stops injection.

Images carry ``ds01.image.*`` labels (owner, name, template, packages). They deliberately do
not use ``ds01.user`` / ``ds01.managed``: containers inherit image labels, and ownership of a
container must only ever come from the labels the spawner signs. No user input can add a
label: the rendered Dockerfile is checked to hold only the instructions ds01hub writes.

Site CA bundle: behind a TLS-intercepting proxy (common on university networks) pip and apt
inside the build must trust the site's CA. Pass
``ca_bundle=Path("/etc/ssl/certs/ca-certificates.crt")`` to :func:`build_image`: the bundle
is copied into the image and pip (``PIP_CERT``), requests, OpenSSL (``SSL_CERT_FILE``) and apt
(``Acquire::https::CAInfo``) are pointed at it.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import string
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import escapism

from ds01hub.errors import Ds01hubError
from ds01hub.units import utcnow

__all__ = [
    "CA_BUNDLE_IN_IMAGE",
    "TEMPLATES",
    "BuildEvent",
    "ImageError",
    "ImageInUseError",
    "ImageNotFoundError",
    "ImageQuotaError",
    "ImageSpec",
    "ImageTemplate",
    "UserImage",
    "build_image",
    "check_image_quota",
    "delete_user_image",
    "get_template",
    "image_labels",
    "image_repository",
    "image_tag",
    "list_templates",
    "list_user_images",
    "parse_package_list",
    "render_dockerfile",
    "spec_from_request",
    "validate_apt_package",
    "validate_image_name",
    "validate_pip_requirement",
]

#: Where a site CA bundle lands inside a built image.
CA_BUNDLE_IN_IMAGE = "/usr/local/share/ds01hub/ca-bundle.crt"

LABEL_PREFIX = "ds01.image."
MAX_PACKAGES = 100

# PEP 508 name, optional extras, optional comma-separated version specifiers. No spaces, no
# URLs, no markers, no options: nothing that pip or a shell could read as more than a package.
_PIP_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?"
_PIP_EXTRAS = rf"\[{_PIP_NAME}(?:,{_PIP_NAME})*\]"
_PIP_VERSION = r"(?:===|==|!=|<=|>=|~=|<|>)[A-Za-z0-9][A-Za-z0-9.*+!_-]{0,63}"
PIP_REQUIREMENT_RE = re.compile(
    rf"^{_PIP_NAME}(?:{_PIP_EXTRAS})?(?:{_PIP_VERSION}(?:,{_PIP_VERSION})*)?$"
)
# Debian policy: lowercase letters, digits, + - . ; at least two characters; optional =version.
APT_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,99}(?:=[A-Za-z0-9][A-Za-z0-9.+~:-]{0,63})?$")
# One docker repository path component, kept short.
IMAGE_NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_STEP_RE = re.compile(r"^Step (\d+)/(\d+) :")
# Terminal control sequences a build's tools print (pip's and apt's colours, cursor moves,
# window titles), which a stored log must not keep: a browser shows them as garbage, a
# terminal would obey them.
_TERMINAL_CODES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window titles, links
    r"|\x1b[ -/]*[0-~]?"  # other escapes (charset selection, ...)
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # other controls, C0 and C1 (tab and newline kept)
)


def plain_text(line: str) -> str:
    """A build log line as it should be stored and shown anywhere: without colour codes or
    other terminal controls, and, for a line redrawn with carriage returns (a progress bar),
    only its last state."""
    shown = line.rstrip("\r").rsplit("\r", 1)[-1]
    return _TERMINAL_CODES.sub("", shown)


class ImageError(Ds01hubError, ValueError):
    """An image request cannot be honoured; the message names the problem and the fix.
    `status` is the HTTP status that the ds01 service and the broker answer it with."""


class ImageNotFoundError(ImageError):
    """The user has no such image (or it is not theirs: the two are not told apart)."""

    status = 404


class ImageInUseError(ImageError):
    """The image cannot be removed now (a container uses it)."""

    status = 409


class ImageQuotaError(ImageError):
    """A new image would take the user over `max_images_per_user`."""

    status = 409


@dataclass(frozen=True)
class ImageTemplate:
    """A use-case starting point: packages installed on top of the single-user image."""

    key: str
    title: str
    description: str
    pip_packages: tuple[str, ...] = ()
    apt_packages: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "title": self.title,
            "description": self.description,
            "pip_packages": list(self.pip_packages),
            "apt_packages": list(self.apt_packages),
        }


TEMPLATES: Mapping[str, ImageTemplate] = {
    t.key: t
    for t in (
        ImageTemplate(
            "general",
            "General ML",
            "NumPy, pandas, scikit-learn, matplotlib and PyTorch for everyday machine learning.",
            ("numpy", "pandas", "scikit-learn", "matplotlib", "torch", "tqdm"),
            ("git",),
        ),
        ImageTemplate(
            "cv",
            "Computer Vision",
            "PyTorch with torchvision, OpenCV (headless), Pillow and albumentations.",
            ("numpy", "torch", "torchvision", "opencv-python-headless", "pillow", "albumentations"),
            ("git", "libgl1", "libglib2.0-0"),
        ),
        ImageTemplate(
            "nlp",
            "NLP",
            "Hugging Face transformers, datasets and tokenizers on PyTorch.",
            ("numpy", "torch", "transformers", "datasets", "tokenizers", "sentencepiece"),
            ("git",),
        ),
        ImageTemplate(
            "rl",
            "Reinforcement Learning",
            "Gymnasium and Stable-Baselines3 on PyTorch.",
            ("numpy", "torch", "gymnasium", "stable-baselines3", "tensorboard"),
            ("git", "swig"),
        ),
        ImageTemplate(
            "custom",
            "Custom",
            "Only the single-user image plus exactly the packages you list.",
        ),
    )
}


#: Rough download sizes (MB) of the packages that make a build heavy, by normalised name: PyTorch
#: from PyPI brings its CUDA libraries (cuDNN, cuBLAS, NCCL, ...), about 2.5 GB together on
#: Linux x86-64; TensorFlow about 0.6 GB. Estimates, for a warning before a build starts.
HEAVY_DOWNLOADS_MB: Mapping[str, int] = {"torch": 2500, "tensorflow": 600}
#: From this size on, a build is announced with its size and asked to be confirmed.
HEAVY_BUILD_MB = 1000


def download_estimate_mb(pip_packages: Iterable[str]) -> tuple[int, list[str]]:
    """The rough download of `pip_packages` (MB) and which of them make it heavy (those in
    `HEAVY_DOWNLOADS_MB`; the others count as small)."""
    heavy = []
    for requirement in pip_packages:
        match = re.match(_PIP_NAME, requirement.strip())
        name = re.sub(r"[-_.]+", "-", match.group(0)).lower() if match else ""
        if name in HEAVY_DOWNLOADS_MB and name not in heavy:
            heavy.append(name)
    return sum(HEAVY_DOWNLOADS_MB[name] for name in heavy), heavy


def list_templates() -> list[ImageTemplate]:
    """All templates, in the order a wizard shows them."""
    return list(TEMPLATES.values())


def get_template(key: str) -> ImageTemplate:
    """The template called ``key``; raise :class:`ImageError` naming the choices otherwise."""
    try:
        return TEMPLATES[key]
    except (KeyError, TypeError):
        raise ImageError(
            f"unknown image template {key!r}: choose one of {', '.join(TEMPLATES)}"
        ) from None


def validate_pip_requirement(text: str) -> str:
    """Return ``text`` if it is a plain pip requirement such as ``six``, ``torch==2.3.1`` or
    ``transformers[torch]>=4.40,<5``; raise :class:`ImageError` otherwise.

    URLs, local paths, options (``--index-url``), environment markers and whitespace are all
    refused: a requirement may only name a package from the configured index.
    """
    if not isinstance(text, str) or not PIP_REQUIREMENT_RE.match(text):
        raise ImageError(
            f"invalid pip package {text!r}: use a package name with an optional version pin, "
            "like 'six', 'torch==2.3.1' or 'transformers[torch]>=4.40' (no spaces, URLs, paths "
            "or options)"
        )
    return text


def validate_apt_package(text: str) -> str:
    """Return ``text`` if it is a Debian package name (optionally ``=version``), else raise."""
    if not isinstance(text, str) or not APT_PACKAGE_RE.match(text):
        raise ImageError(
            f"invalid apt package {text!r}: use a Debian package name such as 'libgl1' or "
            "'ffmpeg' (lowercase letters, digits, '+', '-', '.'), optionally '=version'"
        )
    return text


def validate_image_name(name: str) -> str:
    """Return ``name`` if usable as the image name in ``ds01-{user}/{name}``, else raise."""
    if not isinstance(name, str) or len(name) > 64 or not IMAGE_NAME_RE.match(name):
        raise ImageError(
            f"invalid image name {name!r}: use 1-64 lowercase letters and digits, optionally "
            "separated by single '.', '_' or '-' (for example 'thesis-cv')"
        )
    return name


def parse_package_list(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """Split user input (``"six, numpy==2.0\\nrich"`` or a list) into package strings.

    Only splits and de-duplicates; validation is separate so the caller can say which
    kind (pip or apt) was wrong.
    """
    if text is None:
        return ()
    items = re.split(r"[\s,]+", text) if isinstance(text, str) else list(text)
    if not isinstance(text, str) and not all(isinstance(item, str) for item in items):
        raise ImageError("package lists must contain strings only")
    cleaned = [item.strip() for item in items if item and item.strip()]
    return tuple(dict.fromkeys(cleaned))


def image_repository(user: str) -> str:
    """The user's image namespace ``ds01-{user}``, with the user name made Docker-safe.

    Characters other than lowercase letters and digits are escaped as ``-XX`` (hex), so two
    different users never share a namespace (``Alice`` -> ``ds01--41lice``).
    """
    if not user:
        raise ImageError("a user name is required to name an image")
    safe = set(string.ascii_lowercase + string.digits)
    return "ds01-" + escapism.escape(user, safe=safe, escape_char="-").lower()


def image_tag(user: str, name: str) -> str:
    """The full tag ``ds01-{user}/{name}:latest`` of a user's image."""
    return f"{image_repository(user)}/{validate_image_name(name)}:latest"


@dataclass(frozen=True)
class ImageSpec:
    """A build request: whose image, its name, the template and extra packages."""

    user: str
    name: str
    template: str = "custom"
    pip_packages: tuple[str, ...] = ()
    apt_packages: tuple[str, ...] = ()

    def validated(self) -> ImageSpec:
        """Check every field; raise :class:`ImageError` naming the first bad one."""
        validate_image_name(self.name)
        get_template(self.template)
        image_repository(self.user)
        pip = parse_package_list(self.pip_packages)
        apt = parse_package_list(self.apt_packages)
        if len(pip) + len(apt) > MAX_PACKAGES:
            raise ImageError(f"too many packages ({len(pip) + len(apt)}): at most {MAX_PACKAGES}")
        for requirement in pip:
            validate_pip_requirement(requirement)
        for package in apt:
            validate_apt_package(package)
        return ImageSpec(self.user, self.name, self.template, pip, apt)

    @property
    def tag(self) -> str:
        return image_tag(self.user, self.name)

    def all_pip_packages(self) -> tuple[str, ...]:
        """Template packages followed by the extra ones, without duplicates."""
        return tuple(dict.fromkeys(get_template(self.template).pip_packages + self.pip_packages))

    def all_apt_packages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(get_template(self.template).apt_packages + self.apt_packages))


BUILD_REQUEST_FIELDS = ("name", "template", "pip_packages", "apt_packages")


def spec_from_request(user: str, body: Mapping[str, object]) -> ImageSpec:
    """A build request as the notebook service and the CLI broker receive it (a JSON object)
    -> a validated ImageSpec for `user`, who comes from authentication, never from the body."""
    unknown = sorted(set(body) - set(BUILD_REQUEST_FIELDS))
    if unknown:
        raise ImageError(
            f"unknown field(s) {', '.join(unknown)}",
            hint=f"send {', '.join(BUILD_REQUEST_FIELDS[:-1])} and {BUILD_REQUEST_FIELDS[-1]}",
        )
    return ImageSpec(
        user=user,
        name=str(body.get("name") or ""),
        template=str(body.get("template") or "custom"),
        pip_packages=parse_package_list(body.get("pip_packages")),
        apt_packages=parse_package_list(body.get("apt_packages")),
    ).validated()


def check_image_quota(existing: Iterable[str], name: str, limit: int) -> None:
    """Building a new image name counts against `limit` (0: no limit); rebuilding one of the
    `existing` names never does."""
    names = set(existing)
    if limit and name not in names and len(names) >= limit:
        raise ImageQuotaError(
            f"you already have {len(names)} images, the limit is {limit}",
            hint="delete an image you no longer need (image-delete NAME) and try again",
        )


def render_dockerfile(
    spec: ImageSpec,
    base_image: str,
    *,
    base_user: str | None = None,
    ca_bundle: bool = False,
    pip_command: tuple[str, ...] = ("python3", "-m", "pip"),
) -> str:
    """The Dockerfile for ``spec`` (pure). ``spec`` is validated again here.

    Installs run as root (apt needs it, and the single-user image's Python environment is
    root-owned); the image's original ``base_user`` is restored at the end so containers do
    not run as root because of a custom image.
    """
    spec = spec.validated()
    lines = [f"FROM {base_image}", "USER root"]
    if ca_bundle:
        lines += [
            f"COPY ca-bundle.crt {CA_BUNDLE_IN_IMAGE}",
            f"ENV PIP_CERT={CA_BUNDLE_IN_IMAGE} SSL_CERT_FILE={CA_BUNDLE_IN_IMAGE} "
            f"REQUESTS_CA_BUNDLE={CA_BUNDLE_IN_IMAGE}",
            "RUN "
            + json.dumps(
                [
                    "/bin/sh",
                    "-c",
                    f"echo 'Acquire::https::CAInfo \"{CA_BUNDLE_IN_IMAGE}\";' "
                    "> /etc/apt/apt.conf.d/99ds01hub-ca",
                ]
            ),
        ]
    apt = spec.all_apt_packages()
    if apt:
        quoted = " ".join(shlex.quote(p) for p in apt)
        lines.append(
            "RUN export DEBIAN_FRONTEND=noninteractive && apt-get update && "
            f"apt-get install -y --no-install-recommends {quoted} && rm -rf /var/lib/apt/lists/*"
        )
    pip = spec.all_pip_packages()
    if pip:
        command = [*pip_command, "install", "--no-cache-dir", "--progress-bar", "off", *pip]
        lines.append("RUN " + json.dumps(command))
    if base_user and base_user != "root":
        lines.append(f"USER {_validated_base_user(base_user)}")
    return _checked_dockerfile("\n".join(lines) + "\n")


#: The instructions ds01hub writes. Anything else (a LABEL above all: an image's labels reach
#: every container made from it and every build step) could only come from injected input.
_INSTRUCTIONS = ("FROM ", "USER ", "COPY ", "ENV ", "RUN ")


def _checked_dockerfile(text: str) -> str:
    """`text` if each line is one instruction that ds01hub writes, else ImageError."""
    for line in text.splitlines():
        if not line.startswith(_INSTRUCTIONS) or line.endswith("\\"):
            raise ImageError(
                f"refusing to build: the Dockerfile would contain {line[:80]!r}, which "
                "ds01hub does not write (a package or image name carried an instruction)"
            )
    return text


def _validated_base_user(user: str) -> str:
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*$", user):
        raise ImageError(f"base image user {user!r} cannot be written into a Dockerfile")
    return user


def image_labels(
    spec: ImageSpec, base_image: str, *, now: datetime | None = None
) -> dict[str, str]:
    """The ``ds01.image.*`` labels recording owner, name, template and packages."""
    built_at = (now or utcnow()).isoformat(timespec="seconds")
    return {
        f"{LABEL_PREFIX}user": spec.user,
        f"{LABEL_PREFIX}name": spec.name,
        f"{LABEL_PREFIX}template": spec.template,
        f"{LABEL_PREFIX}pip": " ".join(spec.pip_packages),
        f"{LABEL_PREFIX}apt": " ".join(spec.apt_packages),
        f"{LABEL_PREFIX}base": base_image,
        f"{LABEL_PREFIX}built_at": built_at,
    }


def dockerfile_steps(dockerfile: str) -> int:
    """How many build steps a Dockerfile has (one per instruction line)."""
    return sum(1 for line in dockerfile.splitlines() if line.strip() and not line.startswith("#"))


def build_context(dockerfile: str, ca_bundle: Path | None = None) -> bytes:
    """An in-memory tar build context: the Dockerfile and, optionally, the CA bundle."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        _add_bytes(archive, "Dockerfile", dockerfile.encode())
        if ca_bundle is not None:
            _add_bytes(archive, "ca-bundle.crt", Path(ca_bundle).read_bytes())
    return buffer.getvalue()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class BuildEvent:
    """One step of a build as it streams.

    ``kind`` is ``"log"`` (a line of output), ``"step"`` (a Dockerfile step started; ``step``
    and ``total_steps`` set), ``"error"`` (the build failed; ``text`` says why) or ``"done"``
    (``image_id`` and ``tag`` set). ``progress`` is 0.0-1.0, for progress bars.
    """

    kind: str
    text: str = ""
    progress: float = 0.0
    step: int | None = None
    total_steps: int | None = None
    image_id: str | None = None
    tag: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class _Progress:
    step: int = 0
    total: int = 0
    #: The steps that do the work (our Dockerfile's instructions). Docker appends one LABEL
    #: step per build label; those are instant and must not eat the progress bar.
    work_steps: int | None = None
    image_id: str | None = None
    error: str | None = None

    @property
    def fraction(self) -> float:
        total = self.work_steps or self.total
        return min(self.step - 1, total) / total if total else 0.0


def build_events(
    chunks: Iterable[Mapping], tag: str, work_steps: int | None = None
) -> Iterator[BuildEvent]:
    """Turn Docker's decoded build stream into :class:`BuildEvent` s (pure).

    ``work_steps``: how many steps do real work (the Dockerfile's instructions); progress is
    measured against them, so the LABEL steps Docker appends do not distort it.
    """
    state = _Progress(work_steps=work_steps)
    for chunk in chunks:
        if "error" in chunk:
            state.error = plain_text(str(chunk.get("error", ""))).strip()
            yield BuildEvent("error", state.error, state.fraction)
            return
        if "aux" in chunk and isinstance(chunk["aux"], Mapping) and "ID" in chunk["aux"]:
            state.image_id = chunk["aux"]["ID"]
        for raw in str(chunk.get("stream", "")).split("\n"):
            line = plain_text(raw)
            if not line.strip():
                continue
            match = _STEP_RE.match(line)
            if match:
                state.step, state.total = int(match[1]), int(match[2])
                yield BuildEvent("step", line, state.fraction, state.step, state.total)
            else:
                yield BuildEvent("log", line, state.fraction)
    if state.image_id is None:
        yield BuildEvent("error", "the build ended without producing an image", state.fraction)
        return
    yield BuildEvent("done", f"built {tag}", 1.0, image_id=state.image_id, tag=tag)


def build_image(
    client,
    spec: ImageSpec,
    base_image: str,
    *,
    ca_bundle: Path | None = None,
    pip_command: tuple[str, ...] = ("python3", "-m", "pip"),
    memory_limit: int | None = None,
) -> Iterator[BuildEvent]:
    """Build ``spec`` on ``base_image`` with ``client`` (a ``docker.DockerClient``), yielding
    :class:`BuildEvent` s as the build runs. The last event is ``done`` or ``error``.

    ``ca_bundle``: a PEM file to trust inside the build (see the module docstring).
    ``memory_limit``: bytes of memory for the build's containers (``None``: unlimited).
    Raises :class:`ImageError` before building if the request or the base image is unusable.
    """
    import docker.errors

    spec = spec.validated()
    try:
        base_user = client.images.get(base_image).attrs.get("Config", {}).get("User") or None
    except docker.errors.ImageNotFound:
        raise ImageError(
            f"base image {base_image!r} is not present: build the single-user image first "
            "(ds01hub bootstrap) or configure another base image"
        ) from None
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise ImageError(f"CA bundle {ca_bundle} does not exist: fix the ca_bundle setting")
    dockerfile = render_dockerfile(
        spec,
        base_image,
        base_user=base_user,
        ca_bundle=ca_bundle is not None,
        pip_command=pip_command,
    )
    # memswap = memory: no swap on top, so a runaway build is stopped, not slowed to a crawl.
    limits = {"memory": memory_limit, "memswap": memory_limit} if memory_limit else None
    try:
        stream = client.api.build(
            fileobj=io.BytesIO(build_context(dockerfile, ca_bundle)),
            custom_context=True,
            tag=spec.tag,
            labels=image_labels(spec, base_image),
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            container_limits=limits,
        )
        yield from build_events(stream, spec.tag, work_steps=dockerfile_steps(dockerfile))
    except docker.errors.APIError as error:
        yield BuildEvent("error", f"Docker refused the build: {error.explanation or error}")


@dataclass(frozen=True)
class UserImage:
    """A user's image as listed to them."""

    name: str
    tag: str
    id: str
    template: str
    pip_packages: tuple[str, ...]
    apt_packages: tuple[str, ...]
    built_at: str
    size: int

    def to_dict(self) -> dict:
        data = dict(self.__dict__)
        data["pip_packages"] = list(self.pip_packages)
        data["apt_packages"] = list(self.apt_packages)
        return data


def list_user_images(client, user: str) -> list[UserImage]:
    """The images ``user`` built: owner label matches *and* the tag is in their namespace."""
    repository = image_repository(user) + "/"
    images = []
    for image in client.images.list(filters={"label": f"{LABEL_PREFIX}user={user}"}):
        labels = image.labels or {}
        if labels.get(f"{LABEL_PREFIX}user") != user:
            continue
        for tag in image.tags:
            if tag.startswith(repository):
                images.append(_user_image(image, tag, labels))
    return sorted(images, key=lambda i: i.name)


def _user_image(image, tag: str, labels: Mapping[str, str]) -> UserImage:
    return UserImage(
        name=tag[tag.index("/") + 1 : tag.rindex(":")],
        tag=tag,
        id=image.id,
        template=labels.get(f"{LABEL_PREFIX}template", ""),
        pip_packages=tuple(labels.get(f"{LABEL_PREFIX}pip", "").split()),
        apt_packages=tuple(labels.get(f"{LABEL_PREFIX}apt", "").split()),
        built_at=labels.get(f"{LABEL_PREFIX}built_at", ""),
        size=int(image.attrs.get("Size") or 0),
    )


def delete_user_image(client, user: str, name: str) -> str:
    """Remove ``user``'s image ``name`` (its tag); return the removed tag.

    Refuses an image that does not exist or is not theirs (:class:`ImageNotFoundError`) and one
    a container still uses (:class:`ImageInUseError`, with the fix in the message).
    """
    import docker.errors

    tag = image_tag(user, name)
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        raise ImageNotFoundError(f"you have no image called {name!r} ({tag})") from None
    if (image.labels or {}).get(f"{LABEL_PREFIX}user") != user:
        raise ImageNotFoundError(f"you have no image called {name!r} built through ds01 ({tag})")
    try:
        client.images.remove(tag)
    except docker.errors.APIError as error:
        if error.status_code == 409:
            raise ImageInUseError(
                f"image {tag} is used by a container: stop and remove that container first "
                f"({error.explanation})"
            ) from None
        raise ImageError(f"Docker could not remove {tag}: {error.explanation or error}") from None
    return tag
