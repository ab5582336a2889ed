"""Label provenance: which container labels ds01hub itself wrote, and for which deployment.

Docker labels are not a trustworthy record on their own: the engine merges an image's labels
into every container made from it (for each key the create request leaves unset), and the
classic builder runs each RUN step in a container that carries the labels of the Dockerfile's
earlier LABEL lines. Anyone who can build an image can therefore make containers that *claim*
``ds01.user=<someone else>`` or ``ds01.gpus=0``.

So every container ds01hub creates is signed: ``ds01.signature`` is an HMAC-SHA256, under a
secret key only root on the host can read, over the container's name and the canonical
label fields (`labels.SIGNED_KEYS`: deployment, user, project, group, priority, GPU slots and
UUIDs, image, creation time, the owner tag and the AIME compatibility copies). A reader
believes a container's ownership and GPU labels only when `Provenance.verify` says that
signature is right for *this* container name and *this* deployment. The name is covered
because names are unique on an engine: a signed label set copied into an image (or onto
another container) does not verify on any other container.

One hub = one deployment id (``ds01.deployment``): quotas, holdings, status, the culler, the
lifecycle pass, the admin page, metrics and the broker see only their own deployment's
containers, so two hubs (or a test run) on one engine never see each other's.

Where they live (the one source of truth, read by `load` in every ds01hub process: hub and
spawner, broker, ds01 service, ds01-ops, ``ds01hub status/cull``, the socket proxy): the state
directory (``$DS01HUB_STATE_DIR``, default /var/lib/ds01hub) holds

- ``label-key``: 64 hex digits, created on first use with mode 0600 (root on a real host);
- ``deployment``: the deployment id, created on first use as ``<hostname>-<6 hex>``. An admin
  may write a name of their own there before the hub first starts (changing it later makes
  every existing container invisible: it is part of each signature).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ds01hub import labels, paths
from ds01hub.errors import Ds01hubError

__all__ = [
    "DEPLOYMENT_FILE",
    "KEY_FILE",
    "Provenance",
    "ProvenanceError",
    "load",
    "service_environment",
]

KEY_FILE = "label-key"
DEPLOYMENT_FILE = "deployment"
#: Prefix of the signature value: a later scheme gets a new one, never a new meaning of this.
SCHEME = "v1"
DEPLOYMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


class ProvenanceError(Ds01hubError, RuntimeError):
    """The label key or deployment id cannot be used; the message names the file and the fix."""

    status = 500  # the host's failure, not the caller's


def service_environment(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """A managed service's environment, with the hub's `$DS01HUB_STATE_DIR` when it has one:
    JupyterHub starts services with a bare environment, and a service given no state directory
    must still read the hub's label key and deployment id."""
    inherited = os.environ.get(paths.ENV_STATE_DIR)
    return ({paths.ENV_STATE_DIR: inherited} if inherited else {}) | dict(environment or {})


