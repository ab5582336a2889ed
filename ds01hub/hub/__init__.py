"""JupyterHub's side: its REST client (`client`) and the registration of ds01hub's services in
its config (`services`)."""
