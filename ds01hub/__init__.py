"""ds01hub: a multi-user GPU server kit for university labs.

JupyterHub is the one control plane; Docker labels are the source of truth for who holds which
GPU slot. See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
