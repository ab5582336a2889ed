"""The ds01 admin page: every GPU/MIG slot and its holder, the queue of starts waiting for a
GPU, usage in GPU-hours (tables and charts), config errors, and the servers the culler has
warned it will stop.

In the hub's look: rendered with Jinja2 from `ds01hub/hub/templates/ds01_admin.html`, which
extends the hub's page template through the same loader JupyterHub uses (ds01hub's templates,
then JupyterHub's own as `templates/...`), so the navbar, styles and dark mode are the hub's.
Charts are inline SVG drawn here (`ds01hub.services.ops.charts`); the page reloads itself.

Served by the ds01-ops managed service (`ds01hub.services.ops.app`) under
`/services/ds01-ops/`, not as a hub page: the figures come from Docker, NVML and the event log,
whose calls (tens of milliseconds, more on a busy engine) must never stall the hub's event loop,
and a service is the documented way to add pages to JupyterHub without patching it. Access:
HubOAuth login (the hub's own session; only users granted `access:services!service=ds01-ops`,
which admins have, get a token), then an admin check against the hub's user model with the
service's own token, so a role that merely grants access to the service does not make
someone an admin. Everything shown is escaped: user, container and group names come from
users.

Routes (prefix `/services/ds01-ops/`): `` (HTML), `api/overview` (the same model as JSON),
`metrics` (Prometheus text; a token with `read:metrics`), `oauth_callback`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
from jupyterhub._data import DATA_FILES_PATH
from jupyterhub.services.auth import HubOAuthenticated
from markupsafe import Markup
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web

from ds01hub.engine import EngineState
from ds01hub.gpu.allocator import SlotStatus
from ds01hub.gpu.eventlog import EventLog
from ds01hub.gpu.fairshare import FairShare, Waiting, rank
from ds01hub.gpu.inventory import Inventory
from ds01hub.gpu.queued import QueuedRequest
from ds01hub.services.ops import charts
from ds01hub.services.ops.warnings import CullWarning

__all__ = [
    "AdminApiHandler",
    "AdminPageHandler",
    "MetricsHandler",
    "PageContext",
    "overview",
    "render_page",
    "week_start",
]

#: How many weeks the GPU-hours charts show (the current one last).
CHART_WEEKS = 8
#: Seconds between the page's reloads.
REFRESH_SECONDS = 60


# -- the page model (pure) --------------------------------------------------------------------


def week_start(now: datetime) -> datetime:
    """Monday 00:00 UTC of `now`'s week: 'this week' in the usage tables."""
    monday = now - timedelta(days=now.weekday())
    return monday.replace(hour=0, minute=0, second=0, microsecond=0)


def slot_rows(status: Iterable[SlotStatus], inventory: Inventory) -> list[dict[str, Any]]:
    """One row per slot: who holds it, state, live utilisation, held-until; a slot that more
    than one container holds is a `conflict` row listing every holder."""
    rows = []
    for row in status:
        held = row.holding
        rows.append(
            {
                "slot": row.slot_id,
                "kind": row.profile or "whole GPU",
                "uuid": row.uuid,
                "user": held.user if held else None,
                "group": held.group if held else None,
                "container": held.container if held else None,
                "state": "conflict" if row.conflict else held.state if held else "free",
                "utilization": inventory.utilization(row.slot_id),
                "processes": len(inventory.processes(row.slot_id)),
                "held_until": held.held_until.isoformat() if held and held.held_until else None,
                "conflict": row.conflict,
                "holders": [
                    {"user": h.user, "container": h.container, "state": h.state}
                    for h in row.holders
                ],
            }
        )
    return rows


#: Below this much free space where the event log lives, the page warns.
LOW_FREE_BYTES = 64 << 20


def alerts(slots: Iterable[dict[str, Any]], eventlog_health: dict[str, Any] | None) -> list[str]:
    """What an admin must look at now: slots held twice, an event log that cannot write."""
    found = [
        f"slot {row['slot']} is held by more than one container: "
        + "; ".join(f"{h['container']} ({h['user']}, {h['state']})" for h in row["holders"])
        for row in slots
        if row["conflict"]
    ]
    health = eventlog_health or {}
    if health.get("unwritten") or health.get("dropped"):
        found.append(
            f"event log: {health['unwritten']} event(s) wait to be written, "
            f"{health['dropped']} lost (GPU-hours are short until they are written): "
            f"{health.get('last_error')}"
        )
    elif health.get("write_errors"):
        found.append(f"event log: writes failed ({health.get('last_error')})")
    free = health.get("free_bytes")
    if free is not None and free < LOW_FREE_BYTES:
        found.append(f"state directory: only {free // 1024} KiB free; allocations will fail")
    return found


