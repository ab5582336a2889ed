"""How the users' commands show containers, GPUs and quotas (tables and cells; pure)."""

from __future__ import annotations

import re
from typing import Any

from ds01hub.cli.output import (
    STATE_COLOURS,
    CliError,
    Column,
    format_percent,
    render_table,
)
from ds01hub.units import human_duration, human_size, quota_rows


def gpus_cell(row: dict[str, Any]) -> str:
    gpus = ",".join(row.get("gpus") or [])
    if gpus and row.get("gpus_released"):
        return f"{gpus} (released)"
    return gpus or "-"


_EXITED = re.compile(r"Exited \(-?\d+\) (.{1,40})")


def time_cell(row: dict[str, Any]) -> str:
    """Uptime or time stopped; for a stopped container the listing did not inspect (no
    stop time), Docker's own rough age from its status line (`Exited (0) 3 hours ago`)."""
    if row.get("state") == "queued":
        return queue_cell(row)
    if row.get("uptime_s") is not None:
        return f"up {human_duration(row['uptime_s'])}"
    if row.get("stopped_for_s") is not None:
        return f"stopped {human_duration(row['stopped_for_s'])}"
    exited = _EXITED.fullmatch(str(row.get("status") or ""))
    if exited:
        return f"stopped {exited.group(1)}"
    return "-"


def queue_cell(row: dict[str, Any]) -> str:
    """`position 2 of 5, est. 2026-03-01 14:00 UTC` for a queued request."""
    position, waiting = row.get("queue_position"), row.get("queue_waiting")
    text = f"position {position} of {waiting}" if position else "queued"
    estimate = row.get("queue_estimate")
    return text + (f", est. {estimate.replace('T', ' ')[:16]} UTC" if estimate else ", no est.")


def held_cell(row: dict[str, Any]) -> str:
    value = row.get("held_until")
    return value.replace("T", " ")[:16] + " UTC" if value else "-"


CONTAINER_COLUMNS = (
    Column("PROJECT", "project"),
    Column("STATE", "state", STATE_COLOURS.get),
    Column("IMAGE", "image"),
    Column("GPUS", "gpus_text"),
    Column("UPTIME", "time_text"),
    Column("IDLE", "idle_text"),
    Column("HELD UNTIL", "held_text"),
)


def container_table(rows: list[dict[str, Any]], colour: bool) -> str:
    shown = [
        {
            **row,
            "gpus_text": gpus_cell(row),
            "time_text": time_cell(row),
            "idle_text": human_duration(row.get("idle_s")),
            "held_text": held_cell(row),
        }
        for row in rows
    ]
    return render_table(shown, CONTAINER_COLUMNS, colour)


def gpu_cell(gpu: dict[str, Any]) -> str:
    """`0 (SIMULATED): 12%, 3.0G / 80G`: the slot, its utilisation and memory in use now,
    against its size."""
    slot = f"{gpu['slot']} (SIMULATED)" if gpu.get("simulated") else str(gpu["slot"])
    used, size = gpu.get("memory_used_mb"), gpu.get("memory_mb")
    memory = human_size(None if used is None else used * 2**20)
    if size:
        memory += f" / {human_size(size * 2**20)}"
    return f"{slot}: {format_percent(gpu.get('utilization_percent'))}, {memory}"


def stats_table(rows: list[dict[str, Any]], colour: bool) -> str:
    def against(used: str, limit: str | None) -> str:
        return f"{used} / {limit}" if limit and limit != "-" else used

    shown = []
    for row in rows:
        gpus = row.get("gpus") or []
        shown.append(
            {
                "project": row["project"],
                "cpu": against(
                    format_percent(row.get("cpu_percent")),
                    format_percent(row.get("cpu_limit_percent")),
                ),
                "memory": against(
                    human_size(row.get("memory_bytes")),
                    human_size(row.get("memory_limit_bytes")),
                ),
                "pids": against(str(row.get("pids") or "-"), str(row.get("pids_limit") or "-")),
                "gpus": ", ".join(gpu_cell(g) for g in gpus) or "-",
            }
        )
    columns = (
        Column("PROJECT", "project"),
        Column("CPU", "cpu"),
        Column("MEMORY", "memory"),
        Column("PROCESSES", "pids"),
        Column("GPU: UTIL, MEMORY", "gpus"),
    )
    return render_table(shown, columns, colour)


def running_view(final: dict[str, Any], name: str) -> dict[str, Any]:
    """The container view of a start's final event -- if it says the container runs; any other
    state is a start that did not start (exit 1 with that state)."""
    view = final.get("container") or {}
    if view.get("state") != "running":
        raise CliError(
            f"{name} did not start: it is {view.get('state') or 'unknown'}",
            hint=f"see container-list --all; try container-start {name} again",
        )
    return view


def _sentence_case(label: str) -> str:
    """'Memory per container' -> 'memory per container'; 'GPUs ...' (an acronym) stays."""
    return label if label[1:2].isupper() else label[0].lower() + label[1:]


def _quota_part(what: str, use: str, limit: str) -> str:
    """'memory per container 16G', 'containers 3 (1 running, 2 total)'; a row whose use is a
    whole sentence with its limit in it (the GPUs) reads 'GPUs: 1 of 2 GPUs in use'."""
    if not limit:
        return f"{what}: {use}"
    return f"{what} {limit}" + (f" ({use})" if use else "")


def quota_line(quota: dict[str, Any]) -> str:
    """`Limits (group students): GPUs: 1 of 2 GPUs in use; GPUs per container 1; ...`: the
    quota's rows (ds01hub.units.quota_rows) as one sentence."""
    limits = quota.get("limits")
    if not limits:
        return f"Containers: {quota.get('containers', 0)} (no limits file on this host)"
    parts = [
        _quota_part(_sentence_case(what) if i else what, use, limit)
        for i, (what, use, limit) in enumerate(quota_rows(quota))
    ]
    return f"Limits (group {limits.get('group') or '-'}): " + "; ".join(parts)
