"""Limits YAML: DS01's documented examples load, precedence, validation messages, reload."""

import asyncio
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ds01hub import paths
from ds01hub.limits import (
    LimitsError,
    LimitsStore,
    load_limits,
    parse_limits,
)

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent
GiB = 1 << 30


@pytest.mark.parametrize(
    "name",
    ["small-lab", "university", "thesis-override", "ds01-production"],
)
def test_ds01_documented_examples_load(name):
    config = load_limits(FIXTURES / f"limits-{name}.yaml")
    assert config.path.endswith(f"limits-{name}.yaml")


def test_the_shipped_example_config_loads_with_a_simulated_inventory():
    config = load_limits(REPO / "config" / "resource-limits.yaml")
    simulate = config.gpu_allocation.simulate
    assert simulate is not None
    assert [g.mig for g in simulate.gpus] == [None, None, ("2g.20gb",) * 3]
    assert config.warnings == ()


def test_small_lab_ten_students_share_the_group_limits():
    config = load_limits(FIXTURES / "limits-small-lab.yaml")
    for n in range(1, 11):
        limits = config.resolve(f"s{n:02d}")
        assert (limits.group, limits.max_gpus, limits.memory) == ("students", 1, 32 * GiB)
    admin = config.resolve("labadmin")
    assert admin.max_gpus is None and admin.idle_timeout is None
    assert config.resolve("stranger").group is None


def test_university_faculty_never_idle_out_and_grads_get_more():
    config = load_limits(FIXTURES / "limits-university.yaml")
    faculty = config.resolve("prof_hu")
    assert faculty.idle_timeout is None
    assert faculty.max_runtime is None
    assert faculty.container_hold_after_stop is None
    assert faculty.priority == 80
    grad = config.resolve("farid")
    assert (grad.max_gpus, grad.max_gpus_per_container, grad.max_cpus) == (2, 2, 16.0)
    undergrad = config.resolve("ana")
    assert undergrad.idle_timeout == 12 * 3600
    assert undergrad.max_containers_per_user == 1  # defaults beat policies
    assert config.gpu_allocation.strategy == "spread"  # DS01 'least_allocated'


def test_thesis_override_wins_field_by_field_and_keeps_its_reason():
    config = load_limits(FIXTURES / "limits-thesis-override.yaml")
    henry = config.resolve("henry")
    assert henry.group == "students"
    assert henry.max_gpus == 3 and henry.priority == 100
    assert henry.memory == 96 * GiB  # override
    assert henry.max_cpus == 8.0  # defaults (students set none)
    assert henry.gpu_hold_after_stop == 72 * 3600
    assert henry.reason.startswith("Thesis work")
    assert henry.sources["memory"] == "user_overrides.henry"
    assert henry.sources["max_cpus"] == "defaults"
    assert henry.sources["max_gpus"] == "user_overrides.henry"
    assert config.resolve("alice").reason is None


def test_override_group_defaults_builtin_precedence():
    config = parse_limits(
        {
            "defaults": {"memory": "8g", "max_cpus": 2},
            "groups": {"lab": {"members": ["u"], "memory": "16g"}},
            "user_overrides": {"u": {"max_cpus": 6}},
        }
    )
    limits = config.resolve("u")
    assert (limits.memory, limits.max_cpus) == (16 * GiB, 6.0)
    assert limits.sources["pids_limit"] == "built-in"
    assert limits.max_gpus == 1 and limits.priority == 10


def test_legacy_spellings_map_to_the_ds01hub_names():
    config = parse_limits({"defaults": {"max_mig_instances": 3, "cpus": 1.5}})
    assert (config.resolve("x").max_gpus, config.resolve("x").max_cpus) == (3, 1.5)
    assert parse_limits({"defaults": {"gpus": 2}}).resolve("x").max_gpus == 2
    assert (
        parse_limits({"policies": {"max_containers_per_user": 4}})
        .resolve("x")
        .max_containers_per_user
        == 4
    )


def test_both_spellings_in_one_section_is_a_problem():
    with pytest.raises(LimitsError) as caught:
        parse_limits({"defaults": {"max_gpus": 1, "max_mig_instances": 2}}, file="f.yaml")
    (problem,) = caught.value.problems
    assert problem.key_path == "defaults.max_mig_instances"
    assert "max_gpus" in problem.fix