@dataclass(frozen=True)
class Provenance:
    """One deployment's signing key: signs the labels ds01hub writes, verifies what it reads."""

    deployment: str
    key: bytes = field(repr=False)

    def sign(self, values: Mapping[str, str], name: str) -> dict[str, str]:
        """`values` plus the deployment, owner tag and signature, for container `name`.

        Every signed key is set (empty when `values` lacks it), so the create request names
        each of them explicitly and an image's labels can fill in none.
        """
        signed = {key: "" for key in labels.SIGNED_KEYS} | {k: str(v) for k, v in values.items()}
        signed[labels.DEPLOYMENT] = self.deployment
        signed[labels.OWNER] = self.owner_tag(signed[labels.USER])
        signed[labels.SIGNATURE] = self._mac(signed, name)
        return signed

    def verify(self, values: Mapping[str, str] | None, name: str) -> bool:
        """Whether ds01hub of this deployment signed exactly these fields for `name`."""
        if not values or values.get(labels.DEPLOYMENT) != self.deployment:
            return False
        given = values.get(labels.SIGNATURE)
        if not isinstance(given, str) or not values.get(labels.USER):
            return False
        return hmac.compare_digest(given.encode(), self._mac(values, name).encode())

    def owner_tag(self, user: str) -> str:
        """A per-user tag (``ds01.owner``) that only the key holder can compute: Docker-side
        filters on it (the socket proxy's container list and event stream) drop containers
        that merely claim a user, before any full verification."""
        message = json.dumps([SCHEME, "owner", self.deployment, user]).encode()
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()[:32]

    def record_signature(self, kind: str, fields: Iterable[str]) -> str:
        """A signature over a record ds01hub keeps outside container labels (`kind` names
        what it is, e.g. "image": `ds01hub.actions.registry`), for this deployment: the same
        fields under another kind or deployment never verify."""
        message = json.dumps(
            [SCHEME, kind, self.deployment, list(fields)], ensure_ascii=True, separators=(",", ":")
        ).encode()
        return f"{SCHEME}:{hmac.new(self.key, message, hashlib.sha256).hexdigest()}"

    def verify_record(self, kind: str, fields: Iterable[str], given: object) -> bool:
        """Whether `given` is `record_signature(kind, fields)`."""
        if not isinstance(given, str):
            return False
        expected = self.record_signature(kind, fields)
        return hmac.compare_digest(given.encode(), expected.encode())

    def label_filters(self, extra: Iterable[str] = ()) -> list[str]:
        """Engine-side ``label`` filters for this deployment's managed containers (a
        pre-selection only: what the engine returns is still verified)."""
        return [f"{labels.MANAGED}=true", f"{labels.DEPLOYMENT}={self.deployment}", *extra]

    def _mac(self, values: Mapping[str, str], name: str) -> str:
        fields = [values.get(key) for key in labels.SIGNED_KEYS]
        message = json.dumps(
            [SCHEME, name.removeprefix("/"), fields], ensure_ascii=True, separators=(",", ":")
        ).encode()
        return f"{SCHEME}:{hmac.new(self.key, message, hashlib.sha256).hexdigest()}"


def load(state_dir: str | os.PathLike | None = None) -> Provenance:
    """This host's deployment id and label key from `state_dir` (default
    `paths.state_dir()`), each created on first use. Raises ProvenanceError."""
    directory = paths.state_dir(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise ProvenanceError(
            f"cannot create the state directory {directory}: {error}; "
            f"run as root or point ${paths.ENV_STATE_DIR} at a writable directory"
        ) from None
    key = _read_or_create(directory / KEY_FILE, secrets.token_hex(32), secret=True)
    if not _KEY_RE.match(key):
        raise ProvenanceError(
            f"{directory / KEY_FILE} is not 64 hex digits: remove it (every container "
            "signed with it becomes unmanaged) or restore it from a backup"
        )
    deployment = _read_or_create(directory / DEPLOYMENT_FILE, _new_deployment_id(), secret=False)
    if not DEPLOYMENT_RE.match(deployment):
        raise ProvenanceError(
            f"{directory / DEPLOYMENT_FILE}: deployment id {deployment[:80]!r} must be 1-63 "
            "letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return Provenance(deployment, bytes.fromhex(key))


def _new_deployment_id() -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:40] or "ds01"
    return f"{host}-{secrets.token_hex(3)}"


def secret_file(path: Path) -> str:
    """A random token kept in `path` (mode 0600; made atomically on first use): a service
    token the hub's configuration and the process that uses it both read."""
    return _read_or_create(path, secrets.token_hex(32), secret=True)


def _read_or_create(path: Path, initial: str, *, secret: bool) -> str:
    """The file's first line; created with `initial` when missing. Creation is atomic (a
    complete file is hard-linked into place), so processes starting together agree."""
    try:
        return _read(path, secret)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(initial + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: it wins
            os.link(tmp, path)
    except OSError as error:
        raise ProvenanceError(f"cannot create {path}: {error}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path, secret)


def _read(path: Path, secret: bool) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ProvenanceError(
            f"cannot read {path}: {error} (run as root; it must be a plain file, not a link)"
        ) from None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if secret and info.st_uid not in (0, os.geteuid()):
            raise ProvenanceError(
                f"{path} belongs to uid {info.st_uid}, not to root: remove it and let "
                "ds01hub create a new one (containers signed with it become unmanaged)"
            )
        if secret and info.st_mode & 0o077:
            raise ProvenanceError(
                f"{path} is readable by others (mode {info.st_mode & 0o777:o}): "
                f"run chmod 600 {path}; anyone who read it can forge container labels, "
                "so replace it if that may have happened"
            )
        text = handle.read(256).strip()
    return text.splitlines()[0] if text else ""
