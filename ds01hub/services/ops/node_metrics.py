"""GPU and CPU use per node of a swarm, for the culler and the admin page (ds01-ops).

The hub cannot call NVML on other nodes, so each node serves its use on a metrics endpoint in
dcgm-exporter's names (`ds01hub.gpu.dcgm`; containers' CPU in cAdvisor's). Where the endpoints
are:

- **discovered** (the default) from the tasks of a *global* service (`service`, default
  `ds01-node-metrics`: dcgm-exporter itself, or `ds01hub.services.node_exporter`), which
  publishes its port in host mode: each running task is one node's endpoint,
  `http://<node address>:<published port>/metrics`. Why: Swarm already knows which node runs
  which task, so a node that joins is covered when its task starts, with no list to keep in step
  (and a routing-mesh port would answer from any node: refused, named);
- **listed** (`urls`: hostname -> URLs) for endpoints outside Swarm (a dcgm-exporter and a
  cAdvisor under systemd); several URLs of a node are merged. A listed node wins over
  discovery.

What the culler gets is never a guess: a node whose endpoint fails, or a slot missing from
it, is *unknown* with the endpoint's named problem (shown on the admin page), and unknown
counts as busy. `sampled_activity` (pure) turns a pass's scrapes into each server's signals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ds01hub import labels
from ds01hub.gpu.cluster import ClusterError, ClusterNode, parse_node
from ds01hub.gpu.dcgm import MAX_BYTES, MetricsError, NodeMetrics, fetch_metrics, slot_use
from ds01hub.gpu.swarm_state import service_documents
from ds01hub.provenance import Provenance

__all__ = [
    "NodeMetricsCollector",
    "NodeMetricsSource",
    "Placement",
    "Scrape",
    "ServerSignals",
    "sampled_activity",
]

DEFAULT_SERVICE = "ds01-node-metrics"


@dataclass(frozen=True)
class Placement:
    """A running swarm server: its record (the service's signed labels), the node its task
    runs on, the task's container there ("" until it has one)."""

    record: labels.ContainerRecord
    node: str
    container_id: str


@dataclass(frozen=True)
class Scrape:
    """One round over the nodes: each node's answer or its problem, and when (monotonic)."""

    at: float
    answers: Mapping[str, NodeMetrics] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerSignals:
    """A server's signals from its node's endpoint over one pass."""

    gpu_samples: Mapping[str, tuple[int | None, ...]]
    cpu_percent: float | None
    unknown: tuple[str, ...] = ()


def sampled_activity(
    placement: Placement, node_slots: Sequence[Any], scrapes: Sequence[Scrape]
) -> ServerSignals:
    """The server's GPU samples (one per scrape, per slot), CPU % between the first and last
    scrape (its task's container), and why anything is unknown (never idle)."""
    samples: dict[str, list[int | None]] = {slot: [] for slot in placement.record.gpus}
    unknown: list[str] = []
    mine = [s for s in node_slots if s.id in samples]
    for scrape in scrapes:
        metrics = scrape.answers.get(placement.node)
        if metrics is None:
            why = scrape.problems.get(placement.node, "no metrics endpoint for the node")
            for slot in samples:
                samples[slot].append(None)
            unknown.append(f"GPU use on {placement.node} unknown: {why}")
            continue
        use = slot_use(mine, metrics)
        for slot in samples:
            entry = use.get(slot)
            if entry is None or entry.percent is None:
                samples[slot].append(None)
                reason = entry.unknown if entry is not None else "not in the node's inventory"
                unknown.append(f"GPU {slot} use unknown: {reason}")
            else:
                samples[slot].append(round(entry.percent))
    return ServerSignals(
        {slot: tuple(values) for slot, values in samples.items()},
        _cpu_percent(placement, scrapes),
        tuple(dict.fromkeys(unknown)),
    )


def _cpu_percent(placement: Placement, scrapes: Sequence[Scrape]) -> float | None:
    readings = [
        (scrape.at, scrape.answers[placement.node].cpu_seconds.get(placement.container_id))
        for scrape in scrapes
        if placement.node in scrape.answers and placement.container_id
    ]
    if len(readings) < 2 or readings[0][1] is None or readings[-1][1] is None:
        return None
    (start, before), (end, after) = readings[0], readings[-1]
    if end <= start or after < before:  # restarted meanwhile
        return None
    return (after - before) / (end - start) * 100.0


class NodeMetricsSource:
    """The swarm's nodes, running servers and per-node endpoints, over the manager's API.

    `manager`: a docker-py client of a manager; `urls`: listed endpoints per hostname;
    `service`: the global service whose tasks are the endpoints ("" = none discovered);
    `timeout`/`max_bytes`: bounds of each request."""

    def __init__(
        self,
        manager: Any,
        *,
        urls: Mapping[str, Sequence[str]] | None = None,
        service: str = DEFAULT_SERVICE,
        timeout: float = 5.0,
        max_bytes: int = MAX_BYTES,
        path: str = "/metrics",
    ) -> None:
        self.manager = manager
        self.urls = {host: list(values) for host, values in (urls or {}).items()}
        self.service = service
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.path = path
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="ds01-node-metrics")
        #: node -> its problem as of the last scrape (the admin page lists them)
        self.problems: dict[str, str] = {}

    # -- Swarm's objects ----------------------------------------------------------------------

    def nodes(self) -> list[ClusterNode]:
        """The swarm's nodes (a node object ds01hub cannot read is left out)."""
        found = []
        for attrs in self.manager.api.nodes():
            with contextlib.suppress(ClusterError):
                found.append(parse_node(attrs))
        return found

    def running(
        self, trust: Provenance, extra_labels: Iterable[str] = ()
    ) -> dict[tuple[str, str], Placement]:
        """(user, hub server name) -> the running server, from this deployment's services
        whose signed labels verify (as the allocator reads them)."""
        from ds01hub.actions.operations import project_to_server

        api = self.manager.api
        services = api.services(filters={"label": trust.label_filters(extra_labels)})
        if not services:
            return {}
        tasks = api.tasks(filters={"desired-state": "running"})
        nodes = api.nodes()
        hostnames = {n["ID"]: (n.get("Description") or {}).get("Hostname", "") for n in nodes}
        result = {}
        for document in service_documents(services, tasks, nodes):
            record = labels.ContainerRecord.from_docker(document, trust)
            if record is None or not record.running:
                continue
            task = _running_task(tasks, document["Id"])
            if task is None:
                continue
            container = ((task.get("Status") or {}).get("ContainerStatus") or {}).get(
                "ContainerID", ""
            )
            placement = Placement(record, hostnames.get(task.get("NodeID"), ""), container)
            result[(record.user, project_to_server(record.project))] = placement
        return result

    def endpoints(self) -> dict[str, list[str]]:
        """hostname -> its endpoint URLs (listed ones win); discovery problems are noted."""
        found: dict[str, list[str]] = {}
        if self.service:
            found = self._discovered()
        return found | self.urls

    def _discovered(self) -> dict[str, list[str]]:
        api = self.manager.api
        try:
            tasks = api.tasks(filters={"service": self.service, "desired-state": "running"})
            nodes = {n["ID"]: n for n in api.nodes()}
        except Exception as error:  # the manager answers the rest of the pass, or not
            self.problems["*"] = f"tasks of service {self.service} not read: {error}"
            return {}
        self.problems.pop("*", None)
        found: dict[str, list[str]] = {}
        for task in tasks:
            status = task.get("Status") or {}
            node = nodes.get(task.get("NodeID"), {})
            hostname = (node.get("Description") or {}).get("Hostname", "")
            if status.get("State") != "running" or not hostname:
                continue
            address = (node.get("Status") or {}).get("Addr", "")
            ports = (status.get("PortStatus") or {}).get("Ports") or []
            port = next((p.get("PublishedPort") for p in ports if p.get("PublishedPort")), None)
            if not port or not address:
                self.problems[hostname] = (
                    f"the task of service {self.service} on {hostname} publishes no port in "
                    "host mode (publish mode=host: a routing-mesh port answers from any node)"
                )
                continue
            found[hostname] = [f"http://{address}:{port}{self.path}"]
        return found

    # -- scraping -----------------------------------------------------------------------------

    def scrape(self, hostnames: Iterable[str], at: float) -> Scrape:
        """Every given node's endpoints, in parallel; a node's problem names its endpoint."""
        endpoints = self.endpoints()
        hosts = sorted(set(hostnames))
        results = self._pool.map(lambda h: self._node(h, endpoints.get(h, [])), hosts)
        answers, problems = {}, {}
        for host, (metrics, problem) in zip(hosts, results, strict=True):
            if metrics is not None:
                answers[host] = metrics
                self.problems.pop(host, None)
            else:
                problems[host] = problem
                self.problems[host] = problem
        return Scrape(at, answers, problems)

    def _node(self, hostname: str, urls: Sequence[str]) -> tuple[NodeMetrics | None, str]:
        if not urls:
            how = f"no running task of service {self.service}" if self.service else "none listed"
            return None, f"no metrics endpoint for node {hostname} ({how})"
        merged = NodeMetrics()
        for url in urls:
            try:
                merged = merged.merged(fetch_metrics(url, self.timeout, self.max_bytes))
            except MetricsError as error:
                return None, str(error)
        return merged, ""

    def overview(self, at: float = 0.0) -> list[dict[str, Any]]:
        """The admin page's rows: per node, its state, endpoints, problem and each slot's use."""
        nodes = self.nodes()
        scrape = self.scrape([n.hostname for n in nodes if n.ready], at)
        endpoints = self.endpoints()
        rows = []
        for node in sorted(nodes, key=lambda n: n.hostname):
            metrics = scrape.answers.get(node.hostname)
            use = slot_use(node.slots, metrics) if metrics is not None else {}
            problem = scrape.problems.get(node.hostname) or (
                "" if node.ready else "the node is not ready (down or unreachable)"
            )
            rows.append(
                {
                    "node": node.hostname,
                    "ready": node.ready,
                    "active": node.active,
                    "endpoints": endpoints.get(node.hostname, []),
                    "problem": problem or None,
                    "slots": [
                        {
                            "slot": slot.id,
                            "kind": slot.profile or "GPU",
                            "percent": use[slot.id].percent if slot.id in use else None,
                            "memory_used_mb": use[slot.id].memory_used_mb
                            if slot.id in use
                            else None,
                            "unknown": use[slot.id].unknown if slot.id in use else None,
                        }
                        for slot in node.slots
                    ],
                }
            )
        return rows


