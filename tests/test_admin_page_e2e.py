"""The ds01-ops service under a real JupyterHub: the admin page, its JSON and the Prometheus
metrics over real HTTP (OAuth login, tokens), once in headless Chromium; real containers hold
SIMULATED GPU slots, the event log holds a known history."""

from __future__ import annotations

import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from harness import TEST_LABEL, free_port, unique_name, wait_until
from prometheus_client.parser import text_string_to_metric_families

from ds01hub import labels, provenance
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.queued import QueuedRequest, QueuedStore
from ds01hub.hub.services import OPS_SERVICE
from ds01hub.services.ops.admin_page import week_start
from ds01hub.services.ops.app import EVENTLOG_FILE
from ds01hub.services.ops.warnings import CullWarning, WarningStore

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
SCREENSHOTS = Path(os.environ.get("DS01_SCREENSHOTS", "/tmp/ds01hub-screenshots"))

LIMITS_YAML = """\
defaults: {gpu_hold_after_stop: 1h, max_gpus: 4}
gpu_allocation:
  simulate:
    seed: ds01-admin-page-test
    gpus:
      - {name: NVIDIA A100-SXM4-80GB, memory: 80g, count: 2}
      - {name: NVIDIA A100-SXM4-80GB, memory: 80g, mig: [2g.20gb, 2g.20gb]}
"""

SERVICE_CONFIG = """
from ds01hub.hub.services import configure_ops
configure_ops(c, url={url!r}, state_dir={state!r}, service_args={args!r})
# a role that lets its group reach the service without making anyone an admin
c.JupyterHub.load_groups = {{"opsviewers": {{"users": []}}}}
c.JupyterHub.load_roles.append(
    {{"name": "ops-viewer", "groups": ["opsviewers"],
      "scopes": ["access:services!service=ds01-ops"]}}
)
"""


def hours_between(start: datetime, end: datetime, window_start: datetime) -> float:
    return max(0.0, (end - max(start, window_start)).total_seconds()) / 3600


@pytest.fixture(scope="module")
def ops(hub_factory, docker_client, base_image, tmp_path_factory):
    """A hub with the ds01-ops service; alice runs on GPU 0, bob's stopped container holds
    MIG slot 2:0; the event log has alice's usage (last week and this week) and one cull."""
    directory = tmp_path_factory.mktemp("ops")
    limits, state = directory / "limits.yaml", directory / "state"
    limits.write_text(LIMITS_YAML)
    run = f"ds01.test.adminpage={uuid.uuid4().hex[:8]}"
    key, _, value = run.partition("=")
    alice, bob, admin, student = (unique_name(p) for p in ("ali", "bob", "adm", "stu"))

    def start(user, group, slots, command):
        managed = labels.container_labels(
            user=user, project="work", group=group, priority=10, gpus=slots
        )
        managed = provenance.load(state).sign(managed, f"work._.{user}")  # as the ops service's
        return docker_client.containers.run(
            base_image,
            command,
            name=f"work._.{user}",
            labels={**managed, TEST_LABEL: "1", key: value},
            detach=True,
        )

    start(alice, "students", ["0"], ["sleep", "infinity"])
    stopped = start(bob, "staff", ["2:0"], ["true"])
    stopped.wait(timeout=60)
    stopped.reload()
    finished = labels.parse_docker_time(stopped.attrs["State"]["FinishedAt"])

    now = datetime.now(UTC)
    log = EventLog(state / EVENTLOG_FILE)
    last_week = week_start(now) - timedelta(days=2)
    log.record("allocate", alice, "0", "old._.x", "students", at=last_week)
    log.record("release", alice, "0", "old._.x", "students", at=last_week + timedelta(hours=6))
    this_week = (now - timedelta(minutes=90), now - timedelta(minutes=30))
    log.record("allocate", alice, "0", "new._.x", "students", at=this_week[0])
    log.record("release", alice, "0", "new._.x", "students", at=this_week[1])
    log.record("cull", bob, container="work._.x", group="staff", reason="idle: no hub activity")
    warned = CullWarning(
        alice, "", "default._.x", "idle", "idle for 2h", now, now, now + timedelta(minutes=7)
    )
    WarningStore(state).save([warned])  # as the culler leaves it
    queued = [  # two starts waiting in the GPU queue, as the spawner stores them
        QueuedRequest(
            user, "", f"default._.{user}", options, priority, since=(now - ago).timestamp()
        )
        for user, options, priority, ago in [
            (unique_name("car"), {"gpus": 1}, 10, timedelta(minutes=20)),
            (unique_name("dav"), {"mig": "2g.20gb"}, 50, timedelta(minutes=10)),
        ]
    ]
    for request in queued:
        QueuedStore(state).add(request, None)

    port = free_port()
    args = [
        f"--OpsService.limits_path={limits}",
        f"--OpsService.extra_labels={run}",
        "--OpsService.interval=3600",
        "--OpsService.remove_stopped=False",
        "--OpsService.dry_run=True",  # its passes change nothing here (the warning stays)
    ]
    hub = hub_factory(
        extra_config=SERVICE_CONFIG.format(
            url=f"http://127.0.0.1:{port}", state=str(state), args=args
        )
    )
    hub.create_user(admin, admin=True)
    hub.create_user(student, groups=["opsviewers"])
    hub.create_user(alice)
    base = f"{hub.url}/services/{OPS_SERVICE}/"

    def answers() -> bool:
        try:
            return requests.get(base + "api/overview", timeout=5).status_code == 403
        except requests.ConnectionError:
            return False

    wait_until(answers, 60, 0.5, lambda: "the ds01-ops service did not come up:\n" + hub.log())
    info = dict(
        hub=hub,
        base=base,
        limits=limits,
        alice=alice,
        bob=bob,
        admin=admin,
        student=student,
        held_until=finished + timedelta(hours=1),
        alice_week=hours_between(*this_week, week_start(now)),
        queued=queued,
    )
    yield info
    for container in docker_client.containers.list(all=True, filters={"label": run}):
        container.remove(force=True)


