"""The culler's warning inside the notebook: the IPython extension in a real IPython shell, and
the single-user image's kernels loading it (docker)."""

from __future__ import annotations

import io
import json

import pytest
from IPython.core.interactiveshell import InteractiveShell

from ds01hub.server_extension import cull_notice
from ds01hub.services.ops.culler import CONTAINER_WARNING_PATH

MESSAGE = "Your container 'thesis' will be stopped at 2026-12-01 15:00 UTC (idle for 2h)."


def test_the_extension_reads_the_file_the_culler_writes():
    assert str(cull_notice.WARNING_FILE) == CONTAINER_WARNING_PATH


def test_a_new_warning_is_shown_once_before_the_next_cell(tmp_path):
    path = tmp_path / "cull-warning.txt"
    shown = io.StringIO()
    shell = InteractiveShell.instance()
    notice = cull_notice.CullNotice(path, shown)
    shell.events.register("pre_run_cell", notice.before_cell)
    try:
        shell.run_cell("x = 1")
        assert shown.getvalue() == ""
        path.write_text(MESSAGE + "\n")
        shell.run_cell("x = 2")
        shell.run_cell("x = 3")
        assert shown.getvalue() == f"ds01 warning: {MESSAGE}\n"
        path.write_text("")  # the warning lapsed (the user came back)
        shell.run_cell("x = 4")
        path.write_text(MESSAGE.replace("15:00", "16:00"))  # warned again later
        shell.run_cell("x = 5")
        assert shown.getvalue().count("ds01 warning:") == 2 and "16:00" in shown.getvalue()
    finally:
        shell.events.unregister("pre_run_cell", notice.before_cell)


KERNEL_PROBE = """
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="python3")
out = []
kc.execute_interactive("1 + 1", timeout=60, output_hook=lambda m: out.append(m["content"]))
kc.stop_channels(); km.shutdown_kernel(now=True)
print(json.dumps(out))
"""


@pytest.mark.docker
def test_kernels_in_the_single_user_image_show_the_warning(docker_client, singleuser_image):
    script = 'mkdir -p /tmp/ds01hub && printf "%s" "$MSG" > "$WARNING" && python3 -c "$PROBE"'
    output = docker_client.containers.run(
        singleuser_image,
        ["sh", "-c", script],
        environment={
            "MSG": MESSAGE,
            "WARNING": CONTAINER_WARNING_PATH,
            "PROBE": "import json\n" + KERNEL_PROBE,
        },
        remove=True,
        labels={"ds01.test": "1"},
        entrypoint=[],
    )
    contents = json.loads(output.decode().strip().splitlines()[-1])
    streams = [c for c in contents if c.get("name") == "stderr"]
    assert [s["text"] for s in streams] == [f"ds01 warning: {MESSAGE}\n"], contents
