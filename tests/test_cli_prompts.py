"""Guided prompts on a real pseudo-terminal: every answer is checked as it is given and asked
again when wrong, one default is shown, only the MIG slices this machine has are offered, and
a re-run says what is already set up. The commands run in-process against a scripted control
plane (the transport is the only double; the terminal is a real pty)."""

from __future__ import annotations

import io
import os
import pty
import select
import threading
import time

import pytest

from ds01hub.cli import progress
from ds01hub.cli.user import commands as user

TIMEOUT = 20.0


class Backend:
    """Answers like the broker; records what was asked of it."""

    remote = False

    def __init__(self, containers=(), images=(), mig_profiles=None, max_gpus=2):
        self.calls: list[tuple] = []
        self.containers = [dict(c) for c in containers]
        self.image_rows = [dict(i) for i in images]
        self.mig_profiles = mig_profiles
        self.max_gpus = max_gpus

    def whoami(self):
        return {"user": "alice"}

    def cull_warnings(self):
        return []

    def quota(self):
        return {
            "user": "alice",
            "limits": {"group": "students", "max_gpus": 2, "max_gpus_per_container": 2},
            "mig_profiles": self.mig_profiles,
        }

    def list_containers(self, include_stopped):
        return list(self.containers)

    def images(self):
        return list(self.image_rows)

    def image_templates(self):
        return [{"key": "general", "title": "General ML"}, {"key": "custom", "title": "Custom"}]

    def start(self, project, options, create):
        self.calls.append(("start", project, options, create))
        yield {"event": "ready", "container": {"project": project, "state": "running"}}

    def build_image(self, request):
        self.calls.append(("build", request))
        yield {"event": "done", "tag": f"ds01-alice/{request['name']}:latest"}


class Terminal:
    """A command running in a thread with a pty as its stdin, stdout and stderr."""

    def __init__(self, command: str, argv: list[str], backend: Backend):
        self.master, slave = pty.openpty()
        self.stdin = open(slave, encoding="utf-8", closefd=False)  # noqa: SIM115
        self.out = open(os.dup(slave), "w", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.slave = slave
        self.seen = ""
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(command, argv, backend), daemon=True)
        self.thread.start()

    def _run(self, command: str, argv: list[str], backend: Backend) -> None:
        self.code = user.run_command(
            user.COMMANDS[command],
            argv,
            stdin=self.stdin,
            stdout=self.out,
            stderr=self.out,
            make_backend=lambda who: backend,
        )
        self.out.flush()

    def expect(self, marker: str) -> str:
        """Output up to and including `marker` (since the last expect)."""
        deadline = time.monotonic() + TIMEOUT
        while marker not in self.seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {marker!r} in {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                self.seen += os.read(self.master, 4096).decode(errors="replace")
        shown, _, self.seen = self.seen.partition(marker)
        return shown + marker

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\r").encode())

    def finish(self) -> int:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), self.seen
        for fd in (self.master, self.slave):
            os.close(fd)
        self.out.close()
        assert self.code is not None
        return self.code


@pytest.fixture(autouse=True)
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DS01HUB_WORKSPACE_ROOT", raising=False)
    (tmp_path / "workspace").mkdir()
    return tmp_path / "workspace"


def test_a_bad_name_and_a_missing_mig_slice_are_asked_again():
    backend = Backend(
        containers=[{"project": "taken", "state": "stopped"}], mig_profiles=["2g.20gb"]
    )
    term = Terminal("container-create", ["--guided"], backend)
    term.expect("Container (project) name: ")
    term.send("Not Valid")
    assert "lowercase" in term.expect("Container (project) name: ")
    term.send("taken")
    assert "container-start taken" in term.expect("Container (project) name: ")
    term.send("fresh")
    prompt = term.expect("]: ")
    assert "GPUs (0-2, or a MIG slice: 2g.20gb) [0]: " in prompt
    term.send("1g.10gb")  # well formed, but no such slice on this machine
    assert "one of the MIG slices here: 2g.20gb" in term.expect("[0]: ")
    term.send("3")
    assert "at most 2 GPU(s)" in term.expect("[0]: ")
    term.send("2g.20gb")
    term.expect("created and started")
    assert term.finish() == 0
    assert backend.calls == [("start", "fresh", {"mig": "2g.20gb"}, True)]


