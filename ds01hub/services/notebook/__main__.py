"""`python -m ds01hub.services.notebook`: run the service (JupyterHub starts it, see
`ds01hub.hub.services`)."""

from ds01hub.services.notebook.app import main

main()
