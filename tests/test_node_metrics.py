"""A swarm's per-node metrics for the culler (ds01hub.services.ops.node_metrics): the pure
part on recorded Swarm objects and endpoint answers; the real cluster is test_swarm_culler.py."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from ds01hub import labels
from ds01hub.gpu.cluster import parse_node
from ds01hub.gpu.dcgm import parse_metrics
from ds01hub.services.ops.culler import CullPolicy, ServerActivity, decide
from ds01hub.services.ops.node_metrics import (
    NodeMetricsSource,
    Placement,
    Scrape,
    sampled_activity,
)
from ds01hub.units import utcnow

CID = "e1" * 32
NODE = {
    "ID": "n2",
    "Description": {
        "Hostname": "node2",
        "Resources": {
            "GenericResources": [
                {"NamedResourceSpec": {"Kind": "DS01-GPU-0", "Value": "GPU-aaa"}},
                {"NamedResourceSpec": {"Kind": "DS01-GPU-1", "Value": "GPU-bbb"}},
            ]
        },
    },
    "Status": {"State": "ready", "Addr": "10.9.0.3"},
    "Spec": {"Availability": "active", "Role": "worker"},
}
SLOTS = parse_node(NODE).slots


def record(gpus=("node2/1",)) -> labels.ContainerRecord:
    return labels.ContainerRecord(
        "svc1", "default--mia", "mia", "default", None, 0, gpus, (), "img", "running", None, None
    )


def answer(util_b: float, cpu: float) -> str:
    return (
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="GPU-aaa"}} 99\n'
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="1",UUID="GPU-bbb"}} {util_b}\n'
        f'container_cpu_usage_seconds_total{{id="/docker/{CID}"}} {cpu}\n'
    )


def scrape(at: float, text: str) -> Scrape:
    return Scrape(at, {"node2": parse_metrics(text)})


PLACEMENT = Placement(record(), "node2", CID)


def test_an_idle_server_s_slot_and_container_from_its_node():
    scrapes = [scrape(0.0, answer(0, 10.0)), scrape(2.0, answer(1, 10.02))]
    signals = sampled_activity(PLACEMENT, SLOTS, scrapes)
    assert signals.gpu_samples == {"node2/1": (0, 1)}  # the other GPU's 99% is not its own
    assert round(signals.cpu_percent, 3) == 1.0
    assert signals.unknown == ()


def test_a_node_whose_endpoint_failed_is_unknown_and_keeps_the_server():
    failed = Scrape(2.0, {}, {"node2": "http://10.9.0.3:9400/metrics: unreachable (refused)"})
    signals = sampled_activity(PLACEMENT, SLOTS, [scrape(0.0, answer(0, 10.0)), failed])
    assert signals.cpu_percent is None
    assert any("unreachable (refused)" in why for why in signals.unknown)
    now = utcnow()
    activity = ServerActivity(
        "mia",
        "",
        "default--mia",
        started=now - timedelta(hours=3),
        gpu_samples=signals.gpu_samples,
        cpu_percent=0.0,
        unknown=signals.unknown,
    )
    verdict = decide(activity, CullPolicy(idle_timeout=3600, warn_before=0), now)
    assert (verdict.action, verdict.code) == ("keep", "busy")
    assert "unreachable" in verdict.reason


def test_a_slot_missing_from_the_answer_is_unknown():
    text = f'container_cpu_usage_seconds_total{{id="/docker/{CID}"}} 1\n'
    signals = sampled_activity(PLACEMENT, SLOTS, [scrape(0, text), scrape(1, text)])
    assert signals.gpu_samples == {"node2/1": (None, None)}
    assert signals.unknown and "UUID=GPU-bbb" in signals.unknown[0]


def test_a_counter_that_went_back_gives_no_cpu_figure():
    scrapes = [scrape(0.0, answer(0, 50.0)), scrape(1.0, answer(0, 1.0))]
    assert sampled_activity(PLACEMENT, SLOTS, scrapes).cpu_percent is None


def _manager(tasks, nodes=(NODE,)):
    api = SimpleNamespace(
        tasks=lambda filters=None: list(tasks), nodes=lambda: list(nodes), services=lambda **_: []
    )
    return SimpleNamespace(api=api)


def _task(ports):
    return {
        "NodeID": "n2",
        "ServiceID": "exp",
        "Status": {"State": "running", "PortStatus": {"Ports": ports}},
    }


def test_endpoints_are_discovered_from_the_global_service_s_tasks():
    source = NodeMetricsSource(_manager([_task([{"PublishedPort": 9400, "TargetPort": 9400}])]))
    assert source.endpoints() == {"node2": ["http://10.9.0.3:9400/metrics"]}


def test_a_task_without_a_host_mode_port_is_a_named_problem():
    source = NodeMetricsSource(_manager([_task([])]))
    assert source.endpoints() == {}
    assert "host mode" in source.problems["node2"]
    result = source.scrape(["node2"], 0.0)
    assert "no metrics endpoint for node node2" in result.problems["node2"]


def test_listed_endpoints_win_over_discovery():
    source = NodeMetricsSource(
        _manager([_task([{"PublishedPort": 9400}])]),
        urls={"node2": ["http://gpu2.lab:9400/metrics", "http://gpu2.lab:8080/metrics"]},
    )
    assert source.endpoints()["node2"] == [
        "http://gpu2.lab:9400/metrics",
        "http://gpu2.lab:8080/metrics",
    ]


def test_the_admin_page_shows_use_per_node_and_an_endpoint_s_problem():
    from ds01hub.gpu.inventory import Inventory
    from ds01hub.services.ops.admin_page import overview, render_page

    rows = [
        {
            "node": "node2",
            "ready": True,
            "active": True,
            "endpoints": ["http://10.9.0.3:9400/metrics"],
            "problem": None,
            "slots": [
                {"slot": "node2/0", "kind": "GPU", "percent": 87.0, "memory_used_mb": 1024.0,
                 "unknown": None},
                {"slot": "node2/1", "kind": "GPU", "percent": None, "memory_used_mb": None,
                 "unknown": "DCGM_FI_DEV_GPU_UTIL has no series with UUID=GPU-bbb"},
            ],
        },
        {
            "node": "node3",
            "ready": True,
            "active": True,
            "endpoints": ["http://10.9.0.4:9400/metrics"],
            "problem": "http://10.9.0.4:9400/metrics: unreachable (<refused>)",
            "slots": [],
        },
    ]  # fmt: skip
    model = overview([], Inventory([], [], True), None, utcnow(), nodes=rows)
    assert "node node3: http://10.9.0.4:9400/metrics: unreachable (<refused>)" in model["alerts"]
    page = render_page(model)
    assert 'id="nodes"' in page and "87.0%" in page and "1024 MiB" in page
    assert "UUID=GPU-bbb" in page and "&lt;refused&gt;" in page and "<refused>" not in page
    assert 'id="nodes"' not in render_page(overview([], Inventory([], [], True), None, utcnow()))


def test_listed_urls_are_hostname_equals_url_entries():
    import pytest

    from ds01hub.errors import Ds01hubError
    from ds01hub.services.ops.app import listed_urls

    assert listed_urls(["gpu2=http://a:9400/metrics", "gpu2=http://a:8080/metrics"]) == {
        "gpu2": ["http://a:9400/metrics", "http://a:8080/metrics"]
    }
    for bad in ["http://a:9400/metrics", "gpu2=ftp://a", "=http://a"]:
        with pytest.raises(Ds01hubError, match="is not hostname=URL"):
            listed_urls([bad])


def test_the_ops_inventory_follows_the_swarm_s_nodes():
    from ds01hub.services.ops.app import refresh_inventory

    nodes = [NODE]
    source = NodeMetricsSource(_manager([], nodes))
    allocator = SimpleNamespace(inventory=None)
    assert [s.id for s in refresh_inventory(allocator, source).slots] == ["node2/0", "node2/1"]
    nodes[0] = dict(NODE, Spec=dict(NODE["Spec"], Availability="drain"))
    assert refresh_inventory(allocator, source).slots == []  # drained: offers none
    assert allocator.inventory.slots == []


def test_ops_metrics_say_which_node_answered_and_its_slots_use():
    import http.server
    import threading

    from prometheus_client import CollectorRegistry, generate_latest

    from ds01hub.services.ops.node_metrics import NodeMetricsCollector

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(answer(42, 1.0).encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    node3 = {
        "ID": "n3",
        "Description": {"Hostname": "node3"},
        "Status": {"State": "ready", "Addr": "10.9.0.4"},
    }
    try:
        source = NodeMetricsSource(
            _manager([], [NODE, node3]),
            service="",
            urls={
                "node2": [f"http://127.0.0.1:{server.server_address[1]}/metrics"],
                "node3": ["http://127.0.0.1:9/metrics"],
            },
            timeout=2,
        )
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeMetricsCollector(source))
        text = generate_latest(registry).decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'ds01_node_metrics_up{node="node2"} 1.0' in text
    assert 'ds01_node_metrics_up{node="node3"} 0.0' in text
    assert 'ds01_node_gpu_utilization_percent{node="node2",slot="node2/1"} 42.0' in text
    assert 'ds01_node_gpu_utilization_percent{node="node2",slot="node2/0"} 99.0' in text
