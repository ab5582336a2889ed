"""`python -m ds01hub.services.ops`: run the service (JupyterHub starts it, see
`ds01hub.hub.services`)."""

from ds01hub.services.ops.app import main

main()
