"""The spawn options a user may send, through any door (the hub's options form and REST API,
the broker, the users' commands, the widgets): their names, and the one rule between them.

Their values are checked where the user's limits are known (ds01hub.spawner.options); here is
only what every door must agree on, so that an option one door accepts is never unknown to
another.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["GPUS_OR_MIG", "SPAWN_OPTION_KEYS", "asks_gpus_and_mig"]

#: `profile` (an entry of c.DS01Spawner.profile_list), `image`, `gpus` (whole GPUs, a count),
#: `mig` (one MIG instance, a profile such as 1g.10gb: ds01hub.mig), `queue` (true: wait for
#: a GPU without a time limit, the request kept across hub restarts: ds01hub.gpu.queued).
SPAWN_OPTION_KEYS = ("profile", "image", "gpus", "mig", "queue")

#: What to ask for instead, when both were asked for.
GPUS_OR_MIG = "whole GPUs (gpus) or one MIG instance (mig), not both"


def asks_gpus_and_mig(options: Mapping[str, Any]) -> bool:
    """The rule: a container gets whole GPUs or one MIG instance, never both. `gpus: 0` asks
    for no whole GPU, so it goes with a `mig`."""
    return bool(options.get("gpus")) and bool(options.get("mig"))
