# ruff: noqa: E501 (dcgm-exporter's lines, as it writes them)
"""Per-node GPU use in dcgm-exporter's names (ds01hub.gpu.dcgm): parsing, mapping, the edge."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds01hub.gpu.cluster import parse_node
from ds01hub.gpu.dcgm import (
    MetricsError,
    NodeMetrics,
    fetch_metrics,
    parse_metrics,
    render_metrics,
    slot_use,
)
from ds01hub.gpu.inventory import Slot, discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec

CID = "3f" * 32
#: what dcgm-exporter 3.x/4.x serves (its label order and HELP lines), two GPUs and one MIG GPU
DCGM_TEXT = f"""\
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{gpu="0",UUID="GPU-aaa",pci_bus_id="00000000:00:1E.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node2",DCGM_FI_DRIVER_VERSION="550.54.15"}} 1980
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="GPU-aaa",pci_bus_id="00000000:00:1E.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node2",DCGM_FI_DRIVER_VERSION="550.54.15"}} 87
DCGM_FI_DEV_GPU_UTIL{{gpu="1",UUID="GPU-bbb",pci_bus_id="00000000:00:1F.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node2",DCGM_FI_DRIVER_VERSION="550.54.15"}} 0
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{gpu="0",UUID="GPU-aaa",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node2"}} 40960
DCGM_FI_DEV_FB_USED{{gpu="2",UUID="GPU-ccc",device="nvidia2",modelName="NVIDIA A100-SXM4-80GB",GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="node2"}} 12
# HELP DCGM_FI_PROF_GR_ENGINE_ACTIVE Ratio of time the graphics engine is active.
# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="2",UUID="GPU-ccc",device="nvidia2",modelName="NVIDIA A100-SXM4-80GB",GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",Hostname="node2"}} 0.784913
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="2",UUID="GPU-ccc",device="nvidia2",modelName="NVIDIA A100-SXM4-80GB",GPU_I_PROFILE="2g.20gb",GPU_I_ID="5",Hostname="node2"}} 0.000000
# HELP container_cpu_usage_seconds_total Cumulative cpu time consumed in seconds.
# TYPE container_cpu_usage_seconds_total counter
container_cpu_usage_seconds_total{{cpu="total",id="/docker/{CID}",name="default--mia.1.x"}} 12.5
container_cpu_usage_seconds_total{{cpu="total",id="/system.slice/docker.service"}} 99
"""


def node2_slots() -> list[Slot]:
    """node2's slots as the hub reads them from the manager's node object."""
    resources = [
        ("DS01-GPU-0", "GPU-aaa"),
        ("DS01-GPU-1", "GPU-bbb"),
        ("DS01-MIG-2:0-3g.40gb", "MIG-c0"),
        ("DS01-MIG-2:1-2g.20gb", "MIG-c1"),
    ]
    node = parse_node(
        {
            "ID": "n2",
            "Description": {
                "Hostname": "node2",
                "Resources": {
                    "GenericResources": [
                        {"NamedResourceSpec": {"Kind": kind, "Value": value}}
                        for kind, value in resources
                    ]
                },
            },
            "Status": {"State": "ready"},
        }
    )
    return list(node.slots)


def test_dcgm_exporters_names_and_labels_are_read():
    metrics = parse_metrics(DCGM_TEXT)
    by_key = {(r.gpu, r.instance): r for r in metrics.gpus}
    assert by_key[(0, None)].utilization == 87 and by_key[(0, None)].memory_used_mb == 40960
    assert by_key[(1, None)].utilization == 0
    assert by_key[(2, 1)].profile == "3g.40gb" and by_key[(2, 1)].percent == pytest.approx(78.4913)
    assert metrics.cpu_seconds == {CID: 12.5}  # the node's own cgroups are not containers


def test_slots_map_by_uuid_and_mig_by_gpu_and_profile():
    use = slot_use(node2_slots(), parse_metrics(DCGM_TEXT))
    assert use["node2/0"].percent == 87 and use["node2/0"].memory_used_mb == 40960
    assert use["node2/1"].percent == 0 and use["node2/1"].unknown is None
    assert use["node2/2:0"].percent == pytest.approx(78.4913)
    assert use["node2/2:1"].percent == 0


def test_a_slot_missing_from_the_endpoint_is_unknown_not_idle():
    text = "\n".join(line for line in DCGM_TEXT.splitlines() if 'UUID="GPU-bbb"' not in line)
    use = slot_use(node2_slots(), parse_metrics(text))
    assert use["node2/1"].percent is None
    assert "UUID=GPU-bbb" in use["node2/1"].unknown


def test_two_mig_instances_of_one_profile_cannot_be_told_apart():
    slots = [
        Slot("node3/0:0", 0, "MIG-x", "MIG 3g.40gb", "3g.40gb", 40960, True, "node3"),
        Slot("node3/0:1", 0, "MIG-y", "MIG 3g.40gb", "3g.40gb", 40960, True, "node3"),
    ]
    text = (
        'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-p",GPU_I_PROFILE="3g.40gb",GPU_I_ID="1"} 0\n'
        'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-p",GPU_I_PROFILE="3g.40gb",GPU_I_ID="2"} 1\n'
    )
    use = slot_use(slots, parse_metrics(text))
    assert all(u.percent is None and "GPU_I_ID" in u.unknown for u in use.values())


@pytest.mark.parametrize("value", ["NaN", "+Inf", "-1"], ids=["nan", "infinite", "negative"])
def test_a_sample_that_is_no_reading_is_unknown(value):
    text = f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="GPU-aaa"}} {value}\n'
    use = slot_use(node2_slots()[:1], parse_metrics(text))
    assert use["node2/0"].percent is None and use["node2/0"].unknown


@pytest.mark.parametrize(
    "text",
    [
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-aaa" 87\n',
        "DCGM_FI_DEV_GPU_UTIL{gpu=0} 87\n",
        "<html><body>Bad Gateway</body></html>\n",
        'DCGM_FI_DEV_GPU_UTIL{gpu="0"} eighty\n',
    ],
    ids=["unclosed", "unquoted", "html", "not-a-number"],
)
def test_malformed_answers_are_a_named_error(text):
    with pytest.raises(MetricsError, match="node9: not Prometheus text format"):
        parse_metrics(text, "node9")


def test_an_answer_too_long_is_refused():
    with pytest.raises(MetricsError, match="longer than"):
        parse_metrics("#" * (4 << 20) + "x", "node9")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_metrics_or_a_named_error(text):
    try:
        metrics = parse_metrics(text)
    except MetricsError as error:
        assert str(error).startswith("the endpoint")
    else:
        assert isinstance(metrics, NodeMetrics)


def test_the_simulated_exporter_round_trips_through_the_parser():
    nvml = SimulatedNvml([SimulatedGpuSpec(), SimulatedGpuSpec(mig=("3g.40gb",))], seed="n1")
    inventory = discover(nvml, simulated=True)
    nvml.set_utilization("0", 64)
    nvml.add_process("1:0", 4321)
    metrics = parse_metrics(render_metrics(inventory, "node1", {CID: 7.0}).decode())
    whole = next(r for r in metrics.gpus if r.instance is None)
    mig = next(r for r in metrics.gpus if r.instance is not None)
    assert (whole.uuid, whole.utilization) == (inventory.slot("0").uuid, 64)
    assert (mig.gpu, mig.profile, mig.percent) == (1, "3g.40gb", 100.0)
    assert mig.uuid == inventory.gpus[1].uuid  # dcgm-exporter names MIG by the parent GPU
    assert metrics.cpu_seconds == {CID: 7.0}


# -- the HTTP edge ----------------------------------------------------------------------------


class _Answer(http.server.BaseHTTPRequestHandler):
    body = b""
    status = 200
    headers_out: dict[str, str] = {}
    drip: float = 0.0  # seconds between bytes (a slow endpoint)

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(self.status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        for key, value in self.headers_out.items():
            self.send_header(key, value)
        self.end_headers()
        if not self.drip:
            self.wfile.write(self.body)
            return
        for byte in self.body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(self.drip)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[str, type[_Answer]]]:
    handler = type("Handler", (_Answer,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", handler
    finally:
        server.shutdown()
        server.server_close()


def test_an_endpoint_is_fetched_and_parsed(endpoint):
    url, handler = endpoint
    handler.body = DCGM_TEXT.encode()
    assert slot_use(node2_slots(), fetch_metrics(url))["node2/0"].percent == 87


def test_an_oversized_answer_is_cut_and_refused(endpoint):
    url, handler = endpoint
    handler.body = b"# " + b"x" * 5000 + b"\n"
    with pytest.raises(MetricsError, match=f"{url}: answer longer than 1000 bytes"):
        fetch_metrics(url, max_bytes=1000)


def test_a_redirect_is_not_followed(endpoint):
    url, handler = endpoint
    handler.status, handler.headers_out = 302, {"Location": "http://169.254.169.254/"}
    with pytest.raises(MetricsError, match="answered HTTP 302"):
        fetch_metrics(url)


def test_an_error_status_is_named(endpoint):
    url, handler = endpoint
    handler.status = 503
    with pytest.raises(MetricsError, match=f"{url}: answered HTTP 503"):
        fetch_metrics(url)


def test_a_slow_drip_is_cut_off_at_the_timeout(endpoint):
    url, handler = endpoint
    handler.body, handler.drip = DCGM_TEXT.encode()[:40], 0.1  # 4 s in all, 0.1 s apart
    with pytest.raises(MetricsError, match="took longer than 1 s"):
        fetch_metrics(url, timeout=1)


def test_an_unreachable_endpoint_is_a_named_error():
    with pytest.raises(MetricsError, match="127.0.0.1:9/metrics: unreachable"):
        fetch_metrics("http://127.0.0.1:9/metrics", timeout=2)


def test_only_http_urls_are_fetched():
    with pytest.raises(MetricsError, match="not an http"):
        fetch_metrics("file:///etc/passwd")
