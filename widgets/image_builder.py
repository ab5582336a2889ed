"""``ImageBuilder``: build a personal image from a use-case template plus extra packages.

The build runs on the hub side (the ds01 service, the only part that talks to Docker); this
widget sends the request through the server extension and follows the build's log, showing it
live with a progress bar; ``Cancel`` stops it (the same cancel as ``image-cancel``). Input is
checked in the kernel first (the same strict rules the service applies again) so mistakes are
reported before anything is sent.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as w

from ds01hub.actions import images
from ds01hub.actions.builds import CANCELLED
from ds01hub.units import human_size

from .client import Ds01Client, Ds01Error
from .common import box, error_box, table

MAX_LOG_LINES = 400
LOG_TAIL_LINES = 12


class ImageBuilder(w.VBox):
    """Pick a template, add pip/apt packages, build, and get the image's tag."""

    def __init__(self, client: Ds01Client | None = None, poll_interval: float = 1.0):
        self._client = client
        self.poll_interval = poll_interval
        self.build: dict | None = None
        self.log_lines: list[str] = []
        self._thread: threading.Thread | None = None
        self.template = w.Dropdown(description="Template")
        self.template_info = w.HTML()
        self.image_name = w.Text(description="Name", placeholder="my-image")
        self.pip_packages = w.Textarea(description="pip", placeholder="six\ntransformers==4.44.0")
        self.apt_packages = w.Textarea(description="apt", placeholder="ffmpeg")
        self.build_button = w.Button(description="Build image", button_style="success", icon="cogs")
        self.cancel_button = w.Button(
            description="Cancel build", button_style="warning", icon="stop", disabled=True
        )
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="Progress")
        self.status = w.HTML()
        self.build_log = w.HTML()
        self.result = w.HTML()
        self.images_html = w.HTML()
        self.refresh_button = w.Button(
            description="Refresh my images", icon="refresh", layout=w.Layout(width="180px")
        )
        self.build_button.on_click(lambda _: self.start_build())
        self.cancel_button.on_click(lambda _: self.cancel_build())
        self.refresh_button.on_click(lambda _: self.refresh_images())
        self.template.observe(lambda _: self._show_template(), names="value")
        for widget, name in [
            (self.image_name, "ds01-image-name"),
            (self.pip_packages, "ds01-pip"),
            (self.build_button, "ds01-build"),
            (self.cancel_button, "ds01-cancel"),
            (self.status, "ds01-build-status"),
            (self.result, "ds01-build-result"),
            (self.images_html, "ds01-my-images"),
        ]:
            widget.add_class(name)
        super().__init__(
            [
                w.HTML("<h3 style='margin:4px 0'>Build a custom image</h3>"),
                self.template,
                self.template_info,
                self.image_name,
                self.pip_packages,
                self.apt_packages,
                w.HBox([self.build_button, self.cancel_button]),
                self.progress,
                self.status,
                self.build_log,
                self.result,
                self.refresh_button,
                self.images_html,
            ]
        )
        self.add_class("ds01-image-builder")
        self._load_templates()
        self.refresh_images()

    @property
    def client(self) -> Ds01Client:
        if self._client is None:
            self._client = Ds01Client.discover()
        return self._client

    def _load_templates(self) -> None:
        try:
            templates = self.client.get("api/templates")
        except Ds01Error as error:
            self.status.value = error_box(error)
            templates = [t.to_dict() for t in images.list_templates()]
        self._templates = {t["key"]: t for t in templates}
        self.template.options = [(t["title"], t["key"]) for t in templates]
        self.template.value = "custom" if "custom" in self._templates else templates[0]["key"]
        self._show_template()

    def _show_template(self) -> None:
        template = self._templates.get(self.template.value)
        if not template:
            return
        packages = ", ".join(template["pip_packages"] + template["apt_packages"]) or "none"
        self.template_info.value = (
            f"<i>{html.escape(template['description'])}</i><br>Included: {html.escape(packages)}"
        )

    def request_body(self) -> dict:
        """The build request from the form, checked with the service's own rules."""
        spec = images.ImageSpec(
            user="you",
            name=self.image_name.value.strip(),
            template=self.template.value,
            pip_packages=images.parse_package_list(self.pip_packages.value),
            apt_packages=images.parse_package_list(self.apt_packages.value),
        ).validated()
        return {
            "name": spec.name,
            "template": spec.template,
            "pip_packages": list(spec.pip_packages),
            "apt_packages": list(spec.apt_packages),
        }

    def start_build(self) -> dict | None:
        """Send the build; the log is then followed in a background thread."""
        try:
            body = self.request_body()
        except images.ImageError as error:
            self.status.value = box("error", str(error))
            return None
        try:
            self.build = self.client.post("api/builds", body)
        except Ds01Error as error:
            self.status.value = error_box(error)
            return None
        self.build_button.disabled, self.cancel_button.disabled = True, False
        self.progress.value, self.progress.bar_style = 0.0, "info"
        self.log_lines = []
        self.result.value = ""
        self.status.value = box("info", f"Building {self.build['tag']} ...")
        self._thread = threading.Thread(target=self._follow, args=(self.build["id"],), daemon=True)
        self._thread.start()
        return self.build

    def cancel_build(self) -> dict | None:
        """Ask the service to stop the running build; the log follower then sees it end."""
        if self.build is None or self.build.get("status") in ("done", "error"):
            return None
        self.cancel_button.disabled = True
        try:
            answer = self.client.post(f"api/builds/{self.build['id']}/cancel", {"wait": 0})
        except Ds01Error as error:
            self.cancel_button.disabled = False
            self.status.value = error_box(error)
            return None
        self.status.value = box("info", f"Cancelling the build of {answer['image']} ...")
        return answer

    def wait(self, timeout: float | None = None) -> dict | None:
        """Block until the running build ends (for scripts and tests); returns its state."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.build

    def _follow(self, build_id: str) -> None:
        seen = 0
        failures = 0
        while True:
            try:
                state = self.client.get(f"api/builds/{build_id}?since={seen}")
                failures = 0
            except Ds01Error as error:
                failures += 1
                if failures >= 5:
                    self._finish(None, error)
                    return
                time.sleep(self.poll_interval)
                continue
            events = state.get("events", [])
            seen += len(events)
            self._show_events(events, state)
            if state["status"] in ("done", "error"):
                self._finish(state, None)
                return
            time.sleep(self.poll_interval)

    def _show_events(self, events: list[dict], state: dict) -> None:
        if events:
            self.log_lines.extend(e.get("text", "") for e in events if e.get("text"))
            self.log_lines = self.log_lines[-MAX_LOG_LINES:]
            self.build_log.value = log_html(self.log_lines)
        self.progress.value = float(state.get("progress") or 0.0)

    def _finish(self, state: dict | None, error: Ds01Error | None) -> None:
        self.build_button.disabled, self.cancel_button.disabled = False, True
        if state is not None:
            self.build = state
        if error is not None:
            self.progress.bar_style = "danger"
            self.status.value = error_box(error)
        elif state["status"] == "done":
            self.progress.value, self.progress.bar_style = 1.0, "success"
            self.status.value = box("ok", "Build finished")
            self.result.value = box(
                "ok",
                f"Your image: {state['tag']}",
                "choose it in the hub's server options (image) for your next container",
            )
            self.refresh_images()
        elif (state.get("events") or [{}])[-1].get("text") == CANCELLED:
            self.progress.bar_style = "warning"
            self.status.value = box("info", "Build cancelled", "nothing was kept; build again")
        else:
            self.progress.bar_style = "danger"
            last = self.log_lines[-1] if self.log_lines else "no details"
            self.status.value = box("error", "The build failed", last)

    def refresh_images(self) -> list[dict]:
        """Show (and return) the images this user has built."""
        try:
            mine = self.client.get("api/images")
        except Ds01Error as error:
            self.images_html.value = error_box(error)
            return []
        if not mine:
            self.images_html.value = "<i>You have no custom images yet.</i>"
            return []
        rows = [
            [i["tag"], i["template"], " ".join(i["pip_packages"]) or "-", human_size(i["size"])]
            for i in mine
        ]
        self.images_html.value = table(
            ["image", "template", "extra pip", "size"], rows, "ds01-images"
        )
        return mine


def log_html(lines: list[str], tail: int = LOG_TAIL_LINES) -> str:
    """The newest ``tail`` lines of the build log, in a fixed box (what is happening now;
    the whole log is in ``ImageBuilder.log_lines``)."""
    shown = lines[-tail:]
    skipped = len(lines) - len(shown)
    text = html.escape("\n".join(shown), quote=False)
    more = (
        f"<div style='color:#777;margin:2px 4px'>... {skipped} earlier lines</div>"
        if skipped
        else ""
    )
    return (
        "<div class='ds01-build-log' style='border:1px solid #ddd;background:#fafafa'>"
        f"{more}<pre style='margin:4px;font-size:12px;white-space:pre-wrap'>{text}</pre></div>"
    )
