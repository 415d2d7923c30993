"""The live controller (``encapfwd run``): one process that compiles the plan and hands it to its executors.

Shape::

    controller process (signals, control socket, configuration, neighbour resolution, health, BGP, sync)
      │  compile_plan(config) ─► Plan ─► every executor's install(plan)       (encapfwd.executor)
      ├── the XDP or TC program (runtime/xdp.py, runtime/tc.py), when the engine is xdp or tc
      └── the AF_PACKET worker pool (runtime/afpacket/): the whole data path, or the kernel program's slow path
            ├── worker 0: RX ring (TPACKET_V3) ─► Dispatcher.process ─► TX ring (TPACKET_V2) ─► send()
            └── worker 1 …: same, in the same PACKET_FANOUT group (flow hash)

The engine (which executor forwards first) is chosen by :mod:`.engine`; the control socket is
:mod:`encapfwd.control`; the configuration is prepared by :mod:`.prepare` and its MACs resolved by
:mod:`.neighbours`.

- A classic BPF socket filter lets only frames addressed to this host whose destination is a cluster
  address reach user space; everything else stays in the kernel.
- Every worker compiles the same configuration, so selection (Maglev over the 5-tuple) is identical in all
  of them; the kernel's flow hash keeps a connection on one worker, hence on one flow table.
- SIGHUP: the controller reloads the configuration file, resolves MACs again, validates, compiles it and
  hands the new plan to every executor (each worker installs it in its dispatcher; established flows keep
  their server). A configuration that does not load or compile — for whatever reason — is reported on one line
  and the old one stays in force. Neighbour resolution never happens in the loop: a reload whose MACs are
  missing finishes when they resolved or :data:`~.neighbours.RESOLVE_BOUND` passed, the loop serving
  control requests and signals meanwhile (:mod:`.neighbours`).
- One source of truth for a server's state: every plan is composed from the running configuration, the
  MACs known and the verdicts of the advisors *that configuration* has (:meth:`Controller._compose`); the
  report's per-server ``state``/``reason`` and ``health`` are the installed plan's, and the metrics are
  computed from the report. Automatic new plans (health verdicts, neighbours) are coalesced: at most one
  per :data:`PLAN_WINDOW` seconds.
- Overload (:mod:`.overload`): a worker that cannot keep up says so (an unsolicited ``pressure`` message,
  :mod:`.afpacket.triage`); the controller turns the kernel program's pressure mode on and, once the pressure
  has ended for the hold time, off again — one log line each, the report's ``overload``.
- SIGTERM / SIGINT: workers stop after the batch in hand, rings are closed, the control socket is removed.
- The control socket (AF_UNIX stream, mode 0600 in a 0700 directory, peers checked with SO_PEERCRED)
  answers ``report`` with the summed counters of every worker as JSON; :func:`query_control` is its client.
"""

from __future__ import annotations

import math
import os
import select
import signal
import time
from typing import Dict, List, Optional, Tuple

import attrs

from encapfwd.bgp.speaker import Speaker, bgp_settings
from encapfwd.control import (
    ControlServer,
    Deferred,
    default_control_path,
    query_control,  # noqa: F401 - published here before (encapfwd.engines.live): still importable from here
)
from encapfwd.errors import EncapfwdError, InterfaceBusy
from encapfwd.executor import LiveExecutor
from encapfwd.flowsync.service import flowsync_for  # flow synchronisation (executor syncpeers)
from encapfwd.health.manager import HealthManager, targets_of, with_health
from encapfwd.model import server_key
from encapfwd.plan import Plan, compile_plan
from encapfwd.runtime.afpacket.pool import WorkerPool
from encapfwd.runtime.afpacket.worker import tx_mtu_limit
from encapfwd.runtime.common import LiveError, flush_log, log, one_line, summarize
from encapfwd.runtime.engine import choose_engine
from encapfwd.runtime.metrics import start_metrics  # metrics (--metrics)
from encapfwd.runtime.neighbours import RESOLVE_BOUND, NeighbourResolver
from encapfwd.runtime.netlink import Interface  # noqa: F401 - as query_control
from encapfwd.runtime.overload import CHECK_INTERVAL, Overload  # overload: the slow path cannot keep up
from encapfwd.runtime.prepare import (
    check_platform,
    cluster_addresses,
    complete,
    describe_failure,
    kernel_warnings,
    load_config,
    stage,
)
from encapfwd.runtime.sdnotify import QUIET, Lifecycle  # systemd (Type=notify)
from encapfwd.runtime.tc import TCProgram
from encapfwd.runtime.xdp import KernelFlows, XDPProgram

