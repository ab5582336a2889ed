"""How the users' commands show containers, GPUs and quotas (tables and cells; pure)."""

from __future__ import annotations

from typing import Any

from ds01hub.cli.output import (
    STATE_COLOURS,
    CliError,
    Column,
    format_bytes,
    format_duration,
    format_percent,
    render_table,
)


def gpus_cell(row: dict[str, Any]) -> str:
    gpus = ",".join(row.get("gpus") or [])
    if gpus and row.get("gpus_released"):
        return f"{gpus} (released)"
    return gpus or "-"


def time_cell(row: dict[str, Any]) -> str:
    if row.get("uptime_s") is not None:
        return f"up {format_duration(row['uptime_s'])}"
    if row.get("stopped_for_s") is not None:
        return f"stopped {format_duration(row['stopped_for_s'])}"
    return "-"


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
            "idle_text": format_duration(row.get("idle_s")),
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
    memory = format_bytes(None if used is None else used * 2**20)
    if size:
        memory += f" / {format_bytes(size * 2**20)}"
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
                    format_bytes(row.get("memory_bytes")),
                    format_bytes(row.get("memory_limit_bytes")),
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


def quota_line(quota: dict[str, Any]) -> str:
    """`Limits (group students): GPUs 1 of 1 held, containers 2 of 2, per container 4 CPUs and
    16G; idle timeout 12h, GPUs held 1h after a stop`; None limits read "no limit"."""
    limits = quota.get("limits")
    if not limits:
        return f"Containers: {quota.get('containers', 0)} (no limits file on this host)"
    notices = "".join(f"\nNote: {text}" for text in quota.get("notices") or ())

    def cap(value: Any) -> str:
        return "no limit" if value is None else str(value)

    max_cpus = limits.get("max_cpus")
    cpus = "any CPUs" if max_cpus is None else f"{max_cpus:g} CPU{'' if max_cpus == 1 else 's'}"
    memory = "any memory" if limits.get("memory") is None else format_bytes(limits["memory"])
    idle = limits.get("idle_timeout")
    return (
        f"Limits (group {limits.get('group') or '-'}): "
        f"GPUs {quota.get('gpus_held', 0)} of {cap(limits.get('max_gpus'))} held, "
        f"containers {quota.get('containers', 0)} of {cap(limits.get('max_containers_per_user'))}, "
        f"per container {cpus} and {memory}; "
        f"idle timeout {'never' if idle is None else format_duration(idle)}, "
        f"GPUs held {format_duration(limits.get('gpu_hold_after_stop'))} after a stop"
        f"{notices}"
    )
