"""The site's environment file (``/etc/ds01hub/ds01hub.env``): where the hub's settings live.

One file for three readers, so they can never disagree: the hub's systemd unit
(``EnvironmentFile=``), which hands it to ``jupyterhub_config.py``; the admin commands
(``ds01hub status``, ``gpus``, ``check-config``, ``cull``), which find the hub, its state
directory, its limits and the admin token through it without flags; and the users' commands
(a non-default broker socket). ``ds01hub install`` writes it once and keeps the admin's edits.

The syntax is the plain subset of systemd's ``EnvironmentFile=``: ``NAME=value`` lines,
comments starting with ``#`` or ``;``, and one pair of matching quotes around a value. Only
``DS01HUB_*`` names are read (so the file cannot set ``PATH`` or ``LD_PRELOAD`` for anyone),
and a file that anyone but root could have written is refused: users' commands read it.
Variables already in the environment win over the file.

Standard library only: the users' commands and ``ds01hub install`` read it.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import TextIO

from ds01hub.errors import Ds01hubError
from ds01hub.paths import ENV_FILE, ENV_FILE_VARIABLE

NAME_RE = re.compile(r"^DS01HUB_[A-Z0-9_]+$")
_LINE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


class SiteEnvError(Ds01hubError, ValueError):
    """The environment file is unsafe or malformed; the message names the file, line and fix."""


def parse(text: str, origin: str = "ds01hub.env") -> dict[str, str]:
    """The ``DS01HUB_*`` settings of an environment file's text (see the module docstring)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        match = _LINE_RE.match(line)
        if not match:
            raise SiteEnvError(
                f"{origin}, line {number}: {raw!r} is not NAME=value (comments start with # or ;)"
            )
        name, value = match.groups()
        if not NAME_RE.match(name):
            raise SiteEnvError(
                f"{origin}, line {number}: {name} is not a ds01hub setting; only DS01HUB_* "
                "names belong in this file"
            )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def render(values: Mapping[str, str], comments: Mapping[str, str] | None = None) -> str:
    """An environment file holding ``values`` (each after its comment, when it has one)."""
    lines: list[str] = []
    for name, value in values.items():
        if not NAME_RE.match(name) or "\n" in value:
            raise SiteEnvError(f"cannot write {name}={value!r} to an environment file")
        if comments and name in comments:
            lines += [f"# {line}" for line in comments[name].splitlines()]
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def check_owner(path: Path) -> None:
    """Refuse a file (or its directory) that a non-root user could have written."""
    for candidate in (path, path.parent):
        info = candidate.stat()
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SiteEnvError(
                f"{candidate} is not safe to read settings from (owner uid {info.st_uid}, "
                f"mode {stat.S_IMODE(info.st_mode):04o}): it must be owned by root and "
                "writable by root only (chown root: ...; chmod go-w ...)"
            )


def find(environ: Mapping[str, str] | None = None) -> Path | None:
    """The environment file in force: ``$DS01HUB_ENV_FILE``, else /etc/ds01hub/ds01hub.env,
    else (a source checkout running ``make demo``) the demo's own file; None when there is
    none. An explicitly named file that does not exist is an error."""
    environ = os.environ if environ is None else environ
    named = environ.get(ENV_FILE_VARIABLE)
    if named:
        if not Path(named).is_file():
            raise SiteEnvError(f"${ENV_FILE_VARIABLE}={named}: no such file")
        return Path(named)
    if ENV_FILE.is_file():
        return ENV_FILE
    demo = _demo_env_file()
    return demo if demo and demo.is_file() else None


def _demo_env_file() -> Path | None:
    """``.state/demo/ds01hub.env`` of the source checkout this module runs from, if any (an
    installed copy in /opt/ds01hub has no checkout, and so no demo)."""
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / ".state").is_dir():
        return here / ".state" / "demo" / "ds01hub.env"
    return None


def load(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Put the environment file's settings into ``environ`` (default ``os.environ``) where
    they are not already set. Returns the file read, or None. Raises SiteEnvError for an
    unsafe or malformed file."""
    environ = os.environ if environ is None else environ
    path = find(environ)
    if path is None:
        return None
    check_owner(path)
    for name, value in parse(path.read_text(), str(path)).items():
        environ.setdefault(name, value)
    return path


def load_or_warn(stream: TextIO | None = None) -> Path | None:
    """:func:`load` for the commands: an unsafe or broken file is named on ``stream`` (stderr)
    and not used, so the command goes on with its defaults and flags."""
    try:
        return load()
    except (SiteEnvError, OSError) as error:
        (stream or sys.stderr).write(f"warning: site settings not read: {error}\n")
        return None


def hub_api_url(environ: Mapping[str, str] | None = None) -> str:
    """The hub's REST API as the admin commands reach it: ``$JUPYTERHUB_API_URL``, else the
    hub's own port on the Docker bridge address (where jupyterhub_config.py binds it)."""
    environ = os.environ if environ is None else environ
    if environ.get("JUPYTERHUB_API_URL"):
        return environ["JUPYTERHUB_API_URL"]
    from ds01hub.host.bootstrap import docker_bridge_ip

    return f"http://{docker_bridge_ip()}:{environ.get('DS01HUB_HUB_PORT', '8081')}/hub/api"
