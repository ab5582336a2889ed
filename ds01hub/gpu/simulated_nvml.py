"""A SIMULATED pynvml: the same function names, return shapes and `pynvml.NVMLError`s.

Machines without NVIDIA GPUs (this project's CI, a laptop demo) cannot run MIG. The inventory's
NVML backend is therefore written once against the pynvml API and runs either on the real
`pynvml` module or on a `SimulatedNvml` instance, which behaves like pynvml does on real
hardware where it matters to ds01hub:

- every call before `nvmlInit()` raises `NVMLError_Uninitialized`; init/shutdown are counted;
- a MIG-enabled GPU reports `NVML_DEVICE_MIG_ENABLE`, enumerates its MIG devices through
  `nvmlDeviceGetMigDeviceHandleByIndex` (empty indices raise `NVMLError_NotFound`), and MIG
  device names end with their profile (`... MIG 2g.20gb`);
- utilisation of a MIG-enabled GPU or a MIG device raises `NVMLError_NotSupported`, as NVML does;
- compute processes carry `pid`, `usedGpuMemory`, `gpuInstanceId`, `computeInstanceId`.

UUIDs look like real ones (`GPU-<uuid>`, `MIG-<uuid>`) and derive from a seed, so they are
stable across restarts and containers' recorded UUIDs stay valid. Utilisation and processes are
controllable (`set_utilization`, `add_process`) for the culler's "busy GPU" tests. It always
reports itself as simulated (`simulated = True`, driver version `simulated`).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import pynvml

from ds01hub.limits import SimulateConfig, SimulatedGpuSpec
from ds01hub.mig import COMPUTE_SLICES, model_compute_slices, parse_profile

__all__ = ["SimulatedNvml", "mig_profile_memory_mb", "simulated_uuid"]

_UUID_NAMESPACE = uuid.UUID("6f1d6c52-4a9d-4f5e-9b0e-0d5a1d5e0b01")

# Re-exported so code written against `pynvml` works unchanged on this object.
NVMLError = pynvml.NVMLError
NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE


def simulated_uuid(seed: str, kind: str, *path: object) -> str:
    """`GPU-...` / `MIG-...` from a seed and a position: same inputs, same UUID, every run."""
    name = "/".join([seed, kind, *map(str, path)])
    return f"{kind}-{uuid.uuid5(_UUID_NAMESPACE, name)}"


def mig_profile_memory_mb(profile: str) -> int:
    """`2g.20gb` -> its memory in MiB (the profile's nominal size; 0 for no profile)."""
    parsed = parse_profile(profile)
    return parsed.memory_mb if parsed else 0


@dataclass(frozen=True)
class _Handle:
    """What pynvml calls a device handle: a GPU, or one MIG device of it."""

    gpu: int
    mig: int | None = None


@dataclass
class _Memory:
    total: int
    free: int
    used: int


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 (pynvml's field name)
    gpuInstanceId: int = 0xFFFFFFFF  # noqa: N815
    computeInstanceId: int = 0xFFFFFFFF  # noqa: N815


@dataclass
class _ProfileInfo:
    """pynvml's `c_nvmlGpuInstanceProfileInfo_t`, the fields ds01hub reads."""

    id: int
    sliceCount: int  # noqa: N815 (pynvml's field name)
    instanceCount: int  # noqa: N815
    memorySizeMB: int  # noqa: N815


#: pynvml's GPU instance profile constants by compute slices (those the simulated GPUs offer).
_PROFILE_OF_SLICES = {
    1: pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE,
    2: pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE,
    3: pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE,
    4: pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE,
    7: pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE,
}


@dataclass
class _SimGpu:
    spec: SimulatedGpuSpec
    uuid: str
    mig_uuids: tuple[str, ...]
    utilization: int = 0
    memory_utilization: int = 0
    processes: dict[int | None, list[_Process]] = field(default_factory=dict)


class SimulatedNvml:
    """A module-like object with pynvml's functions, over a declared set of GPUs."""

    simulated = True
    NVMLError = pynvml.NVMLError
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE

    def __init__(
        self,
        gpus: Iterable[SimulatedGpuSpec],
        seed: str = "ds01hub",
        *,
        init_error: int | None = None,
    ):
        """`init_error`: an NVML_ERROR_* code that nvmlInit raises (e.g. a missing driver)."""
        self.seed = seed
        self.init_error = init_error
        self._lock = threading.Lock()
        self._init_count = 0
        self._gpus = [
            _SimGpu(
                spec=spec,
                uuid=simulated_uuid(seed, "GPU", index),
                mig_uuids=tuple(
                    simulated_uuid(seed, "MIG", index, mig) for mig in range(len(spec.mig or ()))
                ),
            )
            for index, spec in enumerate(gpus)
        ]

    @classmethod
    def from_config(cls, config: SimulateConfig) -> SimulatedNvml:
        return cls(config.gpus, config.seed)

    # -- controls for tests and demos (not part of pynvml) ------------------------------------

    def _gpu_and_mig(self, slot_id: str) -> tuple[_SimGpu, int | None]:
        gpu_text, _, mig_text = slot_id.partition(":")
        gpu = self._gpus[int(gpu_text)]
        return gpu, (int(mig_text) if mig_text else None)

    def set_utilization(self, slot_id: str, gpu_percent: int, memory_percent: int = 0) -> None:
        """Make a whole GPU look busy (`"0"`). MIG devices have no utilisation in NVML."""
        gpu, mig = self._gpu_and_mig(slot_id)
        if mig is not None:
            raise ValueError("NVML reports no utilisation for MIG devices; use add_process")
        gpu.utilization, gpu.memory_utilization = gpu_percent, memory_percent

    def add_process(self, slot_id: str, pid: int, used_memory_mb: int = 512) -> None:
        """Pretend `pid` computes on a GPU (`"0"`) or a MIG device (`"0:1"`)."""
        gpu, mig = self._gpu_and_mig(slot_id)
        process = _Process(pid, used_memory_mb << 20)
        if mig is not None:
            process.gpuInstanceId, process.computeInstanceId = self._gi_id(gpu, mig), 0
        with self._lock:
            gpu.processes.setdefault(mig, []).append(process)

    def clear_processes(self, slot_id: str | None = None) -> None:
        with self._lock:
            for index, gpu in enumerate(self._gpus):
                if slot_id is None:
                    gpu.processes.clear()
                    continue
                _, mig = self._gpu_and_mig(slot_id)
                if int(slot_id.partition(":")[0]) == index:
                    gpu.processes.pop(mig, None)

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _gi_id(gpu: _SimGpu, mig: int) -> int:
        """GPU instance ids as NVML numbers them for equal slices (1g: 7.., 2g: 3.., 3g: 1..)."""
        profile = (gpu.spec.mig or ("",))[mig]
        base = {"1g": 7, "2g": 3, "3g": 1, "4g": 1, "7g": 0}.get(profile.split(".")[0], 1)
        return base + mig

    def _check_init(self) -> None:
        if self._init_count <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: _Handle) -> _SimGpu:
        self._check_init()
        if not isinstance(handle, _Handle) or not 0 <= handle.gpu < len(self._gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._gpus[handle.gpu]
        if handle.mig is not None and handle.mig >= len(gpu.mig_uuids):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu

    @staticmethod
    def _require_mig(handle: _Handle) -> int:
        """The handle's MIG index; NVML's invalid-argument error for a whole GPU's handle."""
        if handle.mig is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig

    # -- the pynvml API ----------------------------------------------------------------------

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        with self._lock:
            self._init_count += 1

    def nvmlInitWithFlags(self, flags: int) -> None:  # noqa: N802
        self.nvmlInit()

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._check_init()
        with self._lock:
            self._init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        self._check_init()
        return "simulated"

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._check_init()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:  # noqa: N802
        self._check_init()
        if not 0 <= index < len(self._gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetHandleByUUID(self, device_uuid: str) -> _Handle:  # noqa: N802
        self._check_init()
        for index, gpu in enumerate(self._gpus):
            if gpu.uuid == device_uuid:
                return _Handle(index)
            if device_uuid in gpu.mig_uuids:
                return _Handle(index, gpu.mig_uuids.index(device_uuid))
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, handle: _Handle) -> int:  # noqa: N802
        self._gpu(handle)
        if handle.mig is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return handle.gpu

    def nvmlDeviceGetName(self, handle: _Handle) -> str:  # noqa: N802
        gpu = self._gpu(handle)
        if handle.mig is None:
            return gpu.spec.name
        return f"{gpu.spec.name} MIG {(gpu.spec.mig or ())[handle.mig]}"

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:  # noqa: N802
        gpu = self._gpu(handle)
        return gpu.uuid if handle.mig is None else gpu.mig_uuids[handle.mig]

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> _Memory:  # noqa: N802
        gpu = self._gpu(handle)
        if handle.mig is None:
            total = gpu.spec.memory_mb << 20
            owners = [p for procs in gpu.processes.values() for p in procs]
        else:
            total = mig_profile_memory_mb((gpu.spec.mig or ())[handle.mig]) << 20
            owners = gpu.processes.get(handle.mig, [])
        used = min(total, sum(p.usedGpuMemory or 0 for p in owners))
        return _Memory(total=total, free=total - used, used=used)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:  # noqa: N802
        gpu = self._gpu(handle)
        if handle.mig is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if gpu.spec.mig else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:  # noqa: N802
        return model_compute_slices(self._gpu(handle).spec.name)

    def nvmlDeviceGetGpuInstanceProfileInfo(  # noqa: N802
        self, handle: _Handle, profile: int, version: int | None = None
    ) -> _ProfileInfo:
        """The GPU instance profiles of the spec's model (`ds01hub.mig.model_compute_slices`):
        1, 2, 3, 4 and 7 slices on a 7-slice GPU, 1, 2 and 4 on a 4-slice A30; NotSupported
        for any other profile and on a MIG device, as NVML answers."""
        gpu = self._gpu(handle)
        if handle.mig is not None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        total = model_compute_slices(gpu.spec.name)
        offered = (1, 2, 3, 4, 7) if total == COMPUTE_SLICES else (1, 2, total)
        slices = next((n for n, p in _PROFILE_OF_SLICES.items() if p == profile), None)
        if slices is None or slices not in offered:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return _ProfileInfo(profile, slices, total // slices, gpu.spec.memory_mb * slices // total)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:  # noqa: N802
        gpu = self._gpu(handle)
        if not gpu.spec.mig:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < len(gpu.mig_uuids):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return _Handle(handle.gpu, index)

    def nvmlDeviceIsMigDeviceHandle(self, handle: _Handle) -> int:  # noqa: N802
        self._gpu(handle)
        return int(handle.mig is not None)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: _Handle) -> _Handle:  # noqa: N802
        self._gpu(handle)
        self._require_mig(handle)
        return _Handle(handle.gpu)

    def nvmlDeviceGetGpuInstanceId(self, handle: _Handle) -> int:  # noqa: N802
        gpu = self._gpu(handle)
        return self._gi_id(gpu, self._require_mig(handle))

    def nvmlDeviceGetComputeInstanceId(self, handle: _Handle) -> int:  # noqa: N802
        self._gpu(handle)
        self._require_mig(handle)
        return 0

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> _Utilization:  # noqa: N802
        gpu = self._gpu(handle)
        if handle.mig is not None or gpu.spec.mig:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return _Utilization(gpu=gpu.utilization, memory=gpu.memory_utilization)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[_Process]:  # noqa: N802
        gpu = self._gpu(handle)
        with self._lock:
            if handle.mig is not None:
                return list(gpu.processes.get(handle.mig, []))
            return [p for procs in gpu.processes.values() for p in procs]

    def __getattr__(self, name: str):
        """pynvml's error classes (`NVMLError_NotFound`, ...) and NVML_* constants."""
        if name.startswith(("NVMLError_", "NVML_")):
            return getattr(pynvml, name)
        raise AttributeError(name)
