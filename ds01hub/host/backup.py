"""Backups of the hub's state: ``ds01hub backup DIR`` and ``ds01hub restore DIR``.

What is in the state directory (``$DS01HUB_STATE_DIR``, /var/lib/ds01hub) is what a host would
lose: the JupyterHub database (users, groups, tokens, servers), the event log (GPU-hours), the
allocator's files (revocations, reservations), the culler's warnings, the GPU access grants,
the cookie secret, and the label key and deployment id (`ds01hub.provenance`: without them
every container is unmanaged). SQLite databases are copied with SQLite's online backup API
(``sqlite3.Connection.backup``), which gives a consistent copy while the hub keeps writing;
other files are copied as they are. Lock and pid files, WAL side files and sockets are left
out. With ``--config`` the site's /etc/ds01hub is saved (and restored) too.

A backup is a directory (mode 0700: it holds the cookie secret and tokens' hashes) with a
``manifest.json`` that lists every file with its size and SHA-256. ``restore`` checks the
manifest and each database's integrity first, refuses while the hub runs (stop it:
``systemctl stop ds01hub``), and writes databases back through the same backup API.

The containers themselves are not state: Docker's labels are the allocation truth, and users'
files live in their workspaces (back those up with the site's file backup).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ds01hub import __version__, paths
from ds01hub.errors import Ds01hubError, render

MANIFEST = "manifest.json"
FORMAT = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
SKIPPED_SUFFIXES = (".lock", ".pid", "-wal", "-shm", "-journal", ".tmp", ".sock")


class BackupError(Ds01hubError, RuntimeError):
    """A backup or restore cannot be done; the message says why and how to fix it."""

    status = 500  # the host's failure, not the caller's


@dataclass(frozen=True)
class Entry:
    """One saved file: where it came from (``area`` state/config), its name, kind and digest."""

    area: str
    name: str
    kind: str  # "sqlite" or "file"
    size: int
    sha256: str


def is_sqlite(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


def saved_files(directory: Path) -> list[Path]:
    """The regular files of a state or config directory worth saving (not locks, pids, WAL
    side files, sockets or temporary files; not subdirectories)."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.iterdir()
        if stat.S_ISREG(path.lstat().st_mode) and not path.name.endswith(SKIPPED_SUFFIXES)
    )


def sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a (live) SQLite database through the online backup API, checked."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        with contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)
    finally:
        src.close()
    check_integrity(target)


def check_integrity(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise BackupError(f"{path} is not a usable SQLite database: {error}") from None
    if result != "ok":
        raise BackupError(f"{path} failed SQLite's integrity check: {result}")


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def backup(state_dir: Path, target: Path, config_dir: Path | None = None) -> dict:
    """Save ``state_dir`` (and ``config_dir``) into the new directory ``target``."""
    if not state_dir.is_dir():
        raise BackupError(f"state directory {state_dir} does not exist (--state-dir)")
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty: give a new directory for each backup")
    areas = {"state": state_dir} | ({"config": config_dir} if config_dir else {})
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target, 0o700)
    entries: list[Entry] = []
    for area, directory in areas.items():
        (target / area).mkdir(mode=0o700, exist_ok=True)
        for path in saved_files(directory):
            copy = target / area / path.name
            kind = "sqlite" if is_sqlite(path) else "file"
            if kind == "sqlite":
                sqlite_copy(path, copy)
            else:
                shutil.copyfile(path, copy)
            os.chmod(copy, 0o600)
            entries.append(Entry(area, path.name, kind, copy.stat().st_size, digest(copy)))
    manifest = {
        "format": FORMAT,
        "ds01hub": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": {area: str(directory) for area, directory in areas.items()},
        "files": [vars(e) for e in entries],
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(source: Path) -> list[Entry]:
    """The backup's entries, each checked against its size and digest."""
    try:
        manifest = json.loads((source / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{source}: backup format {manifest.get('format')!r} is unknown")
        entries = [Entry(**e) for e in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BackupError(f"{source} is not a ds01hub backup ({error})") from None
    for entry in entries:
        if entry.area not in ("state", "config") or Path(entry.name).name != entry.name:
            raise BackupError(f"{source}: manifest entry {entry.area}/{entry.name!r} is invalid")
        path = source / entry.area / entry.name
        if not path.is_file() or path.stat().st_size != entry.size or digest(path) != entry.sha256:
            raise BackupError(f"{path} does not match the manifest (changed or damaged)")
        if entry.kind == "sqlite":
            check_integrity(path)
    return entries


def hub_running(state_dir: Path) -> int | None:
    """The pid of a JupyterHub using ``state_dir`` (its pid file names a live jupyterhub)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((state_dir / "jupyterhub.pid").read_text().strip())
        if b"jupyterhub" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def restore(source: Path, state_dir: Path, config_dir: Path | None = None) -> dict:
    """Put a backup back: the state (and with ``config_dir`` the config). The hub must be
    stopped."""
    entries = read_manifest(source)
    pid = hub_running(state_dir)
    if pid:
        raise BackupError(
            f"JupyterHub (pid {pid}) is running on {state_dir}: stop it first "
            "(systemctl stop ds01hub, or make demo-stop), then restore"
        )
    targets = {"state": state_dir} | ({"config": config_dir} if config_dir else {})
    restored = []
    for entry in entries:
        if entry.area not in targets:
            continue
        directory = targets[entry.area]
        directory.mkdir(parents=True, exist_ok=True, mode=0o700 if entry.area == "state" else 0o755)
        backup_file, target = source / entry.area / entry.name, directory / entry.name
        if entry.kind == "sqlite":
            for side in ("-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{target}{side}").unlink()
            sqlite_copy(backup_file, target)
        else:
            temporary = target.with_name(f".{target.name}.restore")
            shutil.copyfile(backup_file, temporary)
            os.replace(temporary, target)
        os.chmod(target, 0o600)
        restored.append(str(target))
    return {"restored": restored}


# --------------------------------------------------------------------------------------------
# command line


def _state_dir(args: argparse.Namespace) -> Path:
    return paths.state_dir(args.state_dir)


def _config_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.config_dir) if args.config else None


def run_backup(args: argparse.Namespace) -> int:
    try:
        manifest = backup(_state_dir(args), Path(args.directory), _config_dir(args))
    except (BackupError, OSError, sqlite3.Error) as error:
        print(render(error, "ds01hub backup"), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        for entry in manifest["files"]:
            print(f"saved {entry['area']}/{entry['name']} ({entry['kind']}, {entry['size']} B)")
        print(f"backup in {args.directory} (restore: ds01hub restore {args.directory})")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    try:
        result = restore(Path(args.directory), _state_dir(args), _config_dir(args))
    except (BackupError, OSError, sqlite3.Error) as error:
        print(render(error, "ds01hub restore"), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(f"restored {path}" for path in result["restored"]))
    return 0
