"""`python -m ds01hub.services.broker`: run the service (JupyterHub starts it, see
`ds01hub.hub.services`)."""

from ds01hub.services.broker.app import main

main()
