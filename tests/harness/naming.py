"""Names and labels that keep concurrent test sessions (and engineers) apart."""

from __future__ import annotations

import secrets

#: Every container a test makes carries this label (value "1"); teardown removes them.
TEST_LABEL = "ds01.test"
#: Which hub made a container (its id), so a hub's teardown removes only its own.
HUB_LABEL = "ds01.test.hub"
#: The pid of the pytest process whose hub made a container: a later session removes the
#: containers of sessions that were killed before their teardown ran.
SESSION_PID_LABEL = "ds01.test.session_pid"


def unique_name(prefix: str = "u") -> str:
    """A fresh name valid as a JupyterHub user, a Unix user and a Docker name part."""
    return f"{prefix}{secrets.token_hex(3)}"
