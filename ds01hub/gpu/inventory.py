"""GPU inventory: which slots exist (whole GPUs and MIG instances), their UUIDs, live usage.

One NVML backend, written against the pynvml API, runs on the real `pynvml` (nvidia-ml-py)
or on `SimulatedNvml` (declared in the YAML `gpu_allocation.simulate`, always marked
simulated). A slot is a whole GPU (`"0"`) or a MIG device (`"0:1"` = GPU 0, MIG device index
1); a GPU with MIG enabled contributes only its MIG devices. Without an NVIDIA library or GPU
the inventory is empty with a one-line `reason`: a CPU-only machine must still run the hub.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ds01hub.errors import Ds01hubError
from ds01hub.limits import GpuAllocationConfig
from ds01hub.mig import COMPUTE_SLICES, model_compute_slices, profile_in_device_name

__all__ = ["Gpu", "Inventory", "InventoryError", "Slot", "discover", "load_inventory"]


class InventoryError(Ds01hubError, KeyError):
    """A slot id that this machine does not have."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown slot"


@dataclass(frozen=True)
class Slot:
    """What the allocator hands out: a whole GPU or one MIG instance. `node` is the Swarm node's
    hostname in a cluster (ds01hub/gpu/cluster.py; the id is then `node/slot`), "" on one host.
    `compute_slices`: how many compute slices the slot's GPU has (a MIG instance is its profile's
    share of them: `ds01hub.mig.gpu_share`)."""

    id: str
    gpu_index: int
    uuid: str
    name: str
    profile: str | None
    memory_mb: int
    simulated: bool
    node: str = ""
    compute_slices: int = COMPUTE_SLICES

    @property
    def is_mig(self) -> bool:
        return self.profile is not None


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mb: int
    mig_enabled: bool
    compute_slices: int = COMPUTE_SLICES


@dataclass
class Inventory:
    """The machine's slots plus live queries (utilisation, processes) through the same NVML."""

    gpus: list[Gpu]
    slots: list[Slot]
    simulated: bool
    reason: str | None = None
    driver_version: str | None = None
    nvml: Any = field(default=None, repr=False)  # the pynvml (or SimulatedNvml) in use
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_id = {slot.id: slot for slot in self.slots}

    def slot(self, slot_id: str) -> Slot:
        try:
            return self._by_id[slot_id]
        except KeyError:
            known = ", ".join(self._by_id) or "none"
            raise InventoryError(
                f"no GPU slot {slot_id!r} on this machine (slots: {known})"
            ) from None

    def has_slot(self, slot_id: str) -> bool:
        return slot_id in self._by_id

    def _query(self, slot_id: str, read: Callable[[Any], Any], fallback: Any) -> Any:
        """`read(handle)` through the live NVML; `fallback` for an unknown slot, a closed
        inventory or an NVML error (a live figure is never worth a crash)."""
        handle = self._handles.get(slot_id)
        if handle is None or self.nvml is None:
            return fallback
        try:
            return read(handle)
        except self.nvml.NVMLError:
            return fallback

    def utilization(self, slot_id: str) -> int | None:
        """GPU utilisation in percent; None where NVML has none (MIG devices, errors)."""
        return self._query(
            slot_id, lambda h: int(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu), None
        )

    def memory_used_mb(self, slot_id: str) -> int | None:
        """Memory in use on the slot (a MIG device reports its own share); None on errors."""
        return self._query(
            slot_id, lambda h: int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) >> 20, None
        )

    def gpu_instance_id(self, slot_id: str) -> int | None:
        """A MIG slot's GPU instance id (what dcgm-exporter calls `GPU_I_ID`); None for a whole
        GPU or on errors."""
        return self._query(slot_id, lambda h: int(self.nvml.nvmlDeviceGetGpuInstanceId(h)), None)

    def processes(self, slot_id: str) -> list[int]:
        """PIDs (host namespace) computing on the slot; [] when none or not visible."""
        return self._query(
            slot_id,
            lambda h: [int(p.pid) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h)],
            [],
        )

    def close(self) -> None:
        """Release NVML (the handles become invalid)."""
        if self.nvml is not None:
            with contextlib.suppress(self.nvml.NVMLError):
                self.nvml.nvmlShutdown()
            self.nvml, self._handles = None, {}

    def to_dict(self, live: bool = True) -> dict[str, Any]:
        """JSON-ready; with `live`, each slot also carries utilisation, memory in use and
        process ids."""
        slots = []
        for slot in self.slots:
            entry = asdict(slot)
            if live:
                entry["utilization"] = self.utilization(slot.id)
                entry["memory_used_mb"] = self.memory_used_mb(slot.id)
                entry["processes"] = self.processes(slot.id)
            slots.append(entry)
        return {
            "simulated": self.simulated,
            "reason": self.reason,
            "driver_version": self.driver_version,
            "gpus": [asdict(gpu) for gpu in self.gpus],
            "slots": slots,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_devices(nvml: Any, gpu_handle: Any) -> Iterable[tuple[int, Any]]:
    """(MIG device index, handle) for each MIG device present; empty indices are skipped."""
    for index in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu_handle)):
        try:
            yield index, nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu_handle, index)
        except nvml.NVMLError_NotFound:
            continue


