"""The ds01hub jupyter-server extension, loaded in every single-user container.

Installing the ds01hub package enables it (``jupyter-config/jupyter_server_config.d/ds01hub.json``
is shipped as a data file). It adds handlers under ``{base_url}ds01/`` for the notebook widgets
and JupyterLab:

* project init runs *here*, on the user's own files, with :mod:`ds01hub.actions.projects`;
* quota, containers, templates, images and builds are forwarded to the hub-side ds01 service
  with the user's own JupyterHub token (``$JUPYTERHUB_API_TOKEN``): the container never talks
  to Docker itself.
"""

from __future__ import annotations

from .handlers import DS01Extension, handler_routes

__all__ = ["DS01Extension", "handler_routes"]


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "ds01hub.server_extension"}]


def _load_jupyter_server_extension(serverapp) -> None:
    """Register the ``/ds01/`` handlers on a running jupyter server."""
    extension = DS01Extension(parent=serverapp)
    web_app = serverapp.web_app
    web_app.settings["ds01_extension"] = extension
    web_app.add_handlers(".*$", handler_routes(web_app.settings["base_url"]))
    serverapp.log.info(
        "ds01hub extension loaded: /ds01/ handlers, hub service %s",
        extension.service_url or "(not configured: set DS01_SERVICE_URL)",
    )
