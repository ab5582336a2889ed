"""``QuotaPanel``: the user's limits, the GPUs they hold and their containers, at a glance."""

from __future__ import annotations

import html

import ipywidgets as w

from ds01hub.units import quota_rows

from .client import Ds01Client, Ds01Error
from .common import error_box, table


class QuotaPanel(w.VBox):
    """Shows what ``GET api/quota`` and ``GET api/containers`` say; ``Refresh`` asks again."""

    def __init__(self, client: Ds01Client | None = None):
        self._client = client
        self.limits_html = w.HTML()
        self.containers_html = w.HTML()
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.refresh())
        super().__init__(
            [
                w.HTML("<h3 style='margin:4px 0'>My resources</h3>"),
                self.limits_html,
                self.containers_html,
                self.refresh_button,
            ]
        )
        self.add_class("ds01-quota-panel")
        self.refresh()

    @property
    def client(self) -> Ds01Client:
        if self._client is None:
            self._client = Ds01Client.discover()
        return self._client

    def refresh(self) -> None:
        try:
            quota = self.client.get("api/quota")
            containers = self.client.get("api/containers")
        except Ds01Error as error:
            self.limits_html.value = error_box(error)
            self.containers_html.value = ""
            return
        self.limits_html.value = limits_table(quota)
        self.containers_html.value = containers_table(containers)


def limits_table(quota: dict) -> str:
    """The limits next to current use (pure, for tests): the GPUs in the one wording of
    ds01hub.gpu.messages ("1 of 2 GPUs in use (slot 0: NVIDIA A100)"), absent limits as
    "unlimited"."""
    limits = quota.get("limits")
    if not limits:
        return "<i>No resource limits are configured for you.</i>"
    rows = [list(row) for row in quota_rows(quota)]
    group = html.escape(str(limits.get("group") or "none"))
    notices = "".join(
        f"<div class='ds01-notice'><b>Note:</b> {html.escape(str(text))}</div>"
        for text in quota.get("notices") or ()
    )
    return (
        notices
        + f"<div>Group: <b>{group}</b></div>"
        + table(["", "in use", "limit"], rows, "ds01-limits")
    )


def containers_table(containers: list[dict]) -> str:
    """One row per container; its GPUs as "slot 0", "slot 2:1" (a bare "0" reads as none)."""
    if not containers:
        return "<i>You have no containers.</i>"
    rows = [
        [
            c.get("project"),
            c.get("state"),
            ", ".join(f"slot {slot}" for slot in c.get("gpus") or []) or "none",
            c.get("image"),
        ]
        for c in containers
    ]
    return table(["project", "state", "GPUs", "image"], rows, "ds01-containers")
