"""The ds01hub jupyter-server extension, loaded in every single-user container."""
