"""Per-node GPU use in the metric names of NVIDIA's dcgm-exporter, read and written.

In a swarm the hub cannot call NVML on other nodes. Each node serves its GPUs' use on an HTTP
endpoint in the Prometheus text format, in the names and labels of NVIDIA's dcgm-exporter, so a
real cluster runs dcgm-exporter itself (and cAdvisor for containers' CPU) and the tests run a
small exporter of the simulated NVML in the same names (`ds01hub.services.node_exporter`):

    DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-...",device="nvidia0",modelName="...",Hostname="n2"} 87
    DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-...",...} 1024                         (MiB)
    DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="0",UUID="GPU-...",GPU_I_PROFILE="3g.40gb",GPU_I_ID="2",...}
        0.42                     (a ratio; the only utilisation dcgm-exporter has for MIG)
    container_cpu_usage_seconds_total{id="/docker/<64 hex>",name="..."} 12.5   (cAdvisor's)

For a MIG instance `UUID` is its *parent* GPU's and the instance is named by `GPU_I_ID`, which
the swarm's inventory (generic resources: MIG UUID and the MIG device index) does not carry:
`slot_use` maps a MIG slot only when its node's GPU has one instance of that profile, and says
why not otherwise. Whatever is not mapped is *unknown*, never idle.

`parse_metrics` reads with prometheus_client's text parser (the format's maintained parser),
bounded by size and sample count; `render_metrics` writes with prometheus_client's own writer;
`fetch_metrics` is the bounded HTTP edge. Errors are `MetricsError`, naming the endpoint.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ds01hub.errors import Ds01hubError
from ds01hub.gpu.inventory import Inventory, Slot

__all__ = [
    "CPU_SECONDS",
    "ENGINE_ACTIVE",
    "FB_USED",
    "GPU_UTIL",
    "FamiliesCollector",
    "GpuReading",
    "MetricsError",
    "NodeMetrics",
    "SlotUse",
    "fetch_metrics",
    "metric_families",
    "parse_metrics",
    "render_metrics",
    "slot_use",
]

GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
FB_USED = "DCGM_FI_DEV_FB_USED"
ENGINE_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
CPU_SECONDS = "container_cpu_usage_seconds_total"
#: an endpoint's answer may be at most this long (dcgm-exporter's is a few KiB per GPU)
MAX_BYTES = 4 << 20
MAX_SAMPLES = 50_000
_MAX_INDEX = 1024
_HEX = frozenset("0123456789abcdef")


class MetricsError(Ds01hubError, ValueError):
    """An endpoint that cannot be read, or an answer that is not usable metrics; says which."""


@dataclass(frozen=True)
class GpuReading:
    """One GPU or MIG instance as an endpoint reports it. `instance` (GPU_I_ID) and `profile`
    (GPU_I_PROFILE) are None for a whole GPU; `uuid` is the (parent) GPU's."""

    gpu: int
    uuid: str
    instance: int | None = None
    profile: str | None = None
    utilization: float | None = None  # percent (DCGM_FI_DEV_GPU_UTIL)
    engine_active: float | None = None  # ratio 0..1 (DCGM_FI_PROF_GR_ENGINE_ACTIVE)
    memory_used_mb: float | None = None

    @property
    def percent(self) -> float | None:
        """Utilisation in percent: GPU_UTIL where the device has it, else the engine ratio."""
        if self.utilization is not None:
            return self.utilization
        return None if self.engine_active is None else self.engine_active * 100.0


@dataclass(frozen=True)
class NodeMetrics:
    """What one node's endpoint(s) said: its GPUs and its containers' CPU seconds."""

    gpus: tuple[GpuReading, ...] = ()
    cpu_seconds: Mapping[str, float] = field(default_factory=dict)  # container id -> seconds

    def merged(self, other: NodeMetrics) -> NodeMetrics:
        """Two endpoints of one node (dcgm-exporter and cAdvisor) as one answer."""
        return NodeMetrics(self.gpus + other.gpus, {**self.cpu_seconds, **other.cpu_seconds})


@dataclass(frozen=True)
class SlotUse:
    """A slot's use from its node's endpoint; `unknown` says why there is none (never idle)."""

    percent: float | None = None
    memory_used_mb: float | None = None
    unknown: str | None = None