def usage_rows(week: dict[str, float], total: dict[str, float]) -> list[dict[str, Any]]:
    """Merge this week's and all-time GPU-hours, biggest users first."""
    names = sorted(set(week) | set(total), key=lambda n: (-total.get(n, 0.0), n))
    return [
        {"name": n, "week": round(week.get(n, 0.0), 2), "total": round(total.get(n, 0.0), 2)}
        for n in names
    ]


def overview(
    status: Iterable[SlotStatus],
    inventory: Inventory,
    eventlog: EventLog,
    now: datetime,
    config_error: str | None = None,
    pending_culls: Iterable[CullWarning] = (),
    engine: EngineState | None = None,
    queue: Iterable[Mapping[str, Any]] = (),
    fairshare: list[dict[str, Any]] | None = None,
    group_problems: Mapping[str, Iterable[Any]] | None = None,
    nodes: list[dict[str, Any]] | None = None,
    chart_cache: ChartCache | None = None,
    hub_groups: str | None = None,
) -> dict[str, Any]:
    """Everything the page shows, JSON-ready (also served as `api/overview`).
    `pending_culls`: the culler's standing warnings (`ds01hub.services.ops.warnings.CullWarning`);
    `engine`: the Docker engine's `ds01hub.engine.EngineState` (its current or last outage);
    `queue`: the starts waiting for a GPU, in the order they are served (`queue_rows`);
    `fairshare`: `ds01hub.gpu.fairshare.report`'s rows (None: fair share is off);
    `group_problems`: hub group -> the problems of its `ds01` properties (its members' spawns
    are refused until an admin fixes them); `nodes`: a swarm's use per node
    (`ds01hub.services.ops.node_metrics.NodeMetricsSource.overview`; None on one host), whose
    problems are alerts too; `chart_cache`: the charts' sums kept between loads
    (`ChartCache`; None: read and sum the log every time); `hub_groups`: the hub-groups
    snapshot's state, as the proxy and the broker see it
    (`ds01hub.hub.group_snapshot.SnapshotReader.status`)."""
    since = week_start(now)
    slots = slot_rows(status, inventory)
    chart, usage = history(eventlog, [row["slot"] for row in slots], now, chart_cache)
    return {
        "queue": [dict(entry) for entry in queue],
        "charts": chart,
        "at": now.isoformat(),
        "week_start": since.isoformat(),
        "simulated": bool(inventory.simulated),
        "inventory_note": inventory.reason,
        "config_error": config_error,
        "group_problems": {
            name: [str(p) for p in problems] for name, problems in (group_problems or {}).items()
        },
        "hub_groups": hub_groups,
        "engine": engine.to_dict() if engine is not None else None,
        "engine_note": engine.note() if engine is not None else None,
        "pending_culls": [
            {
                "user": w.user,
                "project": w.server or "default",
                "cull_at": w.cull_at.isoformat(),
                "reason": w.reason,
            }
            for w in sorted(pending_culls, key=lambda w: w.cull_at)
        ],
        "slots": slots,
        "alerts": alerts(slots, eventlog.health() if eventlog is not None else None)
        + [f"node {row['node']}: {row['problem']}" for row in nodes or () if row["problem"]],
        "nodes": nodes,
        "usage": usage,
        "fairshare": fairshare,
    }


def chart_data(
    eventlog: Any, slots: list[str], now: datetime, cache: ChartCache | None = None
) -> dict[str, Any]:
    """The charts' numbers (JSON-ready, in `api/overview` too): GPU-hours per user and group
    in each of the last CHART_WEEKS weeks, and each slot's share held in each of the last 24
    hours (`history`'s first half)."""
    return history(eventlog, slots, now, cache)[0]