def test_highest_priority_group_wins_and_ties_go_to_the_first_listed():
    config = parse_limits(
        {
            "groups": {
                "a": {"members": ["u", "t"], "priority": 20, "memory": "1g"},
                "b": {"members": ["u"], "priority": 70, "memory": "2g"},
                "c": {"members": ["t"], "priority": 20, "memory": "3g"},
            }
        }
    )
    u = config.resolve("u")
    assert u.group == "b" and u.memory == 2 * GiB
    assert "a (20)" in u.group_reason and "b (70)" in u.group_reason
    t = config.resolve("t")
    assert t.group == "a"  # tie between a and c: first listed


def test_caller_groups_count_only_when_the_file_defines_them():
    config = parse_limits({"groups": {"gpu-users": {"members": [], "priority": 40}}})
    assert config.resolve("x", ["gpu-users", "unknown"]).group == "gpu-users"
    assert config.resolve("x", ["gpu-users"]).group_reason == "caller groups"
    assert config.resolve("x", ["unknown"]).group is None


def test_ds01_default_group_applies_to_users_in_no_group():
    config = load_limits(FIXTURES / "limits-ds01-production.yaml")
    limits = config.resolve("newcomer")
    assert limits.group == "student"
    assert limits.allow_full_gpu is False
    assert limits.gpu_hold_after_stop == 900
    assert any("storage_workspace" in w for w in config.warnings)
    assert any(
        w.endswith("wizard: DS01 section accepted but not used by ds01hub") for w in config.warnings
    )


def test_every_problem_is_reported_once_with_file_line_key_value_and_fix():
    path = FIXTURES / "limits-broken.yaml"
    with pytest.raises(LimitsError) as caught:
        load_limits(path)
    problems = {p.key_path: p for p in caught.value.problems}
    assert set(problems) == {
        "defaults.memroy",
        "defaults.shm_size",
        "defaults.idle_timeout",
        "groups.students.members[2]",
        "groups.students.priority",
        "groups.hpc.shm_size",
        "gpu_allocation.strategy",
    }
    assert problems["defaults.memroy"].fix == "did you mean 'memory'?"
    assert problems["defaults.memroy"].line == 3
    assert problems["defaults.shm_size"].value == "'lots'"
    assert "32g" in problems["defaults.shm_size"].fix
    assert problems["defaults.idle_timeout"].value == "'2 days'"
    assert problems["groups.students.members[2]"].value == "'alice'"
    assert "twice" in problems["groups.students.members[2]"].message
    assert problems["groups.students.priority"].value == "150"
    assert problems["groups.students.priority"].line == 10
    assert "1 to 100" in problems["groups.students.priority"].fix
    assert "ipc_mode: host" in problems["groups.hpc.shm_size"].message
    assert problems["gpu_allocation.strategy"].line == 16
    for problem in caught.value.problems:
        text = str(problem)
        assert text.startswith(f"{path}:{problem.line}: {problem.key_path}: ")
        assert "Fix: " in text
    assert str(caught.value).startswith(f"7 problems in the limits file {path}")


@pytest.mark.parametrize("priority", [0, 101, -5, "high", 5.5])
def test_priority_outside_1_to_100_is_refused(priority):
    with pytest.raises(LimitsError, match="priority"):
        parse_limits({"defaults": {"priority": priority}})


def test_shm_size_with_ipc_host_across_defaults_and_a_group_is_refused():
    with pytest.raises(LimitsError) as caught:
        parse_limits(
            {"defaults": {"shm_size": "8g"}, "groups": {"hpc": {"members": [], "ipc_mode": "host"}}}
        )
    (problem,) = caught.value.problems
    assert problem.key_path == "groups.hpc.ipc_mode"
    assert "shm_size: null" in problem.fix
    ok = parse_limits(
        {
            "defaults": {"shm_size": "8g"},
            "groups": {"hpc": {"members": ["u"], "ipc_mode": "host", "shm_size": None}},
        }
    )
    assert ok.resolve("u").docker_args() == ["--ipc=host"]


