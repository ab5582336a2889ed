"""A test hub running DS01Spawner (spawner tests): its own limits YAML with a SIMULATED
inventory (4 whole GPUs + a GPU with 2 MIG instances of 2g.20gb), its own allocator state
directory and a label of its own, so it counts only its own containers on the shared engine."""

from __future__ import annotations

from pathlib import Path

from ds01hub.gpu.allocator import GpuAllocator, docker_lister
from ds01hub.gpu.inventory import load_inventory
from ds01hub.limits import load_limits
from harness.naming import unique_name

SPAWNER_LABEL = "ds01.test.spawner"

LIMITS_YAML = """\
defaults:
  max_gpus: 1
  max_gpus_per_container: 1
  max_cpus: 1
  memory: 512m
  shm_size: 64m
  pids_limit: 256
  idle_timeout: null
  gpu_hold_after_stop: 1h
  priority: 10
groups:
  students:
    priority: 10
  researchers:
    max_gpus: 3
    max_gpus_per_container: 2
    max_cpus: 1.5
    memory: 768m
    shm_size: 128m
    pids_limit: 512
    cgroup_parent: ds01-test-researchers
    priority: 50
policies:
  max_containers_per_user: 2
gpu_allocation:
  enable_mig: true
  strategy: spread
  simulate:
    seed: {seed}
    gpus:
      - {{name: NVIDIA A100-SXM4-80GB, memory: 80g, count: 4}}
      - {{name: NVIDIA A100-SXM4-80GB, memory: 80g, mig: [2g.20gb, 2g.20gb]}}
"""


class Ds01Hub:
    """A test hub running DS01Spawner on its own limits file, state directory and label, so
    that it counts only its own containers on the shared engine."""

    def __init__(
        self, hub_factory, directory: Path, extra_config: str = "", limits_yaml: str = LIMITS_YAML
    ):
        self.tag = unique_name("sp")
        self.directory = directory
        self.limits_path = directory / "limits.yaml"
        self.limits_path.write_text(limits_yaml.format(seed=self.tag))
        self.state_dir = directory / "state"
        config = f"""
c.DS01Spawner.limits_path = {str(self.limits_path)!r}
c.DS01Spawner.state_dir = {str(self.state_dir)!r}
c.DS01Spawner.container_label_filter = ["{SPAWNER_LABEL}={self.tag}"]
c.DS01Spawner.gpu_recheck_interval = 1.0
c.DS01Spawner.gpu_wait_timeout = 400
c.Spawner.start_timeout = 450
c.Spawner.cmd = ["jupyterhub-singleuser"]
{extra_config}
"""
        self.hub = hub_factory(config, spawner="ds01", labels={SPAWNER_LABEL: self.tag})

    def allocator(self, docker_client) -> GpuAllocator:
        """A second view of the allocation state, as the CLI or `ds01hub status` would have."""
        config = load_limits(self.limits_path)
        return GpuAllocator(
            docker_client,
            load_inventory(config.gpu_allocation),
            self.state_dir,
            None,
            limits=config,
            container_lister=docker_lister(docker_client, [f"{SPAWNER_LABEL}={self.tag}"]),
        )

    def inventory(self):
        return load_inventory(load_limits(self.limits_path).gpu_allocation)
