"""Admin sub-commands over the core library: `limits`, `check-config`, `gpus`, `status`.

    ds01hub limits USER [--group G ...] [--hub URL] [--json | --docker-args]
    ds01hub check-config [FILE] [--json]          exit 0 valid, 1 invalid
    ds01hub gpus [--json]                         the GPU inventory (NVML or simulated)
    ds01hub status [--reconcile] [--all-deployments] [--json]   slots -> holders; conflicts exit 1
    ds01hub usage [--by user|group] [--since DATE] [--json]   GPU-hours from the event log
    ds01hub fairshare [--json]                    each user's decayed usage, factor, priority

Each takes `--limits FILE` (default: $DS01HUB_LIMITS, else /etc/ds01hub/resource-limits.yaml).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ds01hub import paths, provenance
from ds01hub.cli.output import (
    EXIT_FAILURE,
    EXIT_OK,
    CliError,
    Column,
    exit_code,
    paint,
    print_error,
    print_json,
    render_table,
    use_colour,
)
from ds01hub.errors import Ds01hubError
from ds01hub.hub.group_snapshot import SnapshotError, SnapshotReader
from ds01hub.limits import (
    LimitsConfig,
    LimitsError,
    ResolvedLimits,
    load_limits,
    load_limits_or_defaults,
)
from ds01hub.units import utcnow

__all__ = ["register"]

STATE_DIR_HELP = (
    f"allocator state directory (default: ${paths.ENV_STATE_DIR}, else {paths.DEFAULT_STATE_DIR})"
)
LIMITS_HELP = (
    f"the resource-limits YAML (default: ${paths.ENV_LIMITS}, else {paths.DEFAULT_LIMITS_PATH})"
)


def _limits_option() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--limits",
        metavar="FILE",
        type=Path,
        help=LIMITS_HELP,
    )
    return parent


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the core sub-commands to the `ds01hub` parser."""
    common = _limits_option()
    limits = subparsers.add_parser(
        "limits",
        parents=[common],
        help="show a user's resolved limits",
        description="Resolve a user's limits as every door does: user_overrides > JupyterHub "
        "group properties > YAML group > defaults; each value shows where it came from. The "
        "user's hub groups and their properties come from the ds01-ops service's snapshot "
        "(STATE_DIR/hub-groups.json, as the Docker proxy and the broker read them), or live "
        "from the hub with --hub.",
    )
    limits.add_argument("user", metavar="USER")
    limits.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="G",
        help="a group the user belongs to besides the YAML members lists (repeatable)",
    )
    limits.add_argument(
        "--hub",
        metavar="API_URL",
        help="also the user's JupyterHub groups and their properties, from this hub API "
        "(e.g. http://127.0.0.1:8081/hub/api; a token that may read users and groups in "
        "$JUPYTERHUB_API_TOKEN)",
    )
    limits.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    form = limits.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON")
    form.add_argument("--docker-args", action="store_true", help="print docker run arguments")
    limits.set_defaults(handler=_guard(cmd_limits))

    check = subparsers.add_parser(
        "check-config",
        help="validate a limits file (exit 0 valid, 1 invalid)",
        description="Validate a resource-limits YAML as the hub does at start and on every "
        "reload: every problem is listed as FILE:LINE: KEY.PATH: what is wrong (found VALUE). "
        "Fix: ...; --json gives each with its code.",
    )
    check.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: --limits")
    check.add_argument("--limits", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(handler=_guard(cmd_check_config))

    gpus = subparsers.add_parser(
        "gpus",
        parents=[common],
        help="show the GPU inventory",
        description="GPUs and slots (whole GPUs, MIG instances) from NVML, or the simulated "
        "inventory declared in gpu_allocation.simulate.",
    )
    form = gpus.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON")
    form.add_argument(
        "--swarm-daemon-json",
        action="store_true",
        help="print the node-generic-resources for this node's /etc/docker/daemon.json, so a "
        "Docker Swarm of GPU servers offers these slots (README: More than one machine)",
    )
    gpus.set_defaults(handler=_guard(cmd_gpus))

    status = subparsers.add_parser(
        "status",
        parents=[common],
        help="show who holds which GPU slot",
        description="Each slot with its holder: user, container, state, held until, from this "
        "deployment's signed containers only. A slot that more than one container holds is "
        "shown as CONFLICT with every holder, and the command exits 1. Never-started "
        "containers that nothing claims (ghosts: a spawn killed between create and start) "
        "hold nothing and are listed.",
    )
    status.add_argument(
        "--reconcile",
        action="store_true",
        help="also remove the ghosts (never forced), each recorded as a `reconcile` event in "
        "the state directory's event log, as the ds01-ops service does at hub start",
    )
    status.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only containers that also carry this label (repeatable), as `ds01hub cull`",
    )
    status.add_argument(
        "--all-deployments",
        action="store_true",
        help="also list the containers on this engine that claim GPU slots but are not this "
        "deployment's: other hubs' (deployment id), and unsigned or forged ones",
    )
    status.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=STATE_DIR_HELP,
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_guard(cmd_status))

    usage = subparsers.add_parser(
        "usage",
        help="GPU-hours per user or group from the event log",
        description="GPU slot-hours (held time included) per user or group, from the allocation "
        "event log (state directory's events.db).",
    )
    usage.add_argument("--by", choices=("user", "group"), default="user")
    usage.add_argument(
        "--since", metavar="DATE", type=_parse_date, help="only time from DATE (2026-01-31)"
    )
    usage.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=STATE_DIR_HELP,
    )
    formats = usage.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="print JSON")
    formats.add_argument(
        "--csv",
        action="store_true",
        help="print CSV (user or group, gpu_hours) for a spreadsheet; names that a spreadsheet "
        "would run as a formula are quoted with a leading '",
    )
    usage.set_defaults(handler=_guard(cmd_usage))

    fairshare = subparsers.add_parser(
        "fairshare",
        parents=[_limits_option()],
        help="each user's recent GPU usage, fair-share factor and effective priority",
        description="Fair share (gpu_allocation.fairshare): GPU-hours from the event log decayed "
        "with the half-life, the normalized usage and share, the factor 2^(-usage/share) and "
        "the effective priority (configured + weight x factor) that orders the GPU queue and "
        "decides reclaims. Users without recent GPU use have factor 1.",
    )
    fairshare.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=STATE_DIR_HELP,
    )
    fairshare.add_argument("--json", action="store_true", help="print JSON")
    fairshare.set_defaults(handler=_guard(cmd_fairshare))


