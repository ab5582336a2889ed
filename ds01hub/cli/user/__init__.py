"""The SSH users' commands (container-*, image-*, project-init, user-setup): `commands` holds
the table and the entry points, the other modules one concept each."""