def get(ops, path, token=None, **kw):
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(ops["base"] + path, headers=headers, timeout=30, **kw)


def test_the_overview_shows_every_slot_its_holder_and_gpu_hours(ops):
    hub = ops["hub"]
    response = get(ops, "api/overview", hub.token_for(ops["admin"]))
    assert response.status_code == 200, response.text
    model = response.json()
    slots = {row["slot"]: row for row in model["slots"]}
    assert set(slots) == {"0", "1", "2:0", "2:1"}
    assert (slots["0"]["user"], slots["0"]["group"], slots["0"]["state"]) == (
        ops["alice"],
        "students",
        "running",
    )
    assert slots["0"]["utilization"] == 0  # SIMULATED GPU, nothing running on it
    assert (slots["2:0"]["user"], slots["2:0"]["state"]) == (ops["bob"], "stopped")
    assert slots["2:0"]["kind"] == "2g.20gb" and slots["2:0"]["utilization"] is None
    assert datetime.fromisoformat(slots["2:0"]["held_until"]) == ops["held_until"]
    assert slots["1"]["state"] == slots["2:1"]["state"] == "free"
    users = {row["name"]: row for row in model["usage"]["user"]}
    assert users[ops["alice"]]["week"] == pytest.approx(ops["alice_week"], abs=0.01)
    assert users[ops["alice"]]["total"] == pytest.approx(6 + ops["alice_week"], abs=0.01)
    assert model["simulated"] is True and model["config_error"] is None
    (pending,) = model["pending_culls"]
    assert (pending["user"], pending["project"], pending["reason"]) == (
        ops["alice"],
        "default",
        "idle for 2h",
    )


def test_the_page_is_for_admins_only(ops):
    hub = ops["hub"]
    assert get(ops, "api/overview").status_code == 403
    student_token = hub.token_for(ops["student"])
    # the student may reach the service (a role grants it) but is no admin: refused all the same
    scopes = hub.api("GET", "/user", token=student_token).json()["scopes"]
    assert f"access:services!service={OPS_SERVICE}" in scopes
    assert get(ops, "api/overview", student_token).status_code == 403
    session = hub.login(ops["student"])
    assert session.get(ops["base"], timeout=30).status_code == 403
    session = hub.login(ops["admin"])
    page = session.get(ops["base"], timeout=30)  # through the hub's OAuth redirects
    assert page.status_code == 200, page.text[:500]
    row = re.search(r"<tr><td>0</td>(.*?)</tr>", page.text, re.S).group(1)
    assert ops["alice"] in row and "running" in row
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_metrics_count_slots_by_group_and_culls_by_reason(ops):
    hub = ops["hub"]
    assert get(ops, "metrics", hub.token_for(ops["student"])).status_code == 403
    response = get(ops, "metrics", hub.token_for(ops["admin"], scopes=["read:metrics"]))
    assert response.status_code == 200, response.text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert values[("ds01_gpu_slots", (("kind", "gpu"),))] == 2
    assert values[("ds01_gpu_slots", (("kind", "2g.20gb"),))] == 2
    assert values[("ds01_gpu_slots_free", ())] == 2
    assert values[("ds01_gpu_slots_allocated", (("group", "students"),))] == 1
    assert values[("ds01_gpu_slots_held", (("group", "staff"),))] == 1
    assert values[("ds01_culls_total", (("reason", "idle"),))] == 1
    assert values[("ds01_culls_total", (("reason", "max_runtime"),))] == 0
    assert values[("ds01_gpu_hours_total", (("group", "students"),))] == pytest.approx(
        6 + ops["alice_week"], abs=0.01
    )


