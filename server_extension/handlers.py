"""Handlers of the ds01 jupyter-server extension (``{base_url}ds01/...``).

``POST ds01/projects`` creates a project in the user's files. Everything else under
``ds01/`` is forwarded to the hub-side ds01 service (:mod:`ds01hub.services.notebook.app`) with the
user's JupyterHub token; its answers (and refusals) are passed back unchanged. When the service
cannot be reached the answer is a 503 whose message says so in words a student can act on.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from urllib.parse import urlencode

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from pydantic import Field
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Unicode, default
from traitlets.config import LoggingConfigurable

from ds01hub.actions import projects
from ds01hub.bodies import Body
from ds01hub.errors import Ds01hubError
from ds01hub.services.web import JsonHandler

AUTH_RESOURCE = "ds01"


#: Paths (relative to the service's ``api/``) the extension forwards, with the methods allowed.
FORWARDED = {
    r"quota": ("GET",),
    r"containers": ("GET",),
    r"templates": ("GET",),
    r"images": ("GET",),
    r"images/[a-z0-9._-]+": ("DELETE",),
    r"builds": ("GET", "POST"),
    r"builds/[0-9a-f]{32}": ("GET",),
    r"builds/[0-9a-f]{32}/cancel": ("POST",),
    r"projects/[A-Za-z0-9._-]+/server": ("POST",),
}


class DS01Extension(LoggingConfigurable):
    """Settings of the ds01 server extension (``c.DS01Extension.*``)."""

    service_url = Unicode(
        help="""URL of the hub-side ds01 service as seen from this container, ending in
        ``/services/ds01/``. Default: $DS01_SERVICE_URL (set by
        ``ds01hub.hub.services.configure_notebook``).
        """
    ).tag(config=True)

    @default("service_url")
    def _default_service_url(self) -> str:
        url = os.environ.get("DS01_SERVICE_URL", "")
        return url if not url or url.endswith("/") else url + "/"

    api_token = Unicode(
        help="Token sent to the ds01 service. Default: $JUPYTERHUB_API_TOKEN (the user's own)."
    ).tag(config=True)

    @default("api_token")
    def _default_api_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    request_timeout = Float(
        60.0, help="Seconds to wait for the ds01 service before answering 504."
    ).tag(config=True)


class DS01Handler(JsonHandler, APIHandler):
    """Common parts: JSON bodies and errors as every ds01hub door has them
    (ds01hub.services.web), the extension's settings."""

    auth_resource = AUTH_RESOURCE

    @property
    def extension(self) -> DS01Extension:
        return self.settings["ds01_extension"]


class StatusHandler(DS01Handler):
    """What the widgets need to know before they start."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(
            json.dumps(
                {
                    "service_url": self.extension.service_url or None,
                    "root_dir": str(self.settings["server_root_dir"]),
                    "use_cases": dict(projects.USE_CASES),
                }
            )
        )


class ProjectRequest(Body):
    """``POST ds01/projects``; the values are checked by ds01hub.actions.projects."""

    name: str = Field("", description="the project's folder name (letters, digits, . _ -)")
    description: str = Field("", description="one line about the project")
    use_case: str = Field(
        "general", description="one of " + ", ".join(projects.USE_CASES) + " (default general)"
    )
    author: str = Field("", description="the author's name for the README and git")
    git: bool = Field(True, description="true: git init and a first commit")
    parent: str = Field("", description="a folder relative to your files' root (default: it)")


class ProjectsHandler(DS01Handler):
    """``POST ds01/projects``: create a project in the user's files (ProjectRequest)."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.body(ProjectRequest)
        root = Path(self.settings["server_root_dir"]).expanduser().resolve()
        parent = self._parent(root, body.parent)
        spec = projects.ProjectSpec(
            name=body.name,
            description=body.description,
            use_case=body.use_case,
            author=body.author,
            git=body.git,
        )
        result = await asyncio.to_thread(projects.init_project, spec, parent)  # ProjectError: 400
        data = result.to_dict()
        data["relative_path"] = str(result.path.relative_to(root))
        data["summary"] = result.summary()
        self.write_json(data, 201)

    @staticmethod
    def _parent(root: Path, relative: str) -> Path:
        """The parent folder, refused if it leaves the server's root (``..``, symlinks, /abs)."""
        if "\x00" in relative or Path(relative).is_absolute():
            raise Ds01hubError(f"parent {relative!r} must be a folder relative to {root}")
        parent = (root / relative).resolve()
        if not parent.is_relative_to(root):
            raise Ds01hubError(f"parent {relative!r} is outside your files ({root})")
        return parent


class ForwardHandler(DS01Handler):
    """Forward one request to the ds01 service with the user's token."""

    async def _forward(self, path: str) -> None:
        method = self.request.method
        allowed = next((m for p, m in _FORWARD_PATTERNS if p.fullmatch(path)), ())
        if method not in allowed:
            raise Ds01hubError(f"no such ds01 endpoint: {method} {path}", status=404)
        extension = self.extension
        if not extension.service_url:
            raise Ds01hubError(
                "this server does not know where the ds01 service is (DS01_SERVICE_URL is unset)",
                "ask your administrator to register the ds01 service in jupyterhub_config.py",
                status=503,
            )
        query = urlencode(self.request.query_arguments, doseq=True)
        url = f"{extension.service_url}api/{path}" + (f"?{query}" if query else "")
        request = HTTPRequest(
            url,
            method=method,
            body=self.request.body if method in ("POST", "PUT", "PATCH") else None,
            headers={
                "Authorization": f"token {extension.api_token}",
                "Content-Type": "application/json",
            },
            request_timeout=extension.request_timeout,
            allow_nonstandard_methods=True,
        )
        try:
            response = await AsyncHTTPClient().fetch(request)
        except HTTPClientError as error:
            if error.response is None or error.code == 599:
                raise self._unreachable(url, str(error)) from None
            self.set_status(error.code)
            self.finish(error.response.body)
            return
        except OSError as error:
            raise self._unreachable(url, str(error)) from None
        self.set_status(response.code)
        self.finish(response.body)

    @staticmethod
    def _unreachable(url: str, reason: str) -> Ds01hubError:
        return Ds01hubError(
            f"the ds01 service is not reachable ({reason}); your files are not affected",
            "try again in a minute; if it keeps failing, tell your administrator "
            f"(service URL: {url.split('/api/')[0]}/)",
            status=503,
        )

    @web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    @authorized
    async def delete(self, path: str) -> None:
        await self._forward(path)


_FORWARD_PATTERNS = [(re.compile(p), m) for p, m in FORWARDED.items()]


def handler_routes(base_url: str) -> list[tuple[str, type]]:
    """The extension's routes under ``base_url``."""
    prefix = base_url.rstrip("/") + "/ds01/"
    return [
        (prefix + "status", StatusHandler),
        (prefix + "projects", ProjectsHandler),
        (prefix + "api/(.+)", ForwardHandler),
    ]
