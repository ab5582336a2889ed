"""``ProjectWizard``: set up a project folder step by step (name, use case, options, review).

The plan shown on the review step comes from :func:`ds01hub.actions.projects.plan_project` (pure,
run in the kernel); the files are written by the server extension (``POST ds01/projects``), on the
user's files, with the very same code the ``project-init`` command uses.
"""

from __future__ import annotations

import html
import re

import ipywidgets as w

from ds01hub.actions import projects

from .client import Ds01Client, Ds01Error
from .common import box, error_box

#: Container (named server) names the hub-side commands accept (ds01hub.actions.operations.NAME_RE).
SERVER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

STEPS = ("Name", "Use case", "Options", "Review")

#: What the guided mode says at each step.
GUIDANCE = (
    "A project is one folder holding everything for one piece of work: data, notebooks, code "
    "and results. Pick a short name without spaces (it becomes the folder name), and a sentence "
    "saying what the project is about; it goes into the README.",
    "The use case adds the folders that kind of work usually needs, and matches the image "
    "templates of the Image Builder, so you can build an image with the right libraries later.",
    "git keeps the history of your code and notebooks. The wizard creates a repository with a "
    ".gitignore that keeps data, model weights and checkpoints out of it (they are large). "
    "The folder is created inside the one you give here (empty: your home folder). A project "
    "can also get its own container (a named server in the hub) with its own GPU and image; "
    "you can start it later from the hub's home page too.",
    "Check what will be created. Existing files are never overwritten, so running the wizard "
    "again on the same name is safe.",
)


class ProjectWizard(w.VBox):
    """A step-by-step project set-up; ``guided=True`` explains every step.

    ``client`` defaults to the jupyter server this kernel runs on.
    """

    def __init__(self, guided: bool = False, client: Ds01Client | None = None):
        self.guided = guided
        self._client = client
        self.step = 0
        self.result: dict | None = None
        self.title = w.HTML()
        self.guidance = w.HTML()
        self.project_name = w.Text(description="Name", placeholder="my-thesis")
        self.project_description = w.Textarea(
            description="About", placeholder="What is this project about?"
        )
        self.use_case = w.RadioButtons(
            options=[(title, key) for key, title in projects.USE_CASES.items()],
            value="general",
            description="Use case",
        )
        self.use_git = w.Checkbox(value=True, description="Initialise a git repository")
        self.parent = w.Text(description="Inside", placeholder="(your home folder)")
        self.start_container = w.Checkbox(
            value=False, description="Also start a container (named server) for this project"
        )
        self.review = w.HTML()
        self.message = w.HTML()
        self.back_button = w.Button(description="Back", icon="arrow-left")
        self.next_button = w.Button(description="Next", icon="arrow-right", button_style="info")
        self.create_button = w.Button(description="Create project", button_style="success")
        self.back_button.on_click(lambda _: self.go(self.step - 1))
        self.next_button.on_click(lambda _: self.go(self.step + 1))
        self.create_button.on_click(lambda _: self.create())
        for widget, name in [
            (self.back_button, "ds01-back"),
            (self.next_button, "ds01-next"),
            (self.create_button, "ds01-create"),
            (self.project_name, "ds01-project-name"),
            (self.message, "ds01-message"),
        ]:
            widget.add_class(name)
        self.pages = [
            w.VBox([self.project_name, self.project_description]),
            w.VBox([self.use_case]),
            w.VBox([self.use_git, self.parent, self.start_container]),
            w.VBox([self.review]),
        ]
        self.body = w.VBox()
        buttons = w.HBox([self.back_button, self.next_button, self.create_button])
        super().__init__([self.title, self.guidance, self.body, buttons, self.message])
        self.add_class("ds01-project-wizard")
        self.go(0)

    @property
    def client(self) -> Ds01Client:
        if self._client is None:
            self._client = Ds01Client.discover()
        return self._client

    def spec(self) -> projects.ProjectSpec:
        return projects.ProjectSpec(
            name=self.project_name.value.strip(),
            description=self.project_description.value,
            use_case=self.use_case.value,
            git=self.use_git.value,
        )

    def go(self, step: int) -> None:
        """Show ``step``; moving forward first checks the current step."""
        step = max(0, min(step, len(STEPS) - 1))
        if step > self.step:
            problem = self._problem()
            if problem:
                self.message.value = box("error", problem)
                return
        self.step = step
        self.message.value = ""
        numbered = " &rarr; ".join(
            f"<b>{i + 1}. {s}</b>" if i == step else f"{i + 1}. {s}" for i, s in enumerate(STEPS)
        )
        self.title.value = f"<h3 style='margin:4px 0'>New project</h3><div>{numbered}</div>"
        self.guidance.value = box("info", GUIDANCE[step], strong=False) if self.guided else ""
        if STEPS[step] == "Review":
            self.review.value = self._review_html()
        self.body.children = [self.pages[step]]
        self.back_button.disabled = step == 0
        self.next_button.layout.display = "none" if step == len(STEPS) - 1 else None
        self.create_button.layout.display = None if step == len(STEPS) - 1 else "none"

    def _problem(self) -> str | None:
        try:
            projects.plan_project(self.spec())
        except projects.ProjectError as error:
            return str(error)
        name = self.spec().name
        if self.start_container.value and not SERVER_NAME_RE.match(name):
            return (
                f"{name!r} cannot name a container: use lowercase letters, digits, '-' and '_' "
                "(or do not start a container now)"
            )
        return None

    def _review_html(self) -> str:
        plan = projects.plan_project(self.spec())
        where = self.parent.value.strip() or "your home folder"
        rows = "".join(
            f"<li><code>{html.escape(d)}/</code> &mdash; {html.escape(why)}</li>"
            for d, why in plan.directory_purposes.items()
        )
        files = ", ".join(f"<code>{html.escape(f)}</code>" for f in plan.files if "/" not in f)
        git = "a git repository with a first commit" if plan.git else "no git repository"
        container = (
            f"<p>Then a container named <b>{html.escape(plan.name)}</b> is started for it.</p>"
            if self.start_container.value
            else ""
        )
        return (
            f"<div class='ds01-review'><p><b>{html.escape(plan.name)}/</b> in "
            f"{html.escape(where)}, with {git}.</p><ul>{rows}</ul><p>Files: {files}</p>"
            f"{container}</div>"
        )

    def create(self) -> dict | None:
        """Ask the server extension to create the project; returns its answer (or None)."""
        problem = self._problem()
        if problem:
            self.message.value = box("error", problem)
            return None
        spec = self.spec()
        body = {
            "name": spec.name,
            "description": spec.description,
            "use_case": spec.use_case,
            "git": spec.git,
            "parent": self.parent.value.strip(),
        }
        self.create_button.disabled = True
        try:
            self.result = self.client.post("projects", body)
        except Ds01Error as error:
            self.message.value = error_box(error)
            return None
        finally:
            self.create_button.disabled = False
        created = box(
            "ok", f"Project created: {self.result['relative_path']}/", self.result["summary"]
        )
        self.message.value = created
        if self.start_container.value:
            self.message.value = created + box("info", f"Starting a container for {spec.name} ...")
            self.message.value = created + self._start_container(spec.name)
        return self.result

    def _start_container(self, name: str) -> str:
        """Ask the hub (through the ds01 service) to start the project's named server."""
        try:
            container = self.client.post(f"api/projects/{name}/server", {})
        except Ds01Error as error:
            return error_box(error)
        self.result["container"] = container
        where = container.get("url") or f"the hub home page (server {name})"
        state = container.get("state", "starting")
        return box("ok", f"Container {name} is {state}", f"open it from {where}")
