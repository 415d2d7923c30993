"""Server selection: the core's algorithms (``algorithms``: Maglev, WRR, WLC, the flow hash), the Maglev
table (``maglev``), the flow table (``flowtable``) and the :class:`Scheduler` that wraps them
(``scheduler``).

``from encapfwd.selection import Scheduler`` (the path before the tree was reorganised) keeps working.
"""


#: names of the module ``encapfwd.selection`` had before it became this package, and where they are now
_MOVED = {
    "Scheduler": "scheduler",
    **dict.fromkeys(("ALGORITHMS", "DEFAULT_ALGORITHM", "MAGLEV_SIZE", "encapfwd_build_selector",
                     "encapfwd_selection_algorithms", "flow_hash", "maglev_digest", "maglev_selector",
                     "maglev_table", "wlc_selector", "wrr_selector", "wrr_sequence"), "algorithms"),
}


def __getattr__(name):  # PEP 562: the old module's names, without importing anything eagerly
    import importlib

    if name not in _MOVED:
        raise AttributeError(f"module 'encapfwd.selection' has no attribute {name!r}")
    return getattr(importlib.import_module(f"encapfwd.selection.{_MOVED[name]}"), name)