# -- reading ------------------------------------------------------------------------------------


def _value(value: float) -> float | None:
    """A finite, non-negative sample; anything else is no reading."""
    return value if math.isfinite(value) and value >= 0 else None


def _index(text: str | None) -> int | None:
    if text is None or text == "" or not text.isdigit() or int(text) > _MAX_INDEX:
        return None
    return int(text)


def _container_id(cgroup: str) -> str | None:
    """The 64-hex container id at the end of cAdvisor's `id` label (`/docker/<id>`,
    `/system.slice/docker-<id>.scope`); None for the node's own cgroups."""
    last = cgroup.rstrip("/").rsplit("/", 1)[-1]
    last = last.removeprefix("docker-").removesuffix(".scope")
    return last if len(last) == 64 and set(last) <= _HEX else None


def parse_metrics(text: str, source: str = "the endpoint") -> NodeMetrics:
    """The GPUs and containers' CPU in a Prometheus text answer; other metrics are ignored.
    A malformed answer (or one too long) is a `MetricsError` naming `source`."""
    from prometheus_client.parser import text_string_to_metric_families

    if len(text) > MAX_BYTES:
        raise MetricsError(f"{source}: answer longer than {MAX_BYTES} bytes")
    gpus: dict[tuple[int, str, int | None], dict[str, Any]] = {}
    cpu: dict[str, float] = {}
    count = 0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                count += 1
                if count > MAX_SAMPLES:
                    raise MetricsError(f"{source}: more than {MAX_SAMPLES} samples")
                _take(sample.name, sample.labels, sample.value, gpus, cpu)
    except MetricsError:
        raise
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise MetricsError(
            f"{source}: not Prometheus text format ({error}); is it a dcgm-exporter endpoint?"
        ) from None
    readings = tuple(
        GpuReading(gpu, uuid, instance, **values)
        for (gpu, uuid, instance), values in sorted(gpus.items(), key=lambda i: str(i[0]))
    )
    return NodeMetrics(readings, cpu)