def test_unknown_keys_everywhere_get_a_did_you_mean():
    with pytest.raises(LimitsError) as caught:
        parse_limits(
            {
                "defualts": {},
                "groups": {"g": {"membres": []}},
                "policies": {"preempt_runing": True},
                "gpu_allocation": {"stratgy": "pack"},
            }
        )
    fixes = {p.key_path: p.fix for p in caught.value.problems}
    assert fixes == {
        "defualts": "did you mean 'defaults'?",
        "groups.g.membres": "did you mean 'members'?",
        "policies.preempt_runing": "did you mean 'preempt_running'?",
        "gpu_allocation.stratgy": "did you mean 'strategy'?",
    }


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("defaults:\n  memory: 32g\n groups: [\n")
    with pytest.raises(LimitsError) as caught:
        load_limits(path)
    (problem,) = caught.value.problems
    assert (problem.code, problem.line) == ("yaml-syntax", 3)
    assert str(problem).startswith(f"{path}:3: not valid YAML")
    assert "indentation" in problem.fix


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(LimitsError, match="DS01HUB_LIMITS"):
        load_limits(tmp_path / "nope.yaml")


def test_default_path_follows_the_environment(monkeypatch):
    monkeypatch.delenv("DS01HUB_LIMITS", raising=False)
    assert paths.limits_path() == Path("/etc/ds01hub/resource-limits.yaml")
    monkeypatch.setenv("DS01HUB_LIMITS", "/srv/limits.yaml")
    assert paths.limits_path() == Path("/srv/limits.yaml")


def test_docker_args_and_host_config_enforce_the_same_limits():
    config = parse_limits(
        {
            "defaults": {
                "max_cpus": 2.5,
                "memory": "32g",
                "shm_size": "1536m",
                "pids_limit": 512,
                "cgroup_parent": "ds01.slice",
            }
        }
    )
    limits = config.resolve("x")
    assert limits.docker_args() == [
        "--cpus=2.5",
        "--memory=32g",
        "--memory-swap=32g",
        "--shm-size=1536m",
        "--pids-limit=512",
        "--cgroup-parent=ds01.slice",
    ]
    assert limits.host_config() == {
        "nano_cpus": 2_500_000_000,
        "mem_limit": 32 * GiB,
        "memswap_limit": 32 * GiB,
        "shm_size": 1536 << 20,
        "pids_limit": 512,
        "cgroup_parent": "ds01.slice",
    }


def test_simulate_section_forms():
    config = parse_limits(
        {
            "gpu_allocation": {
                "mig_profile": "1g.10gb",
                "simulate": {"gpus": [{"count": 2}, {"mig": 3, "memory": "40g"}]},
            }
        }
    )
    gpus = config.gpu_allocation.simulate.gpus
    assert len(gpus) == 3 and gpus[2].mig == ("1g.10gb",) * 3 and gpus[2].memory_mb == 40960
    assert (
        len(
            parse_limits({"gpu_allocation": {"simulate": {"gpus": 8}}}).gpu_allocation.simulate.gpus
        )
        == 8
    )
    with pytest.raises(LimitsError, match="mig_profile"):
        parse_limits({"gpu_allocation": {"simulate": {"gpus": [{"mig": 2}]}}})
    with pytest.raises(LimitsError, match="bad MIG profile"):
        parse_limits({"gpu_allocation": {"simulate": {"gpus": [{"mig": ["big"]}]}}})


