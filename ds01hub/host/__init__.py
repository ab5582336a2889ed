"""Setting up a host: bootstrap (engine and images), the demo, the real install, backups and the
site's environment file. `bootstrap` and `install` are standard library only (they run before
any venv exists), so this package imports nothing."""
