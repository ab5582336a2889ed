"""ds01hub's JupyterHub managed services, one package each, run as `python -m
ds01hub.services.<name>`: `broker` (the users' commands, over a unix socket), `notebook` (the
notebook's ds01 API), `ops` (culler, lifecycle, metrics, admin page)."""
