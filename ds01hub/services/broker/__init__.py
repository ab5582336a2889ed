"""The ds01 broker: the users' commands' control plane on a unix socket (see `app`)."""