def test_no_mig_slices_means_none_offered_and_the_default_is_taken():
    backend = Backend(mig_profiles=[])
    term = Terminal("container-create", ["--guided", "plain"], backend)
    prompt = term.expect("]: ")
    assert "MIG" not in prompt and prompt.endswith("GPUs (0-2) [0]: ")
    term.send("1g.10gb")
    assert "no MIG slices" in term.expect("[0]: ")
    term.send("")
    term.expect("created and started")
    assert term.finish() == 0
    assert backend.calls == [("start", "plain", {}, True)]


def test_user_setup_survives_bad_answers_and_shows_one_default(workspace):
    backend = Backend()
    term = Terminal("user-setup", [], backend)
    question = term.expect("] ")
    assert question.endswith("Set up a project now? [Y/n] ") and "[y]" not in question
    term.send("maybe")
    assert "answer y or n" in term.expect("[Y/n] ")
    term.send("")
    term.expect("Project name: ")
    term.send("../escape")
    assert "invalid project name" in term.expect("Project name: ")
    term.send("thesis")
    term.expect("(empty for none): ")
    term.send("")
    term.expect("Use case [general]: ")
    term.send("astrology")
    assert "choose one of" in term.expect("Use case [general]: ")
    term.send("")
    term.expect("Build an image for it? [y/N] ")
    term.send("y")
    term.expect("Create a container for it? [y/N] ")
    term.send("yes")
    # the general template brings PyTorch with CUDA: its size is said and confirmed first
    assert "downloads about 2.5 GB (torch with its libraries)" in term.expect("Build it? [y/N] ")
    term.send("y")
    assert "container-run thesis" in term.expect("Connecting to your containers")
    assert term.finish() == 0
    assert (workspace / "thesis" / "README.md").is_file()
    assert [c[0] for c in backend.calls] == ["build", "start"]


def test_user_setup_again_says_what_is_already_set_up(workspace):
    first = Backend()
    term = Terminal("project-init", ["thesis", "--image", "--container", "-y"], first)
    term.expect("container-run thesis")
    assert term.finish() == 0
    again = Backend(
        containers=[{"project": "thesis", "state": "running"}],
        images=[{"name": "thesis", "tag": "ds01-alice/thesis:latest"}],
    )
    term = Terminal("user-setup", [], again)
    shown = term.expect("Set up another project? [y/N] ")
    assert "You are already set up:" in shown
    assert f"projects in {workspace}: thesis" in shown
    assert "containers: thesis (running)" in shown and "ds01-alice/thesis:latest" in shown
    term.send("n")
    term.expect("Connecting to your containers")
    assert term.finish() == 0
    # project-init again: nothing rebuilt or recreated, and it says where things are
    term = Terminal("project-init", ["thesis", "--image", "--container"], again)
    shown = term.expect("container-run thesis")
    assert f"Project already set up at {workspace / 'thesis'}: nothing changed" in shown
    assert "Image thesis is already set up (ds01-alice/thesis:latest)" in shown
    assert "Container thesis is already set up (running)" in shown
    assert term.finish() == 0
    assert again.calls == []


def test_five_wrong_answers_end_with_a_named_error():
    term = Terminal("image-create", ["--guided"], Backend())
    for _ in range(5):
        term.expect("Template [general]: ")
        term.send("nope")
    assert "no usable answer after 5 tries" in term.expect("--guided")
    assert term.finish() == 2


def test_image_packages_are_checked_at_their_prompt():
    backend = Backend()
    term = Terminal("image-create", ["--guided"], backend)
    term.expect("Template [general]: ")
    term.send("")
    term.expect("Image name [general]: ")
    term.send("Bad Name")
    assert "invalid image name" in term.expect("Image name [general]: ")
    term.send("mine")
    term.expect("(comma-separated, empty for none): ")
    term.send("six, --index-url=http://evil")
    assert "invalid pip package" in term.expect("(comma-separated, empty for none): ")
    term.send("six")
    term.expect("(comma-separated, empty for none): ")
    term.send("")
    term.expect("Build it? [y/N] ")
    term.send("y")
    term.expect("Built ")
    assert term.finish() == 0
    assert backend.calls[0][1]["pip_packages"] == ["six"]


def test_confirm_shows_one_default_and_no_keeps_the_container():
    backend = Backend()
    backend.describe = lambda project: {"project": project, "state": "running", "processes": 1}
    term = Terminal("container-stop", ["x"], backend)
    question = term.expect("] ")
    assert question.endswith("Stop x? [y/N] ") and question.count("[") == 1
    term.send("")
    term.expect("Not stopped.")
    assert term.finish() == 1


