"""Docker inspect documents of managed containers, as `docker inspect` gives them, for the unit
tests of code that reads Docker state through a `container_lister` (the allocator behind the
admin page and the metrics). They model real managed containers, so their labels are signed
with `TRUST`, the unit tests' deployment key (give it to the allocator)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ds01hub import labels
from ds01hub.provenance import Provenance

TRUST = Provenance("unit-test", bytes(range(32)))


def inspect_doc(
    now: datetime,
    name: str,
    user: str,
    gpus: list[str],
    group: str,
    state: str = "running",
    stopped_ago: timedelta | None = None,
) -> dict[str, Any]:
    """A container `name` of `user` holding `gpus`, stopped `stopped_ago` before `now`."""
    finished = now - stopped_ago if stopped_ago else None
    return {
        "Id": f"id-{name}",
        "Name": f"/{name}",
        "Config": {
            "Labels": TRUST.sign(
                labels.container_labels(
                    user=user, project=name, group=group, priority=10, gpus=gpus
                ),
                name,
            )
        },
        "State": {
            "Status": state,
            "FinishedAt": finished.isoformat() if finished else "0001-01-01T00:00:00Z",
        },
    }
