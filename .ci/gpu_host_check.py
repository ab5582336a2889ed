"""Read-only check of ds01hub's GPU paths on a machine with real NVIDIA hardware.

Run there as ``python3 .ci/gpu_host_check.py`` (needs nvidia-ml-py and PyYAML importable).
It never changes anything: no chown/chmod of device nodes, no MIG mode change, no NVML
setter. It prints what ds01hub would see and do, so a report can say exactly what was
verified on real hardware and what only in tests (fake /dev trees, the simulated NVML).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import subprocess
from pathlib import Path

from ds01hub.gpu import access
from ds01hub.gpu.inventory import load_inventory
from ds01hub.limits import parse_limits


def _smi(*args: str) -> str:
    try:
        done = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return "nvidia-smi: not found"
    return (done.stdout + done.stderr).strip()


def _udev_kernel_patterns() -> list[str]:
    rule = access.render_udev_rule(access.GPU_GROUP)
    return [g for line in re.findall(r'KERNEL=="([^"]+)"', rule) for g in line.split("|")]


def main() -> int:
    mig_before = _smi("--query-gpu=index,uuid,name,mig.mode.current", "--format=csv,noheader")
    print("nvidia-smi before:", mig_before)
    print("nvidia-smi -L:", _smi("-L"))

    dev = Path("/dev")
    real = sorted(str(p) for p in dev.glob("nvidia*")) + sorted(
        str(p) for p in dev.glob("nvidia-caps/*")
    )
    found = [str(p) for p in access.device_nodes(dev)]
    print("\n/dev NVIDIA nodes present:")
    for name in real:
        info = os.stat(name)
        kind = "char" if stat.S_ISCHR(info.st_mode) else "other"
        print(
            f"  {name:40} {kind} uid={info.st_uid} gid={info.st_gid} "
            f"mode={stat.S_IMODE(info.st_mode):04o} covered={'yes' if name in found else 'NO'}"
        )
    minors = Path("/proc/driver/nvidia-caps/mig-minors")
    if minors.exists():
        head = [line for line in minors.read_text().splitlines() if "/" not in line]
        print("mig-minors (config/monitor):", head)
    owned = {f"/dev/nvidia-caps/{name}" for name in access.DRIVER_OWNED_CAPS}
    missed = [n for n in real if n not in found and n not in owned and Path(n).is_char_device()]
    print("device_nodes() misses char devices:", missed or "none")
    print("driver-owned MIG capabilities left alone:", sorted(owned & set(real)) or "none here")
    patterns = _udev_kernel_patterns()
    matched = {n for n in real if any(fnmatch.fnmatch(Path(n).name, p) for p in patterns)}
    print("udev and the install agree:", matched == set(found), sorted(matched ^ set(found)))
    print(
        "nodes_to_fix(gid=12345) would change:",
        len(access.nodes_to_fix(dev, 12345)),
        "of",
        len(found),
        "(read-only: nothing changed)",
    )
    print("\nudev rule:\n" + access.render_udev_rule(access.GPU_GROUP))
    print("modprobe:\n" + access.render_modprobe(12345))

    inventory = load_inventory(parse_limits({}).gpu_allocation)
    print("inventory:", json.dumps(inventory.to_dict(live=True), indent=1))
    if inventory.slots:
        try:  # the spawner needs JupyterHub and dockerspawner installed
            from spawner.container_plan import device_requests
        except ImportError as error:
            print("device_requests: not checked here:", error)
        else:
            print("device_requests(first slot):", device_requests(inventory.slots[:1]))
    inventory.close()

    mig_after = _smi("--query-gpu=index,uuid,name,mig.mode.current", "--format=csv,noheader")
    print("\nnvidia-smi after:", mig_after)
    print("GPU settings unchanged:", mig_before == mig_after)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