def _take(
    name: str,
    labels: Mapping[str, str],
    raw: float,
    gpus: dict[tuple[int, str, int | None], dict[str, Any]],
    cpu: dict[str, float],
) -> None:
    value = _value(float(raw))
    if name == CPU_SECONDS:
        container = _container_id(labels.get("id", ""))
        if container is not None and value is not None:
            cpu[container] = cpu.get(container, 0.0) + value  # per-CPU series add up
        return
    field_name = {
        GPU_UTIL: "utilization",
        ENGINE_ACTIVE: "engine_active",
        FB_USED: "memory_used_mb",
    }
    if name not in field_name:
        return
    gpu, uuid = _index(labels.get("gpu")), labels.get("UUID", "")
    if gpu is None or not uuid:
        return
    instance = _index(labels.get("GPU_I_ID"))
    entry = gpus.setdefault((gpu, uuid, instance), {})
    if instance is not None:
        entry["profile"] = labels.get("GPU_I_PROFILE") or None
    entry[field_name[name]] = value


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """An endpoint is asked once: a redirect is an answer of its own (named), never followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def fetch_metrics(url: str, timeout: float = 5.0, max_bytes: int = MAX_BYTES) -> NodeMetrics:
    """GET one endpoint (http(s) only, no redirects): at most `max_bytes`, all of it within
    `timeout` seconds (a slow drip is cut off too), parsed."""
    if not url.startswith(("http://", "https://")):
        raise MetricsError(f"{url}: not an http(s) URL")
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            while chunk := response.read1(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise MetricsError(f"{url}: answer longer than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise MetricsError(f"{url}: the answer took longer than {timeout:g} s")
    except urllib.error.HTTPError as error:
        raise MetricsError(f"{url}: answered HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise MetricsError(f"{url}: unreachable ({reason})") from None
    return parse_metrics(b"".join(chunks).decode("utf-8", errors="replace"), url)


# -- mapping to slots -------------------------------------------------------------------------


def _local_id(slot: Slot) -> str:
    return slot.id.rpartition("/")[2]


def slot_use(slots: Iterable[Slot], metrics: NodeMetrics) -> dict[str, SlotUse]:
    """Each of one node's slots -> its use in `metrics` (by UUID for a whole GPU; by GPU index
    and profile for a MIG instance, when that is unambiguous)."""
    slots = list(slots)
    by_uuid = {r.uuid: r for r in metrics.gpus if r.instance is None}
    result: dict[str, SlotUse] = {}
    for slot in slots:
        if not slot.is_mig:
            reading = by_uuid.get(slot.uuid)
            result[slot.id] = _use(reading, f"{GPU_UTIL} has no series with UUID={slot.uuid}")
            continue
        twins = [s for s in slots if s.gpu_index == slot.gpu_index and s.profile == slot.profile]
        found = [r for r in metrics.gpus if r.gpu == slot.gpu_index and r.profile == slot.profile]
        if len(twins) > 1 or len(found) > 1:
            result[slot.id] = SlotUse(
                unknown=f"GPU {slot.gpu_index} has {max(len(twins), len(found))} MIG instances "
                f"of {slot.profile}; dcgm-exporter tells them apart only by GPU_I_ID, which the "
                "node's generic resources do not carry"
            )
            continue
        detail = f"no series for GPU {slot.gpu_index} with GPU_I_PROFILE={slot.profile}"
        result[slot.id] = _use(found[0] if found else None, detail)
    return result


def _use(reading: GpuReading | None, missing: str) -> SlotUse:
    if reading is None:
        return SlotUse(unknown=missing)
    if reading.percent is None:
        return SlotUse(
            memory_used_mb=reading.memory_used_mb,
            unknown=f"no {GPU_UTIL} or {ENGINE_ACTIVE} sample",
        )
    return SlotUse(reading.percent, reading.memory_used_mb)


# -- writing (the exporter of a node's NVML, real or simulated) -------------------------------


def metric_families(
    inventory: Inventory, hostname: str, cpu_seconds: Mapping[str, float] | None = None
) -> list[Any]:
    """`inventory`'s live use as prometheus_client metric families in dcgm-exporter's names
    (and containers' CPU in cAdvisor's, when given): one scrape's worth."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    keys = ["gpu", "UUID", "device", "modelName", "Hostname", "GPU_I_PROFILE", "GPU_I_ID"]
    util = GaugeMetricFamily(GPU_UTIL, "GPU utilization (in %).", labels=keys)
    active = GaugeMetricFamily(
        ENGINE_ACTIVE, "Ratio of time the graphics engine is active.", labels=keys
    )
    memory = GaugeMetricFamily(FB_USED, "Framebuffer memory used (in MiB).", labels=keys)
    gpu_uuids = {gpu.index: gpu.uuid for gpu in inventory.gpus}
    for slot in inventory.slots:
        instance = inventory.gpu_instance_id(slot.id) if slot.is_mig else None
        values = [
            str(slot.gpu_index),
            gpu_uuids.get(slot.gpu_index, slot.uuid),
            f"nvidia{slot.gpu_index}",
            slot.name,
            hostname,
            slot.profile or "",
            "" if instance is None else str(instance),
        ]
        percent = inventory.utilization(slot.id)
        if slot.is_mig:  # NVML has no utilisation for MIG: busy while a process computes
            active.add_metric(values, 1.0 if inventory.processes(slot.id) else 0.0)
        elif percent is not None:
            util.add_metric(values, float(percent))
        used = inventory.memory_used_mb(slot.id)
        if used is not None:
            memory.add_metric(values, float(used))
    families: list[Any] = [util, active, memory]
    if cpu_seconds is not None:
        cpu = CounterMetricFamily(
            CPU_SECONDS.removesuffix("_total"),
            "Cumulative cpu time consumed in seconds.",
            labels=["id"],
        )
        for container, seconds in sorted(cpu_seconds.items()):
            cpu.add_metric([f"/docker/{container}"], seconds)
        families.append(cpu)
    return families


def render_metrics(
    inventory: Inventory, hostname: str, cpu_seconds: Mapping[str, float] | None = None
) -> bytes:
    """`metric_families` in the text format, by prometheus_client's own writer."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(lambda: metric_families(inventory, hostname, cpu_seconds)))
    return generate_latest(registry)


class FamiliesCollector:
    """A prometheus_client collector whose families `build()` makes afresh at each scrape."""

    def __init__(self, build: Callable[[], list[Any]]) -> None:
        self.build = build

    def collect(self) -> Iterator[Any]:
        return iter(self.build())
