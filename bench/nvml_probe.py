"""Run the inventory's NVML backend against the real NVML of a GPU machine (read-only).

    PYTHONPATH=. python3 bench/nvml_probe.py

Prints the discovered inventory (GPUs, MIG mode, slots), then starts a small CUDA workload in a
child process (PyTorch, when present) and shows that `Inventory.utilization` and
`Inventory.processes` see it, and times the per-call latency of both. It never changes a GPU
setting: only nvmlDevice*Get* calls are made.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from ds01hub.gpu.inventory import load_inventory
from ds01hub.limits import GpuAllocationConfig

WORKLOAD = """
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda")
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    x = (x @ x).clamp_(-1, 1)
torch.cuda.synchronize()
"""


def timed(call, repeat: int = 2000) -> float:
    """Median microseconds per call."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        call()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> int:
    inventory = load_inventory(GpuAllocationConfig(simulate=None))
    print("== inventory (ds01hub.gpu.inventory on real NVML) ==")
    print(json.dumps(inventory.to_dict(), indent=2))
    if not inventory.slots:
        return 1
    slot = inventory.slots[0].id
    print(f"== live queries on slot {slot} ==")
    print(f"idle: utilization={inventory.utilization(slot)} processes={inventory.processes(slot)}")
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, "8"], stdout=subprocess.PIPE, text=True
        )
    except OSError as error:
        print(f"no workload: {error}")
        return 0
    if child.stdout.readline().strip() != "ready":
        print("workload did not start (no PyTorch/CUDA?)")
        return 0
    seen_pid, peak = False, 0
    for _ in range(30):
        time.sleep(0.2)
        pids = inventory.processes(slot)
        seen_pid = seen_pid or child.pid in pids
        peak = max(peak, inventory.utilization(slot) or 0)
    print(f"busy: workload pid={child.pid} seen in processes={seen_pid}, peak utilization={peak}%")
    print(f"busy: processes now={inventory.processes(slot)}")
    util_us = timed(lambda: inventory.utilization(slot))
    proc_us = timed(lambda: inventory.processes(slot), repeat=500)
    child.wait()
    print(f"latency: utilization {util_us:.1f} us/call, processes {proc_us:.1f} us/call (median)")
    print(f"after: utilization={inventory.utilization(slot)} processes={inventory.processes(slot)}")
    inventory.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
