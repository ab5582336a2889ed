"""DS01Spawner: a DockerSpawner that enforces ds01hub quotas and hands out GPUs on every spawn.

Select it with ``c.JupyterHub.spawner_class = "ds01"`` (entry point); settings are
``c.DS01Spawner.*`` (see ``ds01hub.spawner.spawner``), the spawn options are documented in
docs/architecture.md ("Spawn options") and validated in ``ds01hub.spawner.options``.
"""

from .spawner import DS01Spawner

__all__ = ["DS01Spawner"]
