"""Plugin manager factory, safe entry-point loading and a record of what was loaded from where.

- Entry-point group ``encapfwd``; the entry-point name is the distribution name.
- ``ENCAPFWD_PLUGINS``: comma-separated allow-list of distribution names to load (set but empty: none).
- ``ENCAPFWD_TRACE_HOOKS=1``: trace every hook call to stderr.
- ``encapfwd.datapath.templates.TemplateTransforms`` is registered in every registry: it answers
  ``encapfwd_build_transform`` last, from ``encapfwd_build_template``, for template-only plugins.
- Advisors (health checks) are registered like forwarders (``encapfwd_register_advisors``); the core's own
  (``connect``, ``http``, ``udp``) come from ``encapfwd.health.probes``, a built-in module.
- A plugin that fails to import, validate or register is recorded with ``status: failed: <error>`` and a
  warning; it never takes the CLI down. A *configured* forwarder that is missing is an error later, when
  the configuration is compiled.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from typing import Dict, List, Optional, Tuple

import pluggy
from attrs import define, field

from encapfwd import hookspecs
from encapfwd.datapath.templates import TemplateTransforms
from encapfwd.errors import PluginError, one_line
from encapfwd.records import AdvisorType, Forwarder

GROUP = "encapfwd"
ENV_ALLOW = "ENCAPFWD_PLUGINS"
ENV_TRACE = "ENCAPFWD_TRACE_HOOKS"

#: Where the project's own forwarders come from, for "install X" hints.
KNOWN_DISTRIBUTIONS = {"mac": "encapfwd-mac", "ipip": "encapfwd-ipip", "gre": "encapfwd-gre"}

#: Modules of the core that implement hooks like any plugin (registered first, so they run last), by the
#: name they are registered under (the names they had before the tree was reorganised: plugins may use them).
BUILTIN_MODULES = {"encapfwd.selection": "encapfwd.selection.algorithms", "encapfwd.advisors": "encapfwd.health.probes"}
#: The distribution named as the owner of what the built-in modules register.
CORE_DISTRIBUTION = "encapfwd"

#: The engines that run forwarding methods: the XDP program runs templates only; Python runs every method.
ENGINES = ("xdp", "python")


@define
class PluginRecord:
    """One loaded (or failed) plugin, as ``encapfwd forwarders`` shows it."""

    name: str
    distribution: str
    version: str
    status: str = "ok"
    hooks: List[str] = field(factory=list)
    forwarders: List[str] = field(factory=list)
    advisors: List[str] = field(factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@define
class Registry:
    """The plugin manager plus what the core keeps about plugins (forwarders and their owners)."""

    pm: pluggy.PluginManager
    records: List[PluginRecord] = field(factory=list)
    forwarders: Dict[str, Forwarder] = field(factory=dict)
    owners: Dict[str, str] = field(factory=dict)  # forwarder name -> distribution
    advisor_types: Dict[str, AdvisorType] = field(factory=dict)
    advisor_owners: Dict[str, str] = field(factory=dict)  # advisor name -> distribution

    @property
    def hook(self):
        return self.pm.hook

    def advisors(self) -> Dict[str, AdvisorType]:
        """The installed advisors: name -> :class:`~encapfwd.records.AdvisorType` (the core's ``connect``,
        ``http`` and ``udp`` included), in registration order."""
        return dict(self.advisor_types)

    def forwarder(self, name: str) -> Forwarder:
        """The registered forwarder *name*, or a one-line error naming the distribution to install."""
        try:
            return self.forwarders[name]
        except KeyError:
            raise PluginError(missing_forwarder_message(name)) from None

    def engines(self, name: str) -> Tuple[str, ...]:
        """The engines that can run the forwarder *name*: ``("xdp", "python")`` when it is declared with
        ``Forwarder(template=True)`` and its plugin implements ``encapfwd_build_template``, else
        ``("python",)``. Known without a server (no plugin code runs); a server whose template is None or
        too long for XDP (:data:`~encapfwd.records.XDP_MAX_HEADER`) still runs in Python.
        """
        forwarder = self.forwarder(name)
        if forwarder.template:
            owner = self.owners.get(name)
            hooks = [record.hooks for record in self.records if record.distribution == owner]
            if not hooks or "encapfwd_build_template" in hooks[0]:
                return ENGINES
        return ("python",)

    def selection_algorithms(self) -> List[str]:
        names: List[str] = []
        for result in self.pm.hook.encapfwd_selection_algorithms():
            for name in result or ():
                if name not in names:
                    names.append(name)
        return names


def missing_forwarder_message(name: str) -> str:
    dist = KNOWN_DISTRIBUTIONS.get(name)
    if dist:
        return f"no installed plugin provides the forwarder {name!r}: install the {dist} distribution"
    return f"no installed plugin provides the forwarder {name!r}: install the distribution that provides it"


def _allow_list() -> Optional[set]:
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _warn(message: str) -> None:
    print(f"encapfwd: warning: {message}", file=sys.stderr)


def _hook_names(pm: pluggy.PluginManager, plugin) -> List[str]:
    return sorted(impl_caller.name for impl_caller in pm.get_hookcallers(plugin) or ())


def _register_checked(pm: pluggy.PluginManager, plugin, name: str) -> None:
    """Register *plugin* and fail (unregistered) if it implements a hook that does not exist."""
    pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(plugin)
        raise PluginError(str(exc)) from None


def get_plugin_manager(*, load_entrypoints: bool = True, plugins=()) -> Registry:
    """Build a fresh registry: built-ins, then entry points (unless disabled), then *plugins*.

    Tests pass ``load_entrypoints=False`` and their own throw-away plugin objects in *plugins*.
    """
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    if os.environ.get(ENV_TRACE):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    registry = Registry(pm=pm)

    for name, module_name in BUILTIN_MODULES.items():
        _register_checked(pm, importlib.import_module(module_name), name)
    # the transform of a method described by a template, for every caller of encapfwd_build_transform
    _register_checked(pm, TemplateTransforms(pm), TemplateTransforms.NAME)

    if load_entrypoints:
        allow = _allow_list()
        for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else ep.name
            version = ep.dist.version if ep.dist is not None else "?"
            if allow is not None and ep.name not in allow and dist not in allow:
                continue
            if pm.has_plugin(ep.name):
                continue
            record = PluginRecord(name=ep.name, distribution=dist, version=version)
            registry.records.append(record)
            try:
                plugin = ep.load()
                _register_checked(pm, plugin, ep.name)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
                record.status = one_line(f"failed: {type(exc).__name__}: {exc}", None, first=True)
                _warn(f"plugin {dist} could not be loaded: {record.status[len('failed: '):]}")
                continue
            record.hooks = _hook_names(pm, plugin)

    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        record = PluginRecord(name=name, distribution=name, version="(test)")
        registry.records.append(record)
        _register_checked(pm, plugin, name)
        record.hooks = _hook_names(pm, plugin)

    _collect_forwarders(registry)
    _collect_advisors(registry)
    return registry


def _collect_forwarders(registry: Registry) -> None:
    """Call every ``encapfwd_register_forwarders`` implementation in its own try, keeping owners."""
    _collect(registry, "encapfwd_register_forwarders", Forwarder, "forwarder", registry.forwarders,
             registry.owners, "forwarders")


def _collect_advisors(registry: Registry) -> None:
    """Call every ``encapfwd_register_advisors`` implementation in its own try, keeping owners."""
    _collect(registry, "encapfwd_register_advisors", AdvisorType, "advisor", registry.advisor_types,
             registry.advisor_owners, "advisors")


def _collect(registry: Registry, hook_name: str, cls, what: str, store: dict, owners: dict,
             listed: str) -> None:
    """Call every implementation of the registration hook *hook_name* in its own try: *store* gets name ->
    object, *owners* name -> distribution, the plugin's record the names (its attribute *listed*). A name
    registered twice is a :class:`PluginError` naming both distributions; a plugin that raises otherwise
    is recorded as failed and unregistered (a built-in's error is raised)."""
    pm = registry.pm
    by_name = {record.name: record for record in registry.records}
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        record = by_name.get(impl.plugin_name)
        if record is not None:
            dist = record.distribution
        elif impl.plugin_name in BUILTIN_MODULES:
            dist = CORE_DISTRIBUTION
        else:
            dist = impl.plugin_name

        def register(obj, _dist=dist, _record=record) -> None:
            if not isinstance(obj, cls):
                raise TypeError(f"register() takes an encapfwd.hookspecs.{cls.__name__}")
            other = owners.get(obj.name)
            if other is not None:
                raise PluginError(
                    f"{what} {obj.name!r} is registered by both {other} and {_dist}: "
                    f"uninstall one of them or restrict loading with {ENV_ALLOW}"
                )
            store[obj.name] = obj
            owners[obj.name] = _dist
            if _record is not None:
                getattr(_record, listed).append(obj.name)

        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001
            if record is None:
                raise
            record.status = one_line(f"failed: {type(exc).__name__}: {exc}", None, first=True)
            _warn(f"plugin {dist} failed to register its {what}s: {record.status[len('failed: '):]}")
            # what the plugin registered before failing goes with it, forwarders and advisors alike
            for name in record.forwarders:
                registry.forwarders.pop(name, None)
                registry.owners.pop(name, None)
            record.forwarders.clear()
            for name in record.advisors:
                registry.advisor_types.pop(name, None)
                registry.advisor_owners.pop(name, None)
            record.advisors.clear()
            if pm.is_registered(impl.plugin):
                pm.unregister(impl.plugin)
