"""Old import paths of modules moved when the tree was reorganised (docs/architecture.md, "Moved modules").

``import encapfwd.engines.live`` still works and gives the very module ``encapfwd.runtime.controller`` (the
same object, so attributes set on one are seen on the other), with a :class:`DeprecationWarning` naming the new
path. Only what the project itself published is here; nothing new is added to it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

#: old dotted path -> new dotted path
MOVED = {
    "encapfwd.engines.live": "encapfwd.runtime.controller",
    "encapfwd.engines.supervisor": "encapfwd.runtime.afpacket.pool",
    "encapfwd.engines.worker": "encapfwd.runtime.afpacket.worker",
    "encapfwd.engines.afpacket": "encapfwd.runtime.afpacket.rings",
    "encapfwd.engines.messaging": "encapfwd.runtime.afpacket.messaging",
    "encapfwd.engines.checksum": "encapfwd.runtime.afpacket.checksum",
    "encapfwd.engines.xdp_executor": "encapfwd.runtime.xdp",
    "encapfwd.engines.tc_executor": "encapfwd.runtime.tc",
    "encapfwd.engines.xdp_link": "encapfwd.runtime.link",
    "encapfwd.engines.control": "encapfwd.control",
    "encapfwd.engines.netlink": "encapfwd.runtime.netlink",
    "encapfwd.engines.prepare": "encapfwd.runtime.prepare",
    "encapfwd.engines.neighbours": "encapfwd.runtime.neighbours",
    "encapfwd.engines.metrics": "encapfwd.runtime.metrics",
    "encapfwd.engines.httpd": "encapfwd.runtime.httpd",
    "encapfwd.engines.sdnotify": "encapfwd.runtime.sdnotify",
    "encapfwd.engines.status_page": "encapfwd.runtime.status_page",
    "encapfwd.engines.common": "encapfwd.runtime.common",
    "encapfwd.engines.flowsync": "encapfwd.flowsync.service",
    "encapfwd.engines.flowsweep": "encapfwd.flowsync.sweep",
    "encapfwd.engines.flowsync_workers": "encapfwd.flowsync.workers",
    "encapfwd.engines.bgp": "encapfwd.bgp.speaker",
    "encapfwd.engines.bgp_relay": "encapfwd.bgp.relay",
    "encapfwd.engines.manager": "encapfwd.health.manager",
    "encapfwd.engines.through": "encapfwd.health.forwarding_probe",
    "encapfwd.engines.replay": "encapfwd.replay.capture",
    "encapfwd.advisors": "encapfwd.health.probes",
    "encapfwd.dispatcher": "encapfwd.datapath.dispatcher",
    "encapfwd.packet": "encapfwd.datapath.packet",
    "encapfwd.encap": "encapfwd.datapath.templates",
    "encapfwd.maglev": "encapfwd.selection.maglev",
    "encapfwd.flowtable": "encapfwd.selection.flowtable",
    "encapfwd.setup": "encapfwd.backend_setup",
    "encapfwd.report": "encapfwd.cli.server_rows",
    "encapfwd.cli_replay": "encapfwd.cli.replay",
    "encapfwd.cli_run": "encapfwd.cli.run",
    "encapfwd.cli_setup": "encapfwd.cli.setup",
    "encapfwd.cli_top": "encapfwd.cli.top",
    "encapfwd.xdp.executor": "encapfwd.xdp.offline",
}
#: old packages that no longer exist: an empty package, so that their old submodules can be imported
OLD_PACKAGES = ("encapfwd.engines",)


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        if spec.name in OLD_PACKAGES:
            module = types.ModuleType(spec.name, "moved: see encapfwd._moved")
            module.__path__ = []
            return module
        warnings.warn(f"{spec.name} moved to {self.target}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED` (and their packages :data:`OLD_PACKAGES`)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _Alias(MOVED[fullname]))
        if fullname in OLD_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, _Alias(fullname), is_package=True)
        return None


def install() -> None:
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())
