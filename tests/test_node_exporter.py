"""The node exporter (ds01hub.services.node_exporter): the simulated NVML in dcgm-exporter's
names, its utilisation driven by a file, containers' CPU from a cgroup tree; a real process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from harness.net import free_port
from harness.wait import wait_until

from ds01hub.gpu.dcgm import MetricsError, fetch_metrics, slot_use
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec
from ds01hub.services.node_exporter import (
    ControlError,
    NodeExporter,
    read_simulated_utilization,
)
from ds01hub.services.ops.cgroups import containers_usage

CID = "ab" * 32
OTHER = "cd" * 32


def inventory():
    gpus = [SimulatedGpuSpec(), SimulatedGpuSpec(mig=("3g.40gb",))]
    return discover(SimulatedNvml(gpus, seed="node2"), simulated=True)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[1]", "not a JSON object"),
        ("{", "not JSON"),
        ('{"7": 50}', "no slot '7' on this node"),
        ('{"0": 101}', "not a percentage"),
        ('{"0": true}', "not a percentage"),
    ],
)
def test_a_bad_control_file_is_a_named_error(text, why):
    with pytest.raises(ControlError, match=why):
        read_simulated_utilization(text, inventory())


def test_the_control_file_drives_the_simulated_gpus(tmp_path):
    control = tmp_path / "util.json"
    exporter = NodeExporter(inventory(), "node2", control=control)
    from prometheus_client import CollectorRegistry, generate_latest

    from ds01hub.gpu.dcgm import FamiliesCollector, parse_metrics

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(exporter.families))

    def use():
        metrics = parse_metrics(generate_latest(registry).decode())
        return {k: v.percent for k, v in slot_use(exporter.inventory.slots, metrics).items()}

    assert use() == {"0": 0, "1:0": 0}  # no file: idle
    control.write_text('{"0": 90, "1:0": 40}')
    assert use() == {"0": 90, "1:0": 100}
    control.write_text("{oops")  # a bad file keeps the last good one
    assert use() == {"0": 90, "1:0": 100}
    control.write_text("{}")
    assert use() == {"0": 0, "1:0": 0}


@pytest.mark.parametrize("version", [1, 2])
def test_containers_cpu_is_read_from_a_cgroup_tree(tmp_path, version):
    if version == 1:
        (tmp_path / "cpu,cpuacct").mkdir()  # an empty directory beside the real mount
        base = tmp_path / "cpuacct"
        (base / "docker" / CID).mkdir(parents=True)
        (base / "cpuacct.usage").write_text("99\n")
        (base / "docker" / CID / "cpuacct.usage").write_text("2500000000\n")
    else:
        base = tmp_path
        (base / "system.slice" / f"docker-{CID}.scope").mkdir(parents=True)
        (base / "system.slice" / f"docker-{CID}.scope" / "cpu.stat").write_text(
            "usage_usec 2500000\nuser_usec 1\n"
        )
    (base / "docker" / "not-a-container").mkdir(parents=True)
    (base / "docker" / OTHER).mkdir()  # stopped meanwhile: no counter
    assert containers_usage(tmp_path) == {CID: 2_500_000_000}


def test_the_exporter_process_serves_the_node(tmp_path):
    """`python -m ds01hub.services.node_exporter` as the global service runs it."""
    limits = tmp_path / "limits.yaml"
    limits.write_text("gpu_allocation:\n  simulate: {seed: node2, gpus: 2}\n")
    control = tmp_path / "util.json"
    control.write_text('{"1": 70}')
    cgroups = tmp_path / "cgroup" / "cpuacct" / "docker" / CID
    cgroups.mkdir(parents=True)
    (tmp_path / "cgroup" / "cpuacct" / "cpuacct.usage").write_text("5")
    (cgroups / "cpuacct.usage").write_text("1000000000")
    port = free_port()
    command = [
        sys.executable, "-m", "ds01hub.services.node_exporter", "--limits", str(limits),
        "--listen", f"127.0.0.1:{port}", "--hostname", "node2",
        "--cgroup-root", str(tmp_path / "cgroup"), "--simulated-utilization", str(control),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def answers():
            try:
                return fetch_metrics(url, timeout=2)
            except MetricsError:
                assert process.poll() is None, process.stderr.read().decode()
                return None

        metrics = wait_until(answers, timeout=30, message="the exporter answers")
        expected = discover(SimulatedNvml([SimulatedGpuSpec()] * 2, seed="node2"), simulated=True)
        use = slot_use(expected.slots, metrics)
        assert (use["0"].percent, use["1"].percent) == (0, 70)
        assert metrics.cpu_seconds == {CID: 1.0}
    finally:
        process.terminate()
        process.wait(timeout=10)
