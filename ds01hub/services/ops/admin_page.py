"""The ds01 admin page: every GPU/MIG slot and its holder, usage in GPU-hours, config errors,
and the servers the culler has warned it will stop.

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
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from html import escape
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado import web

__all__ = [
    "AdminApiHandler",
    "AdminPageHandler",
    "MetricsHandler",
    "overview",
    "render_page",
    "week_start",
]


# -- the page model (pure) --------------------------------------------------------------------


def week_start(now: datetime) -> datetime:
    """Monday 00:00 UTC of `now`'s week: 'this week' in the usage tables."""
    monday = now - timedelta(days=now.weekday())
    return monday.replace(hour=0, minute=0, second=0, microsecond=0)


def slot_rows(status: Iterable[Any], inventory: Any) -> list[dict[str, Any]]:
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
    status: Iterable[Any],
    inventory: Any,
    eventlog: Any,
    now: datetime,
    config_error: str | None = None,
    pending_culls: Iterable[Any] = (),
    engine: Any = None,
    group_problems: Mapping[str, Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Everything the page shows, JSON-ready (also served as `api/overview`).
    `pending_culls`: the culler's standing warnings (`ds01hub.services.ops.warnings.CullWarning`);
    `engine`: the Docker engine's `ds01hub.engine.EngineState` (its current or last outage);
    `group_problems`: hub group -> the problems of its `ds01` properties (its members' spawns
    are refused until an admin fixes them)."""
    since = week_start(now)
    slots = slot_rows(status, inventory)
    usage = {}
    for by in ("user", "group"):
        if eventlog is None:
            usage[by] = []
            continue
        usage[by] = usage_rows(
            eventlog.gpu_hours(by=by, since=since, until=now), eventlog.gpu_hours(by=by, until=now)
        )
    return {
        "at": now.isoformat(),
        "week_start": since.isoformat(),
        "simulated": bool(inventory.simulated),
        "inventory_note": inventory.reason,
        "config_error": config_error,
        "group_problems": {
            name: [str(p) for p in problems] for name, problems in (group_problems or {}).items()
        },
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
        "alerts": alerts(slots, eventlog.health() if eventlog is not None else None),
        "usage": usage,
    }


# -- HTML (pure) ------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state-free { color: #1a7f37; } .state-running { color: #0550ae; }
.state-stopped { color: #9a6700; } .state-reserved, .state-starting { color: #666; }
.state-conflict { color: #cf222e; font-weight: bold; }
.error { background: #ffebe9; border: 1px solid #cf222e; padding: .6rem; margin-bottom: 1rem; }
.note { color: #666; }
"""


def _cell(value: Any, css: str = "") -> str:
    text = "-" if value is None or value == "" else str(value)
    attr = f' class="{css}"' if css else ""
    return f"<td{attr}>{escape(text)}</td>"


def _table(table_id: str, headers: list[str], body: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    rows = "".join(f"<tr>{row}</tr>" for row in body) or (
        f'<tr><td colspan="{len(headers)}" class="note">none</td></tr>'
    )
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def render_page(model: dict[str, Any]) -> str:
    """The admin page as one self-contained HTML document (no scripts, no external assets)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ds01 GPUs</title>",
        f"<style>{_STYLE}</style></head><body><h1>ds01 GPU allocation</h1>",
    ]
    if model.get("config_error"):
        parts.append(
            '<div class="error" id="config-error"><strong>Limits file failed to reload:</strong> '
            f"{escape(model['config_error'])}</div>"
        )
    for name, problems in sorted((model.get("group_problems") or {}).items()):
        listed = "".join(f"<li>{escape(p)}</li>" for p in problems)
        parts.append(
            f'<div class="error group-problem"><strong>JupyterHub group {escape(name)}: its '
            "ds01 properties are refused (its members cannot start servers):</strong>"
            f"<ul>{listed}</ul></div>"
        )
    for alert in model.get("alerts", []):
        parts.append(f'<div class="error alert">{escape(alert)}</div>')
    engine = model.get("engine") or {}
    if engine.get("current"):
        parts.append(
            '<div class="error" id="engine"><strong>Docker engine unreachable:</strong> '
            f"{escape(model['engine_note'])}. Slot holders are unknown until it answers; the "
            "hub reports the servers it stopped as stopped.</div>"
        )
    elif model.get("engine_note"):
        parts.append(f'<p class="note" id="engine">{escape(model["engine_note"])}.</p>')
    if model.get("simulated"):
        parts.append('<p class="note" id="simulated">SIMULATED GPUs (gpu_allocation.simulate)</p>')
    if model.get("inventory_note"):
        parts.append(f'<p class="note">{escape(model["inventory_note"])}</p>')
    slot_body = []
    for row in model["slots"]:
        util = None if row["utilization"] is None else f"{row['utilization']}%"
        slot_body.append(
            _cell(row["slot"])
            + _cell(row["kind"])
            + _cell(row["user"])
            + _cell(row["group"])
            + _cell(row["container"])
            + _cell(row["state"], f"state-{row['state']}")
            + _cell(util, "num")
            + _cell(row["processes"], "num")
            + _cell(row["held_until"])
        )
    headers = ["Slot", "Kind", "User", "Group", "Container", "State", "Util", "Procs"]
    parts.append("<h2>Slots</h2>" + _table("slots", [*headers, "Held until"], slot_body))
    culls = [
        _cell(w["user"]) + _cell(w["project"]) + _cell(w["cull_at"]) + _cell(w["reason"])
        for w in model.get("pending_culls", [])
    ]
    parts.append(
        "<h2>Pending culls (users warned)</h2>"
        + _table("pending-culls", ["User", "Project", "Stopped at", "Why"], culls)
    )
    for by, title in (("user", "User"), ("group", "Group")):
        body = [
            _cell(r["name"]) + _cell(f"{r['week']:.2f}", "num") + _cell(f"{r['total']:.2f}", "num")
            for r in model["usage"][by]
        ]
        parts.append(
            f"<h2>GPU-hours by {by}</h2>"
            + _table(f"usage-{by}", [title, "This week", "All time"], body)
        )
    parts.append(
        f'<p class="note">As of {escape(model["at"])}; the week starts '
        f"{escape(model['week_start'])}.</p></body></html>"
    )
    return "".join(parts)


# -- handlers ---------------------------------------------------------------------------------


class AdminBase(HubOAuthenticated, web.RequestHandler):
    """Logged in through the hub, then admins only. Settings: `ds01_overview` (a callable
    returning the page model), `ds01_is_admin` (async name -> bool)."""

    async def prepare(self) -> None:
        model = self.current_user
        if model is None:
            return  # @web.authenticated redirects browsers to the hub login
        is_admin: Callable = self.settings["ds01_is_admin"]
        if model.get("kind", "user") != "user" or not await is_admin(model["name"]):
            raise web.HTTPError(403, "the ds01 admin page is for JupyterHub admins only")

    async def model(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.settings["ds01_overview"])

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")


class AdminPageHandler(AdminBase):
    @web.authenticated
    async def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(render_page(await self.model()))


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
