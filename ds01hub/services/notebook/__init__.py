"""The ds01 service: what notebooks may ask of the host, for their own user only (see `app`)."""