class Interrupted(Backend):
    """A build the user interrupts (Ctrl-C reaches Python as KeyboardInterrupt) mid-way."""

    def build_image(self, request):
        yield {"event": "log", "kind": "log", "text": "Step 1/3", "progress": 0.1}
        raise KeyboardInterrupt

    def cancel_build(self):
        self.calls.append(("cancel",))
        return {"image": "mine", "stopped": True}


def test_ctrl_c_in_a_build_offers_image_cancel_not_container_stop():
    backend = Interrupted()
    term = Terminal("image-create", ["mine", "--template", "custom"], backend)
    term.expect("Cancel the build of mine? [Y/n] ")
    term.send("")
    shown = term.expect("cancelled")
    assert "container-stop" not in shown
    assert term.finish() == 130 and backend.calls == [("cancel",)]


def test_ctrl_c_in_a_build_kept_going_says_how_to_cancel_later():
    backend = Interrupted()
    term = Terminal("image-create", ["mine", "--template", "custom"], backend)
    term.expect("Cancel the build of mine? [Y/n] ")
    term.send("n")
    assert "stop it with image-cancel" in term.expect("image-cancel")
    assert term.finish() == 130 and backend.calls == []


def test_a_heavy_build_is_announced_and_not_started_without_a_yes():
    backend = Backend()
    term = Terminal(
        "image-create", ["mine", "--template", "custom", "--pip", "Torch==2.4"], backend
    )
    assert "downloads about 2.5 GB" in term.expect("Build it? [y/N] ")
    term.send("")
    term.expect("not built")
    assert term.finish() == 1 and backend.calls == []
    light = Terminal("image-create", ["tools", "--template", "custom", "--pip", "six"], backend)
    light.expect("Built ")
    assert light.finish() == 0 and [c[0] for c in backend.calls] == ["build"]
    heavy = Terminal("image-create", ["cv", "--template", "cv", "-y"], backend)
    assert "downloads about 2.5 GB" in heavy.expect("Built ")
    assert heavy.finish() == 0 and len(backend.calls) == 2


class Building(Backend):
    def build_image(self, request):
        self.calls.append(("build", request))
        total = 4
        for step in range(1, total + 1):
            yield {"kind": "step", "text": f"Step {step}/{total} : RUN x", "progress": step / total}
        yield {"event": "done", "tag": "ds01-alice/mine:latest"}


def test_a_build_on_a_terminal_is_one_redrawn_line_with_a_bar_and_an_eta():
    term = Terminal("image-create", ["mine", "--template", "custom"], Building())
    shown = term.expect("Built ")
    assert term.finish() == 0
    assert shown.count(progress.REDRAW) == 4  # one line, redrawn per step
    assert "[##########----------]  50%" in shown and "ETA " in shown
    assert "Step 4/4 : RUN x" in shown


def test_progress_without_a_terminal_is_plain_lines():
    out = io.StringIO()
    line = progress.ProgressLine(out, "image mine", colour=False)
    line.update(0.25, "Step 2/4")
    line.update(None, "waiting for a free build slot")
    line.close()
    assert out.getvalue() == (
        "image mine: [ 25%] Step 2/4\nimage mine: waiting for a free build slot\n"
    )


def test_the_status_line_and_its_estimate():
    assert progress.remaining_seconds(0.5, 60) == 60
    assert progress.remaining_seconds(0.01, 60) is None  # too early to say
    assert progress.remaining_seconds(1.0, 60) is None
    line = progress.render("image x", 0.25, "Step 2/4 :\nRUN pip", 65, 195, 200)
    assert line == "image x [#####---------------]  25% 1m 5s, ETA 3m 15s: Step 2/4 : RUN pip"
    assert progress.render("wait", None, "waiting for a GPU", 5, None, 200) == (
        "wait 5s: waiting for a GPU"
    )
    cut = progress.render("image x", 0.25, "m" * 300, 65, None, 60)
    assert len(cut) == 60 and cut.endswith("…")
    assert progress.event_fraction(50, "progress") == 0.5
    assert progress.event_fraction(0.5, "step") == 0.5
    assert progress.event_fraction(True, "step") is None
    assert progress.event_fraction("50", "step") is None


def test_away_from_the_host_a_heavy_template_is_not_announced():
    """Remotely no build can start: the command says so at once, without a size to confirm."""
    from ds01hub.cli.user.backends import host_only

    class Remote(Backend):
        remote = True

        def build_image(self, request):
            raise host_only("image builds")

    term = Terminal("image-create", ["x"], Remote())
    shown = term.expect("on the host")
    assert "downloads" not in shown and "Build it?" not in shown
    assert term.finish() == 1
