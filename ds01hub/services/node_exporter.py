"""A node's GPU use in dcgm-exporter's metric names: the stand-in for dcgm-exporter in tests.

`python -m ds01hub.services.node_exporter --limits FILE [--listen ADDR:PORT] [--hostname NAME]
[--cgroup-root DIR] [--simulated-utilization FILE]` serves `/metrics` (Prometheus text format,
prometheus_client's own HTTP server) with the node's GPUs from NVML or, where the limits file
declares `gpu_allocation.simulate`, the simulated NVML, in the names and labels of NVIDIA's
dcgm-exporter (`ds01hub.gpu.dcgm`), and with `--cgroup-root` (the node's /sys/fs/cgroup,
mounted read-only) its containers' CPU in cAdvisor's name. A real cluster runs dcgm-exporter
and cAdvisor instead; ds01-ops reads either the same way (`ds01hub.services.ops.node_metrics`).

In the swarm tests it runs as a *global* service (one task per node; its node's name from
Swarm's template `{{.Node.Hostname}}`). The simulated utilisation the culler tests drive
in-process (`SimulatedNvml.set_utilization`, `add_process`) comes here from
`--simulated-utilization`: a JSON object `{"0": 90, "1:0": 0}` (slot -> percent; a MIG slot is
busy while above 0, as a compute process makes it), re-read at each scrape; a bad file is
logged and the last good one kept. Only for simulated inventories.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from traitlets import Unicode, default
from traitlets.config import Application

from ds01hub.errors import Ds01hubError
from ds01hub.gpu.dcgm import FamiliesCollector, metric_families
from ds01hub.gpu.inventory import Inventory, load_inventory
from ds01hub.limits import load_limits_or_defaults
from ds01hub.services.ops.cgroups import containers_usage

__all__ = ["NodeExporter", "NodeExporterApp", "main", "read_simulated_utilization"]

DEFAULT_PORT = 9400  # dcgm-exporter's
MAX_CONTROL_BYTES = 64 << 10


class ControlError(Ds01hubError, ValueError):
    """A simulated-utilisation file that cannot be used; says why."""


def read_simulated_utilization(text: str, inventory: Inventory) -> dict[str, int]:
    """`{"slot": percent}` checked against the inventory (the file's path is the caller's)."""
    if len(text) > MAX_CONTROL_BYTES:
        raise ControlError(f"longer than {MAX_CONTROL_BYTES} bytes")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ControlError(f"not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ControlError('not a JSON object such as {"0": 90}')
    checked = {}
    for slot, percent in data.items():
        if not inventory.has_slot(slot):
            known = ", ".join(s.id for s in inventory.slots) or "none"
            raise ControlError(f"no slot {slot!r} on this node (slots: {known})")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ControlError(f"slot {slot}: {percent!r} is not a percentage 0..100")
        checked[slot] = percent
    return checked


class NodeExporter:
    """One node's metrics at each scrape: applies the simulated utilisation (if any), reads
    the containers' CPU counters (if a cgroup root is given), renders the families."""

    def __init__(
        self,
        inventory: Inventory,
        hostname: str,
        cgroup_root: Path | None = None,
        control: Path | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.inventory = inventory
        self.hostname = hostname
        self.cgroup_root = cgroup_root
        self.control = control
        self.log = log or logging.getLogger("ds01hub.node_exporter")
        self._lock = threading.Lock()
        self._applied: Mapping[str, int] = {}

    def families(self) -> list[Any]:
        with self._lock:
            self._apply_control()
            cpu = None
            if self.cgroup_root is not None:
                usage = containers_usage(self.cgroup_root)
                cpu = {cid: ns / 1e9 for cid, ns in usage.items()}
            return metric_families(self.inventory, self.hostname, cpu)

    def _apply_control(self) -> None:
        if self.control is None or not self.inventory.simulated:
            return
        try:
            wanted = read_simulated_utilization(self.control.read_text(), self.inventory)
        except FileNotFoundError:
            wanted = {}
        except (OSError, ControlError) as error:
            self.log.error("%s: %s (keeping the last good one)", self.control, error)
            return
        if wanted == self._applied:
            return
        nvml = self.inventory.nvml
        for slot in self.inventory.slots:
            percent = wanted.get(slot.id, 0)
            if slot.is_mig:
                nvml.clear_processes(slot.id)
                if percent:
                    nvml.add_process(slot.id, 1)
            else:
                nvml.set_utilization(slot.id, percent)
        self._applied = wanted


class NodeExporterApp(Application):
    """`python -m ds01hub.services.node_exporter`: serve one node's metrics until stopped."""

    name = "ds01hub-node-exporter"
    description = __doc__

    limits_path = Unicode(
        "",
        help="The resource-limits YAML whose gpu_allocation (simulate) gives the node's "
        "inventory. Empty: $DS01HUB_LIMITS, else /etc/ds01hub/resource-limits.yaml, else NVML.",
    ).tag(config=True)
    listen = Unicode(
        f"0.0.0.0:{DEFAULT_PORT}", help="ADDRESS:PORT to serve /metrics on (dcgm-exporter's port)."
    ).tag(config=True)
    hostname = Unicode(
        help="The node's name in the `Hostname` label. Default: this host's name (a Swarm "
        "service sets its container's hostname to `{{.Node.Hostname}}`)."
    ).tag(config=True)
    cgroup_root = Unicode(
        "",
        help="The node's /sys/fs/cgroup, mounted read-only: containers' CPU in cAdvisor's "
        "name. Empty: no CPU metrics.",
    ).tag(config=True)
    simulated_utilization = Unicode(
        "",
        help='Simulated inventories only: a JSON file {"slot": percent} re-read at each scrape.',
    ).tag(config=True)

    aliases = {
        "limits": "NodeExporterApp.limits_path",
        "listen": "NodeExporterApp.listen",
        "hostname": "NodeExporterApp.hostname",
        "cgroup-root": "NodeExporterApp.cgroup_root",
        "simulated-utilization": "NodeExporterApp.simulated_utilization",
    }

    @default("hostname")
    def _default_hostname(self) -> str:
        return socket.gethostname()

    def address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise Ds01hubError(f"listen: {self.listen!r} is not ADDRESS:PORT (e.g. 0.0.0.0:9400)")
        return host or "0.0.0.0", int(port)

    def start(self) -> None:
        import time

        from prometheus_client import CollectorRegistry, start_http_server

        host, port = self.address()
        config = load_limits_or_defaults(self.limits_path or None)
        inventory = load_inventory(config.gpu_allocation)
        if inventory.reason:
            self.log.warning("%s", inventory.reason)
        exporter = NodeExporter(
            inventory,
            self.hostname,
            Path(self.cgroup_root) if self.cgroup_root else None,
            Path(self.simulated_utilization) if self.simulated_utilization else None,
            log=self.log,
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FamiliesCollector(exporter.families))
        start_http_server(port, host, registry)
        self.log.info(
            "%s: %d slot(s) on http://%s:%d/metrics",
            self.hostname,
            len(inventory.slots),
            host,
            port,
        )
        while True:
            time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    app = NodeExporterApp.instance()
    app.initialize(argv)
    with contextlib.suppress(KeyboardInterrupt):
        app.start()


if __name__ == "__main__":
    main()
