"""A full disk under the allocator's state directory (a real 1 MiB tmpfs, so root): the real
error is reported, an allocation that cannot be recorded changes nothing (no claim, no event),
and once there is space again everything is recorded, GPU-hours included."""

from __future__ import annotations

import contextlib
import os
import subprocess
from datetime import timedelta

import pytest
from harness.allocation_fakes import Clock, FakeEngine, Processes, allocator_for

from ds01hub.gpu.allocator import AllocationStateError
from ds01hub.gpu.decision import GpuRequest
from ds01hub.gpu.eventlog import EventLog, EventLogError
from ds01hub.gpu.inventory import discover
from ds01hub.gpu.simulated_nvml import SimulatedNvml
from ds01hub.limits import SimulatedGpuSpec, parse_limits

pytestmark = pytest.mark.root

LIMITS = parse_limits({"defaults": {"max_gpus": 1, "gpu_hold_after_stop": "1h"}})


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (run the `root` tests as root)")
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory) -> None:
    """Write a file until the file system says it is full."""
    with open(directory / "filler", "wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)


def test_a_full_state_directory_changes_nothing_and_says_why(small_disk):
    clock = Clock()
    engine = FakeEngine(clock)
    log = EventLog(small_disk / "events.db")
    inventory = discover(SimulatedNvml([SimulatedGpuSpec()]), simulated=True)
    allocator = allocator_for(1, engine, Processes(), inventory, small_disk, log, LIMITS)
    request = GpuRequest("alice", "a", 1)
    fill(small_disk)

    with pytest.raises(EventLogError) as raised:
        log.record("cull", "someone", reason="x" * 4000)
    assert "database or disk is full" in str(raised.value)
    assert "cannot rollback" not in str(raised.value)

    with pytest.raises(AllocationStateError) as raised:
        allocator.allocate(request, LIMITS.resolve("alice"))
    message = str(raised.value)
    assert "nothing was changed" in message and str(small_disk) in message
    assert "database or disk is full" in message or "No space left on device" in message
    assert allocator.holdings() == []
    assert not (small_disk / "reservations.json").exists()
    assert [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp")] == []
    assert log.events(kind="allocate") == []

    (small_disk / "filler").unlink()
    assert allocator.allocate(request, LIMITS.resolve("alice")).granted == ("0",)
    container = engine.create("a", "alice", ("0",))
    assert allocator.begin_start("a", container).ok
    engine.start(container)
    allocator.commit("a")
    clock.advance(3600)
    assert log.gpu_hours(until=clock.now) == {"alice": 1.0}
    assert log.gpu_hours(until=clock.now + timedelta(hours=1)) == {"alice": 2.0}