def alias_bomb(good: str) -> bytes:
    """Billion laughs: each anchor ten aliases of the one before."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    return "\n".join(lines).encode() + b"\n"


BROKEN_EDITS = {
    "not yaml": lambda good: (good + "defaults: [oops\n").encode(),
    "a duplicate key": lambda good: (good + "defaults: {max_gpus: 8}\n").encode(),
    "an alias bomb": alias_bomb,
    "UTF-16": lambda good: good.encode("utf-16"),
}


@pytest.mark.parametrize("edit", BROKEN_EDITS)
def test_a_broken_limits_file_is_shown_and_the_last_good_one_kept(ops, edit):
    token = ops["hub"].token_for(ops["admin"])
    metrics_token = ops["hub"].token_for(ops["admin"], scopes=["read:metrics"])

    def reload_ok() -> float:
        response = get(ops, "metrics", metrics_token)
        return next(
            s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
            if s.name == "ds01_limits_last_reload_ok"
        )

    good = ops["limits"].read_text()
    try:
        ops["limits"].write_bytes(BROKEN_EDITS[edit](good))
        model = get(ops, "api/overview", token).json()
        assert (
            model["config_error"] and "keeping the last good configuration" in model["config_error"]
        )
        assert f"{ops['limits']}" in model["config_error"]
        assert len(model["slots"]) == 4  # still served from the last good file
        assert reload_ok() == 0
    finally:
        ops["limits"].write_text(good)
    assert get(ops, "api/overview", token).json()["config_error"] is None
    assert reload_ok() == 1


def test_the_hub_pages_tell_a_warned_user_their_container_will_be_stopped(ops):
    hub = ops["hub"]
    home = hub.login(ops["alice"]).get(f"{hub.hub_url}home", timeout=30)
    assert home.status_code == 200
    assert "Your container &#x27;default&#x27; will be stopped at" in home.text
    other = hub.login(ops["student"]).get(f"{hub.hub_url}home", timeout=30)
    assert "will be stopped" not in other.text


@pytest.mark.browser
def test_an_admin_sees_the_slot_table_in_chromium(ops, chromium):
    from harness.browser import log_in

    hub = ops["hub"]
    context = chromium.new_context()
    try:
        page = context.new_page()
        log_in(page, hub.hub_url, ops["admin"], hub.password)
        page.wait_for_url(re.compile(r".*/(hub|user)/.*"))
        page.goto(ops["base"])
        page.wait_for_selector("#slots")
        assert page.title() == "ds01 GPUs"
        rows = page.locator("#slots tbody tr")
        assert rows.count() == 4
        first = rows.nth(0).inner_text()
        assert ops["alice"] in first and "running" in first
        stopped = page.locator("#slots tbody tr", has_text="2:0").inner_text()
        assert ops["bob"] in stopped and "stopped" in stopped
        usage = page.locator("#usage-user tbody tr", has_text=ops["alice"]).inner_text()
        assert f"{6 + ops['alice_week']:.2f}" in usage
        assert page.locator("#config-error").count() == 0
        # in the hub's look: its navbar with the admins' entry; the charts drawn in the page
        assert page.locator("nav.navbar #ds01-gpus-link").count() == 1
        model = get(ops, "api/overview", hub.token_for(ops["admin"])).json()
        bars = page.locator(f'#chart-user rect.ds01-bar[data-name="{ops["alice"]}"]')
        drawn = sum(float(bars.nth(i).get_attribute("data-value")) for i in range(bars.count()))
        assert drawn == pytest.approx(sum(model["charts"]["user"][ops["alice"]]), abs=0.01)
        assert drawn == pytest.approx(6 + ops["alice_week"], abs=0.05)  # the event log's
        assert page.locator("#chart-slots rect.ds01-cell").count() == 4 * 24
        # the GPU queue in the order it is served: the higher priority first (fair share off:
        # the effective priority is the configured one), each with its place and request
        # (the admin's own start, made by logging in, waits behind them: later, not higher)
        rows = page.locator("#queue tbody tr")
        table = [rows.nth(i).locator("td").all_inner_texts() for i in range(rows.count())]
        assert [row[0] for row in table] == [str(i) for i in range(1, len(table) + 1)]
        served = sorted(ops["queued"], key=lambda r: (-r.priority, r.since))
        mine = [row for row in table if row[1] in {r.user for r in served}]
        assert [row[1] for row in mine] == [r.user for r in served]
        for cells, request in zip(mine, served, strict=True):
            wants = f"MIG {request.options['mig']}" if "mig" in request.options else "1 GPU"
            assert cells[2] == f"{wants} for default queued"
            assert cells[3] == datetime.fromtimestamp(request.since, UTC).strftime(
                "%Y-%m-%d %H:%M UTC"
            )
            assert float(cells[4]) == request.priority
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "admin-page.png"), full_page=True)
        # the hub's own pages have the entry for admins only
        page.goto(f"{hub.hub_url}home")
        assert page.locator("#ds01-gpus-link").count() == 1
    finally:
        context.close()
    context = chromium.new_context()
    try:
        page = context.new_page()
        log_in(page, hub.hub_url, ops["student"], hub.password)
        page.goto(f"{hub.hub_url}home")
        assert page.locator("#ds01-gpus-link").count() == 0
    finally:
        context.close()