ENV_NEIGH_REFRESH = "ENCAPFWD_NEIGH_REFRESH"
FANOUT_BASE = 0x4E00
#: seconds: at most one automatic new plan (health verdicts, neighbour changes) per window, however many
#: changes come in it (a reload is never delayed); ENCAPFWD_PLAN_WINDOW overrides it
PLAN_WINDOW = 1.0
ENV_PLAN_WINDOW = "ENCAPFWD_PLAN_WINDOW"


def merge_reports(reports: List[dict]):
    """Sum the numbers of several workers' reports, recursively (dicts by key, lists by position)."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return {}
    first = reports[0]
    if isinstance(first, bool) or not isinstance(first, (dict, list, int, float)):
        return first
    if isinstance(first, (int, float)):
        return sum(r for r in reports if isinstance(r, (int, float)) and not isinstance(r, bool))
    if isinstance(first, list):
        if all(isinstance(r, list) and len(r) == len(first) for r in reports):
            return [merge_reports([r[i] for r in reports]) for i in range(len(first))]
        return first
    keys: List = []
    for r in reports:
        if isinstance(r, dict):
            keys.extend(k for k in r if k not in keys)
    return {k: _first([r.get(k) for r in reports if isinstance(r, dict)]) if k in _IDENTITY
            else merge_reports([r.get(k) for r in reports if isinstance(r, dict)]) for k in keys}


#: numbers in a report that name something rather than count it: taken from the first report, not summed
_IDENTITY = frozenset(("port",))


def _first(values):
    return next((v for v in values if v is not None), None)


class Controller:
    """Prepares the configuration, compiles its plan, starts the executors, serves the control socket,
    reloads on SIGHUP, stops on SIGTERM/SIGINT.

    :attr:`executors` are :class:`~encapfwd.executor.LiveExecutor` s (the kernel program first when there is
    one, then the AF_PACKET worker pool): they receive only the plan (:attr:`plan`).
    """

    #: what systemd is told (engines/sdnotify.py); __init__ sets the real one
    sd = QUIET

    def __init__(
        self,
        config_path: str,
        registry,
        *,
        interface: Optional[str] = None,
        workers: int = 1,
        control_path: Optional[str] = None,
        cpus: Optional[List[int]] = None,
        answer_arp: bool = False,
        qdisc_bypass: bool = False,
        engine: str = "afpacket",
        xdp_mode: str = "auto",
        metrics: Optional[str] = None,  # metrics (--metrics HOST:PORT)
    ):
        from encapfwd.plan import SidMap

        check_platform()
        if workers < 1:
            raise LiveError("--workers must be at least 1")
        self.config_path = config_path
        self.registry = registry
        self.interface = interface
        self.nworkers = workers
        self.control_path = control_path or default_control_path()
        self.cpus = cpus
        self.answer_arp = answer_arp
        self.qdisc_bypass = qdisc_bypass
        config = load_config(config_path)
        self.asked_engine = engine
        choice = choose_engine(engine, interface or config.executor.interface, xdp_mode)
        self.engine, self.engine_reason, self.xdp_mode = choice.engine, choice.reason, choice.mode
        log(choice.line())  # the first line: which engine and XDP mode, and why
        if choice.warning:
            log(f"warning: {choice.warning}")
        # how often the neighbour table is read again for the MACs taken from it (seconds; 0 = never)
        self.neigh_interval = float(os.environ.get(ENV_NEIGH_REFRESH, "10") or 0)
        self.neigh_changes = 0
        #: at most one automatic new plan per window (seconds)
        self.plan_window = max(0.0, float(os.environ.get(ENV_PLAN_WINDOW, "") or PLAN_WINDOW))
        # every MAC the configuration needs, resolved concurrently with one total bound (RESOLVE_BOUND)
        staged = stage(config, registry, interface)
        self.iface = staged.iface
        self.resolver = NeighbourResolver(staged.iface.index, refresh=self.neigh_interval)
        macs = dict(staged.known)
        missing = [a for a in staged.needed if a not in macs]
        if missing:
            macs.update(self.resolver.resolve(missing, RESOLVE_BOUND))
        #: the running configuration before the MACs (rebuilt with new MACs or health without reading the
        #: file) and the MACs its plan uses ({address: MAC or None when unresolved})
        self.staged, self.macs = staged, {a: macs.get(a) for a in staged.needed}
        self.config, unresolved = complete(staged, self.macs)
        #: stable server ids for every plan of this run (flows keep their server across reloads)
        self.sids = SidMap()
        self.kernel_flows = KernelFlows()
        # the TX rings are sized for the interface's MTU at start; a larger one needs a restart
        self.max_mtu = tx_mtu_limit(self.iface.mtu)
        #: the advisors' manager (None when the configuration has no advisor)
        self.manager = self._new_manager(self.config) if self.config.advisors else None
        self.health_changes = 0
        #: the BGP speaker (docs/scale-out.md); None without an executor bgppeer
        self.bgp = Speaker(self.config.executor) if self.config.executor.bgppeer is not None else None
        self.flowsync = None  # flow synchronisation with the peers (engines/flowsync.py), set in run()
        #: why each server the running plan leaves out is out ({name: reason}); the advisors' verdicts in it
        self.down_reasons: Dict[str, str] = {}
        self.applied_health: Dict[str, str] = {}
        #: the plan every executor runs (compiled here: executors receive only the plan)
        self.plan, self.down_reasons, self.applied_health = self._compose(self.config, unresolved, staged.config)
        self.resolver.watch(self.macs)
        #: a reload waiting for neighbour resolution (its staged configuration and ticket), and the control
        #: clients waiting for a reload's answer
        self._pending: Optional[Tuple[object, object]] = None
        self._reload_waiters: List[Deferred] = []
        #: an automatic new plan is wanted (health, neighbours); when the last plan was installed
        self._rebuild_wanted = False
        self._last_install = -math.inf
        self.plans = 1
        kernel_warnings(self.config)
        self.fanout_group = (os.getpid() & 0xFFFF) or FANOUT_BASE  # one group per dispatcher (per netns)
        self.control = ControlServer(self.control_path, self._control_request, log=log,
                                     own_process_uncapped=metrics is not None)
        self.pool = WorkerPool(
            self.iface,
            workers,
            self.fanout_group,
            cpus=cpus,
            answer_arp=answer_arp,
            qdisc_bypass=qdisc_bypass,
            in_child=self._in_child,
            registry=registry,
            flow_sink=self.kernel_flows if self.engine in ("xdp", "tc") else None,
        )
        self.xdp = (XDPProgram(self.iface, choice.mode, self.kernel_flows, choice) if self.engine == "xdp"
                    else TCProgram(self.iface, self.kernel_flows, choice) if self.engine == "tc" else None)
        self.executors: List[LiveExecutor] = [self.pool] if self.xdp is None else [self.xdp, self.pool]
        #: overload (runtime/overload.py): the workers say when they cannot keep up; never blocks the loop
        self.overload = Overload(lambda: self.xdp, tell=lambda on: self.pool.tell_all(("set-pressure", on)))
        self.pool.on_pressure = self.overload.on_worker
        self.started = time.time()
        self.reloads = 0
        self.reload_errors = 0
        self.last_reload_error: Optional[str] = None
        # settings changed in the file that only take effect after a restart (one line each)
        self.restart_needed: List[str] = []
        self.final_reports: List[dict] = []
        self._stop = False
        self._reload = False
        # metrics: --metrics HOST:PORT (engines/metrics.py); the server while running
        self.metrics, self.metrics_server = metrics, None
        self.sd = Lifecycle(self)  # systemd: takes $NOTIFY_SOCKET before any child starts

    def _build(self, config) -> Plan:
        """Compile *config* into the plan every executor runs."""
        try:
            return compile_plan(config, self.registry, self.sids)
        except EncapfwdError as exc:
            raise LiveError(str(exc)) from None

    def _start_xdp(self) -> None:
        """Load and attach the XDP program; with ``--engine auto`` an interface that refuses it (native
        XDP chosen for a driver that turned out not to have it is tried again in generic mode first) falls
        back to the AF_PACKET engine (said in one line). An interface that already has an XDP program is
        always an error (:class:`~encapfwd.errors.InterfaceBusy`)."""
        try:
            self.xdp.load(self.plan)
        except InterfaceBusy:
            raise
        except LiveError as exc:
            if self.asked_engine != "auto":
                raise
            log(f"engine: afpacket — fallback, the XDP program could not be attached: {exc}")
            self.executors.remove(self.xdp)
            self.xdp, self.engine, self.engine_reason = None, "afpacket", f"fallback: {exc}"

    def _in_child(self) -> None:
        """In a freshly forked worker: drop the controller's descriptors (control socket, other channels)."""
        self.control.forget()
        if self.flowsync is not None:
            self.flowsync.close_in_child()
        self.resolver.close_in_child()
        for executor in self.executors:
            executor.close_in_child()

    @property
    def workers(self) -> Dict[int, dict]:
        return self.pool.workers

    @property
    def restarts(self) -> int:
        return sum(executor.restarts for executor in self.executors)

    # -- reports

    def report(self) -> dict:
        units: List[dict] = []
        kinds: List[str] = []
        for executor in self.executors:
            for unit in executor.report():
                units.append(unit)
                kinds.append(executor.kind)
        merged = merge_reports([w["dispatcher"] for w in units])
        engine = merge_reports([w["engine"] for w in units]) if units else {}
        for key in ("cpu", "pid", "number"):
            engine.pop(key, None)
        engine.update(
            interface=self.iface.name,
            mac=self.iface.mac,
            workers=len(self.pool),
            pid=os.getpid(),
            uptime=round(time.time() - self.started, 3),
            reloads=self.reloads,
            reload_errors=self.reload_errors,
            last_reload_error=self.last_reload_error,
            last_reload=self.sd.last_reload,  # {at, ok, error} of the last reload answered (engines/sdnotify.py)
            restart_needed=list(self.restart_needed),
            worker_restarts=self.restarts,
            neighbour_changes=self.neigh_changes,
            clusters=[str(a) for a in cluster_addresses(self.config)],
            answer_arp=self.answer_arp,
            qdisc_bypass=self.qdisc_bypass,
            engine=self.engine,
            engine_reason=self.engine_reason,
            xdp_mode=self.xdp.mode if self.xdp is not None else None,
            plan_digest=self.plan.digest,
            selection_digest=self.plan.selection,
            config=os.path.abspath(self.config_path),
            control=self.control_path,
            control_requests=dict(self.control.stats),
            unresolved=sorted(a for a, m in self.macs.items() if m is None),
            reload_pending=self._pending is not None,
            plans=self.plans,
            plan_window=self.plan_window,
        )
        out = dict(merged) if isinstance(merged, dict) else {"dispatcher": merged}
        servers = out.get("servers")
        if isinstance(servers, dict):  # the installed plan's view: the one source of truth for health
            weights = {s.name: s.weight for s in self.plan.servers}
            for name, row in servers.items():
                if isinstance(row, dict):
                    reason = self.down_reasons.get(name)
                    row["state"] = "down" if reason is not None else "up"
                    row["reason"] = reason
                    row["weight"] = weights.get(name)  # the installed plan's (encapfwd top, status page)
        if self.bgp is not None:
            out["bgp"] = self.bgp.snapshot()
        if self.flowsync is not None:
            out["sync"] = self.flowsync.snapshot()
        if self.manager is not None:
            if self.config.advisors:
                out["health"] = self._health_report()
            engine["health_changes"] = self.health_changes
        out["engine"] = engine
        out["workers"] = [w["engine"] for w, kind in zip(units, kinds) if kind == "afpacket"]
        overload = getattr(self, "overload", None)
        if overload is not None:
            out["overload"] = overload.snapshot()
        return out

    # -- reload

    def reload(self) -> None:
        """Read, stage and check the configuration file again, then (once the MACs it needs are known)
        compile it and hand it to every executor. Whatever goes wrong before the hand-over (unreadable file,
        bad UTF-8, nesting too deep for the parser, an invalid value, a plugin raising, netlink failing, a
        gateway that does not answer ARP, …) is one line in the log and in the report's
        ``last_reload_error``; the running configuration stays in force.

        Nothing here waits for the network: when MACs are missing they are asked for in the background
        (all at once, one total bound: :data:`~.neighbours.RESOLVE_BOUND`) and :meth:`_finish_reload` runs
        from the loop when they resolved or the bound passed; the loop serves control requests and signals
        meanwhile. A reload asked for while one waits replaces it."""
        self.sd.reloading()  # RELOADING=1; READY=1 when it is answered (_answer_reload)
        try:
            config = load_config(self.config_path)
            self.restart_needed = self._static_changes(config)
            for line in self.restart_needed:
                log(line)
            name = self.interface or self.iface.name
            staged = stage(config, self.registry, name)
            if staged.iface.index != self.iface.index:
                raise LiveError("the interface cannot change on reload; restart instead")
            targets_of(staged.config, self.registry)  # the advisors must be runnable before anything changes
        except Exception as exc:  # noqa: BLE001 - a failed reload never stops the running configuration
            self._reload_failed(describe_failure(exc, self.config_path))
            return
        if self._pending is not None:
            self.resolver.cancel(self._pending[1])
            self._pending = None
        missing = [a for a in staged.needed if a not in staged.known]
        if missing:
            self._pending = (staged, self.resolver.request(missing, RESOLVE_BOUND))
            return
        self._finish_reload(staged, {})

    def _reload_failed(self, reason: str) -> None:
        self.reload_errors += 1
        self.last_reload_error = reason
        log(f"reload failed, keeping the running configuration: {self.last_reload_error}")
        pending = getattr(self, "_pending", None)
        if pending is not None:
            self.resolver.cancel(pending[1])
            self._pending = None
        self._answer_reload()

    def _answer_reload(self) -> None:
        """Answer every control client waiting for a reload."""
        self.sd.reloaded()
        waiters, self._reload_waiters = getattr(self, "_reload_waiters", []), []
        for waiter in waiters:
            waiter.resolve({"reloaded": self.last_reload_error is None, "error": self.last_reload_error})

    def _finish_reload(self, staged, fresh: Dict[str, Optional[str]]) -> None:
        """The second half of a reload: *staged* with the MACs known when staged and those resolved since
        (*fresh*); servers still unresolved are left out of the plan with their reason (and come back
        when they answer)."""
        macs = {a: fresh.get(a) or staged.known.get(a) for a in staged.needed}
        try:
            config, unresolved = complete(staged, macs)
            config = self._within_tx_ring(config)
            plan, reasons, health = self._compose(config, unresolved, staged.config)
        except Exception as exc:  # noqa: BLE001 - a failed reload never stops the running configuration
            self._reload_failed(describe_failure(exc, self.config_path))
            return
        errors = self._hand_over(plan)
        if errors is None:
            self._answer_reload()
            return
        old_executor = self.config.executor
        self._installed(staged, macs, config, plan, reasons, health)
        self._update_manager(config)
        self._update_bgp(old_executor, config.executor)
        self.reloads += 1
        if errors:
            self.reload_errors += 1
            self.last_reload_error = one_line("; ".join(errors))
            log("reload failed in " + self.last_reload_error)
        else:
            self.last_reload_error = None
            log(f"configuration reloaded from {self.config_path} ({len(self.pool)} workers"
                f"{', the XDP program' if self.xdp is not None else ''}; plan {self.plan.digest[:12]})")
        self._answer_reload()

    def _installed(self, staged, macs, config, plan, reasons, health) -> None:
        """Bookkeeping of a plan every executor now runs: the report, the metrics and the next plans are
        derived from exactly this."""
        self.staged, self.macs = staged, macs
        self.config, self.plan = config, plan
        self.down_reasons, self.applied_health = reasons, health
        self._last_install = time.monotonic()
        self._rebuild_wanted = False
        self.plans += 1
        self.resolver.watch(macs)

    def _hand_over(self, plan: Plan) -> Optional[List[str]]:
        """Give every executor *plan*; the workers' errors, or None when the kernel program refused it
        (then nothing changed anywhere: every executor still runs one plan)."""
        errors: List[str] = []
        for executor in self.executors:
            try:
                answers = executor.install(plan)
            except Exception as exc:  # noqa: BLE001 - reported like a worker's failure
                answers = {executor.kind: f"{type(exc).__name__}: {exc}"}
            if executor is self.xdp and any(answers.values()):
                self.reload_errors += 1
                self.last_reload_error = one_line("; ".join(f"{u}: {e}" for u, e in answers.items() if e))
                log(f"reload failed, keeping the running configuration: {self.last_reload_error}")
                return None
            errors.extend(f"{unit}: {error}" for unit, error in answers.items() if error)
        return errors

    # -- BGP (scale-out)

    def _announce(self) -> None:
        """Announce each cluster address the running plan can forward (a server up), withdraw the others."""
        if self.bgp is not None:
            self.bgp.want(self.bgp.routes_for(self.plan))

    def _update_bgp(self, old, new) -> None:
        if bgp_settings(old) == bgp_settings(new) and (self.bgp is not None) == (new.bgppeer is not None):
            self._announce()
            return
        if self.bgp is not None:
            log("bgp: the BGP settings changed: withdrawing and restarting the speaker")
            self.bgp.stop()
            self.bgp = None
        if new.bgppeer is not None:
            try:
                self.bgp = Speaker(new)
            except LiveError as exc:
                log(str(exc))
                return
            self.bgp.start()
            self._announce()

    # -- health (the advisors' manager) and the plan's composition

    def _compose(self, config, unresolved: Dict[str, str], configured) -> Tuple[Plan, Dict[str, str], Dict[str, str]]:
        """The plan of *config* (MACs filled in, unresolved servers already down) with the servers that the
        advisors *of this configuration* hold down taken out of selection: ``(plan, {name: reason}
        for every server left out, {name: reason} of the advisors' verdicts applied)``. A stopped advisor,
        or one whose port or servers changed, contributes nothing (its targets are not *config*'s).
        *configured*: the configuration as in the file (which servers are down there)."""
        health = self.manager.down(config) if self.manager is not None else {}
        plan = self._build(with_health(config, health))
        reasons: Dict[str, str] = {}
        for cluster in configured.clusters:
            for port in cluster.ports:
                for server in port.servers:
                    if server.down:
                        reasons[server_key(cluster.address, port.number, server.address)] = "down in the configuration"
        for name, why in [*unresolved.items(), *((n, f"advisor {w}") for n, w in health.items())]:
            reasons[name] = f"{reasons[name]}; {why}" if name in reasons else why  # every cause, in order
        return plan, reasons, health

    def _health_report(self) -> Dict[str, dict]:
        """The report's ``health``: the manager's rows, with ``state`` the one the installed plan applies
        (``verdict`` is the advisors' latest; ``pending`` while a new plan for it is not installed yet)."""
        health = self.manager.snapshot()
        for name, row in health.items():
            verdict = row.get("state")
            if name in self.applied_health:
                state = "down"
            elif verdict == "down":
                state = "up"  # the verdict's plan is not installed yet (the coalescing window)
            else:
                state = verdict
            row["state"], row["verdict"], row["pending"] = state, verdict, state != verdict
        return health

    def _update_manager(self, config) -> None:
        if self.manager is not None:
            self.manager.update(config)
        elif config.advisors:
            self.manager = self._new_manager(config)
            self.manager.start()

    def _new_manager(self, config) -> HealthManager:
        """The manager, with the ``via forwarding`` probes built by the running plan's transforms."""
        from encapfwd.health.forwarding_probe import ForwardingProber

        return HealthManager(config, self.registry, ForwardingProber(self.iface.name, lambda: self.plan))

    def apply_health(self) -> None:
        """A server's health changed: a new plan (at most one per :attr:`plan_window`)."""
        self.manager.drain()
        self._rebuild_wanted = True

    def _rebuild(self) -> None:
        """A new plan from the running configuration (the file is not read, nor written): the advisors'
        verdicts as they are now, and the MACs that resolved or changed since."""
        self._rebuild_wanted = False
        macs = dict(self.macs)
        for address, (_old, new) in self.resolver.changes().items():
            macs[address] = new
        try:
            config, unresolved = complete(self.staged, macs, warn=lambda line: None)
            config = self._within_tx_ring(config)
            plan, reasons, health = self._compose(config, unresolved, self.staged.config)
        except Exception as exc:  # noqa: BLE001 - the running plan stays
            log(f"new plan not applied: {one_line(str(exc))}")
            return
        health_changed = health != self.applied_health
        if plan.digest == self.plan.digest:  # nothing forwards differently
            self.macs, self.down_reasons, self.applied_health = macs, reasons, health
            self.resolver.watch(macs)
            return
        errors = self._hand_over(plan)
        if errors is None:
            return
        self._installed(self.staged, macs, config, plan, reasons, health)
        if health_changed:
            self.health_changes += 1
        self._announce()
        if errors:
            log("new plan failed in " + one_line("; ".join(errors)))

    def _on_neighbours(self) -> None:
        """The resolver woke us: a reload's MACs are in (or its bound passed), or a MAC of the running plan
        resolved or changed (a server or router replaced, a gratuitous ARP) — then a new plan."""
        self.resolver.drain()
        self._check_pending()
        changes = self.resolver.changes()
        if changes:
            self.neigh_changes += 1
            log("neighbour changed: " + summarize(f"{a} {old or 'unresolved'} → {new}"
                                                  for a, (old, new) in sorted(changes.items())) + "; new plan")
            self._rebuild_wanted = True

    def _check_pending(self, now: Optional[float] = None) -> None:
        if self._pending is None:
            return
        staged, ticket = self._pending
        now = time.monotonic() if now is None else now
        if ticket.done or now > ticket.deadline + 1.0:  # done, or the resolver did not say in time
            self._pending = None
            self.resolver.cancel(ticket)
            self._finish_reload(staged, self.resolver.result(ticket))

    def _static_changes(self, config) -> List[str]:
        """Lines for settings of the new file that cannot change while running (kept as they are)."""
        lines = []
        wanted = config.executor.interface
        if self.interface is None and wanted and wanted != self.iface.name:
            lines.append(
                f"executor interface is now {wanted}, but the interface cannot change at run time: still "
                f"forwarding on {self.iface.name}; restart encapfwd run to move to {wanted}"
            )
        old = getattr(getattr(self, "config", None), "executor", None)
        if old is not None and (old.syncpeers, old.syncport, old.synckey) != (
                config.executor.syncpeers, config.executor.syncport, config.executor.synckey):
            lines.append("executor syncpeers/syncport/synckey changed: flow synchronisation keeps its settings "
                         "until encapfwd run is restarted")
        return lines

    def _within_tx_ring(self, config):
        """Cap the MTU at what the running TX rings can send (they were sized for the interface's MTU at
        start; an interface MTU raised since then takes a restart)."""
        mtu = config.executor.mtu
        if mtu <= self.max_mtu:
            return config
        log(
            f"MTU {mtu} is larger than the TX rings made at start can send ({self.max_mtu}): using "
            f"{self.max_mtu} until a restart"
        )
        return attrs.evolve(config, executor=attrs.evolve(config.executor, mtu=self.max_mtu))

    # -- control socket

    def _control_request(self, command: str) -> dict:
        if command == "ping":
            return {"pong": True, "pid": os.getpid()}
        if command == "report":
            return self.report()
        if command == "reload":
            self.reload()
            if self._pending is not None:  # answered when the MACs are in (the loop serves others meanwhile)
                waiter = Deferred()
                self._reload_waiters.append(waiter)
                return waiter
            return {"reloaded": self.last_reload_error is None, "error": self.last_reload_error}
        return {"error": f"unknown command {command[:40]!r} (report, ping, reload)"}

    # -- main loop

    def run(self) -> int:
        rpipe, wpipe = os.pipe()
        os.set_blocking(wpipe, False)
        os.set_blocking(rpipe, False)
        old_wakeup = signal.set_wakeup_fd(wpipe)

        def on_stop(signum, frame):
            self._stop = True

        def on_hup(signum, frame):
            self._reload = True

        previous = {
            s: signal.signal(s, h)
            for s, h in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup))
        }
        try:
            self.control.open()  # refuses a path in use before any worker starts
            self.metrics_server = start_metrics(self.metrics, self)  # metrics: refuses a port in use
            if self.xdp is not None:
                self._start_xdp()
            for executor in self.executors:
                executor.start(self.plan)
            if self.manager is not None:
                self.manager.start()
            self.flowsync = flowsync_for(self)  # None without executor syncpeers
            if self.flowsync is not None:  # a dump of the peers' live flows before BGP announces
                self.flowsync.catch_up()
            if self.bgp is not None:  # announced once the data plane forwards
                self.bgp.start()
                self._announce()
            log(
                f"forwarding {len(self.config.clusters)} cluster(s) on {self.iface.name} ({self.iface.mac}) "
                f"with {f'the {self.engine.upper()} program in the kernel and ' if self.xdp is not None else ''}"
                f"{self.nworkers} worker(s){' as its slow path' if self.xdp is not None else ''}"
                f"{'; answering ARP for the cluster addresses' if self.answer_arp else ''}; "
                f"control socket {self.control_path}"
            )
            self.sd.installed()  # READY=1 now, or once the BGP session is up or failed
            self._last_install = time.monotonic()
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                    continue
                now = time.monotonic()
                self._check_pending(now)
                next_plan = self._last_install + self.plan_window
                if self._rebuild_wanted and now >= next_plan:
                    self._rebuild()
                    continue
                self.control.expire(now)
                if self.xdp is not None:  # frames the driver lost: one warning line, counted apart
                    self.xdp.watch(now)
                self.overload.poll(now)  # the kernel's pressure mode ends when the pressure has ended
                flush_log()
                if self.bgp is not None:
                    self.bgp.poll()
                if self.flowsync is not None:
                    self.flowsync.poll(now)
                self.sd.poll()
                poller = select.poll()
                poller.register(rpipe, select.POLLIN)
                poller.register(self.resolver.fileno(), select.POLLIN)
                for fd, events in self.control.poll_set():
                    poller.register(fd, events)
                for executor in self.executors:
                    for fd in executor.fds():
                        poller.register(fd, select.POLLIN)
                if self.manager is not None:
                    poller.register(self.manager.fileno(), select.POLLIN)
                if self.flowsync is not None:
                    for fd in self.flowsync.fds():
                        poller.register(fd, select.POLLIN)
                timeout = self.control.timeout_ms(now, 1000)
                if self.xdp is not None:  # the overload control reads the program's hand-up count
                    timeout = min(timeout, int(CHECK_INTERVAL * 1000))
                if self.flowsync is not None:
                    timeout = min(timeout, self.flowsync.timeout_ms(now))
                if self._rebuild_wanted:
                    timeout = min(timeout, max(1, math.ceil((next_plan - now) * 1000)))
                if self._pending is not None:
                    timeout = min(timeout, max(1, math.ceil((self._pending[1].deadline + 1.0 - now) * 1000)))
                for fd, event in poller.poll(timeout):
                    if fd == rpipe:
                        try:
                            os.read(rpipe, 512)
                        except BlockingIOError:
                            pass
                    elif fd == self.resolver.fileno():
                        self._on_neighbours()
                    elif self.manager is not None and fd == self.manager.fileno():
                        self.apply_health()
                    elif self.flowsync is not None and self.flowsync.owns(fd):
                        self.flowsync.on_readable(fd)
                    elif self.control.handle(fd, event):
                        pass
                    elif not self._stop:
                        for executor in self.executors:
                            if executor.owns(fd):
                                if not executor.on_readable(fd):
                                    self._stop = True
                                break
            return 0
        finally:
            self._shutdown()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in previous.items():
                signal.signal(s, h)
            os.close(rpipe)
            os.close(wpipe)

    def _shutdown(self) -> None:
        self.sd.stopping()
        if self.bgp is not None:  # first: the router moves the flows while this data plane still forwards
            took = self.bgp.stop()
            log(f"bgp: routes withdrawn ({took:.3f} s), forwarded {self.bgp.drain:g} s more; stopping")
        if self.metrics_server is not None:  # metrics: stop serving before the control socket goes
            self.metrics_server.stop()
        if self.manager is not None:
            self.manager.stop()
        self.resolver.stop()
        if self.flowsync is not None:
            self.flowsync.close()
        if self._reload_waiters:
            self.last_reload_error = self.last_reload_error or "stopping before the reload finished"
            self._answer_reload()  # written at once; the control socket closes next
        self.control.close()
        for executor in self.executors:
            self.final_reports.extend(executor.close())
        flush_log(force=True)

    def final_summary(self) -> dict:
        workers = self.final_reports
        merged = merge_reports([w["dispatcher"] for w in workers]) if workers else {}
        engine = merge_reports([w["engine"] for w in workers]) if workers else {}
        return {"dispatcher": merged, "engine": engine}


def run(config_path: str, registry, **kwargs) -> int:
    controller = Controller(config_path, registry, **kwargs)
    code = controller.run()
    summary = controller.final_summary()
    engine = summary.get("engine") or {}
    line = f"stopped: {engine.get('rx', 0)} frames received, {engine.get('tx', 0)} sent"
    if controller.engine == "xdp":
        lost = engine.get("xdp_tx_lost", 0)
        grown = sorted((engine.get("xdp_tx_lost_counters") or {}).items())
        counters = ", ".join(f"{k} +{v}" for k, v in grown)
        line += (f"; XDP: {engine.get('xdp_forwarded', 0)} forwarded in the kernel, "
                 f"{lost} lost by the driver{f' ({counters})' if lost and counters else ''}, "
                 f"{engine.get('xdp_passed', 0)} handed up, {engine.get('xdp_dropped', 0)} dropped")
    elif controller.engine == "tc":
        line += (f"; TC: {engine.get('xdp_forwarded', 0)} forwarded in the kernel, "
                 f"{engine.get('xdp_passed', 0)} handed up, {engine.get('xdp_dropped', 0)} dropped")
    log(line)
    return code


__all__ = ["Controller", "merge_reports", "run"]