def _parse_date(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _guard(handler):
    """Turn an error into a message and an exit code, so every command fails the same way."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except Ds01hubError as error:
            print_error(error)
            return exit_code(error)

    return run


def _load_config(args: argparse.Namespace) -> LimitsConfig:
    """The limits named by --limits / env / default, by the one rule for a missing file
    (ds01hub.limits.load_limits_or_defaults)."""
    try:
        return load_limits_or_defaults(args.limits)
    except LimitsError as error:
        path = paths.limits_path(args.limits)
        raise CliError(str(error), hint=f"run: ds01hub check-config {path}") from None


def _hub_groups(api_url: str, user: str) -> tuple[list[str], list[Any]]:
    """The user's hub groups and their validated limits (`--hub`); CliError on any failure."""
    import asyncio

    from ds01hub.hub.client import HubClient, HubError
    from ds01hub.hub.group_limits import user_group_limits

    token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise CliError(
            "--hub needs an API token in $JUPYTERHUB_API_TOKEN",
            hint="create one with the scopes read:users and read:groups (hub: Token page)",
        )
    try:
        return asyncio.run(user_group_limits(HubClient(api_url, token), user))
    except LimitsError as error:
        raise CliError(
            str(error), hint="fix the group's properties in the hub's admin panel"
        ) from None
    except HubError as error:
        raise CliError(f"the hub at {api_url} answered {error}") from None


def _resolved(args: argparse.Namespace, config: LimitsConfig) -> tuple[ResolvedLimits, str]:
    """The user's limits and where their hub groups came from: live (--hub), else the
    snapshot the Docker proxy and the broker read (ds01hub.hub.group_snapshot)."""
    if args.hub:
        names, hub_groups = _hub_groups(args.hub, args.user)
        resolved = config.resolve(args.user, [*args.group, *names], hub_groups=hub_groups)
        return resolved, f"hub groups live from {args.hub}"
    reader = SnapshotReader(paths.hub_groups_snapshot(args.state_dir))
    try:
        resolved = reader.resolve(config, args.user, args.group)
    except SnapshotError as error:
        raise CliError(error.message, hint=error.hint) from None
    except LimitsError as error:
        raise CliError(
            f"{error.summary()} (a JupyterHub group of {args.user}):\n" + "\n".join(error.lines()),
            hint="fix the group's properties in the hub's admin panel; until then the "
            "user's spawns and docker creates are refused",
        ) from None
    return resolved, reader.status(utcnow())


def cmd_limits(args: argparse.Namespace) -> int:
    config = _load_config(args)
    resolved, hub_groups = _resolved(args, config)
    if args.json:
        print_json({**resolved.to_dict(), "hub_groups": hub_groups})
    elif args.docker_args:
        print(" ".join(resolved.docker_args()))
    else:
        rows = resolved.source_rows()
        width = max(len(label) for label, _, _ in rows) + 2
        text_width = max(len(text) for _, text, source in rows if source) + 2
        colour = use_colour(sys.stdout)
        for label, text, source in rows:
            line = paint(f"{label + ':':<{width}}", "bold", colour) + text
            if source:
                line = f"{line:<{len(line) - len(text) + text_width}}" + paint(
                    f"({source})", "dim", colour
                )
            print(line.rstrip())
        for notice in resolved.notices():
            print(f"{paint('note:', 'yellow', colour)} {notice}")
        print(paint(hub_groups, "dim", colour))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.file or paths.limits_path(args.limits)
    colour = use_colour(sys.stdout)
    try:
        config = load_limits(path)
    except LimitsError as error:
        if args.json:
            print_json(
                {
                    "file": str(path),
                    "valid": False,
                    "problems": [p.to_dict() for p in error.problems],
                }
            )
        else:
            print(f"{paint('INVALID', 'red', colour)} {path}")
            for problem in error.problems:
                print(f"  - {problem}")
        return EXIT_FAILURE
    if args.json:
        print_json({"file": str(path), "valid": True, "warnings": list(config.warnings)})
        return EXIT_OK
    summary = (
        f"{len(config.groups)} group(s), {len(config.user_overrides)} user override(s), "
        f"strategy {config.gpu_allocation.strategy}"
    )
    if config.gpu_allocation.simulate:
        summary += f", {len(config.gpu_allocation.simulate.gpus)} SIMULATED GPU(s)"
    print(f"{paint('OK', 'green', colour)} {path}: {summary}")
    for warning in config.warnings:
        print(f"  {paint('warning:', 'yellow', colour)} {warning}")
    return EXIT_OK


def cmd_gpus(args: argparse.Namespace) -> int:
    from ds01hub.gpu.inventory import load_inventory

    config = _load_config(args)
    inventory = load_inventory(config.gpu_allocation)
    try:
        if args.json:
            print_json(inventory.to_dict())
            return EXIT_OK
        if args.swarm_daemon_json:
            from ds01hub.gpu.cluster import daemon_json

            if not inventory.slots:
                print(f"ds01hub: no GPU slots to offer: {inventory.reason}", file=sys.stderr)
                return EXIT_FAILURE
            print_json(daemon_json(inventory))
            return EXIT_OK
        print(_inventory_text(inventory))
    finally:
        inventory.close()
    return EXIT_OK


def _inventory_text(inventory: Any) -> str:
    source = "SIMULATED" if inventory.simulated else "NVML"
    head = f"{source} inventory: {len(inventory.gpus)} GPU(s), {len(inventory.slots)} slot(s)"
    if inventory.driver_version:
        head += f", driver {inventory.driver_version}"
    lines = [head]
    if inventory.reason:
        lines.append(f"note: {inventory.reason}")
    if inventory.slots:
        rows = [
            {
                "slot": s.id,
                "kind": s.profile or "whole GPU",
                "name": s.name + (" (simulated)" if s.simulated else ""),
                "memory": f"{_or_dash(inventory.memory_used_mb(s.id))} / {s.memory_mb} MiB",
                "util": _or_dash(inventory.utilization(s.id), "%"),
                "procs": len(inventory.processes(s.id)),
                "uuid": s.uuid,
            }
            for s in inventory.slots
        ]
        columns = [
            Column("SLOT", "slot"),
            Column("KIND", "kind"),
            Column("NAME", "name"),
            Column("MEMORY USED", "memory"),
            Column("UTIL", "util"),
            Column("PROCS", "procs"),
            Column("UUID", "uuid"),
        ]
        lines.append(render_table(rows, columns, colour=use_colour(sys.stdout)))
    return "\n".join(lines)


def _or_dash(value: int | None, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def cmd_status(args: argparse.Namespace) -> int:
    import docker

    from ds01hub.gpu.allocator import AllocationStateError, GpuAllocator, docker_lister
    from ds01hub.gpu.eventlog import EventLog
    from ds01hub.gpu.inventory import load_inventory

    config = _load_config(args)
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise CliError(
            f"cannot reach the Docker engine: {error}",
            hint="run as root or a member of the docker group; check dockerd runs",
        ) from None
    inventory = load_inventory(config.gpu_allocation)
    state_dir = paths.state_dir(args.state_dir)
    try:
        trust = provenance.load(state_dir)
    except provenance.ProvenanceError as error:
        raise CliError(str(error), hint="run as root; check --state-dir") from None
    eventlog = EventLog(state_dir / "events.db") if args.reconcile else None
    allocator = GpuAllocator(
        client,
        inventory,
        state_dir,
        eventlog,
        limits=config,
        container_lister=docker_lister(client, args.label, trust=trust),
        trust=trust,
    )
    try:
        reconciled = [a.to_dict() for a in allocator.reconcile()] if args.reconcile else []
    except AllocationStateError as error:
        raise CliError(
            str(error), hint=f"free space in {state_dir} or fix its permissions"
        ) from None
    rows = [row.to_dict() for row in allocator.status()]
    ghosts = [g.to_dict() for g in allocator.ghosts()]
    revoked = [{"container_id": cid, **entry} for cid, entry in allocator.revocations().items()]
    others = _other_claims(client, trust, rows) if args.all_deployments else None
    inventory.close()
    code = EXIT_FAILURE if any(row["conflict"] for row in rows) else EXIT_OK
    if args.json:
        found = {
            "deployment": trust.deployment,
            "simulated": inventory.simulated,
            "reason": inventory.reason,
            "slots": rows,
            "conflicts": [row["slot"] for row in rows if row["conflict"]],
            "ghosts": ghosts,
            "reconciled": reconciled,
            "revoked": revoked,
        }
        print_json(found if others is None else found | {"other_claims": others})
        return code
    colour = use_colour(sys.stdout)
    print(f"deployment {trust.deployment}")
    if inventory.simulated:
        print("SIMULATED GPUs (gpu_allocation.simulate)")
    if not rows:
        print(f"no GPU slots: {inventory.reason or 'none found'}")
    for row in rows:
        row["kind"] = row["profile"] or "whole GPU"
        row["state"] = "CONFLICT" if row["conflict"] else row["state"] or "free"
    columns = [
        Column("SLOT", "slot"),
        Column("KIND", "kind"),
        Column("USER", "user"),
        Column("CONTAINER", "container"),
        Column("STATE", "state", colour_of=_state_colour),
        Column("HELD UNTIL", "held_until"),
    ]
    if rows:
        print(render_table(rows, columns, colour=colour))
    for row in rows:
        if row["conflict"]:
            holders = "; ".join(
                f"{h['container']} ({h['user']}, {h['state']})" for h in row["holders"]
            )
            print(f"CONFLICT: slot {row['slot']} is held by more than one container: {holders}")
    for ghost in ghosts:
        print(
            f"ghost: {ghost['name']} ({ghost['user']}) never started and nothing claims it; "
            "it holds no GPU (ds01-ops or `ds01hub status --reconcile` removes it)"
        )
    for action in reconciled:
        print(f"reconciled: {action['container']} ({action['user']}): {action['reason']}")
    for entry in revoked:
        slots = ", ".join(entry.get("slots", []))
        if entry.get("by"):
            print(
                f"reclaimed: {entry.get('name')} lost slot(s) {slots} "
                f"to {entry.get('by')} ({entry.get('by_container')}) at {entry.get('at')}"
            )
        else:  # GpuAllocator.end_hold: given back, nobody took them
            print(f"released: {entry.get('name')} gave back slot(s) {slots}: {entry.get('reason')}")
    if others is not None:
        _print_other_claims(others, colour)
    return code


def _other_claims(client: Any, trust: provenance.Provenance, rows: list[dict]) -> list[dict]:
    """Containers on the engine whose labels claim GPU slots but that this deployment did not
    sign: another hub's (its deployment id), or unsigned/forged. What they claim is shown as
    a claim; a slot this deployment also holds is marked as a conflict."""
    from ds01hub.gpu.allocator import docker_lister
    from ds01hub.labels import ContainerRecord, container_name_of, labels_of

    held = {row["slot"] for row in rows if row.get("user")}
    claims = []
    for doc in docker_lister(client)():
        record = ContainerRecord.claimed(doc)
        if record is None or not record.gpus:
            continue
        if trust.verify(labels_of(doc), container_name_of(doc)):
            continue
        other = record.deployment and record.deployment != trust.deployment
        claims.append(
            {
                "container": record.name,
                "id": record.id[:12],
                "claimed_user": record.user,
                "claimed_slots": list(record.gpus),
                "state": record.state,
                "deployment": record.deployment or None,
                "verdict": "other deployment" if other else "unsigned or forged",
                "conflicts": sorted(held & set(record.gpus)),
            }
        )
    return sorted(claims, key=lambda c: (c["deployment"] or "", c["container"]))


def _print_other_claims(claims: list[dict], colour: bool) -> None:
    if not claims:
        print("no other containers on this engine claim GPU slots")
        return
    print("\nnot this deployment's (claims only, not counted here):")
    rows = [
        c
        | {
            "slots": ",".join(c["claimed_slots"]),
            "deployment": c["deployment"] or "-",
            "conflict": ",".join(c["conflicts"]) or "-",
        }
        for c in claims
    ]
    columns = [
        Column("CONTAINER", "container"),
        Column("CLAIMED USER", "claimed_user"),
        Column("SLOTS", "slots"),
        Column("STATE", "state"),
        Column("DEPLOYMENT", "deployment"),
        Column("VERDICT", "verdict"),
        Column("CONFLICT", "conflict"),
    ]
    print(render_table(rows, columns, colour=colour))


def _state_colour(state: str | None) -> str | None:
    colours = {
        "free": "green",
        "running": "blue",
        "stopped": "yellow",
        "reserved": "grey",
        "starting": "grey",
        "CONFLICT": "red",
    }
    return colours.get(state or "")


def _spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text, never runs: names are users' and groups' (OWASP
    "CSV injection": a leading = + - @ tab or CR starts a formula)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _event_log(state_dir: Path | None) -> Any:
    from ds01hub.gpu.eventlog import EventLog

    path = paths.state_dir(state_dir) / "events.db"
    if not path.exists():
        raise CliError(
            f"no event log at {path}",
            hint="the hub writes it on the first GPU allocation; check --state-dir",
        )
    return EventLog(path)


def cmd_usage(args: argparse.Namespace) -> int:
    hours = _event_log(args.state_dir).gpu_hours(by=args.by, since=args.since)
    ranked = sorted(hours.items(), key=lambda item: (-item[1], item[0]))
    if args.json:
        print_json({"by": args.by, "since": args.since, "gpu_hours": dict(ranked)})
        return EXIT_OK
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([args.by, "gpu_hours"])
        writer.writerows([_spreadsheet_safe(who), f"{value:.4f}"] for who, value in ranked)
        return EXIT_OK
    if not ranked:
        print("no GPU time recorded" + (f" since {args.since:%Y-%m-%d}" if args.since else ""))
        return EXIT_OK
    rows = [{"who": who, "hours": f"{value:.2f}"} for who, value in ranked]
    columns = [Column(args.by.upper(), "who"), Column("GPU-HOURS", "hours")]
    print(render_table(rows, columns, colour=use_colour(sys.stdout)))
    return EXIT_OK


def cmd_fairshare(args: argparse.Namespace) -> int:
    from ds01hub.gpu.fairshare import FairShare, relevant_since, report
    from ds01hub.limits import FairShareConfig

    config = _load_config(args)
    configured = config.gpu_allocation.fairshare
    settings = configured or FairShareConfig()
    now = datetime.now(UTC)
    since = datetime.fromtimestamp(relevant_since(now.timestamp(), settings.half_life), UTC)
    intervals = _event_log(args.state_dir).intervals(since=since, until=now)
    reader = SnapshotReader(paths.hub_groups_snapshot(args.state_dir))
    try:  # each user's group and priority now, from the hub's groups (as the proxy reads them)
        resolve = reader.reporter(config)
    except SnapshotError as error:
        raise CliError(error.message, hint=error.hint) from None
    fair = FairShare.compute(
        settings, intervals, now.timestamp(), lambda user, logged: resolve(user, logged).group
    )
    rows = report(fair if configured else FairShare(0.0, fair.users), config, resolve)
    if args.json:
        print_json(
            {
                "enabled": configured is not None,
                "half_life_seconds": settings.half_life,
                "weight": settings.weight if configured else 0,
                "users": rows,
                "hub_groups": reader.status(now),
            }
        )
        return EXIT_OK
    if configured is None:
        print(
            "fair share is off (no gpu_allocation.fairshare in the limits file): the effective "
            "priority is the configured one; usage shown with the default half-life"
        )
    if not rows:
        print("no GPU time recorded within the half-life's horizon")
        return EXIT_OK
    shown = [
        {
            **row,
            "group": row["group"] or "-",
            "usage": f"{row['usage_gpu_hours']:.2f}",
            "norm": f"{row['normalized_usage']:.3f}",
            "share": f"{row['share']:.3f}",
            "factor": f"{row['factor']:.3f}",
            "priority": str(row["priority"]),
            "effective": f"{row['effective']:g}",
        }
        for row in rows
    ]
    columns = [
        Column("USER", "user"),
        Column("GROUP", "group"),
        Column("USAGE (GPU-H, DECAYED)", "usage"),
        Column("NORM. USAGE", "norm"),
        Column("SHARE", "share"),
        Column("FACTOR", "factor"),
        Column("PRIORITY", "priority"),
        Column("EFFECTIVE", "effective"),
    ]
    print(render_table(shown, columns, colour=use_colour(sys.stdout)))
    print(paint(f"groups: {reader.status(now)}", "dim", use_colour(sys.stdout)))
    return EXIT_OK
