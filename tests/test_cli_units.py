"""Fast unit tests of the users' commands: parsing, names, formatting, the pure halves of the
hub client, the broker's identity rules and the container views. No Docker, no hub."""

from __future__ import annotations

import io
import json
import struct
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from ds01hub import peer
from ds01hub.actions import names, operations
from ds01hub.cli import output
from ds01hub.cli.terminal import FrameDecoder
from ds01hub.cli.user import backends, context, remote, views
from ds01hub.cli.user import commands as user
from ds01hub.hub.client import hub_error_message, parse_sse, server_path
from ds01hub.services.broker import app as broker

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(name: str, argv: list[str], backend=None, stdin: io.StringIO | None = None):
    """Run one command with captured streams; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = user.run_command(
        user.COMMANDS[name],
        argv,
        stdout=out,
        stderr=err,
        stdin=stdin or io.StringIO(""),
        make_backend=lambda _act_for: backend,
    )
    return code, out.getvalue(), err.getvalue()


# ---- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "my-project", "proj_2", "0abc", "x" * 63])
def test_valid_names_are_accepted(name):
    assert operations.validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Proj", "my project", "a.b", "proj._.bob", "-x", "_x", "x" * 64, "é", "a/b"]
)
def test_bad_names_are_refused_with_the_rule_and_a_suggestion(name):
    with pytest.raises(operations.OperationError) as info:
        operations.validate_name(name)
    assert "lowercase letters, digits, '-' and '_'" in info.value.message
    suggestion = info.value.hint.split("'")[1]
    assert names.NAME_RE.match(suggestion)


def test_bad_name_on_the_command_line_exits_2_and_says_why(capsys):
    with pytest.raises(SystemExit) as info:
        user.build_parser(user.COMMANDS["container-stop"]).parse_args(["My.Proj"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "bad container name 'My.Proj'" in err and "'my-proj'" in err


def test_other_users_container_name_is_not_a_valid_name():
    # the `{project}._.{user}` docker name of someone else's container never passes
    with pytest.raises(operations.OperationError):
        operations.validate_name("thesis._.bob")


# ---- spawn options ---------------------------------------------------------------------------


def test_spawn_options_keep_known_keys_and_reuse_when_empty():
    assert operations.spawn_options({}) is None
    assert operations.spawn_options({"image": "x", "gpus": None}) == {"image": "x"}
    with pytest.raises(operations.OperationError, match="unknown spawn option"):
        operations.spawn_options({"privileged": True})
    with pytest.raises(operations.OperationError, match="not both"):
        operations.spawn_options({"gpus": 1, "mig": "1g.10gb"})


def test_gpus_and_mig_are_mutually_exclusive_on_the_command_line(capsys):
    parser = user.build_parser(user.COMMANDS["container-create"])
    args = parser.parse_args(["p", "--gpus", "2", "--image", "img"])
    assert context.spawn_options_from(args) == {"gpus": 2, "image": "img"}
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "--gpus", "1", "--mig", "1g.10gb"])
    with pytest.raises(SystemExit):
        parser.parse_args(["p", "--gpus", "-1"])


def test_project_and_server_names_map_both_ways():
    assert operations.project_to_server("default") == ""
    assert operations.project_to_server("thesis") == "thesis"
    assert operations.server_to_project("") == "default"


# ---- output ----------------------------------------------------------------------------------


def test_table_aligns_and_colours_only_when_asked():
    rows = [{"a": "x", "b": ["0", "1"]}, {"a": "longer", "b": None}]
    cols = (output.Column("A", "a"), output.Column("B", "b", lambda v: "green"))
    plain = output.render_table(rows, cols, colour=False)
    assert plain.splitlines() == ["A       B", "x       0,1", "longer  -"]
    assert "\033[" not in plain
    assert "\033[32m" in output.render_table(rows, cols, colour=True)


def test_colour_only_on_a_tty(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert output.use_colour(FakeTTY())
    assert not output.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not output.use_colour(FakeTTY())


# ---- commands with a scripted backend ---------------------------------------------------------


class ScriptedBackend:
    """Records calls; answers like the broker would. A test double for the transport only."""

    def __init__(self, containers=None, warnings=(), started="running", stopped=None):
        self.calls = []
        self.containers = containers or []
        self.warnings = list(warnings)
        self.started = started  # the state the final view of a start reports
        self.stopped = stopped or {"state": "stopped", "held_until": None}

    def cull_warnings(self):
        return self.warnings

    def list_containers(self, include_stopped):
        self.calls.append(("list", include_stopped))
        return [c for c in self.containers if include_stopped or c["state"] != "stopped"]

    def describe(self, project):
        self.calls.append(("describe", project))
        for c in self.containers:
            if c["project"] == project:
                return {**c, "processes": 7}
        raise output.CliError(f"you have no container named {project!r}")

    def stop(self, project, timeout, force):
        self.calls.append(("stop", project, timeout, force))
        return {"project": project, **self.stopped}

    def start(self, project, options, create):
        self.calls.append(("start", project, options, create))
        yield {"event": "progress", "progress": 50, "message": "waiting for a GPU"}
        yield {
            "event": "ready",
            "container": {"project": project, "state": self.started, "gpus": ["0"]},
        }

    def remove(self, project, force):
        self.calls.append(("remove", project, force))
        return {"project": project, "removed": True, "already_gone": True}

    def cleanup(self, include_running):
        self.calls.append(("cleanup", include_running))
        return [
            {"project": "old", "removed": True, "already_gone": False},
            {"project": "gone", "removed": True, "already_gone": True},
            {"project": "stuck", "removed": False, "error": "the hub said: no", "hint": "ask"},
        ]


def view(project, state="running", **extra):
    base = {
        "project": project,
        "state": state,
        "image": "ds01/singleuser",
        "gpus": [],
        "gpus_released": False,
        "uptime_s": 3700 if state == "running" else None,
        "stopped_for_s": None if state == "running" else 120,
        "idle_s": 60 if state == "running" else None,
        "held_until": None,
        "id": "abc",
    }
    return {**base, **extra}


def test_container_list_table_and_json():
    backend = ScriptedBackend(
        [
            view("thesis", gpus=["0:1"]),
            view("old", "stopped", gpus=["1"], held_until="2026-11-23T10:00:00Z"),
        ]
    )
    code, out, _ = run("container-list", ["--all"], backend)
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == [
        "PROJECT",
        "STATE",
        "IMAGE",
        "GPUS",
        "UPTIME",
        "IDLE",
        "HELD",
        "UNTIL",
    ]
    assert "thesis" in lines[0] and "up 1h 1m" in lines[0] and "0:1" in lines[0]
    assert "stopped 2m" in lines[1] and "2026-11-23 10:00 UTC" in lines[1]
    code, out, _ = run("container-list", ["--json"], backend)
    assert code == 0 and [r["project"] for r in json.loads(out)] == ["thesis"]
    assert backend.calls[-1] == ("list", False)


def test_container_stop_refuses_to_prompt_without_a_tty():
    backend = ScriptedBackend([view("thesis")])
    code, out, err = run("container-stop", ["thesis"], backend)
    assert code == 2
    assert "not asking without a terminal" in err and "-y" in err
    assert "up 1h 1m, 7 processes" in err
    assert not any(c[0] == "stop" for c in backend.calls)


def test_container_stop_asks_on_a_tty_and_honours_no():
    backend = ScriptedBackend([view("thesis")])
    code, _, err = run("container-stop", ["thesis"], backend, stdin=FakeTTY("n\n"))
    assert code == 1 and "Not stopped" in err
    assert not any(c[0] == "stop" for c in backend.calls)
    code, out, _ = run(
        "container-stop", ["thesis", "--timeout", "5"], backend, stdin=FakeTTY("y\n")
    )
    assert code == 0 and "thesis stopped" in out
    assert ("stop", "thesis", 5.0, False) in backend.calls


def test_container_stop_with_yes_needs_no_terminal():
    backend = ScriptedBackend([view("thesis")])
    code, _, _ = run("container-stop", ["thesis", "-y", "--force"], backend)
    assert code == 0 and ("stop", "thesis", None, True) in backend.calls


def test_container_create_shows_progress_on_stderr_and_result_on_stdout():
    backend = ScriptedBackend()
    code, out, err = run("container-create", ["thesis", "--gpus", "1"], backend)
    assert code == 0
    assert "[ 50%] waiting for a GPU" in err
    assert "thesis created and started" in out and "GPUs: 0" in out
    assert backend.calls == [("start", "thesis", {"gpus": 1}, True)]


def test_a_start_that_did_not_start_is_an_error():
    code, out, err = run("container-start", ["thesis"], ScriptedBackend(started="stopped"))
    assert code == 1 and "thesis did not start: it is stopped" in err
    assert "running" not in out

    class Silent(ScriptedBackend):
        def start(self, project, options, create):
            yield {"event": "progress", "progress": 10, "message": "asking the hub"}

    code, out, err = run("container-create", ["thesis"], Silent())
    assert code == 1 and "stopped answering before it said how this ended" in err
    assert out == ""


def test_a_stop_says_what_it_left():
    removed = {"state": "stopped", "removed": True, "held_until": None}
    code, out, _ = run(
        "container-stop", ["thesis", "-y"], ScriptedBackend([view("thesis")], stopped=removed)
    )
    assert code == 0 and "thesis stopped and removed" in out and "GPUs are free" in out
    stopping = {"state": "stopping", "held_until": None}
    code, out, _ = run(
        "container-stop", ["thesis", "-y"], ScriptedBackend([view("thesis")], stopped=stopping)
    )
    assert code == 0 and "thesis is stopping" in out
    running = {"state": "running", "held_until": None}
    code, out, err = run(
        "container-stop", ["thesis", "-y"], ScriptedBackend([view("thesis")], stopped=running)
    )
    assert code == 1 and "thesis did not stop: it is running" in err and out == ""


def test_remove_and_cleanup_report_each_container_truthfully():
    code, out, _ = run("container-remove", ["thesis", "-y"], ScriptedBackend())
    assert code == 0 and "already been removed" in out
    backend = ScriptedBackend(
        [view("old", "stopped"), view("gone", "stopped"), view("stuck", "stopped")]
    )
    code, out, err = run("container-cleanup", ["-y"], backend)
    assert code == 1  # one of three failed: not a success
    assert "Removed 2 container(s)" in out and "gone: already gone" in out
    assert "error: stuck not removed: the hub said: no" in err and "hint: ask" in err


def test_container_create_without_a_name_is_a_usage_error():
    code, _, err = run("container-create", [], ScriptedBackend())
    assert code == 2 and "needs a NAME" in err


def test_failure_from_the_backend_exits_1_with_hint():
    class Refusing(ScriptedBackend):
        def start(self, project, options, create):
            raise output.CliError("over quota: 2 of 2 GPUs in use", hint="stop a container")

    code, _, err = run("container-create", ["thesis", "--gpus", "3"], Refusing())
    assert code == 1 and "error: over quota" in err and "hint: stop a container" in err


def test_pending_cull_warnings_follow_the_command_on_stderr():
    message = "Your container 'thesis' will be stopped at 2026-11-22 13:00 UTC (idle 2h)."
    backend = ScriptedBackend([view("thesis")], warnings=[{"message": message}])
    code, out, err = run("container-list", ["--json"], backend)
    assert code == 0 and json.loads(out)[0]["project"] == "thesis"
    assert err == f"warning: {message}\n"

    class Refusing(ScriptedBackend):
        def start(self, project, options, create):
            raise output.CliError("over quota")

    code, _, err = run("container-create", ["x"], Refusing(warnings=[{"message": message}]))
    assert code == 1 and err.splitlines() == ["error: over quota", f"warning: {message}"]


def test_a_broker_without_warnings_never_fails_the_command():
    class Old(ScriptedBackend):
        def cull_warnings(self):
            raise output.CliError("no such endpoint /api/warnings")

    code, out, err = run("container-list", [], Old([view("thesis")]))
    assert code == 0 and "thesis" in out and err == ""


def test_container_exit_explains_exit_versus_stop():
    code, out, _ = run("container-exit", [], None)
    assert code == 0 and "keeps running" in out and "container-stop NAME" in out


def test_dispatcher_runs_the_same_commands(capsys):
    assert user.container(["--help"]) == 0
    assert "create" in capsys.readouterr().out
    assert user.container(["bogus"]) == 2
    with pytest.raises(SystemExit) as info:
        user.container(["stop", "--help"])
    assert info.value.code == 0
    assert "usage: container stop" in capsys.readouterr().out


def test_console_scripts_table_matches_the_commands():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in user.COMMANDS:
        target = scripts[name]
        module, _, function = target.partition(":")
        assert module == "ds01hub.cli.user.commands"
        assert getattr(user, function).__doc__ == user.COMMANDS[name].help
    assert scripts["container"] == "ds01hub.cli.user.commands:container"
    assert scripts["image"] == "ds01hub.cli.user.commands:image"


# ---- hub client (pure parts) -----------------------------------------------------------------


def test_server_paths_escape_names():
    assert server_path("alice") == "/users/alice/server"
    assert server_path("alice", "thesis") == "/users/alice/servers/thesis"
    assert server_path("a/b", "x y") == "/users/a%2Fb/servers/x%20y"


def test_parse_sse_keeps_partial_events_and_skips_keepalives():
    events, rest = parse_sse('data: {"progress": 10}\n\n\n\ndata: {"progr')
    assert events == [{"progress": 10}] and rest == 'data: {"progr'
    events, rest = parse_sse(rest + 'ess": 100, "ready": true}\n\n')
    assert events == [{"progress": 100, "ready": True}] and rest == ""


def test_hub_error_message():
    assert hub_error_message(b'{"status": 400, "message": "nope"}', "x") == "nope"
    assert hub_error_message(b"<html>", "fallback") == "fallback"


# ---- broker: whom a request acts for ------------------------------------------------------------


def caller(uid, name, admin=False):
    return broker.Caller(uid, uid, name, f"/home/{name}", (name,), admin)


UNIX_NAMES = {"root": 0, "bob": 1002, "carol": 1003, "Alice": 1004}


def lookup_name(name):
    if name not in UNIX_NAMES:
        raise KeyError(name)
    return SimpleNamespace(pw_name=name, pw_uid=UNIX_NAMES[name])


def acting_for(who, requested=None):
    return broker.acting_for(who, requested, 1000, lookup_name)


def test_a_user_acts_for_themselves_only():
    bob = caller(1002, "bob")
    assert acting_for(bob) == "bob"
    assert acting_for(bob, "bob") == "bob"
    with pytest.raises(operations.OperationError) as info:
        acting_for(bob, "carol")
    assert info.value.status == 403 and "only admins" in info.value.message


def test_admins_and_root_may_act_for_another_user_by_the_name_rule():
    carol = caller(1003, "carol", admin=True)
    assert acting_for(carol, "bob") == "bob"
    assert acting_for(caller(0, "root", admin=True), "bob") == "bob"
    with pytest.raises(operations.OperationError, match="root acts for users"):
        acting_for(caller(0, "root", admin=True))
    with pytest.raises(peer.IdentityError, match="no Unix user named 'mallory'"):
        acting_for(carol, "mallory")
    # never folded: 'Alice' is not a hub name, and 'BOB' is not bob
    for name in ("Alice", "BOB"):
        with pytest.raises(peer.IdentityError, match="not a valid hub user name"):
            acting_for(carol, name)


def test_root_without_the_admin_rule_acts_for_nobody():
    # root in another mount namespace (a container) is not an admin: it gets nothing
    with pytest.raises(operations.OperationError, match="only admins"):
        acting_for(caller(0, "root"), "bob")
    with pytest.raises(operations.OperationError, match="root acts for users"):
        acting_for(caller(0, "root"))


def test_system_uids_are_refused():
    with pytest.raises(operations.OperationError, match="system account"):
        acting_for(caller(5, "daemon"))
    with pytest.raises(operations.OperationError, match="system account"):
        acting_for(caller(5, "daemon", admin=True), "bob")


# ---- views and stats ---------------------------------------------------------------------------


def inspect_doc(status="running", gpus="0", finished="0001-01-01T00:00:00Z"):
    return {
        "Id": "0123456789abcdef",
        "Name": "/thesis._.alice",
        "Config": {
            "Image": "img",
            "Labels": {
                "ds01.managed": "true",
                "ds01.user": "alice",
                "ds01.project": "thesis",
                "ds01.gpus": gpus,
                "ds01.image": "ds01/singleuser:1",
            },
        },
        "State": {
            "Status": status,
            "StartedAt": (NOW - timedelta(hours=2)).isoformat(),
            "FinishedAt": finished,
        },
    }


def test_running_view_has_uptime_and_idle():
    server = {"ready": True, "last_activity": (NOW - timedelta(minutes=5)).isoformat(), "url": "/u"}
    row = operations.container_view(inspect_doc(), server, "thesis", NOW, 3600)
    assert row["state"] == "running" and row["gpus"] == ["0"]
    assert row["uptime_s"] == 7200 and row["idle_s"] == 300
    assert row["held_until"] is None and row["container"] == "thesis._.alice"
    assert row["image"] == "ds01/singleuser:1" and row["id"] == "0123456789ab"


def test_stopped_view_holds_gpus_until_the_hold_expires():
    finished = (NOW - timedelta(minutes=30)).isoformat()
    row = operations.container_view(
        inspect_doc("exited", finished=finished), None, "thesis", NOW, 3600
    )
    assert row["state"] == "stopped" and row["stopped_for_s"] == 1800
    assert row["held_until"] == "2026-11-22T12:30:00Z" and not row["gpus_released"]
    row = operations.container_view(
        inspect_doc("exited", finished=finished), None, "thesis", NOW, 600
    )
    assert row["held_until"] is None and row["gpus_released"]


def test_spawning_server_without_container_shows_starting():
    row = operations.container_view(None, {"pending": "spawn"}, "thesis", NOW, 60)
    assert row["state"] == "starting" and row["id"] is None


def test_cpu_and_memory_from_a_docker_stats_sample():
    sample = {
        "cpu_stats": {
            "cpu_usage": {"total_usage": 3_000},
            "system_cpu_usage": 10_000,
            "online_cpus": 4,
        },
        "precpu_stats": {"cpu_usage": {"total_usage": 1_000}, "system_cpu_usage": 6_000},
        "memory_stats": {"usage": 500, "stats": {"inactive_file": 100}},
    }
    assert operations.cpu_percent(sample) == pytest.approx(200.0)
    assert operations.memory_used(sample) == 400
    assert operations.cpu_percent({}) is None


# ---- transport details ---------------------------------------------------------------------------


def test_frame_decoder_splits_stdout_and_stderr_across_chunks():
    frames = struct.pack(">BxxxI", 1, 3) + b"out" + struct.pack(">BxxxI", 2, 3) + b"err"
    decoder = FrameDecoder()
    got = (
        list(decoder.feed(frames[:5]))
        + list(decoder.feed(frames[5:12]))
        + list(decoder.feed(frames[12:]))
    )
    assert got == [(1, b"out"), (2, b"err")]


def test_backend_choice_broker_by_default_hub_with_url_and_token(tmp_path):
    chosen = backends.connect(env={"DS01HUB_BROKER_SOCKET": "/nonexistent.sock"})
    assert isinstance(chosen, backends.BrokerBackend) and chosen.socket_path == "/nonexistent.sock"
    with pytest.raises(output.CliError, match="no API token"):
        backends.connect(env={"DS01HUB_HUB_URL": "http://hub:8000", "HOME": str(tmp_path)})
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    token_file.chmod(0o644)
    env = {"DS01HUB_HUB_URL": "http://hub:8000", "DS01HUB_TOKEN_FILE": str(token_file)}
    with pytest.raises(output.CliError, match="readable by others"):
        backends.connect(env=env)
    token_file.chmod(0o600)
    chosen = backends.connect(env=env)
    assert isinstance(chosen, remote.HubBackend)
    assert chosen.api_url == "http://hub:8000/hub/api" and chosen.token == "secret"


def test_broker_errors_map_to_exit_codes():
    assert backends.error_from_reply(400, {"error": "bad name", "hint": "h"}).code == 2
    err = backends.error_from_reply(409, {"error": "over quota", "hint": None})
    assert err.code == 1 and err.message == "over quota"
    assert "HTTP 502" in backends.error_from_reply(502, None).message


def test_input_frames_round_trip():
    from ds01hub.services.broker import protocol

    frame = protocol.encode_input(protocol.INPUT_DATA, b"ls\n")
    kind, size = protocol.decode_input_header(frame[: protocol.INPUT_HEADER.size])
    assert (kind, size) == (protocol.INPUT_DATA, 3) and frame[
        protocol.INPUT_HEADER.size :
    ] == b"ls\n"
    resize = protocol.encode_resize(50, 200)
    assert protocol.decode_input_header(resize[:5]) == (protocol.INPUT_RESIZE, 4)
    assert struct.unpack(">HH", resize[5:]) == (50, 200)
    assert protocol.encode_input(protocol.INPUT_EOF) == b"\x01\x00\x00\x00\x00"


def test_ctrl_c_while_waiting_says_the_work_goes_on():
    class Interrupted(ScriptedBackend):
        def start(self, project, options, create):
            yield {"event": "progress", "progress": 35, "message": "waiting for a GPU: position 2"}
            raise KeyboardInterrupt

    code, _, err = run("container-create", ["thesis", "--gpus", "1"], Interrupted())
    assert code == 130
    assert "waiting for a GPU: position 2" in err and "thesis goes on in the hub" in err


def test_a_gpu_wait_shows_the_same_headline_as_the_spawn_page_with_a_countdown():
    from datetime import UTC, datetime, timedelta

    from ds01hub.gpu.messages import EVENT_KEY, Message

    deadline = datetime.now(UTC) + timedelta(minutes=10)
    said = Message("wait", "busy", "You are 2nd in line for a whole GPU.", deadline=deadline)

    class Waiting(ScriptedBackend):
        def start(self, project, options, create):
            yield {"event": "progress", "message": "x", EVENT_KEY: said.to_dict()}
            raise KeyboardInterrupt

    code, _, err = run("container-create", ["thesis", "--gpus", "1"], Waiting())
    assert code == 130
    assert "You are 2nd in line for a whole GPU. (gives up in " in err
    assert f"(at {deadline:%H:%M} UTC)" in err


def test_stats_table_shows_use_against_limits():
    rows = [
        {
            "project": "thesis",
            "cpu_percent": 150.0,
            "cpu_limit_percent": 400.0,
            "memory_bytes": 3 * 2**30,
            "memory_limit_bytes": 16 * 2**30,
            "pids": 12,
            "pids_limit": 4096,
            "gpus": [
                {
                    "slot": "0:1",
                    "utilization_percent": 87,
                    "memory_used_mb": 3072,
                    "memory_mb": 20480,
                    "simulated": True,
                }
            ],
        }
    ]
    header, line = views.stats_table(rows, colour=False).splitlines()
    assert header.split()[:4] == ["PROJECT", "CPU", "MEMORY", "PROCESSES"]
    assert "150% / 400%" in line and "3.0G / 16G" in line and "12 / 4096" in line
    assert "0:1 (SIMULATED): 87%, 3.0G / 20G" in line


def test_user_setup_welcomes_with_the_quota_and_reads_unlimited():
    class Backend:
        def whoami(self):
            return {"user": "ann"}

        def quota(self):
            return {"containers": 0, "gpus_held": 0, "limits": {"group": "staff", "max_gpus": None}}

        def cull_warnings(self):
            return []

        def list_containers(self, include_stopped=False):
            return []

        def images(self):
            return []

    code, out, err = run("user-setup", [], Backend(), FakeTTY("n\n"))
    assert code == 0
    assert err.startswith("Welcome, ann! Limits (group staff): GPUs: 0 GPUs in use of unlimited;")
    assert "None" not in err and "Connecting to your containers" in out


def test_quota_line_reads_like_a_sentence():
    quota = {
        "containers": 1,
        "gpus_held": 1,
        "gpus": [{"slot": "0", "name": "NVIDIA A100"}],
        "limits": {
            "group": "students",
            "max_gpus": 2,
            "max_containers_per_user": None,
            "max_cpus": 4.0,
            "memory": 16 * 2**30,
            "idle_timeout": 12 * 3600,
            "gpu_hold_after_stop": 3600,
        },
    }
    assert views.quota_line(quota) == (
        "Limits (group students): GPUs: 1 of 2 GPUs in use (slot 0: NVIDIA A100); GPUs per "
        "container unlimited; CPUs per container 4; memory per container 16G; containers "
        "unlimited (0 running, 1 total); idle "
        "containers stopped after 12h; GPUs kept after a stop 1h"
    )
    assert "no limits file" in views.quota_line({"containers": 0, "limits": None})


# ---- named errors: the services behind every action ------------------------------------------


def docker_failure(path: str) -> Exception:
    """What docker-py really raises for a socket path (no engine needed: nothing answers)."""
    import docker

    client = docker.DockerClient(base_url=f"unix://{path}", version="1.41")
    try:
        client.api.containers()
    except Exception as e:
        return e
    finally:
        client.close()
    raise AssertionError("a dead socket answered")


def test_an_unreachable_docker_engine_is_named_with_its_cause(tmp_path):
    import socket as sockets

    missing = docker_failure(str(tmp_path / "none.sock"))
    error = operations.named_error(missing, "unix:///x/docker.sock")
    assert error.message == (
        "Docker engine unreachable at unix:///x/docker.sock (No such file or directory)"
    )
    assert error.status == 503 and "dockerd" in error.hint
    dead_path = str(tmp_path / "dead.sock")
    dead = sockets.socket(sockets.AF_UNIX)
    dead.bind(dead_path)
    dead.close()
    error = operations.named_error(docker_failure(dead_path), "unix:///y")
    assert error.message == "Docker engine unreachable at unix:///y (Connection refused)"


def test_docker_refusals_and_timeouts_are_named():
    import docker.errors
    import requests.exceptions

    refused = docker.errors.APIError("409", explanation="conflict: in use")
    assert (
        operations.named_error(refused, "u").message
        == "the Docker engine refused: conflict: in use"
    )
    late = operations.named_error(requests.exceptions.ReadTimeout("read timed out"), "unix:///z")
    assert (
        late.message == "Docker engine at unix:///z did not answer in time" and late.status == 504
    )
    assert operations.named_error(KeyError("bug"), "u") is None  # a bug stays a bug
    own = operations.OperationError("mine")
    assert operations.named_error(own, "u") is own


def test_hub_failures_are_named():
    from ds01hub.hub.client import HubError, HubUnreachable

    gone = HubUnreachable(0, "cannot reach the hub at http://h/hub/api: Connection refused")
    error = operations.named_error(gone, "u")
    assert error.message.startswith("cannot reach the hub at http://h/hub/api")
    assert error.status == 503 and "JupyterHub is not running" in error.hint
    error = operations.hub_failure(HubError(400, "bad"), "could not start 'x'")
    assert (error.message, error.status) == ("could not start 'x': bad", 400)
    assert operations.hub_failure(HubError(500, "boom")).status == 502


def test_a_start_failure_says_what_docker_recorded():
    error = operations.start_failure(
        "thesis", "stopped", {"ExitCode": 137, "OOMKilled": True, "Error": ""}
    )
    assert "'thesis' did not start" in error.message
    assert "it is stopped (its container exited with code 137 (out of memory))" in error.message
    assert error.status == 409 and "container-start thesis" in error.hint
    error = operations.start_failure("thesis", "gone", {})
    assert "its container does not exist" in error.message


def test_a_broker_that_breaks_off_is_a_named_failure(tmp_path):
    """A broker that hangs up mid-answer: a CliError that says so, never a traceback."""
    import socket as sockets
    import threading

    path = str(tmp_path / "b.sock")
    server = sockets.socket(sockets.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def answer_half() -> None:
        connection, _ = server.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"user"')

    thread = threading.Thread(target=answer_half)
    thread.start()
    try:
        with pytest.raises(output.CliError, match="broke off its answer") as info:
            backends.BrokerBackend(path, timeout=30).whoami()
        assert "container-list --all" in info.value.hint
    finally:
        thread.join(30)
        server.close()
