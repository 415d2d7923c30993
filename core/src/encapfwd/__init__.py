"""encapfwd: a Layer-4 load-balancer dispatcher with pluggable forwarding methods."""

from encapfwd import _moved
from encapfwd.hookspecs import hookimpl

_moved.install()  # the old import paths of moved modules keep working (docs/architecture.md)

__all__ = ["hookimpl"]
