"""The NVML backend, run on the SIMULATED pynvml (MIG cannot run on this machine)."""

import pynvml
import pytest

from ds01hub.gpu.inventory import InventoryError, discover, load_inventory
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import GpuAllocationConfig, SimulatedGpuSpec, parse_limits


def demo_nvml(seed="lab"):
    return SimulatedNvml(
        [
            SimulatedGpuSpec("NVIDIA A100-SXM4-80GB", 81920),
            SimulatedGpuSpec("NVIDIA A100-SXM4-80GB", 81920),
            SimulatedGpuSpec("NVIDIA A100-SXM4-80GB", 81920, ("2g.20gb",) * 3),
        ],
        seed,
    )


def test_mig_gpu_contributes_only_its_instances():
    inventory = discover(demo_nvml(), simulated=True)
    assert [s.id for s in inventory.slots] == ["0", "1", "2:0", "2:1", "2:2"]
    assert [g.mig_enabled for g in inventory.gpus] == [False, False, True]
    mig = inventory.slot("2:1")
    assert (mig.gpu_index, mig.profile, mig.memory_mb) == (2, "2g.20gb", 20480)
    assert mig.uuid.startswith("MIG-") and inventory.slot("0").uuid.startswith("GPU-")
    assert mig.name.endswith("MIG 2g.20gb")
    assert all(s.simulated for s in inventory.slots) and inventory.simulated
    assert inventory.driver_version == "simulated"


def test_uuids_are_stable_per_seed_and_differ_between_seeds():
    first = discover(demo_nvml("lab"), simulated=True)
    again = discover(demo_nvml("lab"), simulated=True)
    other = discover(demo_nvml("other"), simulated=True)
    assert [s.uuid for s in first.slots] == [s.uuid for s in again.slots]
    assert {s.uuid for s in first.slots}.isdisjoint(s.uuid for s in other.slots)
    assert len({s.uuid for s in first.slots}) == 5
    # uuid-shaped: GPU-8-4-4-4-12 hex
    body = first.slot("0").uuid.removeprefix("GPU-").split("-")
    assert [len(p) for p in body] == [8, 4, 4, 4, 12]


def test_enable_mig_false_offers_no_mig_instances_and_says_why():
    inventory = discover(demo_nvml(), enable_mig=False, simulated=True)
    assert [s.id for s in inventory.slots] == ["0", "1"]
    assert "enable_mig" in inventory.reason


def test_utilization_and_processes_are_controllable_like_a_busy_gpu():
    nvml = demo_nvml()
    inventory = discover(nvml, simulated=True)
    assert inventory.utilization("0") == 0 and inventory.processes("0") == []
    nvml.set_utilization("0", 93)
    nvml.add_process("0", 4242)
    nvml.add_process("2:1", 777)
    assert inventory.utilization("0") == 93
    assert inventory.processes("0") == [4242]
    assert inventory.processes("2:1") == [777]
    assert inventory.processes("2:0") == []
    assert inventory.utilization("2:1") is None  # NVML has no per-MIG utilisation
    assert inventory.memory_used_mb("0") == 512 and inventory.memory_used_mb("2:1") == 512
    assert inventory.memory_used_mb("2:0") == 0  # a MIG device counts only its own processes
    nvml.clear_processes("0")
    assert inventory.processes("0") == [] and inventory.processes("2:1") == [777]
    assert inventory.memory_used_mb("0") == 0


def test_simulated_nvml_raises_pynvml_errors_like_pynvml():
    nvml = demo_nvml()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    assert nvml.nvmlDeviceGetCount() == 3
    gpu2 = nvml.nvmlDeviceGetHandleByIndex(2)
    assert nvml.nvmlDeviceGetMigMode(gpu2) == [pynvml.NVML_DEVICE_MIG_ENABLE] * 2
    with pytest.raises(pynvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu2, 5)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu2, 1)
    assert nvml.nvmlDeviceIsMigDeviceHandle(mig) == 1
    assert nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(mig) == gpu2
    assert nvml.nvmlDeviceGetGpuInstanceId(mig) == 4
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetUtilizationRates(gpu2)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(9)
    assert nvml.nvmlDeviceGetHandleByUUID(nvml.nvmlDeviceGetUUID(mig)) == mig
    memory = nvml.nvmlDeviceGetMemoryInfo(mig)
    assert memory.total == 20480 << 20 and memory.free == memory.total
    nvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetName(gpu2)
    # the error classes are pynvml's own, reachable from the simulated module as from pynvml
    assert nvml.NVMLError_NotFound is pynvml.NVMLError_NotFound


def test_no_driver_gives_an_empty_inventory_and_one_line_reason():
    nvml = SimulatedNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    inventory = discover(nvml)
    assert inventory.slots == [] and inventory.gpus == []
    assert inventory.reason.startswith("NVML unavailable: NVML Shared Library Not Found")
    assert "\n" not in inventory.reason
    assert inventory.utilization("0") is None and inventory.processes("0") == []


def test_real_pynvml_on_this_cpu_machine_does_not_crash():
    inventory = load_inventory(GpuAllocationConfig())
    if inventory.gpus:  # a real NVIDIA machine
        assert not inventory.simulated
    else:
        assert inventory.reason and inventory.slots == []


def test_zero_gpus_is_reported():
    inventory = discover(SimulatedNvml([]), simulated=True)
    assert inventory.reason == "NVML reports no GPUs on this machine"


def test_load_inventory_from_the_yaml_simulate_section_is_simulated():
    config = parse_limits(
        {"gpu_allocation": {"mig_profile": "2g.20gb", "simulate": {"gpus": [{}, {"mig": 3}]}}}
    )
    inventory = load_inventory(config.gpu_allocation)
    assert inventory.simulated and [s.id for s in inventory.slots] == ["0", "1:0", "1:1", "1:2"]
    assert isinstance(inventory.nvml, SimulatedNvml)
    data = inventory.to_dict()
    assert data["simulated"] is True
    assert data["slots"][1]["profile"] == "2g.20gb" and data["slots"][1]["utilization"] is None


def test_unknown_slot_names_the_known_ones():
    inventory = discover(demo_nvml(), simulated=True)
    with pytest.raises(InventoryError, match=r"no GPU slot '7'.*0, 1, 2:0"):
        inventory.slot("7")