class NodeMetricsCollector:
    """ds01-ops' own metrics of a swarm's nodes, per scrape of /services/ds01-ops/metrics:
    whether each ready node's endpoint answered (`ds01_node_metrics_up`), and each slot's use
    as read from it (`ds01_node_gpu_utilization_percent`; unknown ones left out)."""

    def __init__(self, source: NodeMetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "ds01_node_metrics_up",
            "1 when the node's metrics endpoint(s) answered this scrape, 0 when not (the admin "
            "page names why)",
            labels=["node"],
        )
        use = GaugeMetricFamily(
            "ds01_node_gpu_utilization_percent",
            "GPU use of each slot of a swarm node, from its endpoint in dcgm-exporter's names",
            labels=["node", "slot"],
        )
        for row in self.source.overview():
            if not row["ready"]:
                continue
            up.add_metric([row["node"]], 0 if row["problem"] else 1)
            for slot in row["slots"]:
                if slot["percent"] is not None:
                    use.add_metric([row["node"], slot["slot"]], slot["percent"])
        yield up
        yield use


def _running_task(tasks: Iterable[Mapping[str, Any]], service_id: str) -> Mapping | None:
    return next(
        (
            t
            for t in tasks
            if t.get("ServiceID") == service_id
            and (t.get("Status") or {}).get("State") == "running"
        ),
        None,
    )