def history(
    eventlog: Any, slots: list[str], now: datetime, cache: ChartCache | None = None
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(the charts' numbers, the usage tables: GPU-hours per user and per group this week and
    in all) from one read of the event log's intervals, or from `cache` (the ops service's,
    which keeps the finished intervals' sums between loads)."""
    starts = charts.week_starts(now, CHART_WEEKS)
    hours = charts.hour_starts(now, 24)
    if eventlog is None:
        finished, still = [], []
    elif cache is None:
        finished, still = [], eventlog.intervals(until=now)
    else:
        finished, still = cache.intervals(eventlog, now)
    grid = (tuple(starts), tuple(hours), tuple(slots))
    done = cache.sums(grid, finished, now) if cache is not None else _sums(finished, grid, now)
    user, group, held, user_total, group_total = (
        charts.add_sums(a, b) for a, b in zip(done, _sums(still, grid, now), strict=True)
    )
    chart = {
        "weeks": [f"{start:%m-%d}" for start in starts],
        "user": charts.top_series(user),
        "group": charts.top_series(group),
        "hours": [f"{start:%H}:00" for start in hours],
        "slots": charts.slot_shares(held),
    }
    usage = {
        by: usage_rows({n: w[-1] for n, w in weeks.items()}, {n: t[0] for n, t in total.items()})
        for by, weeks, total in (("user", user, user_total), ("group", group, group_total))
    }
    return chart, usage


#: (hours per user per week, per group per week, seconds per slot per hour, hours per user
#: in all, per group in all); each {name: [numbers]}, so that sums of parts add (add_sums).
Sums = tuple[dict[str, list[float]], ...]


def _sums(intervals: Iterable[Any], grid: tuple, now: datetime) -> Sums:
    """`Sums` of `intervals` on `grid` (the weeks' starts, the hours' starts, the slots; the
    last week ends at `now`)."""
    intervals = list(intervals)
    starts, hours, slots = grid
    totals: dict[str, dict[str, list[float]]] = {"user": {}, "group": {}}
    for by, total in totals.items():
        for interval in intervals:
            total.setdefault(interval.key(by), [0.0])[0] += interval.hours
    return (
        charts.week_sums(intervals, "user", starts, now),
        charts.week_sums(intervals, "group", starts, now),
        charts.slot_sums(intervals, slots, hours),
        totals["user"],
        totals["group"],
    )


class ChartCache:
    """The admin page's sums over the event log's finished intervals, kept between loads.

    Reading the log and summing it (charts and usage tables) was most of a page load
    (bench/admin_charts.py). A finished interval never changes, so its sums are kept, keyed by
    the log's files (size and mtime of events.db and its WAL: every write changes them; any
    change re-reads the log) and by the charts' grid (weeks, hours, slots). The intervals
    still open (slots held now: a handful) are extended to `now` and summed on every load:
    with no write since, none of them has ended."""

    def __init__(self) -> None:
        self._read: tuple[Any, datetime, list[Any], list[Any]] | None = None
        self._sums: tuple[tuple, Sums] | None = None
        self.reads = 0  # reads of the log (tests and the benchmark count them)

    def intervals(self, eventlog: Any, now: datetime) -> tuple[list, list]:
        """(finished intervals, open ones ending at `now`), all up to `now`."""
        signature = log_signature(Path(eventlog.path))  # before the read: a write in between
        read = self._read  # then only costs one more read
        if read is None or read[0] != signature or now < read[1]:
            found = eventlog.intervals(until=now)
            finished = [i for i in found if i.end < now]
            still = [i for i in found if i.end >= now]
            self._read = read = (signature, now, finished, still)
            self._sums = None
            self.reads += 1
        return read[2], [dataclasses.replace(i, end=now) for i in read[3]]

    def sums(self, grid: tuple, finished: list[Any], now: datetime) -> Sums:
        """`_sums` of the finished intervals on `grid`, computed once per read and grid."""
        if self._sums is None or self._sums[0] != grid:
            self._sums = (grid, _sums(finished, grid, now))
        return self._sums[1]


def log_signature(path: Path) -> tuple:
    """(size, mtime) of an SQLite file and of its write-ahead log (None where absent)."""

    def stat(file: Path) -> tuple[int, int] | None:
        try:
            info = file.stat()
        except FileNotFoundError:
            return None
        return info.st_size, info.st_mtime_ns

    return stat(path), stat(path.with_name(path.name + "-wal"))


def queue_rows(
    users: Iterable[Mapping[str, Any]],
    stored: Iterable[QueuedRequest] = (),
    fair: FairShare | None = None,
    priority_of: Callable[[str, Sequence[str]], int] = lambda user, groups: 0,
) -> list[dict[str, Any]]:
    """The starts waiting for a GPU, in the order the hub's GPU queue serves them: the hub's
    servers pending `spawn` (from its user models) and the requests stored in the queue
    (`ds01hub.gpu.queued`; one row per server: the stored request where both exist), ranked
    by `ds01hub.gpu.fairshare.rank` (effective priority = configured priority + fair share,
    then arrival). Each row: position (1 = next), user, project, request, since (ISO),
    priority (configured, `priority_of(user, groups)` for live spawns), effective priority,
    queued (a stored request)."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for request in stored:
        since = datetime.fromtimestamp(request.since, UTC)
        entries[(request.user, request.server or "default")] = {
            "user": request.user,
            "project": request.server or "default",
            "since": since.isoformat(timespec="seconds"),
            "wants": _wants(request.options),
            "priority": request.priority,
            "queued": True,
            "_at": since,
        }
    for user in users:
        name = str(user.get("name") or "")
        for server_name, server in (user.get("servers") or {}).items():
            project = server_name or "default"
            if server.get("pending") != "spawn" or (name, project) in entries:
                continue
            entries[(name, project)] = {
                "user": name,
                "project": project,
                "since": server.get("started"),
                "wants": _wants(server.get("user_options") or {}),
                "priority": priority_of(name, list(user.get("groups") or ())),
                "queued": False,
                "_at": _parse_time(server.get("started")),
            }
    arrived = sorted(entries.values(), key=lambda e: (e["_at"] is None, e["_at"] or 0, e["user"]))
    waiting = [Waiting(str(i), e["user"], e["priority"], i) for i, e in enumerate(arrived)]
    rows = []
    for position, (entry, effective) in enumerate(rank(waiting, fair or FairShare()), 1):
        row = {k: v for k, v in arrived[entry.arrival].items() if k != "_at"}
        rows.append({"position": position, **row, "effective": round(effective, 3)})
    return rows


def _wants(options: Mapping[str, Any]) -> str | None:
    """What a start asks for, in words: "MIG 2g.20gb", "1 GPU", "2 GPUs", or its profile."""
    if options.get("mig"):
        return f"MIG {options['mig']}"
    gpus = options.get("gpus")
    if gpus:
        return f"{gpus} GPU" + ("" if gpus == 1 else "s")
    profile = options.get("profile")
    return str(profile) if profile else None


def _parse_time(stamp: Any) -> datetime | None:
    """The hub's ISO time stamps ("2026-03-04T10:00:00.123Z"); None for none or nonsense."""
    if not isinstance(stamp, str):
        return None
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# -- HTML (pure) ------------------------------------------------------------------------------

TEMPLATES = Path(__file__).resolve().parents[2] / "hub" / "templates"


@dataclass(frozen=True)
class PageContext:
    """What the hub's page template needs besides the model: where the hub is (its URL
    prefix, e.g. `/` or `/jhub/`) and who is looking."""

    user: str
    prefix: str = "/"
    refresh: int = REFRESH_SECONDS

    @classmethod
    def from_environment(cls, user: str) -> PageContext:
        """In the managed service: JupyterHub passes its prefix as JUPYTERHUB_BASE_URL."""
        return cls(user=user, prefix=os.environ.get("JUPYTERHUB_BASE_URL", "/") or "/")

    def variables(self) -> dict[str, Any]:
        hub = self.prefix.rstrip("/") + "/hub/"
        escaped = json.dumps(self.user)[1:-1].replace("<", "\\u003c").replace(">", "\\u003e")
        return {
            "prefix": self.prefix,
            "base_url": hub,
            "logo_url": "",
            "static_url": lambda path, include_version=True: f"{hub}static/{path}",
            "user": SimpleNamespace(name=self.user, json_escaped_name=escaped),
            "parsed_scopes": {"admin-ui"},  # the handler let only admins in
            "services": [],
            "admin_access": True,
            "no_spawner_check": True,
            "xsrf_token": "",
            "version_hash": "",
            "logout_url": f"{hub}logout",
            "login_url": f"{hub}login",
            "announcement": None,
            "refresh": self.refresh,
        }


def _environment() -> jinja2.Environment:
    """JupyterHub's own loader arrangement (app.py): ours first, the hub's as `templates/`."""
    hub_templates = str(Path(DATA_FILES_PATH) / "templates")
    loader = jinja2.ChoiceLoader(
        [
            jinja2.PrefixLoader({"templates": jinja2.FileSystemLoader([hub_templates])}, "/"),
            jinja2.FileSystemLoader([str(TEMPLATES), hub_templates]),
        ]
    )
    environment = jinja2.Environment(
        loader=loader, autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters["when"] = when
    return environment


def when(stamp: str | None) -> str:
    """An ISO time of the model as people read it: '2026-03-04 12:00 UTC'; '-' for none."""
    if not stamp:
        return "-"
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M} UTC"


_STATE_BADGES = {
    "free": "text-bg-success",
    "running": "text-bg-primary",
    "stopped": "text-bg-warning",
    "conflict": "text-bg-danger",
}


def render_page(model: dict[str, Any], page: PageContext | None = None) -> str:
    """The admin page: the hub's page with the model's tables and the charts (inline SVG)."""
    page = page or PageContext(user="admin")
    data = model.get("charts") or chart_data(None, [r["slot"] for r in model["slots"]], _at(model))
    drawn = {
        by: Markup(charts.stacked_bars(data[by], data["weeks"], "GPU-hours", f"GPU-hours per {by}"))
        for by in ("user", "group")
    }
    drawn["slots"] = Markup(charts.heatmap(data["slots"], data["hours"], "Slots held per hour"))
    return (
        _environment()
        .get_template("ds01_admin.html")
        .render(
            model=model,
            charts=drawn,
            state_badge=lambda state: _STATE_BADGES.get(state, "text-bg-secondary"),
            **page.variables(),
        )
    )


def _at(model: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(model["at"])


# -- handlers ---------------------------------------------------------------------------------


class AdminBase(HubOAuthenticated, web.RequestHandler):
    """Logged in through the hub, then admins only. Settings: `ds01_overview` (a callable
    returning the page model, given the queue), `ds01_is_admin` (async name -> bool),
    `ds01_queue` (async, the starts waiting for a GPU; optional)."""

    async def prepare(self) -> None:
        model = self.current_user
        if model is None:
            return  # @web.authenticated redirects browsers to the hub login
        is_admin: Callable = self.settings["ds01_is_admin"]
        if model.get("kind", "user") != "user" or not await is_admin(model["name"]):
            raise web.HTTPError(403, "the ds01 admin page is for JupyterHub admins only")

    async def model(self) -> dict[str, Any]:
        queue = self.settings.get("ds01_queue")
        waiting = await queue() if queue is not None else []
        return await asyncio.to_thread(self.settings["ds01_overview"], waiting)

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")


class AdminPageHandler(AdminBase):
    @web.authenticated
    async def get(self) -> None:
        page = render_page(
            await self.model(), PageContext.from_environment(self.current_user["name"])
        )
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", page_policy(page))
        self.finish(page)


def page_policy(page: str) -> str:
    """The admin page's Content-Security-Policy: the hub's own styles, scripts and images
    (same origin), and of inline scripts only those in the <head>, by hash: that is the hub's
    page template's configuration script, rendered before any model value, so a value that
    escaped its escaping still could not run."""
    head = page.split("</head>", 1)[0]
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(head)
    )
    return (
        "default-src 'none'; "
        f"script-src 'self' {hashes}; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )


_INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", re.S | re.I)


class AdminApiHandler(AdminBase):
    def get_login_url(self) -> str:
        raise web.HTTPError(403, "a JupyterHub admin's token is required")

    @web.authenticated
    async def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(await self.model()))


class MetricsHandler(HubOAuthenticated, web.RequestHandler):
    """Prometheus text format for a token with `read:metrics` (as JupyterHub's /hub/metrics)."""

    hub_scopes = {"read:metrics"}

    def get_login_url(self) -> str:
        raise web.HTTPError(403, "a JupyterHub token with the read:metrics scope is required")

    @web.authenticated
    async def get(self) -> None:
        registry = self.settings["ds01_registry"]
        body = await asyncio.to_thread(generate_latest, registry)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)
