"""Which NVIDIA device nodes the install gives to the GPU group: the compute nodes and the MIG
instances' access capabilities, never the MIG ``config``/``monitor`` capabilities (a grantee
could otherwise repartition the GPUs under the allocator). The names are those a real H100
host shows (see .ci/gpu_host_check.py); the tree here is a temp dir of plain files."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ds01hub.gpu import access

COMPUTE = ["nvidia0", "nvidia7", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"]


def _udev_kernel_globs() -> list[str]:
    rule = access.render_udev_rule("ds01-gpu")
    return [g for line in re.findall(r'KERNEL=="([^"]+)"', rule) for g in line.split("|")]


def _tree(tmp_path: Path, caps: list[int]) -> Path:
    (tmp_path / "nvidia-caps").mkdir()
    for name in [*COMPUTE, "null", "nvme0"]:
        (tmp_path / name).write_text("")
    for minor in caps:
        (tmp_path / f"nvidia-caps/nvidia-cap{minor}").write_text("")
    return tmp_path


def test_the_mig_config_and_monitor_capabilities_are_never_restricted_or_loosened(tmp_path):
    dev = _tree(tmp_path, [1, 2, 3, 4, 9, 10, 21, 130])
    found = {str(node.relative_to(dev)) for node in access.device_nodes(dev)}
    assert found == {
        *COMPUTE,
        *(f"nvidia-caps/nvidia-cap{minor}" for minor in (3, 4, 9, 10, 21, 130)),
    }
    assert not found & {f"nvidia-caps/{name}" for name in access.DRIVER_OWNED_CAPS}


@given(st.integers(min_value=1, max_value=100_000))
def test_the_udev_rule_and_the_install_pick_the_same_capability_nodes(minor):
    name = f"nvidia-cap{minor}"
    by_udev = any(fnmatch.fnmatchcase(name, glob) for glob in _udev_kernel_globs())
    by_install = any(
        fnmatch.fnmatchcase(f"nvidia-caps/{name}", pattern) for pattern in access.NODE_PATTERNS
    )
    assert by_udev == by_install == (name not in access.DRIVER_OWNED_CAPS)


def test_the_udev_rule_covers_every_compute_node_and_nothing_else():
    globs = _udev_kernel_globs()
    for name in COMPUTE:
        assert any(fnmatch.fnmatchcase(name, glob) for glob in globs), name
    for name in ["null", "nvme0", "nvidia-cap1", "nvidia-cap2", "nvidia-caps"]:
        assert not any(fnmatch.fnmatchcase(name, glob) for glob in globs), name