#: pynvml's GPU instance profile constants, by the compute slices each one is.
_GPU_INSTANCE_PROFILES = {
    "NVML_GPU_INSTANCE_PROFILE_1_SLICE": 1,
    "NVML_GPU_INSTANCE_PROFILE_2_SLICE": 2,
    "NVML_GPU_INSTANCE_PROFILE_3_SLICE": 3,
    "NVML_GPU_INSTANCE_PROFILE_4_SLICE": 4,
    "NVML_GPU_INSTANCE_PROFILE_6_SLICE": 6,
    "NVML_GPU_INSTANCE_PROFILE_7_SLICE": 7,
    "NVML_GPU_INSTANCE_PROFILE_8_SLICE": 8,
}


def _compute_slices(nvml: Any, handle: Any, name: str) -> int:
    """The GPU's compute slices: the largest GPU instance profile NVML's MIG profile info says
    it supports (the whole-GPU profile: 7 on an A100 or H100, 4 on an A30); the model's number
    (`ds01hub.mig.model_compute_slices`) where NVML has no such info (an old driver or pynvml)."""
    info = getattr(nvml, "nvmlDeviceGetGpuInstanceProfileInfo", None)
    found = []
    for constant in _GPU_INSTANCE_PROFILES:
        profile = getattr(nvml, constant, None)
        if info is None or profile is None:
            continue
        try:
            found.append(int(info(handle, profile).sliceCount))
        except nvml.NVMLError:  # NotSupported: not a profile of this GPU
            continue
    return max(found) if found else model_compute_slices(name)


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except nvml.NVMLError:  # NotSupported on GPUs without MIG
        return False
    return current == nvml.NVML_DEVICE_MIG_ENABLE


def discover(nvml: Any, *, enable_mig: bool = True, simulated: bool = False) -> Inventory:
    """Walk NVML (real or simulated) once; keeps NVML initialised for live queries."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as error:
        hint = (
            ""
            if simulated
            else " (no NVIDIA driver/GPU here; gpu_allocation.simulate declares one)"
        )
        return Inventory([], [], simulated, reason=f"NVML unavailable: {error}{hint}")
    try:
        return _walk(nvml, enable_mig=enable_mig, simulated=simulated)
    except nvml.NVMLError as error:
        nvml.nvmlShutdown()
        return Inventory([], [], simulated, reason=f"NVML query failed: {error}")


def _walk(nvml: Any, *, enable_mig: bool, simulated: bool) -> Inventory:
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    gpus: list[Gpu] = []
    slots: list[Slot] = []
    handles: dict[str, Any] = {}
    skipped_mig = 0
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(handle))
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        memory_mb = int(nvml.nvmlDeviceGetMemoryInfo(handle).total) >> 20
        mig = _mig_enabled(nvml, handle)
        slices = _compute_slices(nvml, handle, name) if mig else COMPUTE_SLICES
        gpus.append(Gpu(index, uuid, name, memory_mb, mig, slices))
        if not mig:
            slot_id = str(index)
            slots.append(Slot(slot_id, index, uuid, name, None, memory_mb, simulated))
            handles[slot_id] = handle
            continue
        for mig_index, mig_handle in _mig_devices(nvml, handle):
            if not enable_mig:
                skipped_mig += 1
                continue
            mig_name = _text(nvml.nvmlDeviceGetName(mig_handle))
            profile = profile_in_device_name(mig_name)
            slot_id = f"{index}:{mig_index}"
            slots.append(
                Slot(
                    id=slot_id,
                    gpu_index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(mig_handle)),
                    name=mig_name,
                    profile=profile.name if profile else "mig",
                    memory_mb=int(nvml.nvmlDeviceGetMemoryInfo(mig_handle).total) >> 20,
                    simulated=simulated,
                    compute_slices=slices,
                )
            )
            handles[slot_id] = mig_handle
    reason = None
    if not gpus:
        reason = "NVML reports no GPUs on this machine"
    elif skipped_mig:
        reason = f"{skipped_mig} MIG instance(s) not offered: gpu_allocation.enable_mig is false"
    return Inventory(gpus, slots, simulated, reason, driver, nvml, handles)


def load_inventory(config: GpuAllocationConfig | None = None, nvml: Any = None) -> Inventory:
    """The inventory the allocator uses: `gpu_allocation.simulate` -> the simulated NVML
    (always marked simulated); else the given `nvml` or the real pynvml."""
    config = config or GpuAllocationConfig()
    simulated = False
    if nvml is None and config.simulate is not None:
        from ds01hub.gpu.simulated_nvml import SimulatedNvml

        nvml = SimulatedNvml.from_config(config.simulate)
    if nvml is None:
        try:
            import pynvml  # optional at import time: a host CLI without NVIDIA's library
        except ImportError:
            return Inventory([], [], False, reason="nvidia-ml-py (pynvml) is not installed")
        nvml = pynvml
    simulated = bool(getattr(nvml, "simulated", False))
    return discover(nvml, enable_mig=config.enable_mig, simulated=simulated)
