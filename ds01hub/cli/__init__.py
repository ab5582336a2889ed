"""Command-line front ends: the `ds01hub` admin command and the SSH users' commands."""
