"""DS01Spawner: a DockerSpawner that enforces ds01hub quotas and hands out GPUs on every spawn."""
