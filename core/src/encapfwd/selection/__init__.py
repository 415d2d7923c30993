"""Server selection: the algorithms (Maglev, WRR, WLC), the flow table and the :class:`Scheduler` that wraps
them (``scheduler``), the Maglev table (``maglev``), the flow table (``flowtable``).

``from encapfwd.selection import Scheduler`` (the path before the tree was reorganised) keeps working.
"""


def __getattr__(name):  # PEP 562: the old module's names, without importing the scheduler eagerly
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    scheduler = importlib.import_module("encapfwd.selection.scheduler")
    try:
        return getattr(scheduler, name)
    except AttributeError:
        raise AttributeError(f"module 'encapfwd.selection' has no attribute {name!r}") from None