def test_store_keeps_the_last_good_configuration_when_a_reload_fails(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("defaults:\n  memory: 8g\n")
    store = LimitsStore(path)
    assert store.resolve("u").memory == 8 * GiB

    path.write_text("defaults:\n  memory: eight\n")
    _bump_mtime(path)
    assert store.reload() is False
    assert store.resolve("u").memory == 8 * GiB
    assert "defaults.memory" in store.last_error
    assert "keeping the last good configuration" in store.last_error

    path.write_text("defaults:\n  memory: 16g\n")
    _bump_mtime(path)
    assert store.reload() is True
    assert store.last_error is None
    assert store.resolve("u").memory == 16 * GiB
    assert store.reload() is False  # unchanged file: not re-read


def test_store_refuses_to_start_on_a_broken_file(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("defaults: {priority: 0}\n")
    with pytest.raises(LimitsError):
        LimitsStore(path)


def _bump_mtime(path: Path, seconds: float = 5) -> None:
    """Move the file's mtime on, so a rewrite within the clock's resolution is seen."""
    future = time.time() + seconds
    os.utime(path, (future, future))


# -- reloads: every failure reported, the last good file kept, never on the caller's loop -------

GOOD = "defaults:\n  memory: 8g\n"


def _alias_bomb() -> bytes:
    lines = [b"a0: &a0 [" + b", ".join([b"x"] * 10) + b"]"]
    lines += [b"a%d: &a%d [%s]" % (i, i, b", ".join([b"*a%d" % (i - 1)] * 10)) for i in range(1, 9)]
    return b"\n".join(lines) + b"\ndefaults: {memory: *a8}\n"


BREAKS = {
    "bad value": lambda path: path.write_text("defaults:\n  memory: 0\n"),
    "duplicate key": lambda path: path.write_text(GOOD + "defaults:\n  memory: 64g\n"),
    "not yaml": lambda path: path.write_text("defaults: [\n"),
    "alias bomb": lambda path: path.write_bytes(_alias_bomb()),
    "utf-16": lambda path: path.write_bytes("defaults: {memory: 16g}\n".encode("utf-16")),
    "too large": lambda path: path.write_text("# " + "x" * (2 << 20) + "\n"),
    "deleted": lambda path: path.unlink(),
}


@pytest.mark.parametrize("kind", [*BREAKS, "internal error"])
def test_a_failed_reload_is_reported_everywhere_and_the_last_good_file_stays(
    kind, tmp_path, caplog, monkeypatch
):
    from types import SimpleNamespace

    from ds01hub import limits
    from ds01hub.services.ops.admin_page import overview, render_page
    from ds01hub.services.ops.metrics import LimitsCollector

    path = tmp_path / "limits.yaml"
    path.write_text(GOOD)
    store = LimitsStore(path, log=logging.getLogger("ds01-test-limits"))
    collector = LimitsCollector([store])
    if kind == "internal error":

        def broken(*args):
            raise KeyError("y" * 100_000)

        monkeypatch.setattr(limits, "_read_policies", broken)
        path.write_text(GOOD + "policies: {}\n")
    else:
        BREAKS[kind](path)
    if path.exists():
        _bump_mtime(path)

    with caplog.at_level(logging.INFO, logger="ds01-test-limits"):
        assert store.reload() is False
        assert store.reload() is False  # the same broken file: not read (nor logged) again

    assert store.resolve("u").memory == 8 * GiB
    assert store.last_problems and all(p.code and p.file == str(path) for p in store.last_problems)
    assert store.last_error.endswith("-- keeping the last good configuration")
    assert len(store.last_error) < 25_000
    assert (store.reload_failures, store.last_reload_ok) == (1, False)
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert samples == {"ds01_limits_reload_failures_total": 1, "ds01_limits_last_reload_ok": 0}
    (record,) = caplog.records
    assert record.levelname == "ERROR" and len(record.getMessage()) < 25_000
    assert record.getMessage().startswith(f"1 problem in the limits file {path}")
    page = render_page(
        overview(
            [],
            SimpleNamespace(simulated=False, reason=None),
            None,
            datetime.now(UTC),
            config_error=store.last_error,
        )
    )
    assert 'id="config-error"' in page and "keeping the last good configuration" in page

    monkeypatch.undo()
    path.write_text("defaults:\n  memory: 16g\n")
    _bump_mtime(path, 10)
    assert store.reload() is True
    assert store.resolve("u").memory == 16 * GiB
    assert (store.last_error, store.last_problems, store.last_reload_ok) == (None, (), True)
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert samples["ds01_limits_last_reload_ok"] == 1


def _gated_load(monkeypatch) -> threading.Event:
    """Make the store's reads wait for the returned event (a slow file, deterministically)."""
    from ds01hub import limits

    gate, real = threading.Event(), limits.load_limits

    def slow(path):
        assert gate.wait(60), "the test never opened the gate"
        return real(path)

    monkeypatch.setattr(limits, "load_limits", slow)
    return gate


def test_a_reload_past_its_time_limit_fails_keeps_the_old_file_then_its_outcome_applies(
    tmp_path, monkeypatch
):
    path = tmp_path / "limits.yaml"
    path.write_text(GOOD)
    store = LimitsStore(path, parse_timeout=0.2)
    gate = _gated_load(monkeypatch)
    path.write_text("defaults:\n  memory: 16g\n")
    _bump_mtime(path)

    assert store.reload() is False
    (problem,) = store.last_problems
    assert problem.code == "timeout" and "longer than 0.2s" in problem.message
    assert store.current.resolve("u").memory == 8 * GiB
    assert store.reload() is False  # joins the read under way: no second read, one failure
    assert store.reload_failures == 1

    gate.set()
    deadline = time.monotonic() + 30
    while store.current.resolve("u").memory != 16 * GiB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.current.resolve("u").memory == 16 * GiB
    assert (store.last_error, store.last_reload_ok, store.reload_failures) == (None, True, 1)


def test_the_first_load_has_a_time_limit_too(tmp_path, monkeypatch):
    path = tmp_path / "limits.yaml"
    path.write_text(GOOD)
    gate = _gated_load(monkeypatch)
    try:
        with pytest.raises(LimitsError) as caught:
            LimitsStore(path, parse_timeout=0.1)
        assert caught.value.problems[0].code == "timeout"
    finally:
        gate.set()


def test_refresh_reads_the_file_off_the_event_loop(tmp_path, monkeypatch):
    path = tmp_path / "limits.yaml"
    path.write_text(GOOD)
    store = LimitsStore(path)
    gate = _gated_load(monkeypatch)
    path.write_text("defaults:\n  memory: 16g\n")
    _bump_mtime(path)

    async def scenario():
        reading = asyncio.create_task(store.refresh())
        answered = 0
        for _ in range(20):  # the loop keeps serving others while the file is read
            await asyncio.sleep(0)
            answered += 1
        assert answered == 20 and not reading.done()
        assert store.current.resolve("u").memory == 8 * GiB  # the last good one meanwhile
        gate.set()
        assert await reading is True

    asyncio.run(scenario())
    assert store.current.resolve("u").memory == 16 * GiB


def test_reload_without_waiting_answers_now_and_applies_the_new_file_soon(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text(GOOD)
    store = LimitsStore(path)
    path.write_text("defaults:\n  memory: 16g\n")
    _bump_mtime(path)
    assert store.reload(wait=False) is False  # answered at once, the read goes on aside
    deadline = time.monotonic() + 30
    while store.current.resolve("u").memory != 16 * GiB and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.current.resolve("u").memory == 16 * GiB


def test_duplicate_keys_and_the_other_problems_are_reported_in_one_pass(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("defaults:\n  memory: 0\n  memory: 1\ngroups:\n  g: {priority: 500}\n")
    problems = {(p.code, p.key_path, p.line) for p in refused_problems(path)}
    assert problems == {
        ("duplicate-key", "defaults.memory", 3),
        ("out-of-range", "defaults.memory", 3),  # the last one, as YAML would have read it
        ("out-of-range", "groups.g.priority", 5),
    }


def refused_problems(path: Path) -> list:
    with pytest.raises(LimitsError) as caught:
        load_limits(path)
    return caught.value.problems


def test_the_engine_api_names_are_what_docker_py_makes_of_the_keywords():
    """ResolvedLimits.api_host_config (the proxy's and the spawner's recreate check) is the
    HostConfig docker-py sends for host_config() (the spawner's create)."""
    from docker.types import HostConfig

    config = parse_limits(
        {
            "defaults": {
                "max_cpus": 2.5,
                "memory": "4g",
                "shm_size": "1g",
                "ipc_mode": "private",
                "pids_limit": 512,
                "cgroup_parent": "ds01.slice",
            }
        }
    )
    resolved = config.resolve("ann", ())
    api = resolved.api_host_config()
    sent = HostConfig("1.41", **resolved.host_config())
    assert api == {key: sent[key] for key in api} and len(api) == 7
