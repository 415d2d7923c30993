"""encapfwd: a Layer-4 load-balancer dispatcher with pluggable forwarding methods."""

from .hookspecs import hookimpl

__all__ = ["hookimpl"]
