"""`ds01hub backup` / `restore`: SQLite's online backup of live databases (a writer keeps
writing meanwhile), the other state files, checks before restoring, and the hub-running
refusal."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ds01hub.gpu.eventlog import EventLog
from ds01hub.host import backup


def make_state(state):
    state.mkdir()
    with contextlib.closing(sqlite3.connect(state / "jupyterhub.sqlite")) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('alice')")
        db.commit()
    EventLog(state / "events.db").record("allocate", "alice", slot="0", container="c1")
    (state / "revoked.json").write_text('{"c1": []}\n')
    (state / "jupyterhub_cookie_secret").write_bytes(os.urandom(32))
    (state / "allocator.lock").write_text("")
    (state / "jupyterhub.pid").write_text("1\n")


def users(path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [row[0] for row in db.execute("SELECT name FROM users ORDER BY name")]


def test_backup_and_restore_round_trip_while_a_writer_keeps_writing(tmp_path):
    state, saved = tmp_path / "state", tmp_path / "backup"
    make_state(state)
    stop = threading.Event()

    def writer():
        with contextlib.closing(sqlite3.connect(state / "jupyterhub.sqlite")) as db:
            n = 0
            while not stop.is_set():
                db.execute("INSERT INTO users VALUES (?)", (f"w{n:05d}",))
                db.commit()
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        manifest = backup.backup(state, saved)
    finally:
        stop.set()
        thread.join()
    names = {entry["name"]: entry["kind"] for entry in manifest["files"]}
    assert names == {
        "jupyterhub.sqlite": "sqlite",
        "events.db": "sqlite",
        "revoked.json": "file",
        "jupyterhub_cookie_secret": "file",
    }  # no lock or pid files
    assert oct(saved.stat().st_mode & 0o777) == "0o700"
    saved_users = users(saved / "state" / "jupyterhub.sqlite")
    # one consistent snapshot: alice, then the writer's rows w00000.. with no gap
    assert saved_users[0] == "alice"
    assert saved_users[1:] == [f"w{n:05d}" for n in range(len(saved_users) - 1)]

    # the host loses its state; the backup brings it back
    (state / "jupyterhub.pid").unlink()
    for name in ("jupyterhub.sqlite", "events.db", "revoked.json"):
        (state / name).unlink()
    backup.restore(saved, state)
    assert users(state / "jupyterhub.sqlite") == saved_users
    assert (state / "revoked.json").read_text() == '{"c1": []}\n'
    assert [e.user for e in EventLog(state / "events.db").events()] == ["alice"]


def test_restore_checks_the_backup_and_refuses_a_running_hub(tmp_path):
    state, saved = tmp_path / "state", tmp_path / "backup"
    make_state(state)
    backup.backup(state, saved)
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.backup(state, saved)
    (saved / "state" / "revoked.json").write_text("tampered\n")
    with pytest.raises(backup.BackupError, match="does not match the manifest"):
        backup.restore(saved, state)
    (saved / "state" / "revoked.json").write_text('{"c1": []}\n')
    sleeper = subprocess.Popen(["bash", "-c", "exec -a jupyterhub sleep 60"])
    try:
        # bash replaces itself with the renamed sleep a moment later: wait for that (bounded).
        # bash's own command line names jupyterhub too, so wait for it as argv[0].
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{sleeper.pid}/cmdline").read_bytes().startswith(b"jupyterhub\0"):
            assert time.monotonic() < deadline, "the stand-in hub process never started"
            time.sleep(0.01)
        (state / "jupyterhub.pid").write_text(f"{sleeper.pid}\n")
        with pytest.raises(backup.BackupError, match=f"pid {sleeper.pid}.*stop it first"):
            backup.restore(saved, state)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_commands_report_errors_by_name(tmp_path):
    command = [sys.executable, "-m", "ds01hub.cli.admin"]
    missing = subprocess.run(
        [*command, "backup", str(tmp_path / "b"), "--state-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 1 and "state directory" in missing.stderr
    state = tmp_path / "state"
    make_state(state)
    made = subprocess.run(
        [*command, "backup", str(tmp_path / "b"), "--state-dir", str(state), "--json"],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["format"] == backup.FORMAT
    bad = subprocess.run(
        [*command, "restore", str(tmp_path), "--state-dir", str(state)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "is not a ds01hub backup" in bad.stderr
